"""The outbox and the one thread that owns its connection, so SQLite never blocks the loop
(nor PostgreSQL: the shared store's outbox runs on such a thread too, :meth:`Store.open_with`).

The WAL is checkpointed off that thread: SQLite's automatic checkpoint runs inside the commit
that crosses 1,000 pages, with an fsync of the database, and was the largest part of the
webhook path's p99 (a commit's p50 0.06 ms, its slowest 1 % 2.0-2.5 ms; bench/README.md).
Here the writer's connection has ``wal_autocheckpoint = 0`` and :class:`_Checkpointer` copies
the WAL back from a second connection on a thread of its own (a ``PASSIVE`` checkpoint runs
beside a writer). The WAL only starts over from its beginning when a write finds it entirely
copied back, which a steady stream of commits rarely allows: so once it passes
:data:`_WRAP_FRAMES`, one ``PASSIVE`` checkpoint runs on the writer's connection, between two
commits, where it completes (with little left to copy), and the next commit starts the WAL
over. The WAL stays within about that size. Bought: with SQLite's own checkpoint off (a
stand-in) the end-to-end p99 at 500 events/s went from 6.1 to 3.1 ms and a commit's slowest
1 % from 2.4 to 0.2-0.4 ms; this one's figures, traced, are in bench/README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import structlog

from listener.webhooks.outbox import Outbox
from listener.webhooks.outbox_store import OutboxStore

__all__ = ["Store"]

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_P = ParamSpec("_P")
# (loop, future, function, args); loop and future are None for a call nobody awaits.
_Loop = asyncio.AbstractEventLoop
_Call = tuple[_Loop | None, asyncio.Future[Any] | None, Callable[..., Any], tuple[Any, ...]]
# How often the checkpointer looks, while the outbox is being written; the WAL size (in
# pages) past which the writer's connection completes a checkpoint so the WAL starts over,
# and how many passes the checkpointer makes first to leave it little to copy. A pass copies
# each page written since the last once, however often it was written (the tails of the
# table and of its indexes, in every commit): every 0.25 s instead of every 0.05 s, the
# checkpoints' CPU per delivery went from 11.5 to 6 µs (commits of 20 rows, one thread, two
# runs each); a backlog of 50,000 peaked at 51 and 58 MiB of WAL against 62 and 41 MiB.
_CHECKPOINT_EVERY = 0.25
_WRAP_FRAMES = 4000
_CATCH_UP_PASSES = 4


class _Thread:
    """One thread running calls in the order they come, each answered on its loop.

    Not a ``ThreadPoolExecutor``: a call there costs a concurrent future, a work item and a
    chained asyncio future; here a queue entry and one ``call_soon_threadsafe``. Measured
    round trip of a no-op call, loop to thread and back: 40-52 µs of CPU through
    ``run_in_executor``, 27 µs here. The daemon makes about 0.5 of these calls per delivery
    while a backlog drains, and three on an event's way to its first attempt.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # A daemon thread, so that a process that never closed its store can still exit: what
        # it was writing is then an uncommitted transaction, which SQLite rolls back.
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._calls.put((loop, future, function, args))
        return future

    def post(self, function: Callable[..., object], *args: Any) -> None:
        """Queue a call nobody awaits (from any thread); its failure is logged."""
        self._calls.put((None, None, function, args))

    def stop(self) -> None:
        """End the thread once the calls already submitted are done."""
        self._calls.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, function, args = call
            outcome: tuple[Any, BaseException | None]
            try:
                outcome = (function(*args), None)
            except BaseException as exc:
                outcome = (None, exc)
            if loop is None or future is None:
                if outcome[1] is not None:
                    _log.error("webhook outbox call failed", exc_info=outcome[1])
                continue
            # The loop may be gone (closed without closing the store): nobody waits then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, *outcome)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """Run a ``PASSIVE`` checkpoint; return (busy, pages in the WAL, pages copied back)."""
    # fetchall: the statement runs to its end, leaving no read open that would keep the
    # WAL from starting over.
    [(busy, log, copied)] = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    return int(busy), int(log), int(copied)


class _Checkpointer:
    """Copies the WAL back into the database from its own connection and thread.

    Args:
        path: the outbox file.
        writer: the writer's thread, where the checkpoint that lets the WAL start over runs.
        conn: the writer's connection.
    """

    def __init__(
        self, path: str | os.PathLike[str], writer: _Thread, conn: sqlite3.Connection
    ) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._writer = writer
        self._writer_conn = conn
        self._stop = threading.Event()
        # Set by every call to the store: only a written outbox needs a look.
        self.dirty = False
        # A checkpoint is queued on the writer's thread and has not run yet.
        self._wrapping = False
        self._thread = threading.Thread(target=self._run, name="sippet-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_CHECKPOINT_EVERY):
            if not self.dirty:
                continue
            self.dirty = False
            try:
                self._look()
            except sqlite3.Error:
                # The writer's own checkpoint at close still runs; the next look retries.
                _log.warning("webhook outbox checkpoint failed", exc_info=True)

    def _look(self) -> None:
        _, log, _ = _checkpoint(self._conn)
        if log < _WRAP_FRAMES or self._wrapping:
            return
        # Catch up first, so that what the writer's thread copies itself (with an fsync) is
        # only what was written since: each pass is shorter than the one before.
        for _ in range(_CATCH_UP_PASSES):
            _, grown, _ = _checkpoint(self._conn)
            # Converged, or the writer outruns the copying: then the writer's thread copies
            # the rest itself, so that the WAL stays bounded (at about twice the bound).
            if grown - log < _WRAP_FRAMES // 16 or grown >= 2 * _WRAP_FRAMES:
                break
            log = grown
        self._wrapping = True
        self._writer.post(self._complete)

    def _complete(self) -> None:
        """On the writer's thread, between two transactions: the checkpoint completes, and
        the next commit starts the WAL over."""
        self._wrapping = False
        _checkpoint(self._writer_conn)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


async def _on_a_new_thread(opener: Callable[[], _T]) -> tuple[_Thread, _T]:
    """Start the outbox thread and run ``opener`` there; the thread stops if it fails."""
    thread = _Thread("sippet-outbox")
    try:
        return thread, await thread.submit(opener)
    except BaseException:
        thread.stop()
        raise


class Store:
    """Runs calls on the outbox, one at a time, on the outbox's own thread.

    A call runs to its end even if the awaiting task is cancelled: what must happen with a
    commit (counting, logging) belongs inside the call, not after the ``await``.
    """

    def __init__(
        self, thread: _Thread, outbox: OutboxStore, checkpointer: _Checkpointer | None = None
    ) -> None:
        self._thread = thread
        self._outbox = outbox
        self._checkpointer = checkpointer

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open (or create) the outbox on a new thread, its WAL checkpointed on another."""
        thread, outbox = await _on_a_new_thread(lambda: _open_for_writing(path))
        return cls(thread, outbox, _Checkpointer(path, thread, outbox.conn))

    @classmethod
    async def open_with(cls, opener: Callable[[], OutboxStore]) -> Store:
        """Open another kind of outbox (the shared store's) on a new thread: ``opener`` runs
        there. It has no WAL to checkpoint."""
        return cls(*await _on_a_new_thread(opener))

    async def run(
        self,
        function: Callable[Concatenate[OutboxStore, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Return ``function(outbox, *args, **kwargs)``, run on the outbox thread.

        Functions take, and call only what names,
        :class:`~listener.webhooks.outbox_store.OutboxStore`.
        """
        if self._checkpointer is not None:
            self._checkpointer.dirty = True
        if kwargs:
            return await self._thread.submit(lambda: function(self._outbox, *args, **kwargs))
        return await self._thread.submit(function, self._outbox, *args)

    async def close(self) -> None:
        """Close the outbox and end its threads (closing checkpoints what is left)."""
        if self._checkpointer is not None:
            self._checkpointer.stop()
        await self.run(lambda outbox: outbox.close())
        self._thread.stop()


def _open_for_writing(path: str | os.PathLike[str]) -> Outbox:
    outbox = Outbox(path)
    outbox.conn.execute("PRAGMA wal_autocheckpoint = 0")
    return outbox
