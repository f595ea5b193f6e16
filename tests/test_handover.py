"""De-duplication across a rotation's overlap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from listener.core.events import Event
from listener.realtime.handover import Handover


def ev(seq: int, name: str = "incoming_call") -> Event:
    return Event.create(name, {"seq": seq}, "events", 0.0)


def test_overlap_is_delivered_once() -> None:
    handover = Handover()
    for seq in (1, 2, 3, 4):
        handover.from_old(ev(seq))
    for seq in (3, 4, 5, 6):
        handover.from_new(ev(seq))
    assert [e.payload["seq"] for e in handover.finish()] == [5, 6]


def test_no_overlap_and_empty_sides() -> None:
    handover = Handover()
    handover.from_old(ev(1))
    handover.from_new(ev(2))
    assert [e.payload["seq"] for e in handover.finish()] == [2]
    only_new = Handover()
    only_new.from_new(ev(1))
    assert len(only_new.finish()) == 1
    assert Handover().finish() == []


def test_same_payload_different_name_is_not_a_duplicate() -> None:
    handover = Handover()
    handover.from_old(ev(1, "call_answered"))
    handover.from_new(ev(1, "call_ended"))
    assert [e.name for e in handover.finish()] == ["call_ended"]


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
    delivered = stream[:old_end] + handover.finish()
    assert [e.payload["seq"] for e in delivered] == list(range(total))
