"""Internal: the handler API, the loader of ``[[handlers]]`` tables and the dispatcher.

Plugin authors import from :mod:`listener`, never from here.
"""
