"""De-duplication across a make-before-break token rotation, without I/O.

During a rotation two sockets are joined to the same topic and receive the same broadcasts,
in the same order, for a while. Phoenix gives events no id, so the overlap is found by
sequence alignment: the events the old socket delivered since the rotation began end with a
run that the new socket's buffered events start with. The longest such run is the overlap;
what follows it in the new socket's buffer is new, and only that is delivered.

Identical events (same name, equal payload) are matched by position, never merged by value:
an event that occurred twice counts twice.

- Repeats heard by both sockets are delivered once per occurrence, in the old socket's order:
  the old socket delivered each, and the overlap holds one copy of each in the new buffer.
- A repeat heard only by the new socket (it occurred after the old socket's last event) is
  delivered, unless it lengthens the alignment: when the new buffer up to and including it
  equals the old socket's last events, it is taken for one of them and dropped. Dropping ``p``
  such events needs them to repeat verbatim the last ``p`` events the old socket delivered,
  with the overlap before them repeating at the same period (``A A | A``, ``A B | A B``). Then
  the same two recordings come from a stream without them in which the new socket joined
  ``p`` events earlier, and nothing here can tell which stream happened; the longest
  alignment picks the one that doubles nothing.

So: old delivered ``A``, new holds ``A A B``: ``A B`` is delivered (one ``A`` was heard by
both, the other is new). Old delivered ``A A``, new holds ``A A B``: only ``B`` is delivered,
though the new socket may have heard a third ``A``. No event is delivered twice; the only loss
is such a verbatim repeat, heard by the new socket alone while its events were held back.

The handover goes on after :meth:`Handover.finish`: the new socket may keep feeding it
while its backlog is taken (3,262 events held in one soak), and those follow the backlog
instead of being lost between the two.
"""

from __future__ import annotations

from collections import deque

from listener.core.events import Event

__all__ = ["Handover"]


def _same(a: Event, b: Event) -> bool:
    return a.name == b.name and a.payload == b.payload


class Handover:
    """Collects both sockets' events during one rotation and yields what is left to deliver.

    Feed :meth:`from_old` with every event the old socket delivered since the new socket was
    asked to join, and :meth:`from_new` with every event the new socket received (held back,
    not delivered). Once the old socket is gone, call :meth:`finish`, then deliver every event
    :meth:`pop` returns until it returns None; the new socket may go on feeding
    :meth:`from_new` meanwhile, and what it feeds is popped in turn.
    """

    def __init__(self) -> None:
        self._old: list[Event] = []
        self._new: deque[Event] = deque()
        self.held = 0
        """How many of the new socket's events were held back."""

    def from_old(self, event: Event) -> None:
        """Record an event the old socket delivered."""
        self._old.append(event)

    def from_new(self, event: Event) -> None:
        """Hold back an event the new socket received."""
        self._new.append(event)
        self.held += 1

    def finish(self) -> None:
        """The old socket is gone: drop the overlap, what it delivered, from the held events."""
        for _ in range(self._overlap()):
            self._new.popleft()
        self._old = []

    def pop(self) -> Event | None:
        """The next held event to deliver (after :meth:`finish`), or None if none is left."""
        return self._new.popleft() if self._new else None

    def _overlap(self) -> int:
        old, new = self._old, list(self._new)
        if not old or not new:
            return 0
        first = new[0]
        longest = min(len(old), len(new))
        # Try the longest candidate first: the overlap is a suffix of old equal to a prefix
        # of new, and it can only start where old holds new's first event.
        for length in range(longest, 0, -1):
            start = len(old) - length
            if _same(old[start], first) and all(
                _same(old[start + i], new[i]) for i in range(1, length)
            ):
                return length
        return 0
