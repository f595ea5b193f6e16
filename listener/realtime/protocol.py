"""The Phoenix Channels V2 protocol for one channel on one socket, without I/O.

Theory of operation
-------------------
A :class:`ChannelProtocol` is fed every text (or binary) message the socket receives through
:meth:`ChannelProtocol.receive`, and returns what happened as a list of protocol events
(:class:`Message`, :class:`JoinOk`, :class:`JoinRefused`, ...). Frames to send are returned as
text by :meth:`join`, :meth:`leave` and :meth:`heartbeat`: the caller must write them to the
socket. Nothing here reads a clock; time is passed in where it matters, and timers belong to the
caller (``listener.realtime.connection``).

Wire format (``vsn=2.0.0``): ``[join_ref, ref, topic, event, payload]``, extra trailing elements
tolerated as the server does. Refs are normalised to strings because the server echoes whatever
JSON the client sent. Broadcasts carry ``join_ref = null``; following phoenix.js ``isMember``, a
frame is stale only when its join_ref is not null and differs from the current join.

Join state is a table (:data:`TRANSITIONS`); an illegal move raises
:class:`~listener.LocalProtocolError`, which is a bug in this package. Anything the server
sends that cannot be read raises :class:`~listener.RemoteProtocolError` and nothing else:
the caller drops that frame and carries on.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

import orjson

from listener.core.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "PHOENIX_TOPIC",
    "TRANSITIONS",
    "ChannelClosed",
    "ChannelErrored",
    "ChannelProtocol",
    "Frame",
    "HeartbeatReply",
    "JoinOk",
    "JoinRefused",
    "JoinState",
    "LeaveOk",
    "Message",
    "ProtocolEvent",
    "decode",
    "encode",
]

PHOENIX_TOPIC = "phoenix"
_CONTROL_EVENTS = frozenset({"phx_join", "phx_leave", "phx_reply", "phx_error", "phx_close"})
# V2 binary frame kinds (phoenix serializer.js): server push, reply, broadcast.
_KIND_PUSH, _KIND_REPLY, _KIND_BROADCAST = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded V2 frame."""

    join_ref: str | None
    ref: str | None
    topic: str
    event: str
    payload: dict[str, Any]


def _ref(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise RemoteProtocolError(f"ref must be a string, a number or null, got {type(value).__name__}")


def decode(data: str | bytes) -> Frame:
    """Decode one message received from the socket.

    Text is a V2 JSON array; bytes are a V2 binary frame (push, reply or broadcast), whose
    raw payload is exposed as ``{"binary": <bytes>}``.

    Raises:
        RemoteProtocolError: for anything that is not a valid V2 frame. No other exception
            escapes; if one does, that is a bug.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        return _decode_binary(bytes(data))
    return _frame(_load(data))


def _load(text: str) -> Any:
    try:
        # orjson: a third of json's time for a typical frame, on the hottest line of the daemon.
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise RemoteProtocolError(f"frame is not valid JSON: {exc}") from None


def _frame(decoded: Any) -> Frame:
    if not isinstance(decoded, list) or len(decoded) < 5:
        raise RemoteProtocolError("frame is not a [join_ref, ref, topic, event, payload] array")
    join_ref, ref, topic, event, payload = decoded[:5]
    if not isinstance(topic, str) or not isinstance(event, str):
        raise RemoteProtocolError("frame topic and event must be strings")
    if not isinstance(payload, dict):
        raise RemoteProtocolError(f"frame payload must be an object, got {type(payload).__name__}")
    return Frame(_ref(join_ref), _ref(ref), topic, event, payload)


def _decode_binary(data: bytes) -> Frame:
    """Decode a V2 binary frame: a kind byte, one-byte field lengths, fields, raw payload."""
    try:
        kind = data[0]
        if kind == _KIND_PUSH:
            join_ref, topic, event, rest = _fields(data, 3)
            return Frame(join_ref or None, None, topic, event, {"binary": rest})
        if kind == _KIND_REPLY:
            join_ref, ref, topic, status, rest = _fields(data, 4)
            payload = {"status": status, "response": {"binary": rest}}
            return Frame(join_ref or None, ref, topic, "phx_reply", payload)
        if kind == _KIND_BROADCAST:
            topic, event, rest = _fields(data, 2)
            return Frame(None, None, topic, event, {"binary": rest})
    except (IndexError, UnicodeDecodeError, ValueError):
        raise RemoteProtocolError("binary frame is truncated or not UTF-8") from None
    raise RemoteProtocolError(f"binary frame of unknown kind {data[0]}")


def _fields(data: bytes, count: int) -> list[Any]:
    """Split ``count`` length-prefixed string fields; the bytes after them are the payload."""
    offset = 1 + count
    lengths = data[1:offset]
    if len(lengths) != count:
        raise ValueError("header too short")
    fields: list[Any] = []
    for length in lengths:
        end = offset + length
        if end > len(data):
            raise ValueError("field runs past the end")
        fields.append(data[offset:end].decode("utf-8"))
        offset = end
    fields.append(data[offset:])
    return fields


def encode(
    join_ref: str | None, ref: str | None, topic: str, event: str, payload: dict[str, Any]
) -> str:
    """Encode one V2 frame as text."""
    return json.dumps([join_ref, ref, topic, event, payload], separators=(",", ":"))


class JoinState(enum.Enum):
    """Where the channel stands (phoenix.js ``CHANNEL_STATES``)."""

    CLOSED = "closed"
    JOINING = "joining"
    JOINED = "joined"
    ERRORED = "errored"
    LEAVING = "leaving"


# Rule: every join-state change happens through this table and nowhere else.
TRANSITIONS: dict[JoinState, frozenset[JoinState]] = {
    JoinState.CLOSED: frozenset({JoinState.JOINING}),
    JoinState.JOINING: frozenset(
        {JoinState.JOINED, JoinState.ERRORED, JoinState.CLOSED, JoinState.LEAVING}
    ),
    JoinState.JOINED: frozenset({JoinState.LEAVING, JoinState.ERRORED, JoinState.CLOSED}),
    JoinState.ERRORED: frozenset({JoinState.JOINING, JoinState.CLOSED}),
    JoinState.LEAVING: frozenset({JoinState.CLOSED, JoinState.ERRORED}),
}


# Not frozen: one is made per frame, and a frozen dataclass's __init__ costs twice as much.
@dataclass(slots=True)
class Message:
    """An application event on our topic (a broadcast or a push): hand it to the handlers."""

    event: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class JoinOk:
    """The server accepted our join."""

    response: dict[str, Any]


@dataclass(frozen=True, slots=True)
class JoinRefused:
    """The server answered our join with ``status: "error"`` (``response`` is app-defined)."""

    response: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LeaveOk:
    """The server acknowledged our leave, or closed the channel after it."""


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """The server closed the channel (``phx_close``) without our asking."""


@dataclass(frozen=True, slots=True)
class ChannelErrored:
    """The channel crashed on the server (``phx_error``), or a push for it was refused."""

    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    """The reply to our pending heartbeat; ``sent_at`` is the time passed to :meth:`heartbeat`."""

    sent_at: float
    ok: bool


ProtocolEvent = (
    Message | JoinOk | JoinRefused | LeaveOk | ChannelClosed | ChannelErrored | HeartbeatReply
)


class ChannelProtocol:
    """Refs, join state and heartbeat bookkeeping for one topic on one socket.

    Typical use: send :meth:`join`, feed every received message to :meth:`receive` and act on
    the returned events; send :meth:`heartbeat` every interval, after checking
    :attr:`heartbeat_pending` (still pending one interval later means the link is dead).
    """

    def __init__(self, topic: str, join_payload: dict[str, Any] | None = None) -> None:
        self.topic = topic
        self.join_payload = join_payload or {}
        self.state = JoinState.CLOSED
        self.join_ref: str | None = None
        self._next_ref = 0
        self._leave_ref: str | None = None
        self._heartbeat_ref: str | None = None
        self._heartbeat_sent_at = 0.0

    def __repr__(self) -> str:
        return f"<ChannelProtocol {self.topic} {self.state.value} join_ref={self.join_ref}>"

    # Public methods for sending data: each returns the frame text to write to the socket.

    def join(self) -> str:
        """Start (or restart, after an error) joining the topic; return the ``phx_join`` frame.

        The join's ref doubles as its join_ref, as phoenix.js does.
        """
        self._move(JoinState.JOINING)
        self.join_ref = self._make_ref()
        return encode(self.join_ref, self.join_ref, self.topic, "phx_join", self.join_payload)

    def leave(self) -> str:
        """Leave the topic; return the ``phx_leave`` frame."""
        self._move(JoinState.LEAVING)
        self._leave_ref = self._make_ref()
        return encode(self.join_ref, self._leave_ref, self.topic, "phx_leave", {})

    def heartbeat(self, now: float) -> str:
        """Return a heartbeat frame; its reply surfaces as :class:`HeartbeatReply`.

        Raises:
            LocalProtocolError: if the previous heartbeat is still unanswered; the caller
                should have declared the link dead instead.
        """
        if self._heartbeat_ref is not None:
            raise LocalProtocolError("heartbeat sent while the previous one is unanswered")
        self._heartbeat_ref = self._make_ref()
        self._heartbeat_sent_at = now
        return encode(None, self._heartbeat_ref, PHOENIX_TOPIC, "heartbeat", {})

    @property
    def heartbeat_pending(self) -> bool:
        """Whether a heartbeat was sent and not yet answered."""
        return self._heartbeat_ref is not None

    # Public methods for receiving data.

    def receive(self, data: str | bytes) -> list[ProtocolEvent]:
        """Feed one received message; return what it means for this channel.

        Frames for other topics, stale frames (a non-null join_ref from an earlier join) and
        replies to nothing we sent are ignored (an empty list).

        Raises:
            RemoteProtocolError: the message is not a valid V2 frame. The state is unchanged.
        """
        if type(data) is str:
            decoded = _load(data)
            # The hot path: a broadcast on our topic, nothing to check but its shape.
            if (
                type(decoded) is list
                and len(decoded) >= 5
                and decoded[0] is None
                and (decoded[1] is None or type(decoded[1]) is str)
                and decoded[2] == self.topic
                and type(decoded[4]) is dict
                and type(decoded[3]) is str
                and decoded[3] not in _CONTROL_EVENTS
            ):
                return [Message(decoded[3], decoded[4])]
            frame = _frame(decoded)
        else:
            frame = decode(data)
        return self._receive_frame(frame)

    def _receive_frame(self, frame: Frame) -> list[ProtocolEvent]:
        """The general path, which the hot path above must agree with (a test holds it to)."""
        if frame.topic == self.topic:
            if frame.join_ref is not None and frame.join_ref != self.join_ref:
                return []
            return self._on_topic_frame(frame)
        if frame.topic == PHOENIX_TOPIC and frame.event == "phx_reply":
            return self._on_heartbeat_reply(frame)
        return []

    def _on_topic_frame(self, frame: Frame) -> list[ProtocolEvent]:
        event = frame.event
        if event not in _CONTROL_EVENTS:
            return [Message(event, frame.payload)]
        if event == "phx_reply":
            return self._on_reply(frame)
        if event == "phx_close":
            if self.state is JoinState.LEAVING:
                self._move(JoinState.CLOSED)
                return [LeaveOk()]
            if self.state in (JoinState.JOINED, JoinState.JOINING):
                self._move(JoinState.CLOSED)
                return [ChannelClosed()]
            return []
        if event == "phx_error":
            if self.state in (JoinState.JOINED, JoinState.JOINING, JoinState.LEAVING):
                self._move(JoinState.ERRORED)
                return [ChannelErrored(frame.payload)]
            return []
        # phx_join / phx_leave never come from a server; nothing to do.
        return []

    def _on_reply(self, frame: Frame) -> list[ProtocolEvent]:
        status = frame.payload.get("status")
        response = frame.payload.get("response")
        response = response if isinstance(response, dict) else {}
        if frame.ref is not None and frame.ref == self.join_ref and self.state is JoinState.JOINING:
            if status == "ok":
                self._move(JoinState.JOINED)
                return [JoinOk(response)]
            self._move(JoinState.ERRORED)
            return [JoinRefused(response)]
        if frame.ref is not None and frame.ref == self._leave_ref:
            self._leave_ref = None
            if self.state is JoinState.LEAVING:
                self._move(JoinState.CLOSED)
                return [LeaveOk()]
        return []

    def _on_heartbeat_reply(self, frame: Frame) -> list[ProtocolEvent]:
        if frame.ref is None or frame.ref != self._heartbeat_ref:
            return []
        self._heartbeat_ref = None
        return [HeartbeatReply(self._heartbeat_sent_at, frame.payload.get("status") == "ok")]

    def _make_ref(self) -> str:
        self._next_ref += 1
        return str(self._next_ref)

    def _move(self, target: JoinState) -> None:
        if target not in TRANSITIONS[self.state]:
            raise LocalProtocolError(
                f"illegal join state change {self.state.value} -> {target.value} on {self.topic}"
            )
        self.state = target
