"""One websocket to Sippet, joined to one topic: the I/O shell around the protocol core.

A :class:`Connection` connects, joins, reads, answers nothing and heartbeats on a fixed
schedule (never reset by incoming traffic, which would starve heartbeats on a busy channel).
It owns its clock; the protocol core owns the rules. However it ends, :meth:`wait_closed`
returns a :class:`~listener.LinkError` saying what happened (a reason, the HTTP status of a
refused upgrade, the server's close code): facts only. What they mean for the token and the
next attempt is decided by the session, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, cast

import structlog
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.protocol import Event as WebSocketEvent

from listener.core import metrics
from listener.core.errors import LinkError, RemoteProtocolError
from listener.core.events import Event
from listener.core.httputil import USER_AGENT
from listener.core.retry import retry_after_seconds
from listener.realtime.frames import Messages, RunProtocol
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
)

__all__ = ["TURN_EVERY", "Connection", "EventSink", "LinkSettings"]

EventSink = Callable[[Event], Awaitable[Any] | None]

_log = structlog.get_logger(__name__)


class _CountingConnection(ClientConnection):
    """websockets' connection, counting the bytes the socket has received (a link still
    receiving is not deaf, however late its heartbeat reply: it may be queued behind a large
    frame still arriving), and reading the server's frames in runs where it can
    (:class:`~listener.realtime.frames.RunProtocol`)."""

    received = 0
    # Whether the protocol reads runs of frames, whose messages this puts in the queue.
    runs = False
    # The read loop's intake of a run's messages (Connection._take_run), asked first: it
    # takes the run where it arrives and says so, or leaves it to the queue.
    intake: Callable[[Messages], bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Decided before any byte arrives: runs only where the queue they go to is as read.
        self.runs = _Received.of(self) is not None and RunProtocol.adopt(self.protocol)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        super().data_received(data)

    def process_event(self, event: WebSocketEvent | Messages) -> None:
        if type(event) is not Messages:
            super().process_event(cast(WebSocketEvent, event))
            return
        if self.intake is not None and self.intake(event):
            return
        # A run's messages go where recv() finds websockets' frames, behind them, in order;
        # the last through Assembler.put, which wakes a waiting reader and pauses reading
        # past max_queue (counted in messages, as websockets counts frames). With the runs
        # and this one put per run, a drain costs 123,800 -> 91,000 instructions an event
        # (bench.instructions; call state off 91,000 -> 57,900, the bare loop 80,100).
        last = event.pop()
        self.recv_messages.frames.queue.extend(cast("list[Frame]", event))
        self.recv_messages.put(cast(Frame, last))


class _Received:
    """The messages websockets has received and not yet handed out, taken all at once.

    ``ws.recv()`` costs an async generator step, a coroutine and websockets' own checks per
    message: 10 % of the daemon's busy samples in a live flood (py-spy), where the frames are
    already in websockets' queue (``bench.instructions``, a drain: 175,000 -> 167,500
    instructions an event). :meth:`next` waits for the queue, then takes every whole message
    in it: the messages of runs (``frames.Messages``, already decoded) and unfragmented text
    or binary frames; a fragment stops it, and ``recv()`` reassembles that message. Then it
    lets websockets resume reading once the queue is low, so that its flow control
    (``max_queue``) bounds what is held as before. This reads websockets' ``Assembler``
    internals (its ``frames`` queue), checked at the connection's start: where they differ,
    :meth:`of` returns None, no runs are read and every message goes through ``recv()``. A
    text frame that is not UTF-8 is passed on as bytes that are not a V2 binary frame
    either, so it is dropped as malformed (``recv()`` would close the connection with 1007).
    """

    __slots__ = ("_assembler", "_frames", "_loop", "_queue", "_waiter", "_woken", "_ws")

    def __init__(self, ws: ClientConnection, assembler: Any, queue: deque[Any]) -> None:
        self._ws = ws
        self._assembler = assembler
        self._frames = assembler.frames
        self._queue = queue
        self._loop = asyncio.get_running_loop()
        # The future next() waits on (not one websockets' recv() made for a fragmented
        # message), and whether wake() ended that wait.
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False

    @classmethod
    def of(cls, ws: ClientConnection) -> _Received | None:
        assembler = getattr(ws, "recv_messages", None)
        frames = getattr(assembler, "frames", None)
        queue = getattr(frames, "queue", None)
        if (
            not isinstance(queue, deque)
            or not callable(getattr(frames, "get", None))
            or not hasattr(frames, "get_waiter")
            or not all(
                callable(getattr(assembler, name, None))
                for name in ("put", "maybe_pause", "maybe_resume")
            )
            or not isinstance(getattr(assembler, "closed", None), bool)
        ):
            return None
        return cls(ws, assembler, queue)

    @property
    def waiting(self) -> bool:
        """Whether :meth:`next` waits, nothing queued."""
        waiter = self._waiter
        return (
            waiter is not None
            and waiter is self._frames.get_waiter
            and not waiter.done()
            and not self._queue
        )

    def wake(self) -> None:
        """End :meth:`next`'s wait, with or without messages queued."""
        waiter = self._waiter
        if waiter is not None and waiter is self._frames.get_waiter and not waiter.done():
            self._woken = True
            waiter.set_result(None)

    def hold(self, messages: list[str | bytes]) -> None:
        """Queue ``messages`` (taken out of a run, not yet handed on) ahead of whatever comes
        next, where websockets' flow control counts them: past ``max_queue``, it pauses
        reading."""
        self._queue.extend(messages)
        self._assembler.maybe_pause()

    async def next(self) -> list[str | bytes]:
        """The next messages, at least one unless woken by :meth:`wake`; raises
        ConnectionClosed once the link has ended."""
        queue = self._queue
        if not queue:
            frames = self._frames
            ended = self._assembler.closed
            if not ended:
                # What the queue's get() does, with its future: put() and abort() resolve it.
                waiter = self._waiter = frames.get_waiter = self._loop.create_future()
                try:
                    await waiter
                except EOFError:
                    ended = True
                finally:
                    waiter.cancel()
                    frames.get_waiter = self._waiter = None
            if ended and not queue:
                # Ended, and everything read: recv() says how (ConnectionClosed).
                return [await self._ws.recv()]
        batch: list[str | bytes] = []
        while queue:
            item = queue[0]
            if type(item) is str or type(item) is bytes:
                batch.append(queue.popleft())
                continue
            if not item.fin or item.opcode not in _DATA:
                break
            queue.popleft()
            data = bytes(item.data)
            if item.opcode is Opcode.TEXT:
                try:
                    batch.append(data.decode())
                    continue
                except UnicodeDecodeError:
                    pass
            batch.append(data)
        woken, self._woken = self._woken, False
        if not batch and queue and not woken:
            # A fragmented message: websockets reassembles it (once what woke the wait, a
            # held event's wait, was seen to: the read loop asks again).
            batch.append(await self._ws.recv())
        return batch

    def done(self) -> None:
        """The batch is processed: websockets may read on if its queue is low."""
        self._assembler.maybe_resume()


_DATA = frozenset({Opcode.TEXT, Opcode.BINARY})
# Messages of one batch handed on before the loop gets a turn (the handlers' workers then
# start on them): a drain's runs are thousands of messages (a read of the socket's backlog),
# and each was decoded, stamped, merged into the call map and queued before any worker
# touched the first, so the workers met every event again out of the CPU's cache. Drains of
# 20,000, the server and the daemon on a CPU each, 4 rounds interleaved, medians of 8:
# unbounded 133,900/s, 256 155,000/s, 64 153,300/s, 1,024 139,000/s; the bare loop's 147,900.
# bench.hotpath quick --before: 125,900 against 117,600/s (0.98 x the bare loop, from 0.92 x),
# in as many instructions (bench.instructions: 82,300 against 82,800 an event): the same work,
# found in the cache.
TURN_EVERY = 256


class _Turn:
    """Awaited, gives the event loop one turn (``asyncio.sleep(0)``'s bare yield; an object,
    not a coroutine, so one a closing link leaves unawaited is no warning)."""

    def __await__(self) -> Generator[None, None, None]:
        yield


_TURN = _Turn()


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """How one socket behaves. Every duration is in seconds.

    Attributes:
        topic: the channel to join.
        heartbeat_interval: a heartbeat goes out this often, and its reply must arrive
            before the next one is due, or the link is declared dead (once what the socket
            is still receiving has been read, for up to one more interval).
        join_timeout: how long a join may wait for its reply.
        connect_timeout: how long the TCP + TLS + upgrade may take.
        close_timeout: how long a closing handshake may take before the socket is dropped.
        max_message_size: the largest message accepted; Sippet's AI audit events can be
            several MB, beyond websockets' 1 MiB default.
        max_queue: messages websockets reads ahead before applying TCP back-pressure.
    """

    topic: str = "events"
    heartbeat_interval: float = 30.0
    join_timeout: float = 10.0
    connect_timeout: float = 10.0
    close_timeout: float = 5.0
    max_message_size: int = 64 * 1024 * 1024
    max_queue: int = 64


class Connection:
    """A socket joined to one topic.

    Args:
        url: the full socket URL, token included; it is never logged.
        settings: timeouts and limits.
        on_event: called with every application event, in arrival order, on the event loop.
            It must not block; it may return an awaitable, and reading pauses until that
            completes (back-pressure from full handler queues). It may be replaced at any time
            (the session does, during a token rotation).
        name: a short label for logs.
        tls: the TLS context of a ``wss://`` URL (default: websockets' own, a new one for
            every connection).

    Attributes:
        joined_at: when the join was accepted (monotonic clock; None before).
        last_heartbeat_ok: when the last heartbeat reply, or the join reply, arrived.
        answered_until: once the link has ended, the last moment the server was known to be
            answering: the end itself, or the last heartbeat reply if it ended for want of one.
    """

    def __init__(
        self,
        url: str,
        settings: LinkSettings,
        on_event: EventSink,
        *,
        name: str = "link",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.on_event = on_event
        self.name = name
        self.settings = settings
        self._url = url
        # websockets refuses a context for a ws:// URL.
        self._tls = tls if url.startswith("wss:") else None
        self._protocol = ChannelProtocol(settings.topic)
        self._ws: _CountingConnection | None = None
        self._joined: asyncio.Future[None] | None = None
        self._left: asyncio.Future[None] | None = None
        self._task: asyncio.Task[LinkError] | None = None
        self._closing = False
        self._intake_paused = False
        # Frames read, for telling a busy link from a deaf one (see _drain); and the
        # batches they were read in (one await each).
        self._frames = 0
        self._batches = 0
        # The read loop's view of websockets' queue (None: every message through recv()),
        # and what the intake left it to do (see _take_run).
        self._received: _Received | None = None
        self._held: Awaitable[Any] | Exception | None = None
        self.joined_at: float | None = None
        self.last_heartbeat_ok: float | None = None
        self.answered_until: float | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.name} {self._protocol.state.value}>"

    @property
    def joined(self) -> bool:
        """Whether the topic is joined and the socket open."""
        return self._joined is not None and self._joined.done() and not self.closed

    @property
    def closed(self) -> bool:
        """Whether the connection has ended (see :meth:`wait_closed` for why)."""
        return self._task is not None and self._task.done()

    async def open(self) -> None:
        """Connect and join; return once the join is accepted.

        Raises:
            LinkError: the upgrade was refused (``upgrade_refused``, with its ``status``), the
                connection failed (``connect_failed``), the join was refused (``join_refused``)
                or timed out (``join_timeout``), or the link ended during the join.
        """
        self._ws = await self._connect()
        self._joined = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(self._ws), name=f"sippet-{self.name}")
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(self._protocol.join())
        waiters: set[asyncio.Future[Any]] = {self._joined, self._task}
        await asyncio.wait(
            waiters, timeout=self.settings.join_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if self._joined.done():
            return
        if self._task.done():
            raise self._task.result()
        await self._abort()
        raise LinkError("join_timeout", f"no join reply in {self.settings.join_timeout}s")

    async def wait_closed(self) -> LinkError:
        """Wait until the connection ends; return why it ended."""
        if self._task is None:
            return LinkError("not_opened")
        return await asyncio.shield(self._task)

    async def leave(self) -> None:
        """Leave the topic, wait (bounded) for the server's acknowledgement, then close.

        Events that arrive before the acknowledgement are still passed to ``on_event``.
        Safe to call again while a leave is under way, or after the link ended.
        """
        ws = self._ws
        if ws is None or self.closed:
            return
        self._closing = True
        if self._left is None:
            self._left = asyncio.get_running_loop().create_future()
            if self._protocol.state in (JoinState.JOINED, JoinState.JOINING):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(self._protocol.leave())
            else:
                # Not joined: there is nothing for the server to acknowledge.
                self._left.set_result(None)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.close_timeout):
                await asyncio.shield(self._left)
        await self.close()

    async def close(self) -> None:
        """Close the socket (a clean close handshake, bounded by ``close_timeout``)."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            await asyncio.wait({self._task})

    async def _abort(self) -> None:
        """Drop the socket without a closing handshake: the peer is not answering anyway."""
        self._closing = True
        if self._ws is not None:
            self._ws.transport.abort()
        if self._task is not None:
            await asyncio.wait({self._task})

    async def _connect(self) -> _CountingConnection:
        try:
            ws = await websockets.connect(
                self._url,
                open_timeout=self.settings.connect_timeout,
                close_timeout=self.settings.close_timeout,
                max_size=self.settings.max_message_size,
                max_queue=self.settings.max_queue,
                user_agent_header=USER_AGENT,
                create_connection=_CountingConnection,
                ssl=self._tls,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise LinkError(
                "upgrade_refused",
                f"HTTP {status}",
                status=status,
                retry_after=retry_after_seconds(exc.response.headers),
            ) from None
        except InvalidURI:
            # The exception text holds the URL, token and all: say less.
            raise LinkError("connect_failed", "invalid socket URL") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise LinkError("connect_failed", type(exc).__name__) from None
        assert isinstance(ws, _CountingConnection)
        return ws

    async def _run(self, ws: _CountingConnection) -> LinkError:
        """Read and heartbeat until the link ends; return why it ended."""
        heartbeat = asyncio.create_task(self._heartbeat(ws), name=f"sippet-{self.name}-hb")
        try:
            failure = await self._read(ws)
        except LinkError as exc:
            failure = exc
        finally:
            heartbeat.cancel()
        if heartbeat.done() and not heartbeat.cancelled() and heartbeat.exception() is not None:
            heartbeat_failure = heartbeat.exception()
            if isinstance(heartbeat_failure, LinkError):
                failure = heartbeat_failure
        else:
            await asyncio.wait({heartbeat})
        if self._closing and failure.reason in ("server_closed", "heartbeat_timeout"):
            failure = LinkError("closed", "closed by us")
        # A deaf server was last heard from at its last heartbeat reply, not when we gave up.
        deaf = failure.reason == "heartbeat_timeout"
        self.answered_until = self.last_heartbeat_ok if deaf else time.monotonic()
        # A pending leave waited for the link to go away: it has.
        self._resolve(self._left)
        if not ws.transport.is_closing():
            await ws.close()
        return failure

    async def _read(self, ws: _CountingConnection) -> LinkError:
        received = _Received.of(ws)
        if received is not None and ws.runs:
            self._received = received
            ws.intake = self._take_run
        try:
            while True:
                # One await per batch, not per frame: what websockets has already received
                # is taken from its queue at once (see _Received).
                batch = await received.next() if received is not None else [await ws.recv()]
                self._frames += len(batch)
                self._batches += 1
                # Every message of a batch had arrived by now: one clock read for them all.
                now = time.time()
                # What the intake left (see _take_run): its failure, raised as if it had
                # happened here, or an event's wait, ahead of the batch (which begins with
                # the rest of that event's run).
                wait, self._held = self._held, None
                if isinstance(wait, Exception):
                    raise wait
                while True:
                    if wait is not None:
                        self._intake_paused = True
                        await wait
                        self._intake_paused = False
                    left = self._hand_on(batch, now)
                    if left is None:
                        break
                    wait, batch = left
                if received is not None:
                    received.done()
        except ConnectionClosed:
            pass
        finally:
            ws.intake = None
        code, reason = ws.close_code, ws.close_reason or ""
        return LinkError("server_closed", f"code {code} {reason}".strip(), close_code=code)

    def _hand_on(
        self, batch: list[str | bytes], now: float
    ) -> tuple[Awaitable[Any], list[str | bytes]] | None:
        """Hand ``batch``'s events on (``now``: when they had all arrived); stop at one whose
        ``on_event`` returned an awaitable, and return it with the messages after it, or
        after :data:`TURN_EVERY` messages, and return a turn of the loop with the rest."""
        protocol = self._protocol
        topic = self.settings.topic
        for index, item in enumerate(batch):
            if index == TURN_EVERY:
                return _TURN, batch[index:]
            try:
                events = protocol.receive(item)
            except RemoteProtocolError as exc:
                metrics.FRAMES_MALFORMED.inc()
                _log.warning(
                    "malformed frame dropped", link=self.name, error=str(exc), size=len(item)
                )
                continue
            # One event at most per message (the protocol core's rule).
            for event in events:
                if type(event) is Message:
                    wait = self.on_event(
                        Event.create(event.event, event.payload, topic, now, len(item))
                    )
                    if wait is not None:
                        return wait, batch[index + 1 :]
                else:
                    self._on_control(event)
        return None

    def _take_run(self, run: Messages) -> bool:
        """Hand a run's events on where it arrives (websockets' ``data_received``), when the
        read loop waits with nothing queued and nothing held; say whether it was taken.

        Otherwise the run waits in the queue for the read task, which takes it a loop turn
        later and hands its events on, and the handler's worker starts a turn after that.
        Taken here, the worker starts a turn sooner and the read task is not woken at all: a
        lone event has a task wake-up and a turn of the loop fewer to pay. What the read loop
        would do mid-batch it is left: an event's wait (the rest of the run queued behind it,
        where websockets' flow control counts it and pauses reading past ``max_queue``, as it
        did), and a failure (a control frame's LinkError, or anything ``on_event`` raised),
        raised there, which ends the link as before. ``python -m bench.instructions --rate 200
        --before MAIN`` (1,000 events at 200/s, each alone): 199,800 -> 172,500 instructions
        a lone event (the bare loop 132,100); a drain of 5,000 unchanged (84,192 -> 84,185).
        """
        received = self._received
        if self._held is not None or received is None or not received.waiting:
            return False
        self._batches += 1
        rest: list[str | bytes] = []
        try:
            left = self._hand_on(run, time.time())
        except Exception as exc:
            self._held = exc
            received.wake()
        else:
            if left is not None:
                self._held, rest = left
                received.hold(rest)
                received.wake()
        # The rest is counted as the read loop takes it.
        self._frames += len(run) - len(rest)
        return True

    def _on_control(self, event: ProtocolEvent) -> None:
        if isinstance(event, HeartbeatReply):
            now = time.monotonic()
            self.last_heartbeat_ok = now
            metrics.HEARTBEAT_RTT.observe(now - event.sent_at)
        elif isinstance(event, JoinOk):
            self._resolve(self._joined)
            self.joined_at = self.last_heartbeat_ok = time.monotonic()
        elif isinstance(event, JoinRefused):
            raise LinkError("join_refused", _reason(event.response))
        elif isinstance(event, LeaveOk):
            self._resolve(self._left)
            raise LinkError("closed", "left")
        elif isinstance(event, ChannelClosed):
            raise LinkError("channel_closed", "phx_close from the server")
        elif isinstance(event, ChannelErrored):
            raise LinkError("channel_error", _reason(event.payload))

    async def _heartbeat(self, ws: _CountingConnection) -> None:
        interval = self.settings.heartbeat_interval
        protocol = self._protocol
        while True:
            await asyncio.sleep(interval)
            if protocol.heartbeat_pending and self._intake_paused:
                # The reply may be sitting unread behind events our handlers cannot take
                # yet: that is our slowness, not a dead server.
                continue
            if protocol.heartbeat_pending:
                await self._drain(ws, interval)
            if protocol.heartbeat_pending:
                _log.warning(
                    "heartbeat unanswered, dropping the link", link=self.name, interval=interval
                )
                # The server is not answering: a closing handshake would only wait too.
                ws.transport.abort()
                raise LinkError("heartbeat_timeout", f"no reply within {interval}s")
            try:
                await ws.send(protocol.heartbeat(time.monotonic()))
            except ConnectionClosed:
                return

    async def _drain(self, ws: _CountingConnection, budget: float) -> None:
        """Past a heartbeat's deadline, read on for up to ``budget`` seconds or until the
        reply arrives, while the socket may still hold what it received before the deadline:
        aborting at once would throw that away (what the kernel holds, half a large frame),
        and the reply may be among it.

        Each short settle ends the wait if nothing more arrived (a silent server), or if
        whole frames did (the reader is keeping up with a stream that carries no reply: a
        deaf server, whose backlog has been read by now). It goes on while the intake is
        paused, or while bytes arrive without a whole frame (a large one on its way).
        """
        settle = min(budget / 10, 0.05)
        until = time.monotonic() + budget
        while self._protocol.heartbeat_pending and time.monotonic() < until:
            received, frames = ws.received, self._frames
            await asyncio.sleep(settle)
            if self._intake_paused:
                continue
            if ws.received == received or self._frames != frames:
                return

    @staticmethod
    def _resolve(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _reason(response: dict[str, Any]) -> str:
    reason = response.get("reason")
    return str(reason) if reason is not None else str(response)[:200]
