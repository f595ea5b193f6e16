"""The call tracker: which events are new, and their call as of each (no I/O, no clock)."""

from __future__ import annotations

from listener.calls.keyfilter import KeyFilter
from listener.calls.state import CallRecord
from listener.calls.tracker import CallTracker
from listener.core.events import Event, LazyId, raw_id
from listener.core.ids import EventIds, lifecycle_id


def event(name: str, payload: dict[str, object], at: float, event_id: str | None = None) -> Event:
    """An event as the session delivers it: with its stable id (or the one given)."""
    stamped = event_id or EventIds().assign(name, payload, at)
    return Event.create(name, payload, "events", at, id=stamped)


def test_a_lifecycle_id_is_handed_on_once_however_late_its_twin_comes() -> None:
    tracker = CallTracker(window=2.0)
    realtime = event("call_ended", {"callUuid": "c-1"}, 10.0)
    rebuilt = Event.create(
        "call_ended",
        {"callUuid": "c-1", "status": "completed"},
        "events",
        5000.0,
        id=lifecycle_id("call_ended", "c-1"),
        origin="reconcile",
    )
    assert tracker.admit(rebuilt)
    assert not tracker.admit(realtime), "the same transition, heard the other way"
    assert tracker.unsaved() == ([], [("c-1", "call_ended")]), "the rule's id: by call"
    assert tracker.unsaved() == ([], []), "each goes to the store once"


def test_other_ids_are_forgotten_after_the_window() -> None:
    tracker = CallTracker(window=2.0)
    first = event("agent_status", {"agent": "a-1"}, 0.0)
    assert tracker.admit(first)
    assert not tracker.admit(event("agent_status", {"agent": "a-1"}, 1.9, first.id))
    assert tracker.admit(event("agent_status", {"agent": "a-1"}, 2.1, first.id))
    assert tracker.unsaved() == ([], []), "only lifecycle ids outlive the process"


def test_an_event_without_an_id_is_always_new() -> None:
    tracker = CallTracker()
    made = Event.create("call_ended", {"callUuid": "c-1"}, "events", 1.0)
    assert tracker.admit(made)
    assert tracker.admit(made)


def test_merge_returns_the_call_as_of_this_event() -> None:
    tracker = CallTracker()
    ringing = tracker.merge(event("incoming_call", {"callUuid": "c-1", "fromNumber": "+1"}, 1.0))
    ended = tracker.merge(event("call_ended", {"callUuid": "c-1"}, 2.0))
    assert ringing is not None
    assert ended is not None
    assert (ringing.status, ended.status) == ("ringing", "ended")
    assert ended.from_number == "+1"
    assert tracker.get("c-1") == ended
    assert tracker.merge(event("call_transcript_delta", {"callUuid": "c-9"}, 3.0)) is None
    assert tracker.merge(event("agent_status", {"agent": "a-1"}, 3.0)) is None
    assert tracker.open_calls() == []


def test_prune_forgets_old_calls_and_ids_and_load_restores_both() -> None:
    tracker = CallTracker()
    tracker.load(
        [CallRecord("old", "ended", 1.0), CallRecord("new", "ringing", 9.0)], ["evt_a"], 1.0
    )
    assert [record.call_key for record in tracker.open_calls()] == ["new"]
    assert not tracker.admit(
        Event.create("call_ended", {"callUuid": "old"}, "events", 9.0, id="evt_a")
    )
    assert tracker.prune(before=5.0) == 1
    assert tracker.get("old") is None
    assert tracker.admit(Event.create("call_ended", {"callUuid": "old"}, "events", 9.0, id="evt_a"))


def intake(name: str, key: str, at: float) -> Event:
    """A lifecycle event as the session stamps it: its id made only when read."""
    return EventIds().stamp(Event.create(name, {"callUuid": key}, "events", at))


def test_the_intake_s_lifecycle_id_is_made_when_read_and_is_the_rule_s() -> None:
    heard = intake("call_answered", "c-1", 1.0)
    assert isinstance(raw_id(heard), LazyId)
    assert heard.id == lifecycle_id("call_answered", "c-1")
    assert raw_id(heard) == heard.id, "made once, then kept"


def test_stored_ids_still_count_after_a_restart_for_known_calls_and_others() -> None:
    tracker = CallTracker()
    # c-1 is in the map; c-9 is not (a transcript of a call the map never knew).
    tracker.load(
        [CallRecord("c-1", "answered", 1.0)],
        [lifecycle_id("call_answered", "c-1"), lifecycle_id("call_transcript_completed", "c-9")],
        1.0,
    )
    assert not tracker.admit(intake("call_answered", "c-1", 2.0))
    assert not tracker.admit(intake("call_transcript_completed", "c-9", 2.0))
    assert tracker.admit(intake("call_ended", "c-1", 2.0))
    assert not tracker.admit(intake("call_ended", "c-1", 3.0))
    assert tracker.unsaved() == ([], [("c-1", "call_ended")])


def test_the_filter_of_calls_let_go_of_finds_each_and_few_others() -> None:
    keys = KeyFilter.of(f"gone-{index}" for index in range(20_000))
    assert all(f"gone-{index}" in keys for index in range(20_000))
    strangers = sum(f"new-{index}" in keys for index in range(20_000))
    assert strangers < 20_000 * 0.02
    assert not keys.full


def test_the_filter_sets_the_three_bits_of_its_rule_for_each_key() -> None:
    """Each key sets bits (h + k * step) mod size, k = 0, 1, 2, of its 64-bit hash h and the
    odd step (h >> 32) | 1, computed here on the whole hash: the filter takes both under the
    mask first, which must give the same positions, for keys added one at a time or many."""
    keys = [f"gone-{index}" for index in range(5_000)]
    one_by_one, at_once = KeyFilter(), KeyFilter()
    for key in keys[:10]:
        one_by_one.add(key)
    at_once.update(keys)
    for made, added in ((one_by_one, keys[:10]), (at_once, keys)):
        size = len(made._bits) * 8
        expected = bytearray(len(made._bits))
        for key in added:
            at = hash(key)
            step = (at >> 32) | 1
            for k in range(3):
                bit = (at + k * step) % size
                expected[bit >> 3] |= 1 << (bit & 7)
        assert made._bits == expected
        assert made.count == len(added)
        assert all(key in made for key in added)
