"""What the dispatcher asks of every event before handlers see it: is it new, and what does
it make of its call?

:meth:`CallTracker.admit` says whether an event's id was handed on before. A lifecycle
event's id (:data:`~listener.core.ids.LIFECYCLE_EVENTS` of a call) is the call's and the
event's name, nothing else, so it is remembered for as long as the call is (its store keeps
the set across restarts): the realtime event and its twin rebuilt by reconciliation are one.
Any other id is only unique within the id window (see :mod:`listener.core.ids`), so it is
remembered for that window and no longer. An event without an id (made outside the daemon's
intake) is always new.

:meth:`CallTracker.merge` merges the event into the call map and returns the call's record
as of this event, the one handlers see as ``ctx.call``; the tracker itself is what they read
the live map through (``ctx.calls``).

A lifecycle event is remembered by its name and call key, which its id is a hash of
(:func:`~listener.core.ids.lifecycle_id`): the intake stamps such events with an id made only
when read (:data:`~listener.core.ids.LIFECYCLE_ID`), so that de-duplicating them costs no
hash; :meth:`CallTracker.unsaved` gives them to the store by call and name. An event whose given
lifecycle id is not that hash (a test's, a plugin's), and the stored ids of calls the map
does not hold, are remembered as ids; while there are any, a new lifecycle event's id is made
and checked against them too, so the rule is the id's either way.

With an archive (:meth:`CallTracker.attach`: the call store), ended calls leave memory soon
after they are saved (:meth:`CallTracker.evict`), their handled ids with them; the first
event of one after that reads the call and its handled ids back from the store, so that it
neither reopens the call nor is handled twice, and a lookup reads the call back.

Bookkeeping: no asyncio, no clock (times come from the events and callers); the only I/O is
the archive's reads of calls let go of.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import structlog

from listener.calls.keyfilter import KeyFilter
from listener.calls.state import CallRecord, CallState
from listener.calls.store import StoreError
from listener.core import metrics
from listener.core.events import Event, LazyId, raw_id
from listener.core.ids import LIFECYCLE_EVENTS, lifecycle_id

__all__ = ["Archive", "CallTracker"]

_log = structlog.get_logger(__name__)


class Archive(Protocol):
    """Where the calls let go of are read back from (:class:`~listener.calls.store.CallReader`).
    Both methods raise :class:`~listener.calls.store.StoreError` when the store fails."""

    def call(self, call_key: str) -> CallRecord | None:
        """The stored call, or None."""
        ...

    def handled(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored as handled."""
        ...

    def handled_names(self, call_key: str) -> set[str]:
        """The names of the call's lifecycle events stored as handled."""
        ...


def _nothing() -> int:
    return 0


def _by_name() -> dict[str, dict[str, float]]:
    return {name: {} for name in LIFECYCLE_EVENTS}


class CallTracker:
    """The call map and the ids already handed on.

    Args:
        window: seconds a non-lifecycle id is remembered (the id window).
    """

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self.state = CallState()
        # Lifecycle events handed on: name -> call key -> when (for pruning). A dict per name,
        # not (name, key) tuples: a tuple per event outlived young collections and fed the
        # cyclic GC (see bench/README.md, "Call state").
        self._handled = _by_name()
        # Lifecycle ids handed on or stored that are not their name and key's hash, or whose
        # call the map does not hold (so the key is not known) -> when. Empty in the daemon's
        # steady state.
        self._handled_ids: dict[str, float] = {}
        # Lifecycle events handed on since the store last took them: name -> call keys, and
        # the ids of those remembered by id.
        self._unsaved: dict[str, list[str]] = {name: [] for name in LIFECYCLE_EVENTS}
        self._unsaved_ids: list[str] = []
        # What _pinned() made of _unsaved: how much of each list it took, and the set (made
        # afresh whenever _unsaved is).
        self._pinned_from: tuple[dict[str, int], set[str]] = ({}, set())
        # Other ids -> when, the oldest first.
        self._recent: OrderedDict[str, float] = OrderedDict()
        #: When the newest event merged was heard (0 before any), and how many events wait
        #: for handlers (the dispatcher sets it): the persister writes its batches in the
        #: lulls, when neither the intake nor the handlers are busy.
        self.last_heard = 0.0
        self.backlog: Callable[[], int] = _nothing
        self._archive: Archive | None = None
        # The stored calls load() left out of memory, for attach().
        self._let_go: KeyFilter | None = None

    def attach(self, archive: Archive) -> None:
        """Let ended calls leave memory once saved (:meth:`evict`), read back from
        ``archive`` when needed."""
        self._archive = archive
        self.state.attach(self._read, self._recall, self._let_go)

    def load(
        self,
        records: Iterable[CallRecord],
        handled: Iterable[str],
        now: float,
        handled_calls: Iterable[tuple[str, str]] = (),
        let_go: Iterable[str] = (),
    ) -> None:
        """Start from what the store kept (what was handled before counts as handled at
        ``now``): the calls to hold in memory, ids, lifecycle events as (call key, event
        name), and the keys of stored calls left out of memory (``let_go``, read back when
        an event asks: see :meth:`attach`).

        Each stored id of a call is found among its four possible lifecycle ids (four hashes
        per call: 0.6 s for 100,000 calls, once per start; only files written before the
        store kept lifecycle events by call have such ids) and remembered by key, or left in
        the store for a call left out of memory.
        """
        self.state = CallState(records)
        resident = self.state.resident
        outside = [key for key in let_go if key not in resident]
        self._let_go = KeyFilter.of(outside) if outside else None
        if self._archive is not None:
            self.state.attach(self._read, self._recall, self._let_go)
        ids = set(handled)
        self._handled = _by_name()
        for key, name in handled_calls:
            if name in self._handled:
                self._handled[name][key] = now
        for key in (*resident, *outside):
            if not ids:
                break
            for name in LIFECYCLE_EVENTS:
                event_id = lifecycle_id(name, key)
                if event_id in ids:
                    ids.discard(event_id)
                    if key in resident:
                        self._handled[name][key] = now
        self._handled_ids = dict.fromkeys(ids, now)

    def get(self, call_key: str) -> CallRecord | None:
        """Return what the map knows of a call now, or None."""
        return self.state.get(call_key)

    def open_calls(self) -> list[CallRecord]:
        """Return the calls not ended."""
        return self.state.open_calls()

    def admit(self, event: Event) -> bool:
        """Whether ``event`` is new; if it is, remember its id."""
        raw = raw_id(event)
        if not raw:
            return True
        key = event.call_key
        name = event.name
        if key is None or name not in LIFECYCLE_EVENTS:
            return self._admit_other(event, raw)
        # A lifecycle event, inline: a second call took 0.1 of the 0.4 µs.
        state = self.state
        if self._archive is not None and key not in state.resident and state.let_go(key):
            # A call let go of: its handled ids come back with it.
            self._recall(key)
        handled_ids = self._handled_ids
        # The intake's lazy id is the key's hash by construction; a given one may be too.
        if type(raw) is LazyId or raw == lifecycle_id(name, key):
            handled = self._handled[name]
            if key in handled or (handled_ids and event.id in handled_ids):
                return False
            handled[key] = event.received_at
            self._unsaved[name].append(key)
            return True
        event_id = event.id
        if event_id in handled_ids:
            return False
        handled_ids[event_id] = event.received_at
        self._unsaved_ids.append(event_id)
        return True

    def _admit_other(self, event: Event, raw: str | LazyId) -> bool:
        """:meth:`admit` for an event that is not of a call's lifecycle: by id, for the id
        window."""
        # Only the intake stamps a LazyId, and only on lifecycle events.
        event_id = raw if type(raw) is str else event.id
        recent = self._recent
        now = event.received_at
        while recent:
            oldest = next(iter(recent.values()))
            if now - oldest < self.window:
                break
            recent.popitem(last=False)
        if event_id in recent:
            return False
        recent[event_id] = now
        return True

    def merge(self, event: Event) -> CallRecord | None:
        """Merge ``event`` into the call map; return its call as of this event, or None when
        the map does not know the call."""
        self.last_heard = event.received_at
        return self.state.fold(event)

    def adopt(self, records: Iterable[CallRecord], handled_calls: Iterable[tuple[str, str]]) -> int:
        """Take what another instance of the cluster knows of these calls where it got further
        (:meth:`CallState.adopt <listener.calls.state.CallState.adopt>`), and the lifecycle
        events it handed on of them (as (call key, event name); they are not handed on here
        again); return how many calls changed."""
        state = self.state
        changed = sum(state.adopt(record) for record in records)
        for key, name in handled_calls:
            handled = self._handled.get(name)
            record = state.resident.get(key)
            if handled is not None and record is not None and key not in handled:
                handled[key] = record.last_event_at
                self._unsaved[name].append(key)
        return changed

    def evictable(self, before: float, keep: int, limit: int | None = None) -> list[str]:
        """The saved ended calls to let go of, at most ``limit`` (see :meth:`CallState.evictable
        <listener.calls.state.CallState.evictable>`). Call it only once the store holds
        everything :meth:`unsaved` gave."""
        return self.state.evictable(before, keep, self._pinned(), limit)

    def evict(self, keys: Sequence[str]) -> int:
        """Let go of the calls of ``keys`` (from :meth:`evictable`) still as they were then,
        with their handled ids; return how many."""
        gone = self.state.evict(keys, self._pinned())
        for handled in self._handled.values():
            for key in gone:
                handled.pop(key, None)
        return len(gone)

    def _pinned(self) -> set[str]:
        """The calls with lifecycle events handed on that the store does not hold yet.

        Kept between calls and extended with what was handed on since (the lists only grow
        until :meth:`unsaved` replaces them): the persister asks once per slice of calls it
        lets go of, and a set of every unsaved key made afresh each time cost a slice as
        much again while a backlog's keys waited for the next batch.
        """
        taken, pinned = self._pinned_from
        for name, keys in self._unsaved.items():
            if len(keys) > taken.get(name, 0):
                pinned.update(keys[taken.get(name, 0) :])
                taken[name] = len(keys)
        return pinned

    def _read(self, call_key: str) -> CallRecord | None:
        """The call let go of, from the archive (None if it is not there or cannot be read:
        logged and counted, and the event goes on as one of a call the map does not know)."""
        assert self._archive is not None
        try:
            return self._archive.call(call_key)
        except StoreError as exc:
            metrics.CALL_STORE_FAILURES.inc()
            _log.error("call store read failed", call_key=call_key, error=str(exc))
            return None

    def _recall(self, call_key: str) -> CallRecord | None:
        """Take a call let go of back into memory, with the lifecycle ids handed on of it."""
        record = self._read(call_key)
        if record is None:
            self.state.not_stored(call_key)
            return None
        assert self._archive is not None
        self.state.hold(record)
        ids = {lifecycle_id(name, call_key): name for name in LIFECYCLE_EVENTS}
        try:
            names = self._archive.handled_names(call_key)
            # Ids written before the store kept lifecycle events by call.
            names |= {ids[event_id] for event_id in self._archive.handled(list(ids))}
        except StoreError as exc:
            metrics.CALL_STORE_FAILURES.inc()
            _log.error("call store read failed", call_key=call_key, error=str(exc))
            names = set()
        for name in names:
            self._handled[name][call_key] = record.last_event_at
        return record

    def unsaved(self) -> tuple[list[str], list[tuple[str, str]]]:
        """Return what was handed on since the last call (for the store): the lifecycle ids
        remembered as ids, and the lifecycle events remembered by (call key, event name),
        whose ids the store need not make (2.4 µs each: no hash in the batch)."""
        keys, self._unsaved = self._unsaved, {name: [] for name in LIFECYCLE_EVENTS}
        self._pinned_from = ({}, set())
        ids, self._unsaved_ids = self._unsaved_ids, []
        return ids, [(key, name) for name, handed in keys.items() for key in handed]

    def forget_unsaved(self) -> None:
        """Drop what :meth:`unsaved` would return (there is no store to take it)."""
        self._unsaved = {name: [] for name in LIFECYCLE_EVENTS}
        self._pinned_from = ({}, set())
        self._unsaved_ids = []

    def prune(self, before: float) -> int:
        """Forget the calls silent since before ``before`` and the lifecycle ids handed on
        before it; return how many calls were forgotten."""
        self._handled = {
            name: {key: at for key, at in handled.items() if at >= before}
            for name, handled in self._handled.items()
        }
        self._handled_ids = {key: at for key, at in self._handled_ids.items() if at >= before}
        return self.state.prune(before)
