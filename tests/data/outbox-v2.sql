-- The outbox schema as version 2 wrote it on users' disks (sqlite_master, verbatim).
-- Frozen: migrations are tested against it, so it never follows the code.
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
PRAGMA user_version = 2;
