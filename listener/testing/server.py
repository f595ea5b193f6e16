"""A fake Sippet: token minting, the Phoenix socket, the events channel and RPC, on loopback.

It speaks the real protocols over real sockets (uvicorn, websockets' protocol implementation,
Phoenix V2 frames), so the daemon is tested exactly as it runs. Strict behaviours that real
deployments may show are switched on through :class:`Behaviour`, from Python or over HTTP::

    async with FakeSippet(token_ttl=2.0) as fake:
        fake.behaviour.expiry_action = "close_socket"
        await fake.broadcast("incoming_call", {"callUuid": "c-1"})

Control API (JSON over HTTP, for tests in other processes and for poking the demo):
``POST /_fake/broadcast`` ``{"event", "payload"}``, ``POST /_fake/behaviour`` (any
:class:`Behaviour` fields), ``POST /_fake/drop``, ``POST /_fake/malformed``,
``POST /_fake/outage`` ``{"seconds"}``, ``GET /_fake/stats``.

Calls: :attr:`FakeSippet.calls` is a table of Call rows (:mod:`listener.testing.calls`) that
``list_calls`` answers from; :meth:`FakeSippet.call_event` changes it and broadcasts the event.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from listener.service.asgi import AsgiServer
from listener.testing.calls import CallTable, PayloadStyle, call_payload

__all__ = ["Behaviour", "FakeSippet", "RecordedRpc", "Upgrade"]

ExpiryAction = Literal["none", "close_socket", "close_channel"]
_MALFORMED: tuple[str | bytes, ...] = (
    "not json at all",
    "[1, 2]",
    '{"topic": "events"}',
    '[null, null, "events", "incoming_call", "not an object"]',
    '[null, null, 7, "incoming_call", {}]',
    b"\xff\x00\x13garbage",
)


@dataclass
class Behaviour:
    """Switches for strict or broken server behaviour. Change them at any time.

    Attributes:
        expiry_action: what happens to a socket when its token expires. ``none`` is what
            Phoenix does by itself; ``close_socket`` closes it (code ``expiry_close_code``);
            ``close_channel`` sends ``phx_close`` for the channel and keeps the socket.
        expiry_close_code: close code for ``close_socket`` (1001 is Phoenix's disconnect).
        refuse_expired: refuse upgrades whose token is expired, with HTTP 403. Unknown tokens
            are always refused.
        join_checks_token: refuse a join with ``{"reason": "unauthorized"}`` once the socket's
            token has expired.
        refuse_joins: refuse every join with ``{"reason": "unauthorized"}``.
        answer_heartbeats: reply to heartbeats (turn off to simulate a zombie socket).
        upgrade_status: refuse every upgrade with this HTTP status (e.g. 403 or 429).
        retry_after: a ``Retry-After`` header sent with refusals and 429s, in seconds.
        key_revoked: refuse every mint and RPC call with HTTP 401.
        broadcast_join_ref: send events as pushes carrying the join_ref instead of fastlane
            broadcasts with ``join_ref = null``.
        mint_failures: answer this many of the next mints with ``mint_failure_status``.
        mint_failure_status: the status for those (503, 429, ...).
    """

    expiry_action: ExpiryAction = "none"
    expiry_close_code: int = 1001
    refuse_expired: bool = True
    join_checks_token: bool = False
    refuse_joins: bool = False
    answer_heartbeats: bool = True
    upgrade_status: int | None = None
    retry_after: int | None = None
    key_revoked: bool = False
    broadcast_join_ref: bool = False
    mint_failures: int = 0
    mint_failure_status: int = 503


_PHOENIX_TOPIC = "phoenix"


# The server's frames are its own few lines of json, not listener.realtime.protocol's codec:
# a bug there then shows against this instead of cancelling out in every test.
def _encode(
    join_ref: str | None, ref: str | None, topic: str, event: str, payload: dict[str, Any]
) -> str:
    """A V2 frame as Phoenix's serializer writes it: compact, UTF-8 unescaped."""
    return json.dumps(
        [join_ref, ref, topic, event, payload], separators=(",", ":"), ensure_ascii=False
    )


def _decode(text: str) -> list[Any] | None:
    """``[join_ref, ref, topic, event, payload]`` of a client frame, or None if unreadable.

    Refs are kept as sent, since Phoenix echoes them back unchanged; extra trailing elements
    are ignored, as Phoenix does.
    """
    try:
        frame = json.loads(text)
    except ValueError:
        return None
    if not isinstance(frame, list) or len(frame) < 5:
        return None
    if not isinstance(frame[2], str) or not isinstance(frame[3], str):
        return None
    return frame[:5]


def _reply(
    ref: str | None,
    join_ref: str | None,
    topic: str,
    status: str,
    response: dict[str, Any] | None = None,
) -> str:
    return _encode(
        join_ref, ref, topic, "phx_reply", {"status": status, "response": response or {}}
    )


@dataclass(frozen=True, slots=True)
class Upgrade:
    """One websocket upgrade attempt as the server saw it."""

    at: float
    status: int
    vsn: str | None


@dataclass(frozen=True, slots=True)
class RecordedRpc:
    """One RPC request as received: path, lower-case headers, parsed JSON body."""

    path: str
    headers: dict[str, str]
    body: Any


@dataclass(frozen=True, slots=True)
class _ScriptedReply:
    status: int
    body: Any
    headers: dict[str, str]


@dataclass(eq=False)
class _Socket:
    """One accepted websocket and its membership of the topic."""

    ws: WebSocket
    token: str
    expires_at: float
    outbox: asyncio.Queue[str | bytes | int] = field(default_factory=asyncio.Queue)
    join_ref: str | None = None
    expiry: asyncio.TimerHandle | None = None


class FakeSippet:
    """The fake server. Use as ``async with FakeSippet() as fake:``.

    Args:
        api_key: the secret key the server accepts.
        token_ttl: lifetime of minted tokens, in seconds.
        topic: the channel topic (``events``).
        host, port: where to listen (port 0: any free port).
        tls: serve ``https://`` and ``wss://`` with this server-side context (a test's own
            certificate authority, say); plain HTTP without.
    """

    def __init__(
        self,
        *,
        api_key: str = "sk_test_fake_secret_key",
        token_ttl: float = 300.0,
        topic: str = "events",
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.api_key = api_key
        self.token_ttl = token_ttl
        self.topic = topic
        self.behaviour = Behaviour()
        self.mints = 0
        self.mint_refusals = 0
        self.joins = 0
        self.join_times: list[float] = []
        self.join_refusals = 0
        self.heartbeats = 0
        self.upgrades: list[Upgrade] = []
        self.rpc_requests: list[RecordedRpc] = []
        self.sent_events = 0
        self.rpc_listeners: list[Callable[[RecordedRpc], None]] = []
        self._tokens: dict[str, float] = {}
        self._sockets: set[_Socket] = set()
        self._scripted: deque[_ScriptedReply] = deque()
        self._scripted_for: dict[str, deque[_ScriptedReply]] = {}
        self._changed = asyncio.Condition()
        self._scheme = "http" if tls is None else "https"
        self._server = AsgiServer(self._app(), host, port, ssl_context=tls)
        self.calls = CallTable()
        self._outage_until = 0.0

    @property
    def base_url(self) -> str:
        """The HTTP root to give the daemon as ``sippet.base_url``."""
        return f"{self._scheme}://{self._server.host}:{self._server.port}"

    @property
    def joined_sockets(self) -> int:
        """How many sockets are joined to the topic right now."""
        return sum(1 for sock in self._sockets if sock.join_ref is not None)

    async def __aenter__(self) -> FakeSippet:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start listening."""
        await self._server.start()

    async def stop(self) -> None:
        """Close every socket and stop listening."""
        await self.drop_all(code=1001)
        await self._server.stop()

    # Driving the server from a test.

    async def broadcast(self, event: str, payload: dict[str, Any]) -> int:
        """Send an event to every socket joined to the topic; return how many got it."""
        receivers = [sock for sock in self._sockets if sock.join_ref is not None]
        if self.behaviour.broadcast_join_ref:
            for sock in receivers:
                sock.outbox.put_nowait(_encode(sock.join_ref, None, self.topic, event, payload))
        else:
            frame = _encode(None, None, self.topic, event, payload)
            for sock in receivers:
                sock.outbox.put_nowait(frame)
        self.sent_events += 1
        return len(receivers)

    async def call_event(
        self, event: str, call_uuid: str, *, style: PayloadStyle = "camel", **fields: Any
    ) -> int:
        """Create or advance a call in :attr:`calls` as ``event`` does (``incoming_call``,
        ``call_answered``, ``call_ended``), then broadcast the event with the call's row as
        its payload, spelled as ``style`` says; return how many sockets got it.

        ``fields`` (camelCase) set anything else on the row (see
        :meth:`CallTable.apply <listener.testing.calls.CallTable.apply>`).
        """
        row = self.calls.apply(event, call_uuid, time.time(), **fields)
        return await self.broadcast(event, call_payload(row, style))

    async def outage(self, seconds: float) -> None:
        """Lose the realtime side for ``seconds``: close every socket now and refuse every
        upgrade (HTTP 503) until then. Minting, RPC and call events go on meanwhile."""
        self._outage_until = time.time() + seconds
        await self.drop_all()

    async def send_malformed(self) -> None:
        """Send every kind of malformed frame to every socket."""
        for sock in self._sockets:
            for frame in _MALFORMED:
                sock.outbox.put_nowait(frame)

    async def drop_all(self, code: int = 1012) -> None:
        """Close every socket now (1012: service restart, as Phoenix's drainer does)."""
        for sock in list(self._sockets):
            sock.outbox.put_nowait(code)

    async def close_channels(self) -> None:
        """Close the channel on every socket (``phx_close``), keeping the sockets open."""
        for sock in self._sockets:
            self._close_channel(sock)
        await self._notify()

    def revoke_key(self) -> None:
        """Refuse the secret key (mints and RPC answer 401) until :meth:`restore_key`, and
        invalidate every token minted with it (open sockets stay open)."""
        self.behaviour.key_revoked = True
        self._tokens.clear()

    def restore_key(self) -> None:
        """Accept the secret key again."""
        self.behaviour.key_revoked = False

    def script_rpc(
        self,
        status: int = 200,
        body: Any = None,
        headers: dict[str, str] | None = None,
        *,
        action: str | None = None,
    ) -> None:
        """Queue one reply for the next RPC request (run or validate), first in first out;
        with ``action``, for the next request for that action only."""
        reply = _ScriptedReply(status, body, headers or {})
        if action is None:
            self._scripted.append(reply)
        else:
            self._scripted_for.setdefault(action, deque()).append(reply)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` is true; it is re-checked whenever the server's state
        changes (a mint, an upgrade, a join, a heartbeat, a leave, a socket closing).

        Raises:
            TimeoutError: it did not become true in time.
        """
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    def stats(self) -> dict[str, Any]:
        """Counters, as served by ``GET /_fake/stats``."""
        return {
            "mints": self.mints,
            "mint_refusals": self.mint_refusals,
            "upgrades": len(self.upgrades),
            "upgrades_refused": sum(1 for u in self.upgrades if u.status != 101),
            "joins": self.joins,
            "join_refusals": self.join_refusals,
            "heartbeats": self.heartbeats,
            "sockets": len(self._sockets),
            "joined_sockets": self.joined_sockets,
            "sent_events": self.sent_events,
            "rpc_requests": len(self.rpc_requests),
            "behaviour": asdict(self.behaviour),
        }

    # The ASGI application.

    def _app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/realtime/session", self._mint, methods=["POST"]),
                Route("/rpc/public/run", self._rpc, methods=["POST"]),
                Route("/rpc/public/validate", self._rpc, methods=["POST"]),
                WebSocketRoute("/socket/websocket", self._socket),
                Route("/_fake/broadcast", self._control_broadcast, methods=["POST"]),
                Route("/_fake/behaviour", self._control_behaviour, methods=["POST"]),
                Route("/_fake/drop", self._control_drop, methods=["POST"]),
                Route("/_fake/malformed", self._control_malformed, methods=["POST"]),
                Route("/_fake/stats", self._control_stats, methods=["GET"]),
                Route("/_fake/outage", self._control_outage, methods=["POST"]),
            ]
        )

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _key_ok(self, request: Request) -> bool:
        return not self.behaviour.key_revoked and secrets.compare_digest(
            request.headers.get("x-api-key", ""), self.api_key
        )

    async def _mint(self, request: Request) -> Response:
        if self.behaviour.mint_failures > 0:
            self.behaviour.mint_failures -= 1
            self.mint_refusals += 1
            await self._notify()
            return JSONResponse(
                {"error": "unavailable"},
                status_code=self.behaviour.mint_failure_status,
                headers=self._retry_after_header(),
            )
        if not self._key_ok(request):
            self.mint_refusals += 1
            await self._notify()
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        token = "st_" + secrets.token_urlsafe(24)
        now = time.time()
        self._tokens[token] = now + self.token_ttl
        self.mints += 1
        await self._notify()
        expires = datetime.fromtimestamp(now + self.token_ttl, UTC).isoformat()
        return JSONResponse(
            {
                "token": token,
                "expires_at": expires.replace("+00:00", "Z"),
                "ttl_seconds": self.token_ttl,
            }
        )

    async def _rpc(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        recorded = RecordedRpc(request.url.path, dict(request.headers), body)
        self.rpc_requests.append(recorded)
        await self._notify()
        for listener in self.rpc_listeners:
            listener(recorded)
        if not self._key_ok(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        action = body.get("action") if isinstance(body, dict) else None
        for_action = self._scripted_for.get(str(action))
        if for_action or self._scripted:
            reply = for_action.popleft() if for_action else self._scripted.popleft()
            return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
        if request.url.path.endswith("/validate"):
            return JSONResponse({"success": True})
        if action == "list_calls":
            return JSONResponse(self.calls.list_calls(body))
        return JSONResponse({"success": True, "data": None})

    def _retry_after_header(self) -> dict[str, str]:
        after = self.behaviour.retry_after
        return {} if after is None else {"retry-after": str(after)}

    def _upgrade_status(self, token: str, vsn: str | None) -> int:
        refusal = self.behaviour.upgrade_status
        if refusal is not None:
            return refusal
        if time.time() < self._outage_until:
            return 503
        if vsn is None or not vsn.startswith("2."):
            # Phoenix answers a vsn no serializer matches with 403; no vsn means V1 frames,
            # which this server does not speak.
            return 403
        expires_at = self._tokens.get(token)
        if expires_at is None:
            return 403
        if self.behaviour.refuse_expired and expires_at <= time.time():
            return 403
        return 101

    async def _socket(self, ws: WebSocket) -> None:
        token = ws.query_params.get("session_token", "")
        status = self._upgrade_status(token, ws.query_params.get("vsn"))
        self.upgrades.append(Upgrade(time.time(), status, ws.query_params.get("vsn")))
        await self._notify()
        if status != 101:
            await ws.send_denial_response(
                Response(status_code=status, headers=self._retry_after_header())
            )
            return
        await ws.accept()
        sock = _Socket(ws, token, self._tokens[token])
        self._sockets.add(sock)
        loop = asyncio.get_running_loop()
        sock.expiry = loop.call_at(
            loop.time() + max(0.0, sock.expires_at - time.time()), self._on_expiry, sock
        )
        writer = asyncio.create_task(self._write(sock))
        try:
            await self._read(sock)
        finally:
            sock.expiry.cancel()
            self._sockets.discard(sock)
            writer.cancel()
            await asyncio.wait({writer})
            await self._notify()

    async def _read(self, sock: _Socket) -> None:
        while True:
            try:
                message = await sock.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("text")
            if data is not None:
                await self._on_frame(sock, data)

    async def _write(self, sock: _Socket) -> None:
        try:
            while True:
                item = await sock.outbox.get()
                if isinstance(item, int):
                    await sock.ws.close(code=item)
                    return
                if isinstance(item, bytes):
                    await sock.ws.send_bytes(item)
                else:
                    await sock.ws.send_text(item)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return

    async def _on_frame(self, sock: _Socket, data: str) -> None:
        frame = _decode(data)
        if frame is None:
            return
        join_ref, ref, topic, event, _ = frame
        if topic == _PHOENIX_TOPIC and event == "heartbeat":
            self.heartbeats += 1
            if self.behaviour.answer_heartbeats:
                sock.outbox.put_nowait(_reply(ref, None, _PHOENIX_TOPIC, "ok"))
            await self._notify()
            return
        if event == "phx_join":
            await self._on_join(sock, topic, ref)
        elif event == "phx_leave":
            sock.outbox.put_nowait(_reply(ref, join_ref, topic, "ok"))
            if topic == self.topic and sock.join_ref is not None:
                sock.outbox.put_nowait(
                    _encode(sock.join_ref, sock.join_ref, self.topic, "phx_close", {})
                )
                sock.join_ref = None
                await self._notify()

    async def _on_join(self, sock: _Socket, topic: str, ref: str | None) -> None:
        if topic != self.topic:
            sock.outbox.put_nowait(_reply(ref, None, topic, "error", {"reason": "unmatched topic"}))
            return
        expired = sock.expires_at <= time.time()
        if self.behaviour.refuse_joins or (self.behaviour.join_checks_token and expired):
            self.join_refusals += 1
            sock.outbox.put_nowait(_reply(ref, ref, topic, "error", {"reason": "unauthorized"}))
            await self._notify()
            return
        if sock.join_ref is not None:
            # Phoenix closes the previous join of the same topic on the same socket.
            sock.outbox.put_nowait(_encode(sock.join_ref, sock.join_ref, topic, "phx_close", {}))
        sock.join_ref = ref
        self.joins += 1
        self.join_times.append(time.time())
        sock.outbox.put_nowait(_reply(ref, ref, topic, "ok"))
        await self._notify()

    def _on_expiry(self, sock: _Socket) -> None:
        action = self.behaviour.expiry_action
        if action == "close_socket":
            sock.outbox.put_nowait(self.behaviour.expiry_close_code)
        elif action == "close_channel":
            self._close_channel(sock)

    def _close_channel(self, sock: _Socket) -> None:
        if sock.join_ref is not None:
            sock.outbox.put_nowait(
                _encode(sock.join_ref, sock.join_ref, self.topic, "phx_close", {})
            )
            sock.join_ref = None

    # Control API handlers.

    async def _control_broadcast(self, request: Request) -> Response:
        body = await request.json()
        receivers = await self.broadcast(str(body["event"]), dict(body.get("payload") or {}))
        return JSONResponse({"receivers": receivers})

    async def _control_behaviour(self, request: Request) -> Response:
        body = await request.json()
        known = {f.name for f in fields(Behaviour)}
        unknown = sorted(set(body) - known)
        if unknown:
            return JSONResponse({"error": f"unknown behaviour {unknown}"}, status_code=400)
        for name, value in body.items():
            setattr(self.behaviour, name, value)
        return JSONResponse(asdict(self.behaviour))

    async def _control_drop(self, request: Request) -> Response:
        del request
        await self.drop_all()
        return JSONResponse({"dropped": len(self._sockets)})

    async def _control_malformed(self, request: Request) -> Response:
        del request
        await self.send_malformed()
        return JSONResponse({"sent": len(_MALFORMED)})

    async def _control_outage(self, request: Request) -> Response:
        body = await request.json()
        await self.outage(float(body["seconds"]))
        return JSONResponse({"until": self._outage_until})

    async def _control_stats(self, request: Request) -> Response:
        del request
        return JSONResponse(self.stats())
