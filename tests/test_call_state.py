"""The call map: transitions, never backwards, every payload spelling, the status mapping."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listener.calls.state import CallRecord, CallState, StatusMap, parse_time
from listener.core.events import Event
from listener.testing.traffic import PayloadStyle, call_payload

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()
LIFECYCLE = ["incoming_call", "call_answered", "call_ended"]


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def test_a_call_moves_through_its_lifecycle() -> None:
    state = CallState()
    ring = state.merge(
        "incoming_call",
        {"callUuid": "c-1", "fromNumber": "+1", "toNumber": "+2", "startedAt": iso(T0)},
        "realtime",
        T0 + 0.2,
    )
    assert ring is not None
    assert (ring.call_key, ring.before, ring.after, ring.origin) == (
        "c-1",
        None,
        "ringing",
        "realtime",
    )
    answer = state.merge("call_answered", {"callUuid": "c-1"}, "realtime", T0 + 5)
    end = state.merge(
        "call_ended", {"callUuid": "c-1", "endedAt": iso(T0 + 60)}, "reconcile", T0 + 90
    )
    assert answer is not None
    assert (answer.before, answer.after) == ("ringing", "answered")
    assert end is not None
    assert (end.before, end.after, end.origin) == ("answered", "ended", "reconcile")
    assert state.get("c-1") == CallRecord(
        "c-1",
        "ended",
        last_event_at=T0 + 90,
        from_number="+1",
        to_number="+2",
        started_at=T0,  # the payload's time
        answered_at=T0 + 5,  # none in the payload: when it was heard
        ended_at=T0 + 60,
        origins={"ringing": "realtime", "answered": "realtime", "ended": "reconcile"},
    )


@given(st.lists(st.sampled_from([*LIFECYCLE, "call_transcript_delta"]), max_size=12))
def test_status_never_moves_backwards(names: list[str]) -> None:
    """Late, repeated and out-of-order events: each move goes forward, and the call ends at
    the furthest status any event took it to."""
    state = CallState()
    furthest = -1
    for index, name in enumerate(names):
        before = state.get("c-1")
        moved = state.merge(name, {"callUuid": "c-1"}, "realtime", float(index))
        after = state.get("c-1")
        if name in LIFECYCLE:
            furthest = max(furthest, LIFECYCLE.index(name))
        if before is not None:
            assert after is not None
            assert after.rank() >= before.rank()
            assert (moved is not None) == (after.rank() > before.rank())
    record = state.get("c-1")
    assert (record.rank() if record else -1) == furthest


def test_a_late_event_never_reopens_an_ended_call() -> None:
    state = CallState()
    state.merge("call_ended", {"callUuid": "c-1", "status": "completed"}, "realtime", 10.0)
    assert state.merge("incoming_call", {"callUuid": "c-1"}, "realtime", 11.0) is None
    assert state.merge("call_answered", {"callUuid": "c-1"}, "reconcile", 12.0) is None
    record = state.get("c-1")
    assert record is not None
    assert (record.status, record.last_event_at) == ("ended", 12.0)
    # The passed-over statuses are absent: nothing claims they were heard.
    assert record.origins == {"ended": "realtime"}
    assert (record.started_at, record.answered_at, record.ended_at) == (None, None, 10.0)
    assert state.open_calls() == []


def test_a_late_event_still_fills_what_the_map_lacks() -> None:
    state = CallState()
    state.merge("call_answered", {"callUuid": "c-1"}, "realtime", T0 + 5)
    late = {"callUuid": "c-1", "fromNumber": "+1", "startedAt": iso(T0)}
    assert state.merge("incoming_call", late, "realtime", T0 + 6) is None
    record = state.get("c-1")
    assert record is not None
    assert (record.status, record.from_number, record.started_at) == ("answered", "+1", T0)
    assert "ringing" not in record.origins


@pytest.mark.parametrize("style", ["camel", "snake", "nested"])
def test_every_payload_spelling_gives_the_same_record(style: PayloadStyle) -> None:
    fields = {
        "callUuid": "c-1",
        "fromNumber": "+15550100",
        "toNumber": "+15557654321",
        "startedAt": iso(T0),
        "endedAt": iso(T0 + 30),
        "status": "completed",
    }
    state = CallState()
    state.merge("call_ended", call_payload(dict(fields), style), "realtime", T0 + 31)
    assert state.get("c-1") == CallRecord(
        "c-1",
        "ended",
        T0 + 31,
        from_number="+15550100",
        to_number="+15557654321",
        started_at=T0,
        ended_at=T0 + 30,
        origins={"ended": "realtime"},
    )


def test_other_events_only_touch_known_calls_and_never_move_them() -> None:
    state = CallState()
    delta = {"callUuid": "c-1", "status": "completed", "toNumber": "+2"}
    assert state.merge("call_transcript_delta", delta, "realtime", 1.0) is None
    assert state.get("c-1") is None  # an unknown call without a transition: nothing
    state.merge("incoming_call", {"callUuid": "c-1"}, "realtime", 2.0)
    # Its payload says completed, but only call_ended ends a call (reconcile rebuilds it).
    assert state.merge("call_status_changed", delta, "realtime", 3.0) is None
    assert state.get("c-1") == CallRecord(
        "c-1", "ringing", 3.0, to_number="+2", started_at=2.0, origins={"ringing": "realtime"}
    )


@pytest.mark.parametrize("payload", [{}, {"status": "ringing"}, {"call": "c-1"}])
def test_events_without_a_call_key_change_nothing(payload: dict[str, Any]) -> None:
    state = CallState()
    assert state.merge("incoming_call", payload, "realtime", 1.0) is None
    assert len(state) == 0
    assert state.changed() == []


def test_changed_returns_each_changed_call_once() -> None:
    state = CallState()
    state.merge("incoming_call", {"callUuid": "a"}, "realtime", 1.0)
    state.merge("incoming_call", {"callUuid": "b"}, "realtime", 1.0)
    state.merge("call_answered", {"callUuid": "a"}, "realtime", 2.0)
    assert sorted((r.call_key, r.status) for r in state.changed()) == [
        ("a", "answered"),
        ("b", "ringing"),
    ]
    assert state.changed() == []
    # The same event heard again at the same moment changes nothing.
    state.merge("call_answered", {"callUuid": "a"}, "realtime", 2.0)
    assert state.changed() == []


def test_prune_forgets_calls_silent_since_the_cut_off() -> None:
    state = CallState(
        [
            CallRecord("old-ended", "ended", 10.0),
            CallRecord("old-open", "answered", 10.0),
            CallRecord("recent", "ended", 50.0),
        ]
    )
    state.merge("call_ended", {"callUuid": "old-ended"}, "realtime", 11.0)  # changed
    assert state.prune(before=20.0) == 2
    assert state.changed() == []  # a forgotten call is not written back
    assert state.get("recent") is not None
    assert state.get("old-open") is None
    assert len(state) == 1


def test_open_calls_are_those_not_ended() -> None:
    state = CallState(
        [
            CallRecord("a", "ringing", 1.0),
            CallRecord("b", "answered", 1.0),
            CallRecord("c", "ended", 1.0),
        ]
    )
    assert sorted(r.call_key for r in state.open_calls()) == ["a", "b"]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("initiated", "ringing"),
        ("queued", "ringing"),
        ("RINGING", "ringing"),
        ("in-progress", "answered"),
        ("in_progress", "answered"),
        ("active", "answered"),
        ("completed", "ended"),
        ("no_answer", "ended"),
        ("No Answer", "ended"),
        ("canceled", "ended"),
        ("busy", "ended"),
        ("failed", "ended"),
        ("missed", "ended"),
        ("on-hold", None),
        ("", None),
        (None, None),
        (3, None),
    ],
)
def test_default_status_mapping(raw: object, status: str | None) -> None:
    assert StatusMap().status_of(raw) == status


def test_status_mapping_is_configurable_and_checked() -> None:
    custom = StatusMap(answered=frozenset({"Bridged"}), ended=frozenset({"HUNG_UP"}))
    assert (custom.status_of("bridged"), custom.status_of("hung-up")) == ("answered", "ended")
    assert custom.status_of("completed") is None
    with pytest.raises(ValueError, match="'busy' is both answered and ended"):
        StatusMap(answered=frozenset({"busy"}))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2026-03-01T12:00:00Z", T0),
        ("2026-03-01T12:00:00.250Z", T0 + 0.25),
        ("2026-03-01T13:00:00+01:00", T0),
        ("2026-03-01T12:00:00", T0),
        ("yesterday", None),
        (T0, None),
        (None, None),
    ],
)
def test_parse_time(value: object, seconds: float | None) -> None:
    assert parse_time(value) == seconds


class ReferenceState:
    """The call map's merge as first written (before its short cuts), to check them against:
    every field through ``Event.field``, a record built by ``CallRecord(...)``."""

    times = {"ringing": "started_at", "answered": "answered_at", "ended": "ended_at"}
    fields = {"ringing": "startedAt", "answered": "answeredAt", "ended": "endedAt"}
    rank = {"ringing": 0, "answered": 1, "ended": 2}
    moves = {"incoming_call": "ringing", "call_answered": "answered", "call_ended": "ended"}

    def __init__(self) -> None:
        self.calls: dict[str, CallRecord] = {}
        self.changed: set[str] = set()

    def _field(self, event: Event, name: str) -> Any:
        return event.payload[name] if name in event.payload else event.field(name)

    def _text(self, event: Event, name: str) -> str | None:
        value = self._field(event, name)
        return value if isinstance(value, str) and value else None

    def merge(self, event: Event) -> tuple[Any, ...] | None:
        key = event.call_key
        if key is None:
            return None
        now, target = event.received_at, self.moves.get(event.name)
        known = self.calls.get(key)
        before = None if known is None else known.status
        origins: dict[Any, Any]
        if target is not None and (known is None or self.rank[target] > known.rank()):
            origins = {**(known.origins if known else {}), target: event.origin}
            status: Any = target
        elif known is not None:
            status, origins = known.status, dict(known.origins)
        else:
            return None
        moved = status != before
        times: dict[str, Any] = {}
        for step in ("ringing", "answered", "ended")[: self.rank[status] + 1]:
            when = None if known is None else getattr(known, self.times[step])
            if when is None:
                when = parse_time(self._field(event, self.fields[step]))
            if when is None and step == status:
                when = now if moved else None
            times[self.times[step]] = when
        updated = CallRecord(
            key,
            status,
            now if known is None else max(known.last_event_at, now),
            (known and known.from_number) or self._text(event, "fromNumber"),
            (known and known.to_number) or self._text(event, "toNumber"),
            origins=origins,
            **times,
        )
        if updated != known:
            self.calls[key] = updated
            self.changed.add(key)
        return (before, updated) if moved else None


def _payload(key: str, extra: dict[str, Any], style: PayloadStyle) -> dict[str, Any]:
    return call_payload({"callUuid": key, **extra}, style)


steps = st.tuples(
    st.sampled_from([*LIFECYCLE, "call_transcript_delta", "call_updated"]),
    st.sampled_from(["c-1", "c-2"]),
    st.fixed_dictionaries(
        {},
        optional={
            "fromNumber": st.sampled_from(["", "+1", "+3"]),
            "toNumber": st.just("+2"),
            "startedAt": st.sampled_from([iso(T0), "not a time"]),
            "answeredAt": st.just(iso(T0 + 5)),
            "endedAt": st.just(iso(T0 + 60)),
        },
    ),
    st.sampled_from(["camel", "snake", "nested"]),
    st.floats(-5, 5),
    st.sampled_from(["realtime", "reconcile"]),
)


@given(st.lists(steps, max_size=15))
def test_merge_is_the_reference_merge(
    events: list[tuple[str, str, dict[str, Any], Any, float, Any]],
) -> None:
    """Whatever the events, their order, spelling and times: the same records, transitions,
    changes, and the record handlers get (``fold``) is the map's."""
    state, reference = CallState(), ReferenceState()
    now = T0
    for name, key, extra, style, step, origin in events:
        now += step
        event = Event.create(name, _payload(key, extra, style), "events", now, origin=origin)
        expected = reference.merge(event)
        moved = state.merge_event(event)
        assert (None if moved is None else (moved.before, moved.record)) == expected
        assert state.get(key) == reference.calls.get(key)
        assert state.fold(event) is state.get(key)  # again: changes nothing more
        assert state.get(key) == reference.calls.get(key)
    assert sorted(r.call_key for r in state.changed()) == sorted(reference.changed)


def test_the_map_s_records_are_frozen_call_records_like_the_constructor_s() -> None:
    """The merge builds records its own quicker way, and shares their origins."""
    state = CallState()
    state.merge("incoming_call", {"callUuid": "c-1", "fromNumber": "+1"}, "realtime", 1.0)
    other = state.merge("incoming_call", {"callUuid": "c-2"}, "realtime", 2.0)
    record = state.get("c-1")
    assert type(record) is CallRecord
    assert record == CallRecord(
        "c-1", "ringing", 1.0, "+1", started_at=1.0, origins={"ringing": "realtime"}
    )
    assert dataclasses.replace(record, status="ended").status == "ended"
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "ended"  # type: ignore[misc]
    assert other is not None
    assert other.record.origins is record.origins


def ended_call(key: str, at: float) -> CallRecord:
    return CallRecord(key, "ended", at, started_at=at - 1, ended_at=at)


def test_calls_adopted_with_older_last_events_leave_memory_before_the_newer_ones() -> None:
    """Ended calls leave memory oldest first, those adopted from a cluster's peer after newer
    ones too (they go to the back of the order, which the next choice sorts again)."""
    state = CallState()
    state.attach(lambda key: None, lambda key: None)
    for index in range(5):
        state.adopt(ended_call(f"new-{index}", 1000.0 + index))
    state.changed()
    for index in range(20):
        state.adopt(ended_call(f"old-{index}", 10.0 + index))
    state.changed()
    chosen = state.evictable(940.0, keep=5)
    assert sorted(chosen) == sorted(f"old-{index}" for index in range(20))
    assert state.evictable(0.0, keep=5, limit=3) == ["old-0", "old-1", "old-2"]
