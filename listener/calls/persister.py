"""Keeps the call store in step with the call map: in batches, off the event loop.

Events only touch memory (the map notes which calls changed, the tracker which lifecycle ids
it handed on). Every ``every`` seconds the changes go to the store in one transaction, on a
worker thread, with the last moment until which nothing was missed (the reconciler's
``covered_until``); the cost per event is the share of one ``executemany`` row. A large
batch due while events pour in waits for a lull, up to one more interval, so that it does not
compete with a backlog for the GIL; a small one (a steady stream's) goes when due. A batch
that fails is logged, counted and kept for the next one. Ended calls are pruned after ``retain``
seconds, in memory and on disk; the final batch is written on :meth:`Persister.close`.

Memory holds the open calls and the ended ones of the last ``resident_for`` seconds, at most
``resident_ended`` of them: after each batch the tracker lets go of the older ones it saved
(a stream of 100,000 events of short calls grew the daemon by 35 MiB when they stayed for
``retain``), and reads one back from the store if an event or a lookup asks for it.

A crash loses at most the last batch (two intervals of changes): those calls are then
rebuilt by the reconciliation after the restart, which starts from the last moment seen the
store still has.

Without a store (``tail``, which must not write a running daemon's state directory) the
batches are dropped and only the pruning is done, so that memory stays bounded all the same.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from listener.calls.backend import CallBackend
from listener.calls.keyfilter import KeyFilter
from listener.calls.state import CallRecord
from listener.calls.store import CallReader, CallStore, StoreError, by_call_key
from listener.calls.tracker import CallTracker
from listener.core import metrics

__all__ = ["Persister"]

_log = structlog.get_logger(__name__)
_T = TypeVar("_T")
# Pruning scans the whole map: an hour apart is soon enough for a retention counted in hours.
_PRUNE_EVERY = 3600.0
# An intake this recently busy is mid-burst (a backlog comes tens of µs apart; a steady 500/s
# 2 ms apart), and the batch waits for it, up to one more interval.
_QUIET = 0.01
# A batch of fewer changed calls than this is written when due, lull or not (see
# _until_quiet): a drain's 20,000 events change 6,667 calls, a second of a 500/s stream ~170.
SMALL_BATCH = 500
# Ended calls stay in memory this long after their last event, at most this many: late
# repeats and transcripts come within seconds, and each call kept is about 1 KiB.
RESIDENT_FOR = 60.0
RESIDENT_ENDED = 1000
# Calls let go of per turn of the loop after a batch (see flush): ~0.5 ms.
_EVICT_SLICE = 256


class Persister:
    """Writes the tracker's changes to the store (see the module docstring).

    Use :meth:`open`, then run :meth:`run` as a task, then :meth:`close`.

    Args:
        store: the open store (either kind: :mod:`listener.calls.backend`), or None to keep
            nothing.
        tracker: whose map and handled ids are kept.
        covered_until: the last moment until which nothing was missed, given ``now``
            (None: no history yet, nothing to record).
        retain: seconds a call is kept after its last event.
        every: seconds between batches.
        clock: wall-clock seconds.
        resident_for: seconds an ended call stays in memory after its last event.
        resident_ended: how many ended calls memory holds at most.
        small_batch: a batch of fewer changed calls is written when due, without a lull.

    Raises:
        StoreError: the store's file cannot be opened for the reads back.
    """

    def __init__(
        self,
        store: CallBackend | None,
        tracker: CallTracker,
        covered_until: Callable[[float], float | None],
        *,
        retain: float,
        every: float = 1.0,
        clock: Callable[[], float] = time.time,
        resident_for: float = RESIDENT_FOR,
        resident_ended: int = RESIDENT_ENDED,
        small_batch: int = SMALL_BATCH,
    ) -> None:
        self._store = store
        self._tracker = tracker
        self._covered_until = covered_until
        self._retain = retain
        self._every = every
        self._clock = clock
        # What a failed batch did not write, kept for the next one.
        self._calls: dict[str, CallRecord] = {}
        self._handled: list[str] = []
        self._handled_calls: list[tuple[str, str]] = []
        self._pruned_at = clock()
        self._busy: asyncio.Future[Any] | None = None
        self._resident_for = resident_for
        self._resident_ended = resident_ended
        self._small_batch = small_batch
        # Without a store nothing can be read back, so nothing leaves memory before retain.
        self._reader = None if store is None else CallReader(store.path)
        if self._reader is not None:
            tracker.attach(self._reader)

    @staticmethod
    async def open(
        path: Path, tracker: CallTracker, opener: Callable[[Path], CallBackend] = CallStore
    ) -> tuple[CallBackend, float | None]:
        """Open the store at ``path`` (with ``opener``, on a worker thread), load it into
        ``tracker``; return it and the last moment seen (None when it has no history).

        Raises:
            StoreError: the file cannot be opened or read.
        """

        # Only the open calls and the recent ended ones come into memory (with what was
        # handled of them); the others are read back when asked for.
        since = time.time() - RESIDENT_FOR

        def load() -> tuple[
            CallBackend,
            list[CallRecord],
            set[str],
            list[tuple[str, str]],
            list[str],
            float | None,
        ]:
            store = opener(path)
            try:
                return (
                    store,
                    store.calls(since),
                    store.handled_ids(),
                    store.handled_calls(since),
                    store.ended_keys(),
                    store.last_seen(),
                )
            except StoreError:
                store.close()
                raise

        store, records, handled, handled_calls, ended, last_seen = await asyncio.to_thread(load)
        tracker.load(records, handled, time.time(), handled_calls, ended)
        return store, last_seen

    async def run(self) -> None:
        """Write a batch every ``every`` seconds, prune now and then, until cancelled."""
        while True:
            await asyncio.sleep(self._every)
            await self._until_quiet()
            await self.flush()
            if self._clock() - self._pruned_at >= _PRUNE_EVERY:
                await self.prune()
            elif self._tracker.state.evicted_full:
                await self._refilter()

    async def _until_quiet(self) -> None:
        """Wait while events pour in (the newest one younger than ``_QUIET``) or wait for
        handlers, for at most ``every`` more seconds: a batch cost ~5 µs of CPU per
        lifecycle event (its ids' hashes, its rows; ~3 µs since it makes no hashes, see
        bench/README.md, "Call state"), and written in the middle of a backlog it held the
        intake up under the GIL: a drain of 10,000 events with the store went at 0.59 x the
        rate without call state, and 0.97 x without a store.

        A small batch (a steady stream's, which never pauses for 10 ms: a 500/s stream's
        events come 2 ms apart) is written when due: the lull it waited for never came, so
        it went one interval later all the same, after a poll every 10 ms, 0.37 loop turns
        per event at 500/s (bench/README.md, "A lone event's cost").
        """
        waited, tracker = 0.0, self._tracker
        while waited < self._every and (
            tracker.backlog()
            or (
                tracker.state.changes() >= self._small_batch
                and self._clock() - tracker.last_heard < _QUIET
            )
        ):
            await asyncio.sleep(_QUIET)
            waited += _QUIET

    async def flush(self) -> None:
        """Write what changed since the last batch (and what that one failed to write)."""
        now = self._clock()
        changed = self._tracker.state.changed()
        store = self._store
        if store is None:
            self._tracker.forget_unsaved()
            return
        ids, pairs = self._tracker.unsaved()
        # In C, rather than a generator making a tuple per call on the loop.
        self._calls.update(zip(map(by_call_key, changed), changed, strict=True))
        self._handled.extend(ids)
        self._handled_calls.extend(pairs)
        calls, handled = list(self._calls.values()), list(self._handled)
        handled_calls = list(self._handled_calls)
        save = functools.partial(
            store.save,
            now,
            calls=calls,
            handled=handled,
            handled_calls=handled_calls,
            seen_until=self._covered_until(now),
        )
        try:
            await self._off_loop(save)
        except StoreError as exc:
            metrics.CALL_STORE_FAILURES.inc()
            _log.error("call store write failed; retrying with the next batch", error=str(exc))
            return
        self._calls.clear()
        del self._handled[: len(handled)]
        del self._handled_calls[: len(handled_calls)]
        # Everything handed on until the batch was taken is stored now. Let go of in slices,
        # the loop's events served between them: a call let go of is ~1.8 µs (the filter's
        # bits, its handled ids), and after a drain of 10,000 events the 2,333 calls let go
        # of at once held the loop for 4-11 ms (bench/README.md, "The call store's batch and
        # the p99").
        tracker, before = self._tracker, now - self._resident_for
        while True:
            keys = tracker.evictable(before, self._resident_ended, _EVICT_SLICE)
            if not keys or not tracker.evict(keys):
                return
            await asyncio.sleep(0)

    async def prune(self) -> None:
        """Forget the calls and handled ids older than the retention."""
        now = self._clock()
        before = now - self._retain
        self._pruned_at = now
        forgotten = self._tracker.prune(before)
        self._calls = {k: r for k, r in self._calls.items() if r.last_event_at >= before}
        if self._store is not None:
            try:
                await self._off_loop(functools.partial(self._store.prune, before))
            except StoreError as exc:
                metrics.CALL_STORE_FAILURES.inc()
                _log.error("call store prune failed", error=str(exc))
                return
        await self._refilter()
        if forgotten:
            _log.info("calls pruned", forgotten=forgotten, retain=self._retain)

    async def _refilter(self) -> None:
        """Rebuild the filter of the calls let go of from the store's ended calls: pruned
        ones leave it, and it grows with them. No batch runs meanwhile (both come from
        :meth:`run`, one after the other), so no call is let go of while it is read."""
        if self._store is None:
            return
        store = self._store
        try:
            # Made on the worker thread: ~1.5 µs a key, 0.15 s for a day of 100,000 calls.
            evicted = await self._off_loop(lambda: KeyFilter.of(store.ended_keys()))
        except StoreError as exc:
            metrics.CALL_STORE_FAILURES.inc()
            _log.error("call store read failed", error=str(exc))
            return
        self._tracker.state.refilter(evicted)

    async def close(self) -> None:
        """Write the last batch and close the store."""
        try:
            await self.flush()
        finally:
            if self._busy is not None:
                await asyncio.wait({self._busy})
            if self._reader is not None:
                self._reader.close()
            if self._store is not None:
                # On the worker thread: the shared store's close is network I/O.
                await self._off_loop(self._store.close)

    async def _off_loop(self, work: Callable[[], _T]) -> _T:
        """Run ``work`` on a worker thread, one at a time: a caller cancelled meanwhile does
        not stop it, and the next one waits for it, so the store never has two threads."""
        if self._busy is not None:
            await asyncio.wait({self._busy})
        busy = asyncio.ensure_future(asyncio.to_thread(work))
        self._busy = busy
        return await asyncio.shield(busy)
