"""The live call map: what the daemon knows of each call, merged from events.

Theory of operation. A call moves through three statuses, ``ringing`` → ``answered`` →
``ended``, and never backwards: the channel may deliver events late, twice or out of order,
so an event that would move a call back (an ``incoming_call`` after its ``call_answered``, a
``call_answered`` after its ``call_ended``) changes no status, and an ended call stays ended.
A status may be passed over: a call first heard of through ``call_ended`` is ended, and its
``ringing`` and ``answered`` transitions are simply absent from :attr:`CallRecord.origins`.

Only the three transition events move a call (:data:`TRANSITIONS`). Their payload's
``status`` is a snapshot that may lag, and any other event carrying a ``status`` is left to
reconciliation: if it ended a call, ``list_calls`` says so and the missing ``call_ended`` is
rebuilt, whereas ending the call here would swallow that event. Every event of a known call
still fills what the map lacks (numbers, times) and counts as its last sign of life.

Payloads are read in any spelling (``fromNumber``, ``from_number``, either inside a nested
``call`` object), as :meth:`Event.field <listener.core.events.Event.field>` reads them, and the
call key is :func:`~listener.core.events.call_key_of`'s. Times are seconds since the epoch: a
transition's time is the payload's own (``startedAt``, ``answeredAt``, ``endedAt``) when it
has one, else ``now``, the moment the transition was heard.

Nothing here reads a clock or does I/O: callers pass ``now``.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, Final, Literal, Protocol

from listener.calls.keyfilter import KeyFilter
from listener.core.events import Event, Origin
from listener.core.templating import MISSING, FieldPath, field_spellings

__all__ = [
    "STATUSES",
    "TRANSITIONS",
    "CallLookup",
    "CallRecord",
    "CallState",
    "Origin",
    "Status",
    "StatusMap",
    "Transition",
    "adopted",
    "format_time",
    "parse_time",
]

Status = Literal["ringing", "answered", "ended"]

#: The statuses, in the only order a call moves through them.
STATUSES: Final[tuple[Status, ...]] = ("ringing", "answered", "ended")
#: The events that move a call, and where to.
TRANSITIONS: Final[Mapping[str, Status]] = {
    "incoming_call": "ringing",
    "call_answered": "answered",
    "call_ended": "ended",
}
_RANK: Final[Mapping[Status, int]] = {status: rank for rank, status in enumerate(STATUSES)}
# Where each transition's time is in a payload.
_TIME_FIELD: Final[Mapping[Status, str]] = {
    "ringing": "startedAt",
    "answered": "answeredAt",
    "ended": "endedAt",
}
# The same, by rank.
_TIME_FIELDS: Final = tuple(_TIME_FIELD[status] for status in STATUSES)
_NO_TIMES: Final[tuple[float | None, ...]] = (None, None, None)


def _word(status: str) -> str:
    """Spell a status one way: ``No_Answer`` and ``no answer`` are ``no-answer``."""
    return status.strip().lower().replace("_", "-").replace(" ", "-")


@dataclass(frozen=True, slots=True)
class StatusMap:
    """Which of Sippet's ``status`` strings mean which status of the call map.

    Sippet does not document its full list, so the defaults take every plausible telephony
    spelling; a status in none of the sets is unknown and never moves a call. Matching
    ignores case, and ``_``, ``-`` and spaces are one character (``no_answer`` is
    ``no-answer``).

    Raises:
        ValueError: a status is in two sets.
    """

    ringing: frozenset[str] = frozenset({"initiated", "ringing", "queued"})
    answered: frozenset[str] = frozenset({"in-progress", "answered", "active"})
    ended: frozenset[str] = frozenset(
        {"completed", "ended", "failed", "busy", "no-answer", "canceled", "missed"}
    )

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for status in STATUSES:
            words = frozenset(_word(raw) for raw in getattr(self, status))
            for word in words:
                if word in seen:
                    raise ValueError(f"status {word!r} is both {seen[word]} and {status}")
                seen[word] = status
            object.__setattr__(self, status, words)

    def status_of(self, raw: object) -> Status | None:
        """Return what Sippet's ``raw`` status means, or None when it is not known."""
        if not isinstance(raw, str):
            return None
        word = _word(raw)
        for status in STATUSES:
            if word in getattr(self, status):
                return status
        return None


def format_time(seconds: float) -> str:
    """Write a time as Sippet does: ISO 8601 in UTC, to the millisecond, with ``Z``."""
    text = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def parse_time(value: object) -> float | None:
    """Read an ISO 8601 time (``2026-01-02T03:04:05.678Z``) as seconds since the epoch.

    A time without an offset is taken as UTC. Anything else is None, numbers too: nothing
    says whether one counts seconds or milliseconds.
    """
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What the map knows of one call.

    Attributes:
        call_key: the call's key (its ``callUuid``).
        status: how far the call got; it never moves backwards.
        last_event_at: when the last event of this call was heard.
        from_number, to_number: the parties, once an event named them.
        started_at, answered_at, ended_at: when each transition happened, once known.
        origins: each transition the call went through, and where it was learnt; a status
            passed over is absent. Read-only.
    """

    call_key: str
    status: Status
    last_event_at: float
    from_number: str | None = None
    to_number: str | None = None
    started_at: float | None = None
    answered_at: float | None = None
    ended_at: float | None = None
    origins: Mapping[Status, Origin] = field(default_factory=dict)

    def rank(self) -> int:
        """The status's position in :data:`STATUSES`."""
        return _RANK[self.status]


@dataclass(frozen=True, slots=True)
class Transition:
    """A call that moved: ``before`` is None for a call the map did not know."""

    before: Status | None
    record: CallRecord

    @property
    def call_key(self) -> str:
        """The call that moved."""
        return self.record.call_key

    @property
    def after(self) -> Status:
        """Where it moved to."""
        return self.record.status

    @property
    def origin(self) -> Origin:
        """Where the move was learnt."""
        return self.record.origins[self.record.status]


def _field(event: Event, name: str) -> Any:
    """:meth:`Event.field`, quicker: the payload's own spelling first (the one ``list_calls``
    rows use), then a path parsed once (Event.field looks it up in a cache each time)."""
    payload = event.payload
    if name in payload:
        return payload[name]
    value = _PATHS[name].find(event)
    return None if value is MISSING else value


def _text(payload: dict[str, Any], event: Event, name: str) -> str | None:
    """Return ``event``'s field ``name`` (its ``payload``, passed in as the caller holds it)
    if it is a non-empty string, else None."""
    value = payload[name] if name in payload else _PATHS[name].find(event)
    return value if isinstance(value, str) and value else None


def _times(
    reached: int, had: tuple[float | None, ...], event: Event, heard: float | None
) -> tuple[float | None, ...]:
    """Return the transition times (started, answered, ended) of a call at rank ``reached``:
    what it ``had``, with what ``event`` adds.

    A status the call has not reached gets no time; one it reached keeps the time it has,
    else takes the payload's, else ``heard`` (when the move to it was heard) for the status
    it is at now. By rank, without a loop (a loop over the ranks took 0.62 µs, this 0.35).
    Only for a payload with a time in it: its callers settle the common case, none, inline.
    """
    started, answered, ended = had
    if reached == 0:
        return _when(started, event, "startedAt", heard), None, None
    if reached == 1:
        return (
            _when(started, event, "startedAt", None),
            _when(answered, event, "answeredAt", heard),
            None,
        )
    return (
        _when(started, event, "startedAt", None),
        _when(answered, event, "answeredAt", None),
        _when(ended, event, "endedAt", heard),
    )


def _when(had: float | None, event: Event, name: str, heard: float | None) -> float | None:
    """A transition's time: what the call ``had``, else the payload's ``name``, else
    ``heard``."""
    if had is not None:
        return had
    when = parse_time(_field(event, name))
    return heard if when is None else when


class _Unfrozen:
    """CallRecord's layout without its frozen ``__setattr__``: a record is filled in as one of
    these, then becomes a CallRecord (see the end of ``CallState.fold``)."""

    __slots__ = (
        "answered_at",
        "call_key",
        "ended_at",
        "from_number",
        "last_event_at",
        "origins",
        "started_at",
        "status",
        "to_number",
    )
    call_key: str
    status: Status
    last_event_at: float
    from_number: str | None
    to_number: str | None
    started_at: float | None
    answered_at: float | None
    ended_at: float | None
    origins: Mapping[Status, Origin]


_new: Final = object.__new__
_RECORD_FIELDS: Final = (
    "call_key",
    "status",
    "last_event_at",
    "from_number",
    "to_number",
    "started_at",
    "answered_at",
    "ended_at",
    "origins",
)
if tuple(item.name for item in fields(CallRecord)) != _RECORD_FIELDS or sorted(
    _Unfrozen.__slots__
) != sorted(_RECORD_FIELDS):
    raise AssertionError("CallRecord's fields changed: _Unfrozen must follow them")
# The payload fields the map reads, parsed once.
_PATHS: Final = {name: FieldPath(name) for name in ("fromNumber", "toNumber", *_TIME_FIELDS)}
_FROM: Final = _PATHS["fromNumber"]
_TO: Final = _PATHS["toNumber"]
# Every top-level key under which a payload may hold a transition time (FieldPath.find also
# looks inside a nested ``call`` object).
_TIME_KEYS: Final = frozenset(
    {"call", *(spelling for name in _TIME_FIELDS for spelling in field_spellings(name))}
)


# The rank each transition event moves a call to.
_MOVES: Final[Mapping[str, int]] = {name: _RANK[status] for name, status in TRANSITIONS.items()}
# Records share their ``origins`` (documented read-only): there are 26 distinct ones (a
# subset of the statuses, each learnt one of two ways), and a dict per transition cost
# 0.15-0.4 µs of its merge, a lookup here 0.05-0.1. Keyed by the mapping's items, and by
# (id of a shared mapping, status, origin) for the next one: the shared ones live as long as
# the process, so no other object can have their ids.
_SHARED_ORIGINS: dict[tuple[tuple[Status, Origin], ...], Mapping[Status, Origin]] = {}
_ORIGINS_AFTER: dict[tuple[int, Status, Origin], Mapping[Status, Origin]] = {}


def shared_origins(origins: Mapping[Status, Origin]) -> Mapping[Status, Origin]:
    """The shared mapping equal to ``origins`` (the store reads records back through it)."""
    items = tuple(origins.items())
    shared = _SHARED_ORIGINS.get(items)
    if shared is None:
        # setdefault, not a test then a store: the follower's read makes records on a thread
        # of its own, and two threads storing two mappings would leave one in use unshared
        # (whose id() _origins_after could later see reused).
        shared = _SHARED_ORIGINS.setdefault(items, dict(items))
    return shared


def _in_order(origins: Mapping[Status, Origin]) -> dict[Status, Origin]:
    """``origins`` in the statuses' order (as the merge makes them: one shared mapping)."""
    return {status: origins[status] for status in STATUSES if status in origins}


def _origins_after(
    origins: Mapping[Status, Origin], status: Status, origin: Origin
) -> Mapping[Status, Origin]:
    """``{**origins, status: origin}``, shared."""
    after = _ORIGINS_AFTER.get((id(origins), status, origin))
    if after is None:
        shared = shared_origins(origins)
        after = shared_origins({**shared, status: origin})
        _ORIGINS_AFTER[(id(shared), status, origin)] = after
    return after


_NO_ORIGINS: Final = shared_origins({})
# A new call's origins, by the event's origin and the rank of its status.
_FIRST_ORIGINS: Final = {
    origin: tuple(_origins_after(_NO_ORIGINS, status, origin) for status in STATUSES)
    for origin in ("realtime", "reconcile")
}


def adopted(known: CallRecord | None, record: CallRecord) -> CallRecord | None:
    """What another instance's ``record`` of a call makes of the one known here (None: the
    call is not known), or None when it adds nothing.

    The one further along (by status, then last event) keeps its status and the fields it
    has; the other fills what it lacks (parties, times, where a transition came from), so a
    record that only adds fields is taken too. Never backwards: a late record never reopens
    an ended call.
    """
    if known is None:
        return record
    if (record.rank(), record.last_event_at) > (known.rank(), known.last_event_at):
        ahead, behind = record, known
    else:
        ahead, behind = known, record
    # The constructor, off the socket's path (another instance's records, a batch a second).
    taken = CallRecord(
        known.call_key,
        ahead.status,
        max(record.last_event_at, known.last_event_at),
        ahead.from_number or behind.from_number,
        ahead.to_number or behind.to_number,
        behind.started_at if ahead.started_at is None else ahead.started_at,
        behind.answered_at if ahead.answered_at is None else ahead.answered_at,
        behind.ended_at if ahead.ended_at is None else ahead.ended_at,
        ahead.origins
        if behind.origins.keys() <= ahead.origins.keys()
        else shared_origins(_in_order({**behind.origins, **ahead.origins})),
    )
    return None if taken == known else taken


class CallLookup(Protocol):
    """The call map as handlers read it (``ctx.calls``): live, and read-only."""

    def get(self, call_key: str) -> CallRecord | None:
        """Return what the map knows of a call now, or None."""
        ...

    def open_calls(self) -> list[CallRecord]:
        """Return the calls not ended."""
        ...


class CallState:
    """The call map, keyed by call key.

    Ended calls need not stay in memory: with an archive (:meth:`attach`, the call store),
    :meth:`evict` lets go of those already saved, and an event or a lookup of one reads it
    back. A :class:`~listener.calls.keyfilter.KeyFilter` of the keys let go of tells, without
    I/O, the first event of a new call (nothing to read) from a late one of a call let go of.

    Args:
        records: the calls to start from (as loaded from the store).
    """

    def __init__(self, records: Iterable[CallRecord] = ()) -> None:
        #: The calls in memory, by key (read-only outside this class).
        self.resident = {record.call_key: record for record in records}
        # Keys in the order they first changed since the last batch (a dict, not a set: the
        # batch then hands ended calls on in a fixed order, see changed()).
        self._changed: dict[str, None] = {}
        # The ended calls in memory that a batch took, the one silent longest first: the
        # calls to let go of come off its front, so a batch looks at those that leave, not
        # at every call in memory (see evictable).
        ended = sorted(
            (record for record in self.resident.values() if record.status == "ended"),
            key=_last_event_at,
        )
        self._ended = dict.fromkeys(record.call_key for record in ended)
        # The newest last event put at its back, and whether every call went in no older
        # than the one ahead of it: a call adopted from a cluster's peer with an older last
        # event goes to the back out of order, and the next choice sorts the calls again
        # (as they came, the newest would leave before it).
        self._ended_newest = ended[-1].last_event_at if ended else float("-inf")
        self._ended_in_order = True
        # Set by attach: the calls let go of, how to read one, how to take one back in.
        self._evicted: KeyFilter | None = None
        # The last key the filter said it never let go of: the tracker's de-dup asks first,
        # then the merge of the same event need not ask again (a filter test is 0.15 µs).
        self._cleared: str | None = None
        self._read: Callable[[str], CallRecord | None] = _nothing
        self._recall: Callable[[str], CallRecord | None] = _nothing

    def __len__(self) -> int:
        return len(self.resident)

    def attach(
        self,
        read: Callable[[str], CallRecord | None],
        recall: Callable[[str], CallRecord | None],
        evicted: KeyFilter | None = None,
    ) -> None:
        """Let ended calls go (:meth:`evict`): ``read`` returns a stored call (lookups),
        ``recall`` one that an event of it takes back into the map (through :meth:`hold`)."""
        self._read, self._recall = read, recall
        self._evicted = KeyFilter() if evicted is None else evicted

    def get(self, call_key: str) -> CallRecord | None:
        """Return what the map knows of a call (read back if it was let go of), or None."""
        record = self.resident.get(call_key)
        if record is None and self._evicted is not None and call_key in self._evicted:
            return self._read(call_key)
        return record

    def let_go(self, call_key: str) -> bool:
        """Whether a call not in memory may have been let go of (then read it back)."""
        if self._evicted is None or call_key not in self._evicted:
            self._cleared = call_key
            return False
        return True

    def not_stored(self, call_key: str) -> None:
        """The filter said "maybe" of a call the archive does not hold (about 1 % of new
        calls): the merge of the same event need not read it again."""
        self._cleared = call_key

    def hold(self, record: CallRecord) -> None:
        """Take a call read back from the store into memory again (it is saved as it is).

        An ended one goes to the front of those to let go of: it left memory once as one
        of the oldest, and leaves again at the next choice unless an event changes it. At
        the back, out of order, it made the next choice sort every ended call in memory
        again, after each read-back; a copy of the order in C is a small part of a read
        from the store."""
        self.resident[record.call_key] = record
        if record.status == "ended":
            self._ended = {record.call_key: None, **self._ended}

    def adopt(self, record: CallRecord) -> bool:
        """Take what another instance of a cluster knows of a call (see :func:`adopted`).
        Return whether the map changed (the call is then saved as changed)."""
        key = record.call_key
        known = self.resident.get(key)
        if known is None and self._evicted is not None and key in self._evicted:
            # Taken back in as an event of it would be, with the lifecycle events handed on
            # of it: read only, it would come back into memory without them, and a repeat of
            # one would be handed on again.
            known = self._recall(key)
        taken = adopted(known, record)
        if taken is None:
            return False
        self.resident[key] = taken
        self._changed[key] = None
        return True

    def open_calls(self) -> list[CallRecord]:
        """Return the calls not ended (they are always in memory)."""
        return [record for record in self.resident.values() if record.status != "ended"]

    def all_calls(self) -> list[CallRecord]:
        """Return every call the map holds in memory."""
        return list(self.resident.values())

    def merge(
        self, name: str, payload: dict[str, Any], origin: Origin, now: float
    ) -> Transition | None:
        """Merge one event into the map; return the transition it made, or None.

        A transition event of an unknown call adds the call. Any event of a known call fills
        in what the map lacked and sets its last event time, but only a transition event
        beyond the call's status moves it (see the module docstring). An event without a
        call key, or of an unknown call and no transition, changes nothing.

        Args:
            name: the event name.
            payload: the payload, in any spelling; it is only read.
            origin: ``realtime`` for the channel, ``reconcile`` for a rebuilt event.
            now: when the event was heard, seconds since the epoch.
        """
        return self.merge_event(Event.create(name, payload, "", now, origin=origin))

    def merge_event(self, event: Event) -> Transition | None:
        """:meth:`merge` for an event already built: its origin, and ``received_at`` as the
        moment it was heard."""
        key = event.call_key
        known = None if key is None else self.resident.get(key)
        record = self.fold(event)
        if record is None or (known is not None and record.status == known.status):
            return None
        return Transition(None if known is None else known.status, record)

    def fold(self, event: Event) -> CallRecord | None:
        """Merge ``event`` into the map as :meth:`merge_event` does; return its call's record
        as of this event (the map's, from now on), or None when the map does not know it.

        On the socket's path for every event of a call, so written out straight: each
        Python call or allocation avoided is ~700 instructions, and the first version's
        helpers (the parties, the times, the origins, the record) took 21,600 instructions
        per event of the drain stream, this 13,100 (valgrind; bench/README.md, "Call state").
        """
        key = event.call_key
        if key is None:
            return None
        known = self.resident.get(key)
        if (
            known is None
            and self._evicted is not None
            and key is not self._cleared
            and key in self._evicted
        ):
            known = self._recall(key)
        payload = event.payload
        now = event.received_at
        move = _MOVES.get(event.name)
        if known is None:
            if move is None:
                return None
            status = STATUSES[move]
            from_number = payload.get("fromNumber", MISSING)
            if from_number is MISSING:
                from_number = _FROM.find(event)
            to_number = payload.get("toNumber", MISSING)
            if to_number is MISSING:
                to_number = _TO.find(event)
            if _TIME_KEYS.isdisjoint(payload):
                # No time in the payload (no realtime event seen so far has one): the one
                # test settles all three, where each miss of a spelling cost 0.3 µs.
                started = now if move == 0 else None
                answered = now if move == 1 else None
                ended = now if move == 2 else None
            else:
                started, answered, ended = _times(move, _NO_TIMES, event, now)
            last = now
            from_number = from_number if isinstance(from_number, str) and from_number else None
            to_number = to_number if isinstance(to_number, str) and to_number else None
            origins = _FIRST_ORIGINS[event.origin][move]
        else:
            status = known.status
            rank = _RANK[status]
            origins = known.origins
            moved = move is not None and move > rank
            if moved:
                rank = move  # type: ignore[assignment]
                status = STATUSES[rank]
                origin = event.origin
                after = _ORIGINS_AFTER.get((id(origins), status, origin))
                origins = _origins_after(origins, status, origin) if after is None else after
            started, answered, ended = known.started_at, known.answered_at, known.ended_at
            if started is None or (rank and answered is None) or (rank == 2 and ended is None):
                # A status reached without its time: the payload's, else when it was heard.
                heard = now if moved else None
                if not _TIME_KEYS.isdisjoint(payload):
                    started, answered, ended = _times(
                        rank, (started, answered, ended), event, heard
                    )
                # As _times without a time in the payload, inline: a call less for each move
                # (1,100 instructions per move, valgrind).
                elif rank == 0:
                    started, answered, ended = heard if started is None else started, None, None
                elif rank == 1:
                    answered, ended = heard if answered is None else answered, None
                elif ended is None:
                    ended = heard
            last = known.last_event_at
            from_number = known.from_number or _text(payload, event, "fromNumber")
            to_number = known.to_number or _text(payload, event, "toNumber")
            if (
                not moved
                and last >= now
                and from_number == known.from_number
                and to_number == known.to_number
                and started == known.started_at
                and answered == known.answered_at
                and ended == known.ended_at
            ):
                # An event that changes nothing (a repeat, a late one): no new record.
                return known
            if last < now:
                last = now
        # The record: a frozen dataclass's __init__ sets each field through
        # object.__setattr__, and its slots' own descriptors cost a call each too: 8,000
        # instructions a record. Plain attribute stores into a twin without the frozen
        # __setattr__, then one __class__ assignment (the layouts are the same, checked at
        # import): 3,900; with that assignment a plain store (the twin has no __setattr__ of
        # its own), not object.__setattr__'s call, 3,100. Inline here, not a function of
        # nine arguments: the merge 10,700 -> 10,120 instructions an event (bench.hotstages;
        # bench/README.md, "The call map's cost on the hot path, second pass"). A record is
        # handed on only once it is a CallRecord.
        updated = _new(_Unfrozen)
        updated.call_key = key
        updated.status = status
        updated.last_event_at = last
        updated.from_number = from_number
        updated.to_number = to_number
        updated.started_at = started
        updated.answered_at = answered
        updated.ended_at = ended
        updated.origins = origins
        updated.__class__ = CallRecord  # type: ignore[assignment]
        self.resident[key] = updated  # type: ignore[assignment]
        self._changed[key] = None
        return updated  # type: ignore[return-value]

    def changes(self) -> int:
        """How many calls :meth:`changed` would return, at most."""
        return len(self._changed)

    def changed(self) -> list[CallRecord]:
        """Return the calls changed since the last call (for the store), and forget them.

        The ended ones among them go to the back of those :meth:`evictable` chooses from,
        the one silent longest first."""
        keys, self._changed = self._changed, {}
        # In C (a record is never false): 0.19 -> 0.09 ms for 3,333 keys on the loop.
        records = list(filter(None, map(self.resident.get, keys)))
        ended = self._ended
        moved = sorted(
            (record for record in records if record.status == "ended"), key=_last_event_at
        )
        for record in moved:
            key = record.call_key
            ended.pop(key, None)
            ended[key] = None
        if moved:
            if moved[0].last_event_at < self._ended_newest:
                self._ended_in_order = False
            self._ended_newest = max(self._ended_newest, moved[-1].last_event_at)
        return records

    def prune(self, before: float) -> int:
        """Forget the calls whose last event came before ``before``; return how many.

        Open calls too: a call silent that long is taken as lost, so the cut-off must be
        further back than the longest call (and than reconciliation's lookback).
        """
        stale = [key for key, record in self.resident.items() if record.last_event_at < before]
        for key in stale:
            del self.resident[key]
            self._changed.pop(key, None)
            self._ended.pop(key, None)
        return len(stale)

    def evictable(
        self, before: float, keep: int, pinned: Container[str] = (), limit: int | None = None
    ) -> list[str]:
        """The keys of the ended calls to let go of, at most ``limit`` of them: those
        silent since before ``before``, and the oldest beyond the ``keep`` newest; each
        saved as it is (not changed since :meth:`changed` last gave it), none ``pinned``
        (the caller's unsaved ones). Only with an archive.

        Taken from the front of the ended calls in the order the batches took them, up to
        the first one that is neither old nor beyond ``keep``: a batch looks at the calls
        that leave. A scan of the whole map each batch, with 1,000 ended calls in memory at
        200 events/s, was 0.3 of the loop's 1.2 ms per batch and 3,600 instructions per lone
        event (``python -m bench.instructions --rate 200``: 150,400 -> 146,800; bench/README.md,
        "The calls to let go of, from the front"). A call that went to the back out of that
        order (one adopted from a cluster's peer with an older last event) has them sorted
        again first.
        """
        if self._evicted is None:
            return []
        resident, changed = self.resident, self._changed
        if not self._ended_in_order:
            self._ended = dict.fromkeys(
                sorted(self._ended, key=lambda key: resident[key].last_event_at)
            )
            self._ended_in_order = True
        over = len(self._ended) - keep
        chosen: list[str] = []
        for index, key in enumerate(self._ended):
            if index >= over and resident[key].last_event_at >= before:
                break
            if key not in changed and key not in pinned:
                chosen.append(key)
                if len(chosen) == limit:
                    break
        return chosen

    def evict(self, keys: Iterable[str], pinned: Container[str] = ()) -> list[str]:
        """Let go of the calls of ``keys`` (from :meth:`evictable`) still as they were then:
        in memory, ended, not changed since, not ``pinned``; return their keys."""
        evicted, resident, changed, ended = self._evicted, self.resident, self._changed, self._ended
        if evicted is None:
            return []
        gone = []
        for key in keys:
            record = resident.get(key)
            # Ended, though an ended call never moves back: an open call let go of would be
            # missing from open_calls(), whose calls are never read back.
            if (
                record is not None
                and record.status == "ended"
                and key not in changed
                and key not in pinned
            ):
                del resident[key]
                ended.pop(key, None)
                gone.append(key)
        # The filter's bits for all of them at once (see KeyFilter.update).
        evicted.update(gone)
        self._cleared = None
        return gone

    @property
    def evicted_full(self) -> bool:
        """Whether the filter of the calls let go of is past its capacity (see
        :meth:`refilter`)."""
        return self._evicted is not None and self._evicted.full

    def refilter(self, evicted: KeyFilter) -> None:
        """Take ``evicted`` as the filter of the calls let go of: one made afresh from every
        ended call the archive holds (after it pruned some, or when the filter is full)."""
        if self._evicted is not None:
            self._evicted = evicted
            self._cleared = None


def _nothing(call_key: str) -> CallRecord | None:
    del call_key
    return None


# In C: a Python key function was a frame per call sorted.
_last_event_at: Final = attrgetter("last_event_at")
