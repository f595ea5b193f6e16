"""Internal: the realtime link (sans-I/O Phoenix protocol, socket, supervisor, tokens).

Plugin authors import from :mod:`listener`, never from here.
"""
