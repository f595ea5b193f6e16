"""The call map, the handled lifecycle ids and the last moment seen, in one SQLite file.

What must outlive the process: the call map (so that a late event does not reopen a call
ended before a restart, and reconciliation knows what was already seen), the ids of the
lifecycle events already handled (so that none is handled twice, whatever the restarts), and
the last moment until which the daemon had missed nothing (so that the next start knows how
long it was away: from then on is a gap to reconcile).

Pure storage: no asyncio, no clock (callers pass ``now``). Writes come in batches, one
transaction each (:meth:`CallStore.save`), into a WAL journal (see
:class:`~listener.core.sqlite.Database`): a commit costs a write of the log and no fsync.

The schema (``PRAGMA user_version`` = 3)::

    calls          call_key PK, status, last_event_at, from_number, to_number,
                   started_at, answered_at, ended_at, origins (JSON: status -> origin),
                   handled (bits: the lifecycle events handed on, since version 3)
    handled        id PK, handled_at
    handled_calls  (call_key, name) PK, handled_at   (since version 2)
    moments        name PK (``last_seen``), at

A lifecycle event handed on is a bit of its call's row when the batch writes that row (the
common case: the event changed the call), else a ``handled_calls`` row. No other index: a
batch writes a row per call changed and per id handed on, and each index would cost every
one of them a B-tree insert, for a prune that runs once an hour.
"""

from __future__ import annotations

import json
import operator
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from listener.calls.state import CallRecord, Origin, Status, shared_origins
from listener.core.errors import ListenerError
from listener.core.sqlite import Database

__all__ = [
    "SCHEMA_VERSION",
    "CallReader",
    "CallStore",
    "StoreError",
    "by_call_key",
    "record_row",
    "row_record",
    "store_path",
]

_SCHEMA: Final = (
    """CREATE TABLE calls (
        call_key      TEXT PRIMARY KEY,
        status        TEXT NOT NULL,
        last_event_at REAL NOT NULL,
        from_number   TEXT,
        to_number     TEXT,
        started_at    REAL,
        answered_at   REAL,
        ended_at      REAL,
        origins       TEXT NOT NULL
    ) WITHOUT ROWID""",
    "CREATE TABLE handled (id TEXT PRIMARY KEY, handled_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE moments (name TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID",
)
# Version 2: the lifecycle events handed on, by call and event name. Their ids are a hash of
# those two (listener.core.ids.lifecycle_id): a row per id made the batch hash each one
# (2.4 µs of its ~5 µs per lifecycle event, `python -m bench.callcost`'s `read id`) and each
# start hash four per stored call to match them back. The ``handled`` table keeps the ids
# that are not the rule's, and those written by version 1.
_HANDLED_CALLS: Final = (
    """CREATE TABLE handled_calls (
        call_key   TEXT NOT NULL,
        name       TEXT NOT NULL,
        handled_at REAL NOT NULL,
        PRIMARY KEY (call_key, name)
    ) WITHOUT ROWID""",
)
# Version 3: the lifecycle events handed on of a call the batch writes are bits of its row.
# A row per event made the store's part 3.4-4.3 µs per lifecycle event of the drain stream,
# the bits 1.9-2.1 (bench.callcost; three B-tree inserts per call fewer, and the batch is
# what the loop competes with: bench/README.md, "The call store's batch and the p99"). Rows
# of version 2 stay where they are, and are read as before.
_HANDLED_BITS_COLUMN: Final = ("ALTER TABLE calls ADD COLUMN handled INTEGER NOT NULL DEFAULT 0",)
_MIGRATIONS: Final = (_SCHEMA, _HANDLED_CALLS, _HANDLED_BITS_COLUMN)
SCHEMA_VERSION: Final = len(_MIGRATIONS)
# The first files had an index on each table's time, for the hourly prune alone. Every row a
# batch writes paid for it (one more B-tree insert, at a random place for a call replaced):
# without them a batch costs half (3.5 -> 2.1 µs per event of the drain stream into an
# empty store, 8.5 -> 4.3 µs into one holding 100,000 calls), and a prune scans the tables,
# once an hour, on the worker thread. Same schema version: the rows are the same.
_DROPPED_INDEXES: Final = ("calls_last_event", "handled_at")
_CALL_COLUMNS: Final = (
    "call_key, status, last_event_at, from_number, to_number, started_at, answered_at,"
    " ended_at, origins"
)
# Assembled from the module's own constants only (hence the S608 silences); values travel as
# parameters.
# A later batch carries only its own events' bits: replacing the row would forget those of
# earlier batches, and their events would be handed on again after a restart.
_UPSERT_CALL: Final = (
    f"INSERT INTO calls ({_CALL_COLUMNS}, handled) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
    " ON CONFLICT (call_key) DO UPDATE SET status = excluded.status,"
    " last_event_at = excluded.last_event_at, from_number = excluded.from_number,"
    " to_number = excluded.to_number, started_at = excluded.started_at,"
    " answered_at = excluded.answered_at, ended_at = excluded.ended_at,"
    " origins = excluded.origins, handled = handled | excluded.handled"
)
# The bit of each lifecycle event in a call's ``handled`` (stored: never renumber).
_BITS: Final = {
    "incoming_call": 1,
    "call_answered": 2,
    "call_ended": 4,
    "call_transcript_completed": 8,
}
_SELECT_CALLS: Final = f"SELECT {_CALL_COLUMNS} FROM calls"  # noqa: S608


def store_path(state_dir: Path) -> Path:
    """Where the daemon keeps its call store under ``service.state_dir``."""
    return state_dir / "calls.sqlite3"


class StoreError(ListenerError):
    """The call store could not be opened, read or written (the message says why)."""


class CallStore(Database):
    """The store in one SQLite file, created on first open.

    Use it from one thread at a time. Every method raises :class:`StoreError` when SQLite
    fails (a lock held past ``busy_timeout``, a full disk, a corrupt file); anything else
    is a bug.

    Args:
        path: the database file; its directory must exist.
        busy_timeout: seconds to wait for another connection's write lock.

    Raises:
        StoreError: the file cannot be opened or was written by a newer schema version.
    """

    what = "call store"
    error = StoreError
    migrations = _MIGRATIONS

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        super().__init__(path, busy_timeout=busy_timeout)
        self.path = Path(path)
        try:
            with self.translated("open"), self.transaction():
                for index in _DROPPED_INDEXES:
                    self.conn.execute(f"DROP INDEX IF EXISTS {index}")
        except BaseException:
            self.close()
            raise

    def save(
        self,
        now: float,
        *,
        calls: Iterable[CallRecord] = (),
        handled: Iterable[str] = (),
        handled_calls: Iterable[tuple[str, str]] = (),
        seen_until: float | None = None,
    ) -> None:
        """Write a batch in one transaction: calls (replacing what was stored of them, the
        lifecycle events handed on of each added to its row's), ids
        and lifecycle events (call key, event name) newly handled at ``now`` (one already
        stored keeps its time) and, when given, ``seen_until`` as the last moment until which
        nothing was missed."""
        # In key order: B-tree inserts at random keys (call keys and ids are hashes and
        # UUIDs) touched a page apart each, sorted ones go page by page. 30,000 ids into an
        # empty table: 3.9 -> 1.8 µs each; into one holding 300,000: 9.4 -> 4.6 µs.
        ordered = sorted(calls, key=by_call_key)
        bits = dict.fromkeys(map(by_call_key, ordered), 0)
        rows: list[tuple[str, str]] = []
        for key, name in handled_calls:
            bit = _BITS.get(name, 0)
            if bit and key in bits:
                bits[key] |= bit
            else:
                rows.append((key, name))
        with self.translated("save"), self.transaction():
            # The bits concatenated, not the row unpacked into another tuple (200-260
            # instructions fewer a row, callgrind). With the origins' JSON by identity: the
            # batch's rows 2,140 -> 1,270 and its save 9,920 -> 8,840 instructions per event
            # of the drain stream (bench/README.md, "The call map's cost on the hot path,
            # second pass").
            self.conn.executemany(
                _UPSERT_CALL,
                (record_row(record) + (bits[record.call_key],) for record in ordered),  # noqa: RUF005
            )
            self.conn.executemany(
                "INSERT OR IGNORE INTO handled (id, handled_at) VALUES (?, ?)",
                ((msg_id, now) for msg_id in sorted(handled)),
            )
            self.conn.executemany(
                "INSERT OR IGNORE INTO handled_calls (call_key, name, handled_at) VALUES (?, ?, ?)",
                ((key, name, now) for key, name in sorted(rows)),
            )
            if seen_until is not None:
                self.conn.execute(
                    "INSERT OR REPLACE INTO moments (name, at) VALUES ('last_seen', ?)",
                    (seen_until,),
                )

    def calls(self, since: float | None = None) -> list[CallRecord]:
        """Return every stored call, or with ``since`` the open ones and those ended whose
        last event came at ``since`` or later."""
        with self.translated("read"):
            if since is None:
                rows = self.conn.execute(_SELECT_CALLS).fetchall()
            else:
                rows = self.conn.execute(
                    _SELECT_CALLS + " WHERE status != 'ended' OR last_event_at >= ?", (since,)
                ).fetchall()
        return [row_record(row) for row in rows]

    def handled_ids(self) -> set[str]:
        """Return the ids of every event stored as handled."""
        with self.translated("read"):
            return {msg_id for (msg_id,) in self.conn.execute("SELECT id FROM handled")}

    def handled_calls(self, since: float | None = None) -> list[tuple[str, str]]:
        """Return every lifecycle event stored as handled, as (call key, event name); with
        ``since``, only those of the calls :meth:`calls` returns for it and of calls not
        stored. One may come twice (a version-2 row and its call's bit): callers take them
        as a set."""
        with self.translated("read"):
            if since is None:
                rows = list(self.conn.execute("SELECT call_key, name FROM handled_calls"))
                marked = self.conn.execute("SELECT call_key, handled FROM calls WHERE handled")
            else:
                rows = list(
                    self.conn.execute(
                        "SELECT h.call_key, h.name FROM handled_calls AS h"
                        " LEFT JOIN calls AS c ON c.call_key = h.call_key"
                        " WHERE c.call_key IS NULL OR c.status != 'ended'"
                        " OR c.last_event_at >= ?",
                        (since,),
                    )
                )
                marked = self.conn.execute(
                    "SELECT call_key, handled FROM calls WHERE handled"
                    " AND (status != 'ended' OR last_event_at >= ?)",
                    (since,),
                )
            rows.extend((key, name) for key, handled in marked for name in _names(handled))
        return rows

    def last_seen(self) -> float | None:
        """Return the last ``seen_until`` that :meth:`save` wrote, or None when none was."""
        with self.translated("read"):
            row = self.conn.execute("SELECT at FROM moments WHERE name = 'last_seen'").fetchone()
        return None if row is None else float(row[0])

    def ended_keys(self) -> list[str]:
        """Return the keys of every stored call that ended."""
        with self.translated("read"):
            rows = self.conn.execute("SELECT call_key FROM calls WHERE status = 'ended'")
            return [key for (key,) in rows]

    def prune(self, before: float) -> int:
        """Forget the calls whose last event, and the ids handled, before ``before`` (a
        call's lifecycle events handed on go with its row).

        Returns:
            How many calls were forgotten.
        """
        with self.translated("prune"), self.transaction():
            forgotten = self.conn.execute("DELETE FROM calls WHERE last_event_at < ?", (before,))
            self.conn.execute("DELETE FROM handled WHERE handled_at < ?", (before,))
            self.conn.execute("DELETE FROM handled_calls WHERE handled_at < ?", (before,))
        return forgotten.rowcount


class CallReader:
    """Reads single calls back from the store, on the event loop's own thread, through a
    connection of its own (WAL lets it read while the persister's thread writes).

    What the call map let go of is read back here (:class:`~listener.calls.state.Archive`):
    a primary-key lookup, tens of µs, for the rare late event of a call ended a while ago.

    Raises:
        StoreError: the file cannot be opened.
    """

    def __init__(self, path: Path) -> None:
        try:
            self.conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"call store open failed: {exc}") from exc

    def call(self, call_key: str) -> CallRecord | None:
        """Return the stored call, or None.

        Raises:
            StoreError: SQLite failed.
        """
        try:
            row = self.conn.execute(_SELECT_CALLS + " WHERE call_key = ?", (call_key,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"call store read failed: {exc}") from exc
        return None if row is None else row_record(row)

    def calls(self) -> list[CallRecord]:
        """Return every stored call (``sippet-listener calls``: read only, so that a newer
        install's command never migrates the file of a running older daemon, which could
        then not start again).

        Raises:
            StoreError: SQLite failed.
        """
        try:
            return [row_record(row) for row in self.conn.execute(_SELECT_CALLS).fetchall()]
        except sqlite3.Error as exc:
            raise StoreError(f"call store read failed: {exc}") from exc

    def handled(self, ids: Sequence[str]) -> set[str]:
        """Return which of ``ids`` are stored as handled.

        Raises:
            StoreError: SQLite failed.
        """
        marks = ", ".join("?" * len(ids))
        try:
            rows = self.conn.execute(f"SELECT id FROM handled WHERE id IN ({marks})", ids)  # noqa: S608
            return {msg_id for (msg_id,) in rows}
        except sqlite3.Error as exc:
            raise StoreError(f"call store read failed: {exc}") from exc

    def handled_names(self, call_key: str) -> set[str]:
        """Return the names of the call's lifecycle events stored as handled.

        Raises:
            StoreError: SQLite failed.
        """
        try:
            rows = self.conn.execute(
                "SELECT name FROM handled_calls WHERE call_key = ?", (call_key,)
            )
            names = {name for (name,) in rows}
            for (handled,) in self.conn.execute(
                "SELECT handled FROM calls WHERE call_key = ?", (call_key,)
            ):
                names.update(_names(handled))
            return names
        except sqlite3.Error as exc:
            raise StoreError(f"call store read failed: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


# In C: a Python key function was a frame per call, twice per row of a batch.
by_call_key: Final = operator.attrgetter("call_key")
# The origins' JSON by the identity of the shared mapping (listener.calls.state's: 26 or so,
# alive as long as the process, so no other object takes their ids), where a tuple of the
# items and an lru_cache lookup hashed and compared it: 5,870 -> 3,310 instructions a row.
_ORIGINS_JSON: dict[int, tuple[Mapping[Status, Origin], str]] = {}


def _names(handled: int) -> list[str]:
    """The lifecycle events a call's ``handled`` bits say were handed on."""
    return [name for name, bit in _BITS.items() if handled & bit]


def _origins_json(origins: Mapping[Status, Origin]) -> str:
    """``json.dumps(dict(origins))``, made once per distinct value (statuses x origins: a
    handful; json.dumps took 1.9 µs a row), for :func:`record_row` (which looks it up by
    identity first)."""
    shared = shared_origins(origins)
    known = _ORIGINS_JSON.get(id(shared))
    if known is None:
        # setdefault: the store's thread and the follower's may both make one.
        known = _ORIGINS_JSON.setdefault(id(shared), (shared, json.dumps(dict(shared))))
    return known[1]


def record_row(record: CallRecord) -> tuple[object, ...]:
    """A call as the store's row (the shared store's too): its fields, origins as JSON."""
    origins = record.origins
    known = _ORIGINS_JSON.get(id(origins))
    return (
        record.call_key,
        record.status,
        record.last_event_at,
        record.from_number,
        record.to_number,
        record.started_at,
        record.answered_at,
        record.ended_at,
        known[1] if known is not None and known[0] is origins else _origins_json(origins),
    )


def row_record(row: Any) -> CallRecord:
    """A row of :func:`record_row`'s columns read back as a call."""
    key, status, last_event_at, from_number, to_number, started, answered, ended, origins = row
    return CallRecord(
        key,
        status,
        last_event_at,
        from_number,
        to_number,
        started,
        answered,
        ended,
        shared_origins(json.loads(origins)),
    )
