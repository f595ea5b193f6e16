"""Realtime events as handlers see them.

Sippet does not document its realtime payload field names: the docs key client state by
``callUuid`` while its REST resources say ``call_uuid``. An event's *call key* is therefore
taken from whichever spelling is present, including a nested ``call`` object, and the payload
itself is passed on exactly as received.

Each event also carries a stable id (:mod:`listener.core.ids` says how it is made) and its
origin: ``realtime`` when the channel delivered it, ``reconcile`` when it was rebuilt from
``list_calls`` after the daemon missed it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from listener.core.templating import MISSING, FieldPath

__all__ = ["Event", "LazyId", "Origin", "call_key_of", "raw_id", "set_id", "stamp_id"]

#: Where an event was learnt: from the channel, or rebuilt from ``list_calls``.
Origin = Literal["realtime", "reconcile"]

_CALL_KEY_FIELDS = ("callUuid", "call_uuid", "callId", "call_id")
_NESTED_CALL_FIELDS = ("callUuid", "call_uuid", "uuid", "id")
_MAX_LOG_PAYLOAD = 200


@functools.lru_cache(maxsize=512)
def _field_path(path: str) -> FieldPath:
    return FieldPath(path)


def call_key_of(payload: dict[str, Any]) -> str | None:
    """Return the call an event belongs to, or None when the payload names no call.

    Looks at ``callUuid``, ``call_uuid`` (and the ``callId`` / ``call_id`` spellings), then a
    nested ``call`` object's ``callUuid``, ``call_uuid``, ``uuid`` or ``id``.
    """
    for name in _CALL_KEY_FIELDS:
        value = payload.get(name)
        # A plain string first, the usual key: an isinstance against a union is slow
        # (Event.create 8,700 -> 7,800 instructions, callgrind).
        if type(value) is str:
            if value:
                return value
        elif isinstance(value, str | int) and value != "":
            return str(value)
    nested = payload.get("call")
    if isinstance(nested, dict):
        for name in _NESTED_CALL_FIELDS:
            value = nested.get(name)
            if isinstance(value, str | int) and value != "":
                return str(value)
    return None


@dataclass(frozen=True, slots=True)
class Event:
    """One event received on the realtime channel.

    Attributes:
        name: the Phoenix event name (``incoming_call``, or any name the server sends).
        payload: the JSON object exactly as received; treat it as read-only.
        topic: the channel topic it arrived on (``events``).
        received_at: wall-clock time of receipt, seconds since the epoch.
        call_key: the call it belongs to (see :func:`call_key_of`), or None.
        size: the size of the frame it came in, in bytes (0 when unknown); handler queues
            are bounded by it as well as by count.
        id: its stable id (``evt_...``): a lifecycle event of a call has the same one however
            often and however it is heard (the intake leaves it to be made when first
            read, see :class:`LazyId`). Empty for an event made outside the daemon's intake
            (a test's, say).
        origin: ``realtime``, or ``reconcile`` for a transition rebuilt from ``list_calls``.
    """

    name: str
    payload: dict[str, Any]
    topic: str
    received_at: float
    call_key: str | None = field(default=None)
    size: int = field(default=0)
    id: str = field(default="")
    origin: Origin = field(default="realtime")

    @classmethod
    def create(
        cls,
        name: str,
        payload: dict[str, Any],
        topic: str,
        received_at: float,
        size: int = 0,
        *,
        id: str = "",
        origin: Origin = "realtime",
    ) -> Event:
        """Build an event, deriving its call key from the payload."""
        # The usual spelling, a non-empty ``callUuid`` string, first (call_key_of's answer
        # for it): a call less per event.
        key = payload.get("callUuid")
        if type(key) is not str or not key:
            key = call_key_of(payload)
        if cls is not Event:
            return cls(name, payload, topic, received_at, key, size, id, origin)
        # A frozen dataclass's __init__ sets each field through object.__setattr__ (1.0 µs);
        # the slots' own descriptors, a previous version, cost a call each (0.45 µs). Plain
        # attribute stores into a twin without the frozen __setattr__, then one __class__
        # assignment (the layouts are the same, checked at import), as
        # listener.calls.state makes its records: Event.create 12,000 -> 8,700 instructions
        # an event (callgrind, 3,000 events of the drain stream; bench/README.md, "Hot path,
        # third pass"); that assignment a plain store, not object.__setattr__'s call, 7,850
        # -> 7,040 (bench.hotstages). Here, not in a function of eight arguments, and with
        # the key's fast path above: 7,050 -> 5,700 (bench.hotstages --store; bench/README.md,
        # "Call state's hot path, third pass"). The id goes into the slot that
        # ``Event.id``'s property reads.
        event = _new(_Unfrozen)
        event.name = name
        event.payload = payload
        event.topic = topic
        event.received_at = received_at
        event.call_key = key
        event.size = size
        event.id = id
        event.origin = origin
        event.__class__ = Event  # type: ignore[assignment]
        return event  # type: ignore[return-value]

    def field(self, path: str, default: Any = None) -> Any:
        """Read a payload field whatever its spelling: ``event.field("fromNumber")`` finds
        ``fromNumber``, ``from_number``, or either inside a nested ``call`` object; dotted
        paths (``call.uuid``) and list indices (``legs.0``) work too. ``call_key``, ``event``,
        ``topic`` and ``received_at`` name the event's own attributes.

        Returns:
            The value, or ``default`` when no spelling is present.

        Raises:
            ValueError: ``path`` is not a valid path (empty segment, spaces, ...).
        """
        value = _field_path(path).find(self)
        return default if value is MISSING else value

    def __str__(self) -> str:
        # A multi-megabyte AI audit payload must not flood the journal.
        text = json.dumps(self.payload, separators=(",", ":"), default=str)
        if len(text) > _MAX_LOG_PAYLOAD:
            text = f"{text[:_MAX_LOG_PAYLOAD]}... ({len(text)} chars)"
        return f"{self.name} call={self.call_key} {text}"


class LazyId:
    """An id made when it is first read, by ``make(event)``: what the intake stamps on an
    event whose id is a function of fields it already holds (a lifecycle event's name and
    call key), so that only the events whose id is read pay for it (see ``Event.id``)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[Event], str]) -> None:
        self.make = make


def stamp_id(event: Event, id: str | LazyId) -> Event:
    """Give ``event`` its stable id in place and return it: for the intake alone, which
    stamps the events it has just built from a frame before anyone reads them (the rotation
    handover holds some by then, but reads only their names and payloads). Everywhere else
    an Event is read-only (``dataclasses.replace`` copies one).

    A slot set: 0.1 µs, where a copy takes 0.45 µs and the dataclass's ``__init__`` 1.0.
    """
    set_id(event, id)
    return event


def _read_id(event: Event) -> str:
    raw = _ID_SLOT.__get__(event, Event)
    if type(raw) is LazyId:
        raw = raw.make(event)
        _ID_SLOT.__set__(event, raw)
    return raw  # type: ignore[no-any-return]


# ``Event.id`` reads through a property over the field's slot, so that a LazyId is made on
# first read: the lifecycle id (a SHA-256 and its base32, 2.0 µs of the 5.5 µs call state
# cost per event in bench/README.md) is paid only by what reads it (a webhook, the store's
# batch), not by the socket's path. The dataclass's own methods (init, eq, hash, repr,
# replace) go through the property too, so they see the made id.
_ID_SLOT: Final[Any] = Event.__dict__["id"]
type.__setattr__(Event, "id", property(_read_id, _ID_SLOT.__set__, doc=_ID_SLOT.__doc__))
#: ``set_id(event, id)``: :func:`stamp_id` without returning the event, for the intake's
#: own stamp (:meth:`EventIds.stamp <listener.core.ids.EventIds.stamp>`), which saves the
#: Python call. The slot's setter bound once: ``_ID_SLOT.__set__`` made a method-wrapper
#: per stamp (stamp_id 1,770 -> 1,450 instructions, callgrind).
set_id: Final[Callable[[Event, str | LazyId], None]] = _ID_SLOT.__set__

#: ``raw_id(event)``: the id as stamped, without making a :class:`LazyId` one (the call
#: tracker de-dupes lifecycle events by name and call key, and needs no id for that). The
#: slot's own getter: a Python function around it cost 0.1 µs more per event.
raw_id: Final[Callable[[Event], str | LazyId]] = _ID_SLOT.__get__


class _Unfrozen:
    """Event's layout without its frozen ``__setattr__``: an event is filled in as one of
    these, then becomes an Event by one ``__class__`` assignment (see ``Event.create``)."""

    __slots__ = ("call_key", "id", "name", "origin", "payload", "received_at", "size", "topic")
    name: str
    payload: dict[str, Any]
    topic: str
    received_at: float
    call_key: str | None
    size: int
    id: str | LazyId
    origin: Origin


_EVENT_FIELDS: Final = (
    "name",
    "payload",
    "topic",
    "received_at",
    "call_key",
    "size",
    "id",
    "origin",
)
if tuple(item.name for item in dataclasses.fields(Event)) != _EVENT_FIELDS or sorted(
    _Unfrozen.__slots__
) != sorted(_EVENT_FIELDS):
    raise AssertionError("Event's fields changed: _Unfrozen must follow them")
_new: Final = object.__new__
