"""Internal: forwarding events to webhooks (the ``webhook`` handler and its delivery engine).

Plugin authors import from :mod:`listener`, never from here.
"""
