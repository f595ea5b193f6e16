"""Stable event ids for a channel that gives events none.

Sippet's realtime channel carries no event id and no sequence number, yet the same event may
be heard more than once: on two sockets during a token rotation, by two instances sharing a
store, and again when reconciliation rebuilds it from ``list_calls``. Each must get the same
id, so that it is handled once and its webhook keeps one ``webhook-id``. The id is therefore
derived from the event itself, never from the frame envelope (refs, join refs) or the clock.

The rule:

* **Call lifecycle** (:data:`LIFECYCLE_EVENTS`: ``incoming_call``, ``call_answered``,
  ``call_ended``, ``call_transcript_completed``): the id is a hash of the event name and the
  call key, nothing else. The payload does not count, so a transition rebuilt by
  reconciliation from a ``list_calls`` row has the id the realtime event had. Known limit: a
  call genuinely answered twice (a transfer, say) is seen once; the second ``call_answered``
  has the first one's id. A lifecycle event whose payload names no call follows the next rule.
* **Every other event**: a hash of the event name, a canonical form of the payload and an
  occurrence number. The canonical form sorts object keys and writes a number by its value,
  as RFC 8785 does (``1``, ``1.0`` and ``1e0`` are one number; so are ``0`` and ``-0.0``), so
  the spelling of a payload does not change its id. The occurrence number tells genuinely
  identical events apart: it is 0 for an event, and one more than the previous identical
  event's when that one came less than ``window`` seconds earlier on the same stream.

Known limits of the second rule: two identical payloads further apart than ``window`` share an
id, so ids of non-lifecycle events are only unique within a window and any de-duplication by
them must forget them after ``window`` seconds; a socket that joins in the middle of a run of
identical events numbers them from 0.

Ids look like ``evt_`` followed by 32 lowercase base32 characters (160 bits of a SHA-256).
Nothing here reads a clock or does I/O: callers pass ``now``.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson

from listener.core.events import Event, LazyId, call_key_of, set_id, stamp_id

__all__ = ["LIFECYCLE_EVENTS", "LIFECYCLE_ID", "EventIds", "canonical_json", "lifecycle_id"]

#: The events whose id is their name and call key.
LIFECYCLE_EVENTS: Final = frozenset(
    {"incoming_call", "call_answered", "call_ended", "call_transcript_completed"}
)

# The range of integers orjson writes; a wider one arrives from the wire (orjson decodes it)
# as a float, so it is written as one here too.
_INT_MIN: Final = -(2**63)
_INT_END: Final = 2**64
# Scalars written as they are, by exact type as JSON decoders build them: testing these inline
# keeps the walk over a typical payload cheap.
_PLAIN: Final = frozenset({str, bool, type(None)})
# Every pair of base32 characters, by the 10 bits they write.
_BASE32: Final = "abcdefghijklmnopqrstuvwxyz234567"
_PAIRS: Final = tuple(first + second for first in _BASE32 for second in _BASE32)


def _number(value: float) -> int | float:
    """Return the one representation of a number's value (see :func:`canonical_json`)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a JSON number")
        if value.is_integer() and _INT_MIN <= value < _INT_END:
            return int(value)
        return value
    if _INT_MIN <= value < _INT_END:
        return value
    try:
        return float(value)
    except OverflowError:
        raise ValueError("an integer too large for a JSON number") from None


def _normalised(value: Any) -> Any:
    """Return ``value`` with every number in its one representation.

    Containers holding no number to change are returned as they are: this runs for most
    events, and a copy of every payload would cost more than the hash. The loop settles
    the values that stay as they are (strings, booleans, null, integers within range,
    finite floats with a fraction) without a call: 1.2 -> 0.5 µs for a transcript delta.
    """
    kind = type(value)
    if kind in _PLAIN:
        return value
    slots: Iterable[tuple[Any, Any]]
    container: Callable[[Any], Any]
    if kind is dict:
        slots, container = value.items(), dict
    elif kind is list:
        slots, container = enumerate(value), list
    elif isinstance(value, int | float):
        return _number(value)
    elif isinstance(value, dict):
        slots, container = value.items(), dict
    elif isinstance(value, list | tuple):
        slots, container = enumerate(value), list
    else:
        raise TypeError(f"{type(value).__name__} is not a JSON value")
    plain, low, high = _PLAIN, _INT_MIN, _INT_END
    copy: Any = None
    for slot, item in slots:
        kind = type(item)
        if kind in plain:
            continue
        if kind is int:
            if low <= item < high:
                continue
        # inf - inf and nan - nan are nan, which equals nothing.
        elif kind is float and not item.is_integer() and item - item == 0.0:
            continue
        new = _normalised(item)
        if new is not item:
            copy = container(value) if copy is None else copy
            copy[slot] = new
    return value if copy is None else copy


def canonical_json(value: Any) -> bytes:
    """Write a JSON value canonically: compact, object keys sorted, each number by its value.

    An integral float is written as the integer it equals (``1.0`` as ``1``, ``-0.0`` as
    ``0``), as RFC 8785 does. Integers are kept exact within orjson's range (64 bits); wider
    ones are written as the float orjson decodes them to, so a payload reads the same whether
    it was decoded by orjson or by :mod:`json`. Keys are sorted by code point (RFC 8785 sorts
    by UTF-16 unit; the orders differ only between astral characters and those from U+E000 to
    U+FFFF, which does not matter for ids that only this program computes).

    Raises:
        ValueError: a number JSON cannot carry (NaN, infinity, an integer beyond a double).
        TypeError: a value that is not JSON (a set, bytes, a key that is not a string).
    """
    return orjson.dumps(_normalised(value), option=orjson.OPT_SORT_KEYS)


def _id(text: bytes) -> str:
    """Return the id made from ``text``: ``evt_`` and the first 160 bits of its SHA-256 in
    lower-case base32 (RFC 4648's alphabet, as ``base64.b32encode`` writes it).

    Written 10 bits (two characters) at a time from one integer: ``base64.b32encode``, which
    is pure Python, took 2.2 µs of every id, this 0.9 µs (the same characters).
    """
    bits = int.from_bytes(hashlib.sha256(text).digest()[:20], "big")
    pair = _PAIRS
    return "".join(
        (
            "evt_",
            pair[bits >> 150],
            pair[bits >> 140 & 1023],
            pair[bits >> 130 & 1023],
            pair[bits >> 120 & 1023],
            pair[bits >> 110 & 1023],
            pair[bits >> 100 & 1023],
            pair[bits >> 90 & 1023],
            pair[bits >> 80 & 1023],
            pair[bits >> 70 & 1023],
            pair[bits >> 60 & 1023],
            pair[bits >> 50 & 1023],
            pair[bits >> 40 & 1023],
            pair[bits >> 30 & 1023],
            pair[bits >> 20 & 1023],
            pair[bits >> 10 & 1023],
            pair[bits & 1023],
        )
    )


def lifecycle_id(name: str, call_key: str) -> str:
    """Return the id of lifecycle event ``name`` of call ``call_key``.

    Also the id a reconciled transition gets, whatever the row it was rebuilt from says.
    """
    # The first element keeps the two rules' inputs apart. Three strings are their own
    # canonical form: orjson writes them as canonical_json would, without its walk (0.6 µs).
    return _id(orjson.dumps(["call", name, call_key]))


def _lifecycle_id_of(event: Event) -> str:
    assert event.call_key is not None
    return lifecycle_id(event.name, event.call_key)


#: The id of a lifecycle event of a call, made when first read (see :class:`LazyId`): it
#: depends on the event's name and call key alone, and the call tracker de-dupes on those.
LIFECYCLE_ID: Final = LazyId(_lifecycle_id_of)


class EventIds:
    """Gives each event of one stream its id, by the rule in the module docstring.

    Use one per stream: the occurrence number counts identical events heard on one socket,
    so the same event heard on two sockets gets the same number (and id) on each.

    Args:
        window: seconds within which an identical non-lifecycle event counts as another
            occurrence rather than the same one heard again after a while.
    """

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        # digest of the canonical form -> (occurrences so far, when the last one came), the
        # least recent first; a digest, not the form, because audit payloads run to megabytes.
        self._recent: OrderedDict[bytes, tuple[int, float]] = OrderedDict()

    def assign(self, name: str, payload: dict[str, Any], now: float) -> str:
        """Return the id of event ``name`` with ``payload``, heard at ``now``.

        Raises:
            ValueError, TypeError: the payload is not JSON (see :func:`canonical_json`).
        """
        if name in LIFECYCLE_EVENTS:
            key = call_key_of(payload)
            if key is not None:
                return lifecycle_id(name, key)
        return self._numbered(name, payload, now)

    def of(self, event: Event) -> str:
        """:meth:`assign` for an event: its name, payload, ``received_at``, and the call key
        it already holds (``call_key_of`` again cost 0.2 µs)."""
        key = event.call_key
        if key is not None and event.name in LIFECYCLE_EVENTS:
            return lifecycle_id(event.name, key)
        return self._numbered(event.name, event.payload, event.received_at)

    def stamp(self, event: Event) -> Event:
        """Give ``event`` its id in place (see :func:`~listener.core.events.stamp_id`) and
        return it: :meth:`of`'s, except that a lifecycle id is :data:`LIFECYCLE_ID`, made
        when read (2.0 -> 0.1 µs per lifecycle event on the socket's path)."""
        if event.call_key is not None and event.name in LIFECYCLE_EVENTS:
            # The slot set here, not through stamp_id: a Python call less per lifecycle
            # event (stamp 2,166 -> 1,804 instructions, bench.hotstages --store).
            set_id(event, LIFECYCLE_ID)
            return event
        return stamp_id(event, self._numbered(event.name, event.payload, event.received_at))

    def _numbered(self, name: str, payload: dict[str, Any], now: float) -> str:
        """The id of an event by the second rule (its canonical form and occurrence)."""
        self._forget(now)
        # canonical_json(["event", name, payload]), the name being a string already.
        text = orjson.dumps(["event", name, _normalised(payload)], option=orjson.OPT_SORT_KEYS)
        form = hashlib.sha256(text).digest()
        count, _ = self._recent.pop(form, (0, now))
        self._recent[form] = (count + 1, now)
        return _id(b"%s%d" % (form, count))

    def _forget(self, now: float) -> None:
        """Drop the events whose run ended more than ``window`` ago."""
        recent = self._recent
        while recent:
            form, (_, last) = next(iter(recent.items()))
            if now - last < self.window:
                return
            del recent[form]
