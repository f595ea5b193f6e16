"""The sans-I/O Phoenix core, driven with frames only."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listener.core.errors import LocalProtocolError, RemoteProtocolError
from listener.realtime.protocol import (
    ChannelClosed,
    ChannelErrored,
    ChannelProtocol,
    HeartbeatReply,
    JoinOk,
    JoinRefused,
    JoinState,
    LeaveOk,
    Message,
    ProtocolEvent,
    decode,
    encode,
)


def joined_channel() -> ChannelProtocol:
    channel = ChannelProtocol("events")
    frame = json.loads(channel.join())
    channel.receive(
        json.dumps([frame[0], frame[1], "events", "phx_reply", {"status": "ok", "response": {}}])
    )
    assert channel.state is JoinState.JOINED
    return channel


def test_join_frame_uses_its_ref_as_join_ref() -> None:
    channel = ChannelProtocol("events", {"last_seen": 3})
    assert json.loads(channel.join()) == ["1", "1", "events", "phx_join", {"last_seen": 3}]
    assert channel.state is JoinState.JOINING


def test_join_ok_and_refused() -> None:
    channel = ChannelProtocol("events")
    channel.join()
    ok = channel.receive('["1","1","events","phx_reply",{"status":"ok","response":{"a":1}}]')
    assert ok == [JoinOk({"a": 1})]

    refused = ChannelProtocol("events")
    refused.join()
    events = refused.receive(
        '["1","1","events","phx_reply",{"status":"error","response":{"reason":"unauthorized"}}]'
    )
    assert events == [JoinRefused({"reason": "unauthorized"})]
    assert refused.state is JoinState.ERRORED


def test_numeric_refs_are_normalised_and_trailing_elements_tolerated() -> None:
    channel = ChannelProtocol("events")
    channel.join()
    assert channel.receive('[1, 1, "events", "phx_reply", {"status": "ok"}, "extra"]') == [
        JoinOk({})
    ]
    frame = decode('[7, 8, "t", "e", {}, 9]')
    assert (frame.join_ref, frame.ref) == ("7", "8")


def test_broadcasts_with_null_join_ref_are_delivered() -> None:
    channel = joined_channel()
    events = channel.receive('[null,null,"events","incoming_call",{"callUuid":"c"}]')
    assert events == [Message("incoming_call", {"callUuid": "c"})]


def test_stale_frames_from_an_earlier_join_are_dropped() -> None:
    channel = joined_channel()
    assert channel.receive('["99",null,"events","incoming_call",{}]') == []
    # A push carrying the current join_ref is ours.
    assert channel.receive('["1",null,"events","incoming_call",{}]') == [
        Message("incoming_call", {})
    ]
    # Phoenix closes a previous join with the old join_ref: not our channel closing.
    assert channel.receive('["99","99","events","phx_close",{}]') == []
    assert channel.state is JoinState.JOINED


def test_frames_for_other_topics_are_ignored() -> None:
    channel = joined_channel()
    assert channel.receive('[null,null,"other","incoming_call",{}]') == []


def test_leave_is_acknowledged_by_reply_or_close() -> None:
    channel = joined_channel()
    leave = json.loads(channel.leave())
    assert leave[:4] == ["1", "2", "events", "phx_leave"]
    assert channel.receive('["1","2","events","phx_reply",{"status":"ok","response":{}}]') == [
        LeaveOk()
    ]
    assert channel.state is JoinState.CLOSED

    closing = joined_channel()
    closing.leave()
    assert closing.receive('["1","1","events","phx_close",{}]') == [LeaveOk()]


def test_unsolicited_close_and_error() -> None:
    channel = joined_channel()
    assert channel.receive('["1","1","events","phx_close",{}]') == [ChannelClosed()]
    assert channel.state is JoinState.CLOSED

    crashed = joined_channel()
    assert crashed.receive('["1","1","events","phx_error",{"reason":"channel_crash"}]') == [
        ChannelErrored({"reason": "channel_crash"})
    ]
    # An errored channel may join again, with a fresh join_ref.
    rejoin = json.loads(crashed.join())
    assert rejoin[0] == rejoin[1] != "1"


def test_heartbeat_bookkeeping() -> None:
    channel = joined_channel()
    frame = json.loads(channel.heartbeat(now=10.0))
    assert frame[0] is None
    assert frame[2:] == ["phoenix", "heartbeat", {}]
    assert channel.heartbeat_pending
    with pytest.raises(LocalProtocolError):
        channel.heartbeat(now=11.0)
    # A reply to some other ref is not ours.
    assert channel.receive('[null,"999","phoenix","phx_reply",{"status":"ok"}]') == []
    reply = json.dumps([None, frame[1], "phoenix", "phx_reply", {"status": "ok"}])
    assert channel.receive(reply) == [HeartbeatReply(10.0, ok=True)]
    assert not channel.heartbeat_pending


def test_illegal_transitions_are_local_errors() -> None:
    channel = ChannelProtocol("events")
    with pytest.raises(LocalProtocolError):
        channel.leave()
    channel.join()
    with pytest.raises(LocalProtocolError):
        channel.join()


def test_binary_frames_are_decoded() -> None:
    broadcast = bytes([2, 6, 4]) + b"events" + b"ping" + b"\x00\x01"
    frame = decode(broadcast)
    assert (frame.topic, frame.event, frame.payload) == ("events", "ping", {"binary": b"\x00\x01"})
    push = bytes([0, 1, 6, 4]) + b"3" + b"events" + b"ping" + b"raw"
    assert decode(push).join_ref == "3"
    reply = bytes([1, 1, 1, 6, 2]) + b"3" + b"4" + b"events" + b"ok" + b"raw"
    frame = decode(reply)
    assert (frame.event, frame.ref, frame.payload["status"]) == ("phx_reply", "4", "ok")


def test_frames_match_the_v2_wire_format_written_out_by_hand() -> None:
    # Literal frames, not built with this package's encoder: a codec bug cannot cancel out.
    channel = ChannelProtocol("events", {"token": "t"})
    assert channel.join() == '["1","1","events","phx_join",{"token":"t"}]'
    assert channel.receive('["1","1","events","phx_reply",{"status":"ok","response":{"k":1}}]') == [
        JoinOk({"k": 1})
    ]
    assert channel.heartbeat(now=4.0) == '[null,"2","phoenix","heartbeat",{}]'
    assert channel.receive('[null,"2","phoenix","phx_reply",{"status":"ok","response":{}}]') == [
        HeartbeatReply(4.0, ok=True)
    ]
    broadcast = '[null,null,"events","incoming_call",{"callUuid":"c-1","n":[1,2.5,null,true]}]'
    assert channel.receive(broadcast) == [
        Message("incoming_call", {"callUuid": "c-1", "n": [1, 2.5, None, True]})
    ]
    # Phoenix's JSON encoder writes UTF-8 as is; other servers escape it.
    assert channel.receive('[null,null,"events","x",{"name":"Zoë","alt":"Zo\\u00eb"}]') == [
        Message("x", {"name": "Zoë", "alt": "Zoë"})
    ]
    assert channel.receive('["1",null,"events","call_ended",{}]') == [Message("call_ended", {})]
    assert channel.leave() == '["1","3","events","phx_leave",{}]'
    assert channel.receive('["1","3","events","phx_reply",{"status":"ok","response":{}}]') == [
        LeaveOk()
    ]
    assert (
        encode(None, None, "events", "e", {"a": "é"}) == '[null,null,"events","e",{"a":"\\u00e9"}]'
    )


def test_encode_round_trips() -> None:
    text = encode(None, "5", "events", "x", {"a": [1, 2]})
    frame = decode(text)
    assert (frame.join_ref, frame.ref, frame.topic, frame.event, frame.payload) == (
        None,
        "5",
        "events",
        "x",
        {"a": [1, 2]},
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.one_of(st.text(), st.binary(), json_values.map(json.dumps)))
def test_malformed_input_raises_only_remote_protocol_error(data: str | bytes) -> None:
    channel = joined_channel()
    with contextlib.suppress(RemoteProtocolError):
        channel.receive(data)
    assert channel.state in (JoinState.JOINED, JoinState.CLOSED, JoinState.ERRORED)


@given(st.lists(json_values, min_size=0, max_size=7))
def test_arbitrary_arrays_raise_only_remote_protocol_error(items: list[object]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode(json.dumps(items))


@pytest.mark.parametrize(
    "data",
    [
        "",
        "[",
        "{}",
        "[1,2,3,4]",
        '[null,null,"events","x","payload"]',
        '[null,null,1,"x",{}]',
        '[{},null,"events","x",{}]',
        '[true,null,"events","x",{}]',
        b"",
        b"\x07abc",
        b"\x02\xff",
        "[" * 100_000,
    ],
)
def test_known_malformed_frames(data: str | bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(data)


@pytest.mark.parametrize(
    "data",
    [
        '[null,{},"events","incoming_call",{}]',
        '[null,null,"events","incoming_call",[]]',
        '[null,null,"events",7,{}]',
        '[null,null,"events"]',
    ],
)
def test_malformed_broadcasts_on_our_topic_are_refused(data: str) -> None:
    with pytest.raises(RemoteProtocolError):
        joined_channel().receive(data)


def test_a_broadcast_on_our_topic_skips_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    channel = joined_channel()

    def general(self: ChannelProtocol, frame: object) -> list[ProtocolEvent]:
        raise AssertionError("the general path was taken")

    monkeypatch.setattr(ChannelProtocol, "_receive_frame", general)
    assert channel.receive('[null,null,"events","incoming_call",{}]') == [
        Message("incoming_call", {})
    ]
    assert channel.receive('[null,"7","events","x",{"a":1},"extra"]') == [Message("x", {"a": 1})]


# The channel under test is in one of these states when the frame arrives.
def _joined_with_heartbeat_pending() -> ChannelProtocol:
    channel = joined_channel()
    channel.heartbeat(now=1.0)  # ref "2"
    return channel


def _leaving() -> ChannelProtocol:
    channel = joined_channel()
    channel.leave()  # ref "2"
    return channel


def _joining() -> ChannelProtocol:
    channel = ChannelProtocol("events")
    channel.join()  # ref "1"
    return channel


_CHANNELS: dict[str, Callable[[], ChannelProtocol]] = {
    "joined": joined_channel,
    "heartbeat pending": _joined_with_heartbeat_pending,
    "leaving": _leaving,
    "joining": _joining,
}
_refs = st.one_of(
    st.none(),
    st.sampled_from(["1", "2", "99", ""]),
    st.integers(-1, 3),
    st.sampled_from([True, 1.5, {}]),
)
_replies = st.fixed_dictionaries(
    {"status": st.sampled_from(["ok", "error", None])},
    optional={"response": json_values},
)
_frames = st.tuples(
    _refs,
    _refs,
    st.sampled_from(["events", "other", "phoenix", "Events"]),
    st.one_of(
        st.sampled_from(
            ["phx_join", "phx_leave", "phx_reply", "phx_error", "phx_close", "heartbeat"]
        ),
        st.text(max_size=12),
    ),
    st.one_of(st.dictionaries(st.text(max_size=8), json_values, max_size=4), _replies, json_values),
    st.lists(json_values, max_size=2),
).map(lambda parts: json.dumps([*parts[:5], *parts[5]]))


def _outcome(channel: ChannelProtocol, feed: Callable[[], list[ProtocolEvent]]) -> tuple[Any, ...]:
    try:
        events: Any = feed()
    except RemoteProtocolError:
        events = RemoteProtocolError
    return events, channel.state, channel.join_ref, channel.heartbeat_pending


@given(state=st.sampled_from(sorted(_CHANNELS)), text=_frames)
def test_the_broadcast_fast_path_agrees_with_the_general_path(state: str, text: str) -> None:
    fast, general = _CHANNELS[state](), _CHANNELS[state]()
    assert _outcome(fast, lambda: fast.receive(text)) == _outcome(
        general, lambda: general._receive_frame(decode(text))
    )
