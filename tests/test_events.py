"""Deriving an event's call key from every plausible payload spelling."""

from __future__ import annotations

import pytest

from listener.core.events import Event, call_key_of, stamp_id


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        ({"callUuid": "c-1"}, "c-1"),
        ({"call_uuid": "c-2"}, "c-2"),
        ({"call": {"callUuid": "c-3"}}, "c-3"),
        ({"call": {"call_uuid": "c-4"}}, "c-4"),
        ({"call": {"uuid": "c-5"}}, "c-5"),
        ({"call": {"id": 42}}, "42"),
        ({"callId": "c-6"}, "c-6"),
        ({"callUuid": "", "call_uuid": "c-7"}, "c-7"),
        ({"status": "ringing"}, None),
        ({"call": "not an object"}, None),
        ({"callUuid": None}, None),
    ],
)
def test_call_key_of(payload: dict[str, object], key: str | None) -> None:
    assert call_key_of(payload) == key


def test_payload_is_kept_untouched_and_str_is_bounded() -> None:
    payload = {"call_uuid": "c-1", "blob": "x" * 5_000_000}
    event = Event.create("call_ai_audit_event", payload, "events", 1.0)
    assert event.payload is payload
    assert event.call_key == "c-1"
    assert len(str(event)) < 400


def test_field_reads_every_spelling() -> None:
    event = Event.create(
        "incoming_call",
        {"from_number": "+1", "call": {"callUuid": "u"}, "legs": [{"id": 7}]},
        "events",
        0.0,
    )
    assert event.field("fromNumber") == "+1"
    assert event.field("call_uuid") == "u"
    assert event.field("legs.0.id") == 7
    assert event.field("call_key") == "u"
    assert event.field("toNumber") is None
    assert event.field("toNumber", "unknown") == "unknown"


def test_stamp_id_sets_the_id_of_the_event_itself() -> None:
    event = Event.create("call_ended", {"callUuid": "c-1"}, "events", 12.5, 90)
    assert stamp_id(event, "evt_new") is event
    expected = Event.create("call_ended", {"callUuid": "c-1"}, "events", 12.5, 90, id="evt_new")
    assert event == expected
