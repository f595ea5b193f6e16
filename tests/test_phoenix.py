"""The sans-I/O Phoenix core, driven with frames only."""

from __future__ import annotations

import contextlib
import json

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
