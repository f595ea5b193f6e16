"""Internal: the PostgreSQL store that several instances share (``[store] url``).

Its URL (password kept out of every log line, error and repr), its schema and migrations,
the leader lease for singleton work, and the cluster-wide claims that make each handler run
once per event whichever instance heard it, with the local spool where they wait while the
store does not answer. Below the call map and dispatch: it knows events
and ids, nothing of handlers or calls.
"""
