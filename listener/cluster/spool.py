"""The claims the shared store did not answer, kept on disk until it does.

While PostgreSQL is out of reach an instance cannot tell whether another one took an
(event, handler): running the handler anyway would double it (every instance hears every
event), dropping it would lose it. So it goes here instead, one SQLite file under
``service.state_dir``, and waits: :class:`~listener.cluster.claims.Claims` hands the entries
back, oldest first, once the store answers, and each leaves only after its claim was
answered. A process killed meanwhile finds them again at its next start.

:class:`SpoolFile` is the storage (no asyncio); :class:`Spool` owns it on a thread of its
own, so that the event loop never waits for the disk, and writes what is asked within one
turn of the loop in one transaction.

The schema (``PRAGMA user_version`` = 2)::

    events   id PK, name, topic, payload (JSON), received_at, size, origin
    entries  seq PK (received order), event_id -> events, handler, lease;
             UNIQUE (event_id, handler)

An event is written once whatever the number of its handlers waiting. Step 2 adds::

    marks        (event_id, handler) PK: handled here, not yet marked done in the store
    incarnation  holder PK: the names this file's instance took in the store, at each start
                 whose claims were not given back yet

A mark the store does not take at once is kept here (:meth:`Spool.keep`), so that a kill
while the store is away does not forget it: the handler would run again once its claim
lapsed. The earlier names tell a restarted instance which unfinished claims were its own,
so that it can give them back at once instead of after their lease.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Generic, TypeVar

import orjson
import structlog

from listener.core import metrics
from listener.core.errors import ListenerError
from listener.core.events import Event
from listener.core.sqlite import Database

__all__ = ["SPOOL_FILE", "Mark", "Spool", "SpoolError", "SpoolFile", "Spooled"]

#: The spool's file name under ``service.state_dir``.
SPOOL_FILE: Final = "claims-spool.sqlite3"

_log = structlog.get_logger(__name__)
_T = TypeVar("_T")

_SCHEMA: Final = (
    """CREATE TABLE events (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        topic       TEXT NOT NULL,
        payload     BLOB NOT NULL,
        received_at REAL NOT NULL,
        size        INTEGER NOT NULL,
        origin      TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE entries (
        seq      INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL REFERENCES events (id),
        handler  TEXT NOT NULL,
        lease    REAL NOT NULL,
        UNIQUE (event_id, handler)
    )""",
)
_MARKS: Final = (
    """CREATE TABLE marks (
        event_id TEXT NOT NULL,
        handler  TEXT NOT NULL,
        PRIMARY KEY (event_id, handler)
    ) WITHOUT ROWID""",
    "CREATE TABLE incarnation (holder TEXT PRIMARY KEY) WITHOUT ROWID",
)
_OLDEST: Final = """
SELECT s.seq, s.handler, s.lease, e.name, e.payload, e.topic, e.received_at, e.size, e.id,
       e.origin
FROM entries s JOIN events e ON e.id = s.event_id
ORDER BY s.seq LIMIT ?
"""


class SpoolError(ListenerError):
    """The spool file failed (the message names it)."""


@dataclass(frozen=True, slots=True)
class Spooled:
    """One entry: the event, the handler waiting for it and its lease (the handler's
    timeout), in received order (``seq``)."""

    seq: int
    event: Event
    handler: str
    lease: float


# What one write reports: events added or removed, and per handler, the entries that were
# already there (added twice) or were not (removed twice).
_Written = tuple[int, dict[str, int]]
# A done mark: (event id, handler).
Mark = tuple[str, str]


class SpoolFile(Database):
    """The spool's SQLite file. One thread at a time (see :class:`Database`)."""

    what = "claim spool"
    error = SpoolError
    migrations = (_SCHEMA, _MARKS)

    def add(self, entries: Sequence[tuple[Event, str, float]]) -> _Written:
        """Spool ``entries`` (event, handler, lease) in their order, in one transaction;
        return the events that were new and, per handler, the entries already spooled."""
        new_events = 0
        present: dict[str, int] = {}
        with self.translated("write"), self.transaction():
            for event, handler, lease in entries:
                new_events += self.conn.execute(
                    "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        event.id,
                        event.name,
                        event.topic,
                        orjson.dumps(event.payload),
                        event.received_at,
                        event.size,
                        event.origin,
                    ),
                ).rowcount
                added = self.conn.execute(
                    "INSERT OR IGNORE INTO entries (event_id, handler, lease) VALUES (?, ?, ?)",
                    (event.id, handler, lease),
                ).rowcount
                if not added:
                    present[handler] = present.get(handler, 0) + 1
        return new_events, present

    def remove(self, entries: Sequence[Spooled]) -> _Written:
        """Remove ``entries`` (and the events no entry waits for any more) in one
        transaction; return the events removed and, per handler, the entries already gone."""
        gone: dict[str, int] = {}
        with self.translated("write"), self.transaction():
            for entry in entries:
                if not self.conn.execute(
                    "DELETE FROM entries WHERE seq = ?", (entry.seq,)
                ).rowcount:
                    gone[entry.handler] = gone.get(entry.handler, 0) + 1
            ids = sorted({entry.event.id for entry in entries})
            removed = sum(
                self.conn.execute(
                    "DELETE FROM events WHERE id = ?"
                    " AND NOT EXISTS (SELECT 1 FROM entries WHERE event_id = ?)",
                    (event_id, event_id),
                ).rowcount
                for event_id in ids
            )
        return removed, gone

    def oldest(self, limit: int) -> list[Spooled]:
        """The first ``limit`` entries in received order."""
        with self.translated("read"):
            rows = self.conn.execute(_OLDEST, (limit,)).fetchall()
        return [
            Spooled(
                seq,
                Event.create(
                    name, orjson.loads(payload), topic, received_at, size, id=id_, origin=origin
                ),
                handler,
                lease,
            )
            for seq, handler, lease, name, payload, topic, received_at, size, id_, origin in rows
        ]

    def keep_marks(self, marks: Sequence[Mark]) -> int:
        """Keep ``marks`` until the store has them, in one transaction; return how many
        were not kept already."""
        with self.translated("write"), self.transaction():
            return self.conn.executemany(
                "INSERT OR IGNORE INTO marks VALUES (?, ?)", marks
            ).rowcount

    def drop_marks(self, marks: Sequence[Mark]) -> int:
        """Forget ``marks`` (the store has them); return how many were kept."""
        with self.translated("write"), self.transaction():
            return self.conn.executemany(
                "DELETE FROM marks WHERE event_id = ? AND handler = ?", marks
            ).rowcount

    def kept_marks(self, limit: int) -> list[Mark]:
        """The first ``limit`` marks kept for the store."""
        with self.translated("read"):
            rows = self.conn.execute("SELECT event_id, handler FROM marks LIMIT ?", (limit,))
            return [(event_id, handler) for event_id, handler in rows]

    def succeed(self, holder: str) -> list[str]:
        """Record ``holder`` as this file's instance in the store; return the names of the
        earlier starts whose claims were not given back."""
        with self.translated("write"), self.transaction():
            rows = self.conn.execute("SELECT holder FROM incarnation").fetchall()
            self.conn.execute("INSERT OR IGNORE INTO incarnation VALUES (?)", (holder,))
        return [str(name) for (name,) in rows if name != holder]

    def forget_holders(self, holders: Sequence[str]) -> None:
        """The claims of ``holders`` were given back."""
        with self.translated("write"), self.transaction():
            self.conn.executemany(
                "DELETE FROM incarnation WHERE holder = ?", [(name,) for name in holders]
            )

    def counts(self) -> tuple[int, dict[str, int], int]:
        """The events spooled, the entries per handler, and the marks kept."""
        with self.translated("read"):
            (events,) = self.conn.execute("SELECT count(*) FROM events").fetchone()
            rows = self.conn.execute("SELECT handler, count(*) FROM entries GROUP BY handler")
            entries = dict(rows.fetchall())
            (marks,) = self.conn.execute("SELECT count(*) FROM marks").fetchone()
            return events, entries, marks


def _lock(path: Path) -> int:
    """Lock the spool for this process (released when it ends, however it ends): what it
    holds, and the name it took in the store, are one instance's.

    Raises:
        SpoolError: another process has it (two instances on one ``state_dir``).
    """
    # A file of its own: SQLite's own locks on the database file are POSIX locks, which a
    # flock on a file system that emulates flock with them (NFS) would collide with.
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise SpoolError(f"claim spool: cannot open {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SpoolError(
            f"claim spool {path} is in use by another process: each instance needs a"
            " service.state_dir of its own"
        ) from None
    return fd


class _Batch(Generic[_T]):
    """What is asked within one turn of the loop, written by ``write`` in one job."""

    def __init__(self, write: Callable[[list[_T], asyncio.Future[None]], None]) -> None:
        self._write = write
        self.items: list[_T] = []
        self.written: asyncio.Future[None] | None = None

    def join(self, item: _T) -> asyncio.Future[None]:
        if self.written is None:
            loop = asyncio.get_running_loop()
            self.written = loop.create_future()
            loop.call_soon(self.flush)
        self.items.append(item)
        return self.written

    def flush(self) -> None:
        """Hand what was asked to ``write`` now (nothing if it already went)."""
        if self.written is None:
            return
        self._write(self.items, self.written)
        self.items, self.written = [], None


class Spool:
    """The spool of one instance: its file on a thread of its own, and what is in it.

    Counts are kept in memory (read on every claim); an entry counts from the moment it is
    asked for, so that what arrives next for that handler goes behind it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: SpoolFile | None = None
        self._lock: int | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")
        self.events = 0
        self._entries: dict[str, int] = {}
        self._total = 0
        self._nonempty = asyncio.Event()
        self._adds: _Batch[tuple[Event, str, float]] = _Batch(self._write_adds)
        self._removals: _Batch[Spooled] = _Batch(self._write_removals)
        #: The done marks kept on disk for the store (:meth:`keep`).
        self.marks = 0
        #: The names earlier starts took in the store, their claims not given back yet.
        self.previous_holders: list[str] = []

    async def open(self, holder: str | None = None) -> None:
        """Open (or create) the file, with what an earlier run left in it; with ``holder``
        (this instance's name in the store), record it and read the previous one.

        Raises:
            SpoolError: the file cannot be opened or read.
        """

        def load() -> tuple[SpoolFile, int, dict[str, int], int, list[str]]:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SpoolError(
                    f"claim spool: cannot create {self.path.parent}: {exc.strerror}"
                ) from None
            lock = _lock(self.path)
            try:
                file = SpoolFile(self.path)
            except SpoolError:
                os.close(lock)
                raise
            self._lock = lock
            try:
                previous = [] if holder is None else file.succeed(holder)
                return file, *file.counts(), previous
            except SpoolError:
                file.close()
                self._unlock()
                raise

        self._file, events, entries, marks, self.previous_holders = await self._run(load)
        for handler, count in entries.items():
            self._count(handler, count)
        self._events(events)
        self.marks = marks
        if events:
            _log.warning("claims spooled by an earlier run wait for the store", events=events)
        if marks:
            _log.warning("done marks kept by an earlier run wait for the store", marks=marks)

    async def keep(self, marks: Sequence[Mark]) -> None:
        """Keep ``marks`` on disk until :meth:`drop`; return once they are there.

        Raises:
            SpoolError: they could not be written (they are not kept).
        """
        await self._counted(self._opened().keep_marks, marks, 1)

    async def kept(self, limit: int) -> list[Mark]:
        """The first ``limit`` marks kept."""
        return await self._run(self._opened().kept_marks, limit)

    async def drop(self, marks: Sequence[Mark]) -> None:
        """Forget kept ``marks`` (the store has them).

        Raises:
            SpoolError: the file failed (they stay on disk, and go to the store again,
                which does no harm).
        """
        await self._counted(self._opened().drop_marks, marks, -1)

    async def forget_holders(self, holders: Sequence[str]) -> None:
        """The claims of ``holders`` (earlier starts) were given back.

        Raises:
            SpoolError: the file failed (they are given back again at the next start,
                which finds nothing left to give).
        """
        await self._run(self._opened().forget_holders, holders)
        self.previous_holders = [h for h in self.previous_holders if h not in holders]

    async def _counted(
        self, work: Callable[[Sequence[Mark]], int], marks: Sequence[Mark], sign: int
    ) -> None:
        # The write goes on if its caller is cancelled: its count is taken all the same.
        job = asyncio.get_running_loop().run_in_executor(self._executor, work, marks)

        def count(job: asyncio.Future[int]) -> None:
            if not job.cancelled() and job.exception() is None:
                self.marks += sign * job.result()

        job.add_done_callback(count)
        await asyncio.shield(job)

    @property
    def entries(self) -> int:
        """The (event, handler) entries spooled or being written."""
        return self._total

    def holds(self, handler: str) -> bool:
        """Whether entries for ``handler`` are spooled (what comes next goes behind them)."""
        return bool(self._entries.get(handler))

    async def wait(self) -> None:
        """Wait until something is spooled."""
        await self._nonempty.wait()

    async def add(self, event: Event, handler: str, lease: float) -> None:
        """Spool ``handler``'s turn at ``event``; return once it is on disk.

        Raises:
            SpoolError: it could not be written (it is not spooled).
        """
        self._opened()
        self._count(handler, 1)
        await asyncio.shield(self._adds.join((event, handler, lease)))

    def remove(self, entry: Spooled) -> None:
        """Take ``entry`` out (its claim was answered), in the next write."""
        self._count(entry.handler, -1)
        self._removals.join(entry)

    async def oldest(self, limit: int) -> list[Spooled]:
        """The first ``limit`` entries, after what was asked so far is written."""
        self._adds.flush()
        self._removals.flush()
        return await self._run(self._opened().oldest, limit)

    async def close(self) -> None:
        """Write what was asked, close the file (if it was opened)."""
        if self._file is not None:
            self._adds.flush()
            self._removals.flush()
            await self._run(self._file.close)
            self._file = None
        self._unlock()
        self._executor.shutdown()
        self._events(-self.events)

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _opened(self) -> SpoolFile:
        if self._file is None:
            raise SpoolError(f"claim spool {self.path} is not open")
        return self._file

    def _count(self, handler: str, change: int) -> None:
        self._entries[handler] = self._entries.get(handler, 0) + change
        self._total += change
        if self._total:
            self._nonempty.set()
        else:
            self._nonempty.clear()

    def _events(self, change: int) -> None:
        self.events += change
        metrics.SPOOLED_EVENTS.inc(change)

    def _write_adds(
        self, items: list[tuple[Event, str, float]], written: asyncio.Future[None]
    ) -> None:
        def done(job: asyncio.Future[_Written]) -> None:
            if job.cancelled() or job.exception() is not None:
                for _, handler, _ in items:
                    self._count(handler, -1)
                error = None if job.cancelled() else job.exception()
                if not isinstance(error, SpoolError):
                    # Whatever broke, the dispatcher hears a ListenerError (its handler runs).
                    error = SpoolError(f"claim spool write failed: {error!r}")
                written.set_exception(error)
                # Retrieved here: the callers that asked may all have been cancelled.
                written.exception()
                return
            new_events, present = job.result()
            self._events(new_events)
            for handler, count in present.items():
                self._count(handler, -count)
            written.set_result(None)

        self._submit(SpoolFile.add, items).add_done_callback(done)

    def _write_removals(self, items: list[Spooled], written: asyncio.Future[None]) -> None:
        def done(job: asyncio.Future[_Written]) -> None:
            written.set_result(None)
            if job.cancelled():
                return
            if (error := job.exception()) is not None:
                # They were answered: at the next start they are claimed again and told no.
                _log.error("cannot take answered claims out of the spool", error=str(error))
                return
            removed, gone = job.result()
            self._events(-removed)
            for handler, count in gone.items():
                self._count(handler, count)

        self._submit(SpoolFile.remove, items).add_done_callback(done)

    def _submit(
        self, work: Callable[[SpoolFile, list[_T]], _Written], items: list[_T]
    ) -> asyncio.Future[_Written]:
        loop = asyncio.get_running_loop()
        file = self._file
        if file is None:
            failed: asyncio.Future[_Written] = loop.create_future()
            failed.set_exception(SpoolError(f"claim spool {self.path} is not open"))
            return failed
        return loop.run_in_executor(self._executor, work, file, items)

    async def _run(self, work: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)
