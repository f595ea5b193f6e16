"""Internal: the running service (config, daemon, systemd, health, command line).

Plugin authors import from :mod:`listener`, never from here.
"""
