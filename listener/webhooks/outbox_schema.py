"""The outbox file's schema, its migrations, and the longer queries.

The schema (``PRAGMA user_version`` = 3; a file is brought up to it by each step of
``MIGRATIONS`` it has not had, in order, so a new file and an old one end up alike)::

    deliveries    seq PK (enqueue order), destination, msg_id, event, call_key, body,
                  created_at, due_at, attempts, last_attempt_at, last_status, last_error;
                  UNIQUE (destination, msg_id); pending while delivered_at is NULL
                  delivered_at, last_latency, last_answer, last_probe: the 2xx    [v3]
    dead_letters  the same columns plus dead_at and reason
                  ("exhausted", "max_pending", "max_age")
    destinations  name PK, disabled_at, disabled_reason (a row exists once it was disabled)
    attempts      id PK (record order), destination, msg_id, at, latency, status,
                  error_class, error, answer (its first 1 KiB), probe, counted        [v2]
                  (from v3 the failed ones; a success is folded into its delivery row)

Version 2 also had ``delivered`` (a copy of each delivered row, body included); version 3
moves those rows back into ``deliveries``, marked delivered.
"""

from __future__ import annotations

import json
from collections.abc import Collection

__all__ = [
    "BURY",
    "COUNT_REPLAYABLE",
    "DELIVER",
    "INSERT_ATTEMPTS",
    "MIGRATIONS",
    "PRUNE",
    "REPLAY",
    "SCHEMA_VERSION",
    "SELECT_ATTEMPTS",
    "SELECT_CANDIDATES",
    "SELECT_DEAD",
    "SELECT_ROWS",
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
# Version 3: a 2xx marks its row delivered in place, with the attempt's facts on the row,
# instead of copying the row with its body into ``delivered``, deleting it and writing an
# attempt. A stand-in without those records took a drain of 5,000 from 3,509 to 4,130/s and
# 268 to 215 µs CPU a delivery, side by side (bench/README.md); with claiming ahead and the
# checkpoint off the commit path, the outbox thread went from 1,112 to about 280 busy
# samples in the same 8 s profile. The indexes that
# serve pending rows only are partial, so a delivered row leaves them and costs no scan.
# ``deliveries_age`` serves ``max_age`` and the gauges (a full scan at 100,000 pending took
# 32-35 ms every 0.5 s; 0.02-0.2 ms through an index); ``deliveries_delivered``, pruning.
# ``delivered_at`` (always NULL there) ends the pending indexes only so that SQLite 3.40 sees
# them as covering the queries that test it: a claim's first look and the gauges then read
# no row.
_V2_TO_V3 = """
ALTER TABLE deliveries ADD COLUMN delivered_at REAL;
ALTER TABLE deliveries ADD COLUMN last_latency REAL;
ALTER TABLE deliveries ADD COLUMN last_answer BLOB;
ALTER TABLE deliveries ADD COLUMN last_probe INTEGER;
INSERT OR IGNORE INTO deliveries (
    seq, destination, msg_id, event, call_key, body, created_at, due_at, attempts,
    delivered_at)
SELECT seq, destination, msg_id, event, call_key, body, created_at, delivered_at, attempts,
    delivered_at
FROM delivered;
DROP TABLE delivered;
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries (destination, due_at, delivered_at)
    WHERE delivered_at IS NULL;
DROP INDEX deliveries_call;
CREATE INDEX deliveries_call ON deliveries (destination, call_key, seq)
    WHERE call_key IS NOT NULL AND delivered_at IS NULL;
CREATE INDEX deliveries_age ON deliveries (destination, created_at, last_attempt_at, delivered_at)
    WHERE delivered_at IS NULL;
CREATE INDEX deliveries_delivered ON deliveries (delivered_at) WHERE delivered_at IS NOT NULL;
"""
# Step n takes a file from version n to n + 1; a new file (version 0) takes them all.
MIGRATIONS = (_SCHEMA_V1, _V1_TO_V2, _V2_TO_V3)
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
# A delivered row's 2xx, in the columns of an attempt.
_SUCCESS_COLUMNS = (
    "destination, msg_id, delivered_at, last_latency, last_status, NULL, '', last_answer,"
    " last_probe, 0"
)

# Queries are assembled from the module's own constants (S608 is silenced for that reason only);
# every value travels as a parameter.

# The pending rows of a destination in due order, as (seq, due_at): the claim's first look,
# from the ``deliveries_due`` index alone. Under per-call ordering a row is skipped while an
# earlier delivery of the same call to this destination is pending.
SELECT_CANDIDATES = {
    False: "SELECT seq, due_at FROM deliveries WHERE destination = :destination"
    " AND delivered_at IS NULL ORDER BY due_at, seq LIMIT :limit",
    True: """
SELECT d.seq, d.due_at FROM deliveries AS d
WHERE d.destination = :destination AND d.delivered_at IS NULL
    AND (d.call_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM deliveries AS e
        WHERE e.destination = d.destination AND e.call_key = d.call_key AND e.seq < d.seq
            AND e.delivered_at IS NULL))
ORDER BY d.due_at, d.seq LIMIT :limit
""",
}
SELECT_ROWS = (
    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries"  # noqa: S608
    " WHERE seq IN (SELECT value FROM json_each(?)) ORDER BY due_at, seq"
)

BURY = """
INSERT OR REPLACE INTO dead_letters (
    seq, destination, msg_id, event, call_key, body, created_at, attempts, last_attempt_at,
    last_status, last_error, dead_at, reason)
SELECT seq, destination, msg_id, event, call_key, body, created_at,
    COALESCE(:attempts, attempts), IIF(:attempts IS NULL, last_attempt_at, :now),
    COALESCE(:status, last_status), COALESCE(:error, last_error), :now, :reason
FROM deliveries WHERE destination = :destination AND msg_id = :msg_id AND delivered_at IS NULL
"""
# The 2xx is the row's last attempt: its facts go on the row, which leaves the pending
# indexes. One UPDATE per success; version 2 paid an INSERT ... SELECT of the whole row into
# ``delivered``, a DELETE and an ``attempts`` row (the bench's figures: bench/README.md).
DELIVER = """
UPDATE deliveries SET delivered_at = :at, last_attempt_at = :at, last_status = :status,
    last_error = NULL, last_latency = :latency, last_answer = :answer, last_probe = :probe
WHERE destination = :destination AND msg_id = :msg_id AND delivered_at IS NULL
"""

# Filters shared by listing and replaying dead and delivered rows; a NULL parameter means
# "any". Times are the event's (when it was enqueued), so a range selects what users expect.
_FILTER = """
    (:destination IS NULL OR destination = :destination)
    AND (:since IS NULL OR created_at >= :since)
    AND (:until IS NULL OR created_at < :until)
    AND (:msg_ids IS NULL OR msg_id IN (SELECT value FROM json_each(:msg_ids)))
"""
_DELIVERED = f"delivered_at IS NOT NULL AND {_FILTER}"
SELECT_DEAD = (
    f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE {_FILTER}"  # noqa: S608
    " ORDER BY seq LIMIT :limit"
)
# Replaying goes through two statements a source: dead letters move back to ``deliveries``
# and leave their table; delivered rows first put their folded 2xx on the attempts' record
# (the timeline keeps it), then become pending again in place.
REPLAY = {
    "dead": (
        f"""
INSERT OR IGNORE INTO deliveries (
    seq, destination, msg_id, event, call_key, body, created_at, due_at, attempts)
SELECT seq, destination, msg_id, event, call_key, body, created_at, :now, 0
FROM dead_letters WHERE {_FILTER}
""",  # noqa: S608
        f"DELETE FROM dead_letters WHERE {_FILTER}",  # noqa: S608
    ),
    "delivered": (
        f"""
INSERT INTO attempts ({_ATTEMPT_COLUMNS})
SELECT {_SUCCESS_COLUMNS} FROM deliveries WHERE last_latency IS NOT NULL AND {_DELIVERED}
""",  # noqa: S608
        f"""
UPDATE deliveries SET delivered_at = NULL, due_at = :now, attempts = 0, last_attempt_at = NULL,
    last_status = NULL, last_error = NULL, last_latency = NULL, last_answer = NULL,
    last_probe = NULL
WHERE {_DELIVERED}
""",  # noqa: S608
    ),
}
COUNT_REPLAYABLE = {
    "dead": f"SELECT COUNT(*) FROM dead_letters WHERE {_FILTER}",  # noqa: S608
    "delivered": f"SELECT COUNT(*) FROM deliveries WHERE {_DELIVERED}",  # noqa: S608
}
INSERT_ATTEMPTS = (
    f"INSERT INTO attempts ({_ATTEMPT_COLUMNS})"  # noqa: S608
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The failures on record and the folded 2xx of a delivered row, in time order (a 2xx last
# among attempts of the same instant). ``deliveries`` is keyed by (destination, msg_id): its
# destinations are found by walking that index (a few steps), not by scanning the rows.
SELECT_ATTEMPTS = f"""
WITH RECURSIVE names (name) AS (
    SELECT MIN(destination) FROM deliveries
    UNION ALL
    SELECT (SELECT MIN(destination) FROM deliveries WHERE destination > name)
    FROM names WHERE name IS NOT NULL)
SELECT * FROM (
    SELECT {_ATTEMPT_COLUMNS}, 0 AS kind, id FROM attempts WHERE msg_id = :msg_id
    UNION ALL
    SELECT {_SUCCESS_COLUMNS}, 1, seq FROM deliveries
    WHERE destination IN (SELECT name FROM names WHERE name IS NOT NULL) AND msg_id = :msg_id
        AND delivered_at IS NOT NULL AND last_latency IS NOT NULL)
ORDER BY 3, kind, id
"""  # noqa: S608
# Oldest first, at most :limit a call so that a file left unpruned for days does not hold the
# outbox thread in one long delete. Attempts go in id order (the order they were written,
# times the attempts': an attempt that took its whole timeout is written after later ones, so
# the walk may keep a row up to one timeout past the cut-off); delivered rows through their
# index.
PRUNE = (
    """
DELETE FROM attempts WHERE id < MIN(
    COALESCE(
        (SELECT id FROM attempts WHERE at >= :before ORDER BY id LIMIT 1),
        (SELECT MAX(id) + 1 FROM attempts)),
    (SELECT MIN(id) FROM attempts) + :limit)
""",
    """
DELETE FROM deliveries WHERE seq IN (
    SELECT seq FROM deliveries WHERE delivered_at < :before ORDER BY delivered_at LIMIT :limit)
""",
)


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
