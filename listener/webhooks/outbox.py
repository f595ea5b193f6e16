"""The durable webhook outbox: pending deliveries, dead letters and disabled destinations.

Pure storage over one SQLite file: no HTTP, no asyncio, no clock (every method that needs the
time takes ``now``, seconds since the epoch). The delivery engine (:mod:`.forwarder`)
drives it from a single thread of its own (:mod:`.store`); the CLI opens the same file from
another process while the daemon runs. WAL journaling lets that reader/writer pair proceed
without blocking each other for long, and ``busy_timeout`` makes a writer wait for the other's
commit instead of failing.

Theory of operation. A delivery is one event for one destination. It is inserted before its
first attempt and moved to ``delivered`` once a 2xx answer arrives; until then it is *pending*.
A failed attempt reschedules it; when its retry schedule is exhausted, or the outbox bound for
its destination is exceeded, it moves to ``dead_letters``. :meth:`Outbox.replay` moves dead or
delivered ones back to pending. Its ``msg_id`` (the Standard Webhooks ``webhook-id``) never
changes along the way, and it is in exactly one of the three tables. Every attempt is recorded
in ``attempts``; those and the delivered rows are kept for a retention period
(:meth:`Outbox.prune`), dead letters until replayed.

Nothing here marks a row as "being attempted": one process delivers from a file, and it keeps
the ids of its in-flight rows in memory and passes them as ``exclude``. After a crash nothing is
stranded: every pending row is simply due again.

The schema (``PRAGMA user_version`` = 2; a file is brought up to it by each step of
``_MIGRATIONS`` it has not had, in order, so a new file and an old one end up alike)::

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

import contextlib
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Concatenate, Literal, ParamSpec, TypeVar

from listener.core.errors import ListenerError

__all__ = [
    "SCHEMA_VERSION",
    "Attempt",
    "Claim",
    "DeadLetter",
    "Delivery",
    "DestinationStats",
    "NewDelivery",
    "Outbox",
    "OutboxError",
    "ReplaySource",
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
_MIGRATIONS = (_SCHEMA_V1, _V1_TO_V2)
SCHEMA_VERSION = len(_MIGRATIONS)

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
_SELECT_DUE = (
    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries AS d WHERE {_ELIGIBLE}"  # noqa: S608
    " AND d.due_at <= :now ORDER BY d.due_at, d.seq LIMIT :limit"
)
# Not MIN(): with the extra conditions that would read every row; this walks the index.
_SELECT_NEXT_DUE = (
    f"SELECT d.due_at FROM deliveries AS d WHERE {_ELIGIBLE}"  # noqa: S608
    " ORDER BY d.due_at LIMIT 1"
)

_BURY = """
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
_SELECT_DEAD = (
    f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE {_FILTER}"  # noqa: S608
    " ORDER BY seq LIMIT :limit"
)
# What replay reads from, by the name users give it.
_REPLAY_TABLES = {"dead": "dead_letters", "delivered": "delivered"}
_REPLAY = {
    source: f"""
INSERT OR IGNORE INTO deliveries (
    seq, destination, msg_id, event, call_key, body, created_at, due_at, attempts)
SELECT seq, destination, msg_id, event, call_key, body, created_at, :now, 0
FROM {table} WHERE {_FILTER}
"""  # noqa: S608
    for source, table in _REPLAY_TABLES.items()
}
_DELETE_REPLAYED = {
    source: f"DELETE FROM {table} WHERE {_FILTER}"  # noqa: S608
    for source, table in _REPLAY_TABLES.items()
}
_COUNT_REPLAYABLE = {
    source: f"SELECT COUNT(*) FROM {table} WHERE {_FILTER}"  # noqa: S608
    for source, table in _REPLAY_TABLES.items()
}
_DELIVER = """
INSERT OR REPLACE INTO delivered (
    seq, destination, msg_id, event, call_key, body, created_at, attempts, delivered_at)
SELECT seq, destination, msg_id, event, call_key, body, created_at, attempts, ?
FROM deliveries WHERE destination = ? AND msg_id = ?
"""
# Rows go in id order, oldest first, at most :limit a call so that a file left unpruned for
# days does not hold the outbox thread in one long delete. Ids follow the order rows were
# written, times the attempts': an attempt that took its whole timeout is written after later
# ones, so the walk may keep a row up to one timeout past the cut-off.
_PRUNE = {
    table: f"""
DELETE FROM {table} WHERE id < MIN(
    COALESCE(
        (SELECT id FROM {table} WHERE {column} >= :before ORDER BY id LIMIT 1),
        (SELECT MAX(id) + 1 FROM {table})),
    (SELECT MIN(id) FROM {table}) + :limit)
"""  # noqa: S608
    for table, column in (("attempts", "at"), ("delivered", "delivered_at"))
}

_P = ParamSpec("_P")
_R = TypeVar("_R")

ReplaySource = Literal["dead", "delivered"]
_DEAD_ONLY: tuple[ReplaySource, ...] = ("dead",)


class OutboxError(ListenerError):
    """The outbox file could not be opened, read or written (the message says why)."""


def _mapped(
    method: Callable[Concatenate[Outbox, _P], _R],
) -> Callable[Concatenate[Outbox, _P], _R]:
    """Translate sqlite3 errors raised by an :class:`Outbox` method into :class:`OutboxError`."""

    @functools.wraps(method)
    def wrapper(self: Outbox, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {method.__name__} failed: {exc}") from exc

    return wrapper


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A delivery to insert: one event's serialized body for one destination.

    Attributes:
        destination: the destination's name.
        msg_id: the Standard Webhooks message id, also in ``body``; stable for ever.
        event: the event name (for listings; the body is what is sent).
        call_key: the call the event belongs to, for per-call ordering; None if none.
        body: the exact bytes every attempt sends.
        created_at: when the event was enqueued.
        due_at: when the first attempt may start.
    """

    destination: str
    msg_id: str
    event: str
    call_key: str | None
    body: bytes
    created_at: float
    due_at: float


@dataclass(frozen=True, slots=True)
class Delivery:
    """A pending delivery as read back from the outbox.

    ``attempts`` counts the attempts made so far; ``seq`` is the enqueue order.
    """

    seq: int
    destination: str
    msg_id: str
    event: str
    call_key: str | None
    body: bytes
    created_at: float
    due_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class Claim:
    """What a worker gets from :meth:`Outbox.claim`.

    Attributes:
        rows: the due deliveries to attempt now.
        next_due: when the next eligible delivery falls due; None if none is pending.
        evicted: how many deliveries the bound moved to the dead letters, by reason.
    """

    rows: list[Delivery]
    next_due: float | None
    evicted: dict[str, int]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery given up on.

    Attributes:
        last_status: the HTTP status of the last attempt, None if it got no answer.
        last_error: what went wrong last, as a short fact.
        dead_at: when it was moved here.
        reason: ``exhausted`` (retry schedule used up), ``max_pending`` or ``max_age`` (the
            outbox bound pushed it out).
    """

    seq: int
    destination: str
    msg_id: str
    event: str
    call_key: str | None
    body: bytes
    created_at: float
    attempts: int
    last_status: int | None
    last_error: str | None
    dead_at: float
    reason: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt, as recorded.

    Attributes:
        at: when it started, seconds since the epoch.
        latency: seconds until it was answered, or failed.
        status: the HTTP status; None when there was no answer.
        error_class: None for a 2xx, else what kind of failure (see
            :mod:`listener.webhooks.worker`).
        error: the failure as a short fact ("HTTP 503", "timed out after 15 s").
        answer: the first bytes of the answer's body (1 KiB).
        probe: it was the one probe of an unhealthy destination.
        counted: it used up one attempt of the delivery's retry schedule.
    """

    destination: str
    msg_id: str
    at: float
    latency: float
    status: int | None
    error_class: str | None
    error: str
    answer: bytes
    probe: bool
    counted: bool


@dataclass(frozen=True, slots=True)
class DestinationStats:
    """One destination's outbox state.

    Attributes:
        pending: deliveries not yet delivered (including any being attempted right now).
        oldest_age: seconds since the oldest pending delivery was enqueued; None if none.
        failing: pending deliveries that were attempted and failed at least once.
        dead: deliveries in the dead-letter table.
        disabled_at: when the destination was disabled (HTTP 410), None while enabled.
        disabled_reason: why it was disabled.
    """

    name: str
    pending: int
    oldest_age: float | None
    failing: int
    dead: int
    disabled_at: float | None
    disabled_reason: str | None

    @property
    def disabled(self) -> bool:
        """Whether the destination is disabled; its deliveries wait until it is enabled."""
        return self.disabled_at is not None


class Outbox:
    """The outbox stored in one SQLite file, created on first open.

    An ``Outbox`` wraps one connection: use it from one thread at a time (the connection is
    opened with ``check_same_thread=False`` so that a dedicated worker thread may own it).
    Methods are atomic on their own; wrap several in :meth:`transaction` to commit them as
    one. Every method raises :class:`OutboxError` when SQLite fails (a lock held longer than
    ``busy_timeout``, a full disk, a corrupt file); anything else is a bug.

    Args:
        path: the database file; its directory must exist.
        busy_timeout: seconds to wait for another process's write lock before failing.

    Raises:
        OutboxError: the file cannot be opened or was written by a newer schema version.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        try:
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox open failed: {exc}") from exc
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise

    @_mapped
    def _setup(self) -> None:
        """Switch to WAL and create or check the schema."""
        self._conn.execute("PRAGMA journal_mode = WAL")
        # With WAL, NORMAL loses at most the last commits on power loss, never on a crash of
        # this process, and skips an fsync per commit.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        with self.transaction():
            (version,) = self._conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"outbox schema version {version} is newer than this program's"
                    f" ({SCHEMA_VERSION})"
                )
            # One transaction for every step: a file is at its old version or the current one,
            # never half-way.
            for step in _MIGRATIONS[version:]:
                for statement in step.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
            if version < SCHEMA_VERSION:
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection; calling it again does nothing."""
        self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the enclosed calls as one transaction; nested uses join the outer one.

        The write lock is taken at the start (``BEGIN IMMEDIATE``), so a transaction never
        fails half-way because another process wrote first.
        """
        if self._conn.in_transaction:
            yield
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # Pending deliveries.

    @_mapped
    def add(self, deliveries: Iterable[NewDelivery]) -> None:
        """Insert deliveries; one whose (destination, msg_id) is already pending is skipped."""
        self._conn.executemany(
            "INSERT OR IGNORE INTO deliveries"
            " (destination, msg_id, event, call_key, body, created_at, due_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                (d.destination, d.msg_id, d.event, d.call_key, d.body, d.created_at, d.due_at)
                for d in deliveries
            ),
        )

    @_mapped
    def due(
        self,
        destination: str,
        now: float,
        limit: int,
        *,
        exclude: Collection[str] = (),
        per_call: bool = False,
    ) -> list[Delivery]:
        """Return up to ``limit`` deliveries due at ``now``, earliest due first.

        Nothing is returned while the destination is disabled. Rows whose ``msg_id`` is in
        ``exclude`` (the caller's in-flight attempts) are skipped. With ``per_call``, a row is
        skipped while an earlier delivery of the same call to this destination is pending.
        """
        if self.is_disabled(destination):
            return []
        params = _eligible_params(destination, exclude, per_call)
        rows = self._conn.execute(_SELECT_DUE, {**params, "now": now, "limit": limit})
        return [Delivery(*row) for row in rows]

    @_mapped
    def next_due(
        self, destination: str, *, exclude: Collection[str] = (), per_call: bool = False
    ) -> float | None:
        """Return when the next eligible delivery falls due (see :meth:`due`), or None.

        None also while the destination is disabled.
        """
        if self.is_disabled(destination):
            return None
        params = _eligible_params(destination, exclude, per_call)
        row = self._conn.execute(_SELECT_NEXT_DUE, params).fetchone()
        return None if row is None else float(row[0])

    def claim(
        self,
        destination: str,
        now: float,
        limit: int,
        *,
        exclude: Collection[str] = (),
        per_call: bool = False,
        max_pending: int | None = None,
        max_age: float | None = None,
    ) -> Claim:
        """Enforce the outbox bound if one is given (see :meth:`evict`), then return up to
        ``limit`` due deliveries (see :meth:`due`) and when the next one after them falls due.
        """
        evicted: dict[str, int] = {}
        if max_pending is not None or max_age is not None:
            evicted = self.evict(
                destination, now, max_pending=max_pending, max_age=max_age, exclude=exclude
            )
        rows = self.due(destination, now, limit, exclude=exclude, per_call=per_call)
        taken = {*exclude, *(row.msg_id for row in rows)}
        return Claim(rows, self.next_due(destination, exclude=taken, per_call=per_call), evicted)

    @_mapped
    def mark_delivered(self, destination: str, delivered: Collection[tuple[str, float]]) -> None:
        """Move deliveries answered with a 2xx, given as ``(msg_id, when)``, to ``delivered``."""
        with self.transaction():
            self._conn.executemany(
                _DELIVER, ((at, destination, msg_id) for msg_id, at in delivered)
            )
            self._conn.executemany(
                "DELETE FROM deliveries WHERE destination = ? AND msg_id = ?",
                ((destination, msg_id) for msg_id, _ in delivered),
            )

    @_mapped
    def pending_count(self, destination: str) -> int:
        """Return how many deliveries to ``destination`` are pending."""
        (count,) = self._conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE destination = ?", (destination,)
        ).fetchone()
        return int(count)

    # Attempts and what was delivered.

    @_mapped
    def record_attempts(self, attempts: Iterable[Attempt]) -> None:
        """Add attempts to the record."""
        self._conn.executemany(
            f"INSERT INTO attempts ({_ATTEMPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
            (
                (
                    a.destination,
                    a.msg_id,
                    a.at,
                    a.latency,
                    a.status,
                    a.error_class,
                    a.error,
                    a.answer,
                    int(a.probe),
                    int(a.counted),
                )
                for a in attempts
            ),
        )

    @_mapped
    def attempts(self, msg_id: str) -> list[Attempt]:
        """Return the recorded attempts of message ``msg_id``, to any destination, in order."""
        rows = self._conn.execute(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE msg_id = ? ORDER BY at, id",  # noqa: S608
            (msg_id,),
        )
        return [Attempt(*row[:8], *(bool(flag) for flag in row[8:])) for row in rows]

    @_mapped
    def whereabouts(self, destination: str, msg_id: str) -> tuple[str, float | None] | None:
        """Return where a delivery is: ``pending`` (with None), ``dead`` (with when it died) or
        ``delivered`` (with when); None if the outbox does not have it (any more)."""
        row = self._conn.execute(
            "SELECT 'pending', NULL FROM deliveries WHERE destination = :d AND msg_id = :m"
            " UNION ALL SELECT 'dead', dead_at FROM dead_letters"
            " WHERE destination = :d AND msg_id = :m"
            " UNION ALL SELECT 'delivered', delivered_at FROM delivered"
            " WHERE destination = :d AND msg_id = :m",
            {"d": destination, "m": msg_id},
        ).fetchone()
        return None if row is None else (str(row[0]), row[1])

    @_mapped
    def prune(self, before: float, limit: int = 10_000) -> int:
        """Forget attempts and delivered rows written before ``before``, the oldest first and
        at most about ``limit`` of each; return how many rows went."""
        removed = 0
        with self.transaction():
            for statement in _PRUNE.values():
                cursor = self._conn.execute(statement, {"before": before, "limit": limit})
                removed += cursor.rowcount
        return removed

    @_mapped
    def reschedule(
        self,
        destination: str,
        msg_id: str,
        *,
        due_at: float,
        attempts: int,
        attempted_at: float,
        status: int | None,
        error: str,
    ) -> None:
        """Record a failed attempt and when to try next; a row no longer pending is ignored."""
        self._conn.execute(
            "UPDATE deliveries SET due_at = ?, attempts = ?, last_attempt_at = ?,"
            " last_status = ?, last_error = ? WHERE destination = ? AND msg_id = ?",
            (due_at, attempts, attempted_at, status, error, destination, msg_id),
        )

    @_mapped
    def bury(
        self,
        destination: str,
        msg_id: str,
        *,
        now: float,
        reason: str,
        attempts: int | None = None,
        status: int | None = None,
        error: str | None = None,
    ) -> bool:
        """Move a pending delivery to the dead letters; return whether it was pending.

        ``attempts``, ``status`` and ``error`` describe a last attempt, made at ``now``, not yet
        recorded; when None, the row's recorded values are kept.
        """
        params = {
            "destination": destination,
            "msg_id": msg_id,
            "now": now,
            "reason": reason,
            "attempts": attempts,
            "status": status,
            "error": error,
        }
        with self.transaction():
            if self._conn.execute(_BURY, params).rowcount == 0:
                return False
            self._conn.execute(
                "DELETE FROM deliveries WHERE destination = ? AND msg_id = ?",
                (destination, msg_id),
            )
        return True

    @_mapped
    def evict(
        self,
        destination: str,
        now: float,
        *,
        max_pending: int | None = None,
        max_age: float | None = None,
        exclude: Collection[str] = (),
    ) -> dict[str, int]:
        """Enforce the outbox bound: move the oldest pending deliveries to the dead letters.

        Deliveries older than ``max_age`` seconds go first (reason ``max_age``), then the
        oldest ones beyond ``max_pending`` (reason ``max_pending``). Rows in ``exclude`` (being
        attempted) stay, and count towards ``max_pending``.

        Returns:
            How many deliveries were moved, by reason; empty when the bound holds.
        """
        moved: dict[str, int] = {}
        with self.transaction():
            if max_age is not None:
                victims = self._conn.execute(
                    "SELECT msg_id FROM deliveries WHERE destination = ? AND created_at < ?"
                    " AND msg_id NOT IN (SELECT value FROM json_each(?))",
                    (destination, now - max_age, json.dumps(list(exclude))),
                ).fetchall()
                self._bury_all(destination, victims, now, "max_age", moved)
            if max_pending is not None:
                (pending,) = self._conn.execute(
                    "SELECT COUNT(*) FROM deliveries WHERE destination = ?", (destination,)
                ).fetchone()
                victims = self._conn.execute(
                    "SELECT msg_id FROM deliveries WHERE destination = ?"
                    " AND msg_id NOT IN (SELECT value FROM json_each(?)) ORDER BY seq LIMIT ?",
                    (destination, json.dumps(list(exclude)), max(0, pending - max_pending)),
                ).fetchall()
                self._bury_all(destination, victims, now, "max_pending", moved)
        return moved

    def _bury_all(
        self,
        destination: str,
        victims: list[tuple[str]],
        now: float,
        reason: str,
        moved: dict[str, int],
    ) -> None:
        """Bury each listed delivery with ``reason`` and count it in ``moved``."""
        for (msg_id,) in victims:
            self.bury(destination, msg_id, now=now, reason=reason)
        if victims:
            moved[reason] = len(victims)

    # Destinations.

    @_mapped
    def disable(self, destination: str, now: float, reason: str) -> bool:
        """Disable a destination; return False if it already was (its reason is kept)."""
        cursor = self._conn.execute(
            "INSERT INTO destinations (name, disabled_at, disabled_reason) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET disabled_at = excluded.disabled_at,"
            " disabled_reason = excluded.disabled_reason WHERE disabled_at IS NULL",
            (destination, now, reason),
        )
        return cursor.rowcount > 0

    @_mapped
    def enable(self, destination: str) -> bool:
        """Enable a destination again; return False if it was not disabled."""
        cursor = self._conn.execute(
            "UPDATE destinations SET disabled_at = NULL, disabled_reason = NULL"
            " WHERE name = ? AND disabled_at IS NOT NULL",
            (destination,),
        )
        return cursor.rowcount > 0

    @_mapped
    def is_disabled(self, destination: str) -> bool:
        """Return whether the destination is disabled."""
        row = self._conn.execute(
            "SELECT 1 FROM destinations WHERE name = ? AND disabled_at IS NOT NULL",
            (destination,),
        ).fetchone()
        return row is not None

    @_mapped
    def stats(self, now: float, destinations: Iterable[str] = ()) -> list[DestinationStats]:
        """Return the state of every destination named here or present in the file, by name."""
        pending = {
            name: (count, oldest, failing)
            for name, count, oldest, failing in self._conn.execute(
                "SELECT destination, COUNT(*), MIN(created_at), SUM(last_attempt_at IS NOT NULL)"
                " FROM deliveries GROUP BY destination"
            )
        }
        dead = dict(
            self._conn.execute(
                "SELECT destination, COUNT(*) FROM dead_letters GROUP BY destination"
            ).fetchall()
        )
        disabled = {
            name: (at, reason)
            for name, at, reason in self._conn.execute(
                "SELECT name, disabled_at, disabled_reason FROM destinations"
            )
        }
        names = sorted({*destinations, *pending, *dead, *disabled})
        result = []
        for name in names:
            count, oldest, failing = pending.get(name, (0, None, 0))
            disabled_at, reason = disabled.get(name, (None, None))
            result.append(
                DestinationStats(
                    name=name,
                    pending=count,
                    oldest_age=None if oldest is None else max(0.0, now - oldest),
                    failing=failing,
                    dead=dead.get(name, 0),
                    disabled_at=disabled_at,
                    disabled_reason=reason,
                )
            )
        return result

    # Dead letters.

    @_mapped
    def dead_letters(
        self,
        *,
        destination: str | None = None,
        since: float | None = None,
        msg_ids: Collection[str] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """List dead letters in enqueue order, optionally filtered.

        Args:
            destination: only this destination's.
            since: only deliveries enqueued at or after this time (the event's time, not the
                time it died, so that "since the outage began" selects what users expect).
            msg_ids: only these message ids.
            limit: at most this many, the oldest first.
        """
        params = _filter_params(destination, since, None, msg_ids)
        rows = self._conn.execute(_SELECT_DEAD, {**params, "limit": -1 if limit is None else limit})
        return [DeadLetter(*row) for row in rows]

    @_mapped
    def replay(
        self,
        now: float,
        *,
        sources: Collection[ReplaySource] = _DEAD_ONLY,
        destination: str | None = None,
        since: float | None = None,
        until: float | None = None,
        msg_ids: Collection[str] | None = None,
        dry_run: bool = False,
    ) -> dict[ReplaySource, int]:
        """Move dead letters, delivered rows or both back to pending, due at ``now`` with
        their attempts reset.

        They keep their ``msg_id`` (receivers deduplicate on it) and their place in the
        enqueue order. The filters are those of :meth:`dead_letters`, plus ``until``
        (enqueued before it); none means all.

        Returns:
            How many deliveries were moved back (with ``dry_run``: would be), by source.
        """
        params = _filter_params(destination, since, until, msg_ids)
        if dry_run:
            return {
                source: self._conn.execute(_COUNT_REPLAYABLE[source], params).fetchone()[0]
                for source in sources
            }
        moved: dict[ReplaySource, int] = {}
        with self.transaction():
            for source in sources:
                moved[source] = self._conn.execute(_REPLAY[source], {**params, "now": now}).rowcount
                self._conn.execute(_DELETE_REPLAYED[source], params)
        return moved


def _eligible_params(
    destination: str, exclude: Collection[str], per_call: bool
) -> dict[str, object]:
    """Return the parameters of the ``_ELIGIBLE`` clause."""
    return {
        "destination": destination,
        "exclude": json.dumps(list(exclude)),
        "per_call": int(per_call),
    }


def _filter_params(
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
