"""Reconciliation: the call transitions the channel missed, rebuilt from ``list_calls``.

Sippet's channel has no replay, so whatever it broadcast while no socket was joined is gone.
Sippet's own list of calls is not: after a gap :func:`list_calls_request` asks for every call
that may have moved meanwhile, on a timer (because the channel promises nothing even while
joined) :func:`refresh_request` asks after the calls open for a while, and :func:`diff`
compares the answer with the call map. The very first start, with no history at all, loads
the open calls (:func:`open_calls_request`).

Each row stands for the transitions its call went through: ``incoming_call`` once it exists,
``call_answered`` when its status says so or when it ended after being answered (an
``answeredAt`` or a positive ``durationSeconds``), ``call_ended`` when its status says it
ended. The missed transitions are those beyond the call's status in the map; they come out
in the call's own order, as events whose payload is the row and whose id is the lifecycle
id the realtime event would have had (:func:`~listener.core.ids.lifecycle_id`), so an event
heard both ways is handled once. A transition below the map's status is never rebuilt: it
would reach handlers after its successor.

Nothing is made up from a row that cannot be read (not an object, no call key, no status
string): it is skipped and counted, as is a row whose status the
:class:`~listener.calls.state.StatusMap` does not know.

Pure functions: no I/O, no clock (callers pass ``now``), and the call map is only read; the
caller merges the rebuilt events into it as it dispatches them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from listener.calls.state import (
    STATUSES,
    TRANSITIONS,
    CallRecord,
    CallState,
    Status,
    StatusMap,
    format_time,
)
from listener.core.events import call_key_of
from listener.core.ids import lifecycle_id

__all__ = [
    "CALL_FIELDS",
    "MARGIN",
    "Diff",
    "Missed",
    "diff",
    "list_calls_request",
    "open_calls_request",
    "refresh_request",
]

#: The ``list_calls`` fields reconciliation asks for: what the call map reads, plus the
#: call's id and direction, which handlers of a rebuilt event are likely to want.
CALL_FIELDS: Final = (
    "id",
    "callUuid",
    "direction",
    "fromNumber",
    "toNumber",
    "status",
    "startedAt",
    "answeredAt",
    "endedAt",
    "durationSeconds",
)
#: Seconds earlier than a gap's start a pass looks (and a catch-up of the shared call map
#: writes from): the events in flight when it began, and the skew between two clocks (this
#: host's and Sippet's, or another instance's).
MARGIN: Final = 60.0
_EVENT_OF: Final = {status: name for name, status in TRANSITIONS.items()}
_DEFAULT_STATUSES: Final = StatusMap()


@dataclass(frozen=True, slots=True)
class Missed:
    """A transition the channel missed, as an event to dispatch with ``origin=reconcile``.

    Attributes:
        name: the event (``incoming_call``, ``call_answered`` or ``call_ended``).
        payload: the ``list_calls`` row it was rebuilt from, untouched.
        id: its stable id, the one the realtime event had.
    """

    name: str
    payload: dict[str, Any]
    id: str


@dataclass(frozen=True, slots=True)
class Diff:
    """What one ``list_calls`` answer adds to the call map.

    Attributes:
        missed: the transitions to emit, in order (each call's in its own order).
        malformed: rows skipped because they could not be read.
        unknown_status: rows skipped because their status is in no set of the status map.
    """

    missed: tuple[Missed, ...]
    malformed: int
    unknown_status: int


def _read(row: object) -> tuple[dict[str, Any], str, str] | None:
    """Return a row with its call key and status, or None when it has not both."""
    if not isinstance(row, dict):
        return None
    key = call_key_of(row)
    status = row.get("status")
    if key is None or not isinstance(status, str):
        return None
    return row, key, status


def _answered(row: dict[str, Any]) -> bool:
    """Whether an ended call's row says it was answered first."""
    answered_at = row.get("answeredAt")
    duration = row.get("durationSeconds")
    if isinstance(answered_at, str) and answered_at:
        return True
    return isinstance(duration, int | float) and not isinstance(duration, bool) and duration > 0


def _path(row: dict[str, Any], status: Status) -> list[Status]:
    """Return the statuses the row's call went through, in order."""
    path = list(STATUSES[: STATUSES.index(status) + 1])
    if status == "ended" and not _answered(row):
        path.remove("answered")
    return path


def diff(state: CallState, rows: Iterable[object], statuses: StatusMap = _DEFAULT_STATUSES) -> Diff:
    """Return the transitions ``rows`` (a ``list_calls`` answer's data) hold that ``state``
    lacks, in the rows' order, each call's in its own order (see the module docstring).

    Args:
        state: the call map; only read.
        rows: the rows, camelCase as the RPC API answers.
        statuses: what Sippet's status strings mean.
    """
    missed: list[Missed] = []
    malformed = unknown = 0
    # Rows repeating a call add only what the first one did not.
    reached: dict[str, int] = {}
    for item in rows:
        read = _read(item)
        if read is None:
            malformed += 1
            continue
        row, key, raw = read
        status = statuses.status_of(raw)
        if status is None:
            unknown += 1
            continue
        if key not in reached:
            record = state.get(key)
            reached[key] = -1 if record is None else record.rank()
        for step in _path(row, status):
            rank = STATUSES.index(step)
            if rank > reached[key]:
                name = _EVENT_OF[step]
                missed.append(Missed(name, row, lifecycle_id(name, key)))
                reached[key] = rank
    return Diff(tuple(missed), malformed, unknown)


def _request(filter: dict[str, Any]) -> dict[str, Any]:
    """The payload keys of a ``list_calls`` request for the rows ``filter`` selects."""
    return {"fields": list(CALL_FIELDS), "filter": filter, "sort": "startedAt"}


def _tracked(state: CallState, floor: float) -> list[CallRecord]:
    """The open calls heard of since ``floor``: older ones are taken as lost."""
    return [record for record in state.open_calls() if record.last_event_at >= floor]


def list_calls_request(
    state: CallState,
    *,
    since: float,
    now: float,
    margin: float = MARGIN,
    lookback_max: float = 86400.0,
) -> dict[str, Any]:
    """Return the payload keys of the ``list_calls`` request that covers a gap.

    It asks for the calls open in the map and for every call started or ended since the gap
    began, less ``margin``, but never further back than ``lookback_max``; open calls silent
    for longer than that are left out too, so a call whose end Sippet never reports does not
    weigh on every request. Pass it on as ``rpc.run("list_calls", **request)``.

    Args:
        state: the call map; only read.
        since: when the gap began.
        now: the current time.
        margin: how much earlier to look, for events in flight when the gap began and for
            the skew between this clock and Sippet's.
        lookback_max: the furthest back a request looks, however long the gap.

    Returns:
        ``fields``, ``filter`` (an Ash filter) and ``sort`` (by start, so that rebuilt
        events come out in the order the calls began).
    """
    floor = now - lookback_max
    start = format_time(max(since - margin, floor))
    open_keys = sorted(record.call_key for record in _tracked(state, floor))
    clauses: list[dict[str, Any]] = [
        {"startedAt": {"greaterThanOrEqual": start}},
        {"endedAt": {"greaterThanOrEqual": start}},
    ]
    if open_keys:
        clauses.insert(0, {"callUuid": {"in": open_keys}})
    return _request({"or": clauses})


def refresh_request(
    state: CallState, *, now: float, open_for: float, lookback_max: float = 86400.0
) -> dict[str, Any] | None:
    """Return the ``list_calls`` request of a refresh on a timer, or None if it has nothing
    to ask: the calls open in the map for ``open_for`` seconds or more, so that a
    ``call_ended`` the channel lost while joined is still seen. Open calls silent for longer
    than ``lookback_max`` are left out, as by :func:`list_calls_request`."""
    cut = now - open_for
    keys = sorted(
        record.call_key
        for record in _tracked(state, now - lookback_max)
        if (record.started_at or record.answered_at or record.last_event_at) <= cut
    )
    return _request({"callUuid": {"in": keys}}) if keys else None


def open_calls_request(*, now: float, lookback_max: float = 86400.0) -> dict[str, Any]:
    """Return the ``list_calls`` request of the very first start: every call not ended that
    started within ``lookback_max``, to load into an empty map."""
    start = format_time(now - lookback_max)
    return _request(
        {"and": [{"endedAt": {"isNil": True}}, {"startedAt": {"greaterThanOrEqual": start}}]}
    )
