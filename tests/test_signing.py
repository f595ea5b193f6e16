"""The body and the signature every attempt sends, against the json module and the
Standard Webhooks reference library they replaced on the hot path."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from listener.core.events import Event
from listener.webhooks.signing import encode_body, new_message_id, sign_headers

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _reference(msg_id: str, event: Event) -> bytes:
    """The body as it was written before orjson: json, ASCII-only."""
    occurred = datetime.fromtimestamp(event.received_at, UTC).isoformat(timespec="milliseconds")
    envelope = {
        "id": msg_id,
        "type": event.name,
        "occurred_at": occurred.replace("+00:00", "Z"),
        "topic": event.topic,
        "origin": event.origin,
        "data": event.payload,
    }
    return json.dumps(envelope, separators=(",", ":")).encode("ascii")


@given(payload=st.dictionaries(st.text(), _JSON, max_size=5), at=st.floats(0, 4e9))
def test_the_body_is_ascii_json_with_the_same_value_as_before(
    payload: dict[str, object], at: float
) -> None:
    event = Event.create("call_answered", payload, "events", at)
    body = encode_body("msg_1", event)
    assert body.isascii()
    assert json.loads(body) == json.loads(_reference("msg_1", event))


def test_what_orjson_refuses_or_writes_as_utf8_is_written_by_json() -> None:
    for payload in ({"big": 2**70}, {"name": "Zoë"}, {"lone": "\ud800"}):
        event = Event.create("x", payload, "events", 0.25)
        assert encode_body("msg_1", event) == _reference("msg_1", event)


def test_non_finite_floats_which_no_frame_can_carry_become_null() -> None:
    # json wrote NaN and Infinity, which are not JSON; the socket's decoder refuses them.
    event = Event.create("x", {"v": [float("inf"), float("nan")]}, "events", 0.0)
    assert json.loads(encode_body("msg_1", event))["data"] == {"v": [None, None]}


def test_what_json_cannot_represent_is_still_a_type_error() -> None:
    for value in (datetime.now(UTC), {1, 2}, object()):
        with pytest.raises(TypeError):
            encode_body("msg_1", Event.create("x", {"v": value}, "events", 0.0))


@given(
    key=st.binary(min_size=24, max_size=64),
    msg_id=st.from_regex(r"msg_[A-Za-z0-9]{1,32}", fullmatch=True),
    timestamp=st.integers(0, 2**33),
    body=st.binary(max_size=300).map(lambda raw: base64.b64encode(raw)),
    unpadded=st.booleans(),
)
def test_the_signature_is_the_reference_librarys(
    key: bytes, msg_id: str, timestamp: int, body: bytes, unpadded: bool
) -> None:
    encoded = base64.b64encode(key).decode()
    secret = "whsec_" + (encoded.rstrip("=") if unpadded else encoded)
    expected = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())
    headers = sign_headers([secret, secret], msg_id, timestamp, body)
    assert headers["webhook-signature"] == f"{expected} {expected}"
    assert (headers["webhook-id"], headers["webhook-timestamp"]) == (msg_id, str(timestamp))


def test_message_ids_are_msg_and_32_hex_digits_each_new() -> None:
    ids = {new_message_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"msg_[0-9a-f]{32}", found) for found in ids)
