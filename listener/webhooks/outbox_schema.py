"""The outbox file's schema, its migrations, and the longer queries.

The schema (``PRAGMA user_version`` = 2; a file is brought up to it by each step of
``MIGRATIONS`` it has not had, in order, so a new file and an old one end up alike)::

    deliveries    seq PK (enqueue order), destination, msg_id, event, call_key, body,
                  created_at, due_at, attempts, last_attempt_at, last_status, last_error;
                  UNIQUE (destination, msg_id)
    dead_letters  the same columns plus dead_at and reason
                  ("exhausted", "max_pending", "max_age")
    destinations  name PK, disabled_at, disabled_reason (a row exists once it was disabled)
    delivered     id PK (delivery order), seq, destination, msg_id, event, call_key, body,
                  created_at, attempts, delivered_at; UNIQUE (destination, msg_id)   [v2]
    attempts      id PK (record order), destination, msg_id, at, latency, status,
                  error_class, error, answer (its first 1 KiB), probe, counted        [v2]
"""

from __future__ import annotations

import json
from collections.abc import Collection

__all__ = [
    "BURY",
    "COUNT_REPLAYABLE",
    "DELETE_REPLAYED",
    "DELIVER",
    "INSERT_ATTEMPTS",
    "MIGRATIONS",
    "PRUNE",
    "REPLAY",
    "SCHEMA_VERSION",
    "SELECT_ATTEMPTS",
    "SELECT_DEAD",
    "SELECT_DUE",
    "SELECT_NEXT_DUE",
    "eligible_params",
    "filter_params",
]

# Version 1, as it was released: files on users' disks have exactly this.
_SCHEMA_V1 = """
CREATE TABLE deliveries (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    destination     TEXT    NOT NULL,
    msg_id          TEXT    NOT NULL,
    event           TEXT    NOT NULL,
    call_key        TEXT,
    body            BLOB    NOT NULL,
    created_at      REAL    NOT NULL,
    due_at          REAL    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_attempt_at REAL,
    last_status     INTEGER,
    last_error      TEXT,
    UNIQUE (destination, msg_id)
);
CREATE INDEX deliveries_due ON deliveries (destination, due_at);
CREATE INDEX deliveries_call ON deliveries (destination, call_key, seq)
    WHERE call_key IS NOT NULL;
CREATE TABLE dead_letters (
    seq             INTEGER PRIMARY KEY,
    destination     TEXT    NOT NULL,
    msg_id          TEXT    NOT NULL,
    event           TEXT    NOT NULL,
    call_key        TEXT,
    body            BLOB    NOT NULL,
    created_at      REAL    NOT NULL,
    attempts        INTEGER NOT NULL,
    last_attempt_at REAL,
    last_status     INTEGER,
    last_error      TEXT,
    dead_at         REAL    NOT NULL,
    reason          TEXT    NOT NULL,
    UNIQUE (destination, msg_id)
);
CREATE INDEX dead_letters_created ON dead_letters (destination, created_at);
CREATE TABLE destinations (
    name            TEXT PRIMARY KEY,
    disabled_at     REAL,
    disabled_reason TEXT
) WITHOUT ROWID;
"""
# Version 2: delivered rows are kept (replays by time), every attempt is on record. Both are
# keyed by an id in the order rows are written, so that pruning walks the oldest from the
# start of the table instead of needing a time index that every insert would pay for.
_V1_TO_V2 = """
CREATE TABLE delivered (
    id              INTEGER PRIMARY KEY,
    seq             INTEGER NOT NULL,
    destination     TEXT    NOT NULL,
    msg_id          TEXT    NOT NULL,
    event           TEXT    NOT NULL,
    call_key        TEXT,
    body            BLOB    NOT NULL,
    created_at      REAL    NOT NULL,
    attempts        INTEGER NOT NULL,
    delivered_at    REAL    NOT NULL,
    UNIQUE (destination, msg_id)
);
CREATE TABLE attempts (
    id              INTEGER PRIMARY KEY,
    destination     TEXT    NOT NULL,
    msg_id          TEXT    NOT NULL,
    at              REAL    NOT NULL,
    latency         REAL    NOT NULL,
    status          INTEGER,
    error_class     TEXT,
    error           TEXT    NOT NULL,
    answer          BLOB    NOT NULL,
    probe           INTEGER NOT NULL,
    counted         INTEGER NOT NULL
);
CREATE INDEX attempts_msg ON attempts (msg_id);
"""
# Step n takes a file from version n to n + 1; a new file (version 0) takes them all.
MIGRATIONS = (_SCHEMA_V1, _V1_TO_V2)
SCHEMA_VERSION = len(MIGRATIONS)

# In the field order of the row classes (:mod:`.outbox_rows`), which are built from them by
# position.
_DELIVERY_COLUMNS = "seq, destination, msg_id, event, call_key, body, created_at, due_at, attempts"
_DEAD_COLUMNS = (
    "seq, destination, msg_id, event, call_key, body, created_at, attempts, last_status,"
    " last_error, dead_at, reason"
)
_ATTEMPT_COLUMNS = (
    "destination, msg_id, at, latency, status, error_class, error, answer, probe, counted"
)

# Queries are assembled from the module's own constants (S608 is silenced for that reason only);
# every value travels as a parameter.

# A row is eligible when no in-flight attempt holds it and, under per-call ordering, no earlier
# delivery of the same call to the same destination is still pending.
_ELIGIBLE = """
    d.destination = :destination
    AND d.msg_id NOT IN (SELECT value FROM json_each(:exclude))
    AND (:per_call = 0 OR d.call_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM deliveries AS e
        WHERE e.destination = d.destination AND e.call_key = d.call_key AND e.seq < d.seq))
"""
SELECT_DUE = (
    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries AS d WHERE {_ELIGIBLE}"  # noqa: S608
    " AND d.due_at <= :now ORDER BY d.due_at, d.seq LIMIT :limit"
)
# Not MIN(): with the extra conditions that would read every row; this walks the index.
SELECT_NEXT_DUE = (
    f"SELECT d.due_at FROM deliveries AS d WHERE {_ELIGIBLE}"  # noqa: S608
    " ORDER BY d.due_at LIMIT 1"
)

BURY = """
INSERT OR REPLACE INTO dead_letters (
    seq, destination, msg_id, event, call_key, body, created_at, attempts, last_attempt_at,
    last_status, last_error, dead_at, reason)
SELECT seq, destination, msg_id, event, call_key, body, created_at,
    COALESCE(:attempts, attempts), IIF(:attempts IS NULL, last_attempt_at, :now),
    COALESCE(:status, last_status), COALESCE(:error, last_error), :now, :reason
FROM deliveries WHERE destination = :destination AND msg_id = :msg_id
"""

# Filters shared by listing and replaying dead and delivered rows; a NULL parameter means
# "any". Times are the event's (when it was enqueued), so a range selects what users expect.
_FILTER = """
    (:destination IS NULL OR destination = :destination)
    AND (:since IS NULL OR created_at >= :since)
    AND (:until IS NULL OR created_at < :until)
    AND (:msg_ids IS NULL OR msg_id IN (SELECT value FROM json_each(:msg_ids)))
"""
SELECT_DEAD = (
    f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE {_FILTER}"  # noqa: S608
    " ORDER BY seq LIMIT :limit"
)
# What replay reads from, by the name users give it.
_REPLAY_TABLES = {"dead": "dead_letters", "delivered": "delivered"}
REPLAY = {
    source: f"""
INSERT OR IGNORE INTO deliveries (
    seq, destination, msg_id, event, call_key, body, created_at, due_at, attempts)
SELECT seq, destination, msg_id, event, call_key, body, created_at, :now, 0
FROM {table} WHERE {_FILTER}
"""  # noqa: S608
    for source, table in _REPLAY_TABLES.items()
}
DELETE_REPLAYED = {
    source: f"DELETE FROM {table} WHERE {_FILTER}"  # noqa: S608
    for source, table in _REPLAY_TABLES.items()
}
COUNT_REPLAYABLE = {
    source: f"SELECT COUNT(*) FROM {table} WHERE {_FILTER}"  # noqa: S608
    for source, table in _REPLAY_TABLES.items()
}
DELIVER = """
INSERT OR REPLACE INTO delivered (
    seq, destination, msg_id, event, call_key, body, created_at, attempts, delivered_at)
SELECT seq, destination, msg_id, event, call_key, body, created_at, attempts, ?
FROM deliveries WHERE destination = ? AND msg_id = ?
"""
INSERT_ATTEMPTS = (
    f"INSERT INTO attempts ({_ATTEMPT_COLUMNS})"  # noqa: S608
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_ATTEMPTS = (
    f"SELECT {_ATTEMPT_COLUMNS} FROM attempts"  # noqa: S608
    " WHERE msg_id = ? ORDER BY at, id"
)
# Rows go in id order, oldest first, at most :limit a call so that a file left unpruned for
# days does not hold the outbox thread in one long delete. Ids follow the order rows were
# written, times the attempts': an attempt that took its whole timeout is written after later
# ones, so the walk may keep a row up to one timeout past the cut-off.
PRUNE = {
    table: f"""
DELETE FROM {table} WHERE id < MIN(
    COALESCE(
        (SELECT id FROM {table} WHERE {column} >= :before ORDER BY id LIMIT 1),
        (SELECT MAX(id) + 1 FROM {table})),
    (SELECT MIN(id) FROM {table}) + :limit)
"""  # noqa: S608
    for table, column in (("attempts", "at"), ("delivered", "delivered_at"))
}


def eligible_params(
    destination: str, exclude: Collection[str], per_call: bool
) -> dict[str, object]:
    """Return the parameters of the ``_ELIGIBLE`` clause."""
    return {
        "destination": destination,
        "exclude": json.dumps(list(exclude)),
        "per_call": int(per_call),
    }


def filter_params(
    destination: str | None,
    since: float | None,
    until: float | None,
    msg_ids: Collection[str] | None,
) -> dict[str, object]:
    """Return the parameters of the ``_FILTER`` clause."""
    return {
        "destination": destination,
        "since": since,
        "until": until,
        "msg_ids": None if msg_ids is None else json.dumps(list(msg_ids)),
    }
