"""The durable webhook outbox: pending deliveries, dead letters and disabled destinations.

Pure storage over one SQLite file: no HTTP, no asyncio, no clock (every method that needs the
time takes ``now``, seconds since the epoch). The delivery engine (:mod:`.forwarder`)
drives it from a single thread of its own (:mod:`.store`); the CLI opens the same file from
another process while the daemon runs. WAL journaling lets that reader/writer pair proceed
without blocking each other for long, and ``busy_timeout`` makes a writer wait for the other's
commit instead of failing.

Theory of operation. A delivery is one event for one destination. It is inserted before its
first attempt and deleted once a 2xx answer arrives; until then it is *pending*. A failed
attempt reschedules it; when its retry schedule is exhausted, or the outbox bound for its
destination is exceeded, it moves to ``dead_letters``, from where :meth:`Outbox.replay` moves it
back. Its ``msg_id`` (the Standard Webhooks ``webhook-id``) never changes along the way.

Nothing here marks a row as "being attempted": one process delivers from a file, and it keeps
the ids of its in-flight rows in memory and passes them as ``exclude``. After a crash nothing is
stranded: every pending row is simply due again.

The schema (``PRAGMA user_version`` = 1)::

    deliveries    seq PK (enqueue order), destination, msg_id, event, call_key, body,
                  created_at, due_at, attempts, last_attempt_at, last_status, last_error;
                  UNIQUE (destination, msg_id)
    dead_letters  the same columns plus dead_at and reason
                  ("exhausted", "max_pending", "max_age")
    destinations  name PK, disabled_at, disabled_reason (a row exists once it was disabled)
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
from typing import Concatenate, ParamSpec, TypeVar

from listener.core.errors import ListenerError

__all__ = [
    "SCHEMA_VERSION",
    "Claim",
    "DeadLetter",
    "Delivery",
    "DestinationStats",
    "NewDelivery",
    "Outbox",
    "OutboxError",
]

SCHEMA_VERSION = 1

_SCHEMA = """
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

_DELIVERY_COLUMNS = "seq, destination, msg_id, event, call_key, body, created_at, due_at, attempts"
_DEAD_COLUMNS = (
    "seq, destination, msg_id, event, call_key, body, created_at, attempts, last_status,"
    " last_error, dead_at, reason"
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

# Filters shared by listing and replaying dead letters; a NULL parameter means "any".
_DEAD_FILTER = """
    (:destination IS NULL OR destination = :destination)
    AND (:since IS NULL OR created_at >= :since)
    AND (:msg_ids IS NULL OR msg_id IN (SELECT value FROM json_each(:msg_ids)))
"""
_SELECT_DEAD = (
    f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE {_DEAD_FILTER}"  # noqa: S608
    " ORDER BY seq LIMIT :limit"
)
_REPLAY = f"""
INSERT OR IGNORE INTO deliveries (
    seq, destination, msg_id, event, call_key, body, created_at, due_at, attempts)
SELECT seq, destination, msg_id, event, call_key, body, created_at, :now, 0
FROM dead_letters WHERE {_DEAD_FILTER}
"""  # noqa: S608
_DELETE_DEAD = f"DELETE FROM dead_letters WHERE {_DEAD_FILTER}"  # noqa: S608

_P = ParamSpec("_P")
_R = TypeVar("_R")


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
class DestinationStats:
    """One destination's outbox state.

    Attributes:
        pending: deliveries not yet delivered (including any being attempted right now).
        oldest_age: seconds since the oldest pending delivery was enqueued; None if none.
        failing: pending deliveries that were attempted at least once and failed.
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
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise OutboxError(
                    f"outbox schema version {version} is newer than this program's"
                    f" ({SCHEMA_VERSION})"
                )

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
    def mark_delivered(self, destination: str, msg_ids: Iterable[str]) -> None:
        """Forget deliveries that were answered with a 2xx."""
        self._conn.executemany(
            "DELETE FROM deliveries WHERE destination = ? AND msg_id = ?",
            ((destination, msg_id) for msg_id in msg_ids),
        )

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
                "SELECT destination, COUNT(*), MIN(created_at), SUM(attempts > 0)"
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
        params = _dead_filter_params(destination, since, msg_ids)
        rows = self._conn.execute(_SELECT_DEAD, {**params, "limit": -1 if limit is None else limit})
        return [DeadLetter(*row) for row in rows]

    @_mapped
    def replay(
        self,
        now: float,
        *,
        destination: str | None = None,
        since: float | None = None,
        msg_ids: Collection[str] | None = None,
    ) -> int:
        """Move dead letters back to pending, due at ``now`` with their attempts reset.

        They keep their ``msg_id`` (receivers deduplicate on it) and their place in the
        enqueue order. The filters are those of :meth:`dead_letters`; none means all.

        Returns:
            How many deliveries were moved back.
        """
        params = _dead_filter_params(destination, since, msg_ids)
        with self.transaction():
            moved = self._conn.execute(_REPLAY, {**params, "now": now}).rowcount
            self._conn.execute(_DELETE_DEAD, params)
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


def _dead_filter_params(
    destination: str | None, since: float | None, msg_ids: Collection[str] | None
) -> dict[str, object]:
    """Return the parameters of the ``_DEAD_FILTER`` clause."""
    return {
        "destination": destination,
        "since": since,
        "msg_ids": None if msg_ids is None else json.dumps(list(msg_ids)),
    }
