"""Internal: the call map, its reconciliation with ``list_calls``, and their storage.

Between dispatch and the link: events are merged into the call map before they are
dispatched, and the transitions the link missed are rebuilt from Sippet's own list.
"""
