"""De-duplication across a rotation's overlap."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listener.core.events import Event
from listener.realtime.handover import Handover


def ev(seq: int, name: str = "incoming_call") -> Event:
    return Event.create(name, {"seq": seq}, "events", 0.0)


def same(value: str) -> Event:
    """An event identical to every other ``same(value)``: the channel gives them no id."""
    return Event.create("call_transcript_delta", {"text": value}, "events", 0.0)


def values(events: list[Event]) -> str:
    return "".join(str(event.payload["text"]) for event in events)


def released(handover: Handover) -> list[Event]:
    """Finish ``handover`` and return every event it releases."""
    handover.finish()
    events = []
    while (event := handover.pop()) is not None:
        events.append(event)
    return events


def handed_over(old: str, new: str) -> str:
    handover = Handover()
    for value in old:
        handover.from_old(same(value))
    for value in new:
        handover.from_new(same(value))
    return values(released(handover))


def test_overlap_is_delivered_once() -> None:
    handover = Handover()
    for seq in (1, 2, 3, 4):
        handover.from_old(ev(seq))
    for seq in (3, 4, 5, 6):
        handover.from_new(ev(seq))
    assert [e.payload["seq"] for e in released(handover)] == [5, 6]


def test_events_the_new_socket_hears_after_the_finish_are_popped_in_turn() -> None:
    handover = Handover()
    for seq in (1, 2):
        handover.from_old(ev(seq))
    for seq in (2, 3):
        handover.from_new(ev(seq))
    handover.finish()
    popped = [handover.pop()]
    # Heard while the backlog was being delivered: it follows the backlog.
    handover.from_new(ev(4))
    popped += [handover.pop(), handover.pop()]
    assert [e.payload["seq"] for e in popped if e is not None] == [3, 4]
    assert popped[-1] is None
    assert handover.held == 3


def test_no_overlap_and_empty_sides() -> None:
    handover = Handover()
    handover.from_old(ev(1))
    handover.from_new(ev(2))
    assert [e.payload["seq"] for e in released(handover)] == [2]
    only_new = Handover()
    only_new.from_new(ev(1))
    assert len(released(only_new)) == 1
    assert released(Handover()) == []


def test_same_payload_different_name_is_not_a_duplicate() -> None:
    handover = Handover()
    handover.from_old(ev(1, "call_answered"))
    handover.from_new(ev(1, "call_ended"))
    assert [e.name for e in released(handover)] == ["call_ended"]


@given(total=st.integers(0, 60), data=st.data())
def test_any_overlap_of_one_stream_is_exact(total: int, data: st.DataObject) -> None:
    stream = [ev(seq) for seq in range(total)]
    # The old socket delivered stream[:old_end]; recording began at old_start; the new socket
    # subscribed somewhere at or before old_end (make-before-break: no gap).
    old_end = data.draw(st.integers(0, total))
    old_start = data.draw(st.integers(0, old_end))
    new_start = data.draw(st.integers(old_start, old_end))
    handover = Handover()
    for event in stream[old_start:old_end]:
        handover.from_old(event)
    for event in stream[new_start:]:
        handover.from_new(event)
    delivered = stream[:old_end] + released(handover)
    assert [e.payload["seq"] for e in delivered] == list(range(total))


@pytest.mark.parametrize(
    ("stream", "old_start", "old_end", "new_start"),
    [
        ("AAAAB", 0, 3, 0),  # every A heard by both
        ("AABAAC", 0, 5, 1),  # two runs of A around a B, all but the first A heard by both
        ("ABABAB", 2, 4, 2),  # a repeating pair, heard by both for one period
    ],
)
def test_repeats_heard_by_both_sockets_are_delivered_once_per_occurrence(
    stream: str, old_start: int, old_end: int, new_start: int
) -> None:
    delivered = stream[:old_end] + handed_over(stream[old_start:old_end], stream[new_start:])
    assert delivered == stream


def test_a_repeat_heard_only_by_the_new_socket_is_kept_when_the_old_one_heard_fewer() -> None:
    # Stream X A A B: the old socket left after the first A, the new one heard both.
    assert handed_over("XA", "AAB") == "AB"
    assert handed_over("A", "AAB") == "AB"


def test_a_verbatim_repeat_of_the_old_tail_heard_only_by_the_new_socket_is_dropped() -> None:
    # Stream A A A B, old socket heard the first two A, new socket the last two and B: the
    # recordings are those of stream A A B with both A heard by both, so the third A is lost.
    assert handed_over("AA", "AAB") == "B"
    assert handed_over("AB", "ABAB") == "AB"


@given(stream=st.text("AB", max_size=24), data=st.data())
def test_with_repeats_nothing_is_doubled_and_only_an_indistinguishable_repeat_is_lost(
    stream: str, data: st.DataObject
) -> None:
    total = len(stream)
    old_end = data.draw(st.integers(0, total))
    old_start = data.draw(st.integers(0, old_end))
    new_start = data.draw(st.integers(old_start, old_end))
    old, new = stream[old_start:old_end], stream[new_start:]
    rest = handed_over(old, new)
    lost = total - old_end - len(rest)
    # What follows the old socket's events is the stream's tail: nothing doubled, nothing
    # reordered, and every occurrence counted (as a multiset) once, delivered or lost.
    assert lost >= 0
    assert rest == stream[old_end + lost :]
    assert Counter(stream[:old_end] + rest) + Counter(stream[old_end : old_end + lost]) == Counter(
        stream
    )
    if lost:
        # The lost events may never have happened: without them, and the new socket joined
        # that many events earlier (still after the rotation began), both recordings are the
        # same, so no rule fed only these recordings could have kept them.
        without = stream[:old_end] + stream[old_end + lost :]
        assert new_start - lost >= old_start
        assert without[old_start:old_end] == old
        assert without[new_start - lost :] == new
