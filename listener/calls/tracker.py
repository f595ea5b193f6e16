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

Pure bookkeeping: no asyncio, no I/O, no clock (times come from the events and callers).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from listener.calls.state import CallRecord, CallState
from listener.core.events import Event
from listener.core.ids import LIFECYCLE_EVENTS

__all__ = ["CallTracker"]


class CallTracker:
    """The call map and the ids already handed on.

    Args:
        window: seconds a non-lifecycle id is remembered (the id window).
    """

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self.state = CallState()
        # Lifecycle id -> when it was handed on (for pruning).
        self._handled: dict[str, float] = {}
        # Lifecycle ids handed on since the store last took them.
        self._unsaved: list[str] = []
        # Other ids -> when, the oldest first.
        self._recent: OrderedDict[str, float] = OrderedDict()

    def load(self, records: Iterable[CallRecord], handled: Iterable[str], now: float) -> None:
        """Start from what the store kept (ids handled before count as handled at ``now``)."""
        self.state = CallState(records)
        self._handled = dict.fromkeys(handled, now)

    def get(self, call_key: str) -> CallRecord | None:
        """Return what the map knows of a call now, or None."""
        return self.state.get(call_key)

    def open_calls(self) -> list[CallRecord]:
        """Return the calls not ended."""
        return self.state.open_calls()

    def admit(self, event: Event) -> bool:
        """Whether ``event`` is new; if it is, remember its id."""
        event_id = event.id
        if not event_id:
            return True
        if event.call_key is not None and event.name in LIFECYCLE_EVENTS:
            if event_id in self._handled:
                return False
            self._handled[event_id] = event.received_at
            self._unsaved.append(event_id)
            return True
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
        return self.state.fold(event)

    def unsaved(self) -> list[str]:
        """Return the lifecycle ids handed on since the last call (for the store)."""
        ids, self._unsaved = self._unsaved, []
        return ids

    def prune(self, before: float) -> int:
        """Forget the calls silent since before ``before`` and the lifecycle ids handed on
        before it; return how many calls were forgotten."""
        self._handled = {key: at for key, at in self._handled.items() if at >= before}
        return self.state.prune(before)
