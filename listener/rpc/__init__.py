"""Internal: Sippet's HTTP RPC (the client and the catalog of actions).

Plugin authors import from :mod:`listener`, never from here.
"""
