"""A real webhook receiver on loopback, for tests, benchmarks and plugin authors.

It is an ASGI app served by uvicorn inside the running event loop, on ``127.0.0.1`` and a free
port, so deliveries cross a real TCP connection and a real HTTP parser::

    async with WebhookReceiver() as receiver:
        receiver.respond_with(503, {"retry-after": "1"}, times=1)   # then 200 again
        receiver.respond_with(422, when=lambda body: b'"bad"' in body)  # only those
        ...  # point a destination at receiver.url
        first, second = await receiver.wait_for(2)

:meth:`WebhookReceiver.down` stops the server and closes its socket (connections are refused,
as with a receiver that crashed); :meth:`WebhookReceiver.up` serves again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from listener.service.asgi import AsgiServer

__all__ = ["ReceivedRequest", "Reply", "WebhookReceiver"]

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Reply:
    """How the receiver answers a request.

    Attributes:
        status: the HTTP status.
        headers: response headers.
        delay: seconds to wait before answering (the request is recorded on arrival).
    """

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as it arrived.

    Attributes:
        method: the HTTP method.
        path: the request path.
        headers: the request headers, names lowercased (repeated ones joined by ``", "``).
        body: the body bytes exactly as received.
        received_at: wall-clock time the body was fully read, seconds since the epoch.
        status: the status it was (or is being) answered with.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    status: int

    def json(self) -> Any:
        """Return the body parsed as JSON."""
        return json.loads(self.body)


class WebhookReceiver:
    """A loopback HTTP server that records every request and answers as told.

    Args:
        host: the loopback address to bind.
        path: the path :attr:`url` points at (every path is accepted and recorded).

    Attributes:
        requests: every request received, in arrival order.
        port: the port, chosen on the first :meth:`up` and kept afterwards.
    """

    def __init__(self, host: str = "127.0.0.1", path: str = "/hook") -> None:
        self.requests: list[ReceivedRequest] = []
        self._host = host
        self._path = path
        self._default = Reply()
        self._once: deque[Reply] = deque()
        self._rules: list[tuple[Callable[[bytes], bool], Reply]] = []
        self._changed = asyncio.Condition()
        self._server: AsgiServer | None = None
        # Set when going down: requests waiting out a delay are answered at once.
        self._release = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        """The URL to deliver to."""
        return f"http://{self._host}:{self.port}{self._path}"

    @property
    def is_up(self) -> bool:
        """Whether the server accepts connections."""
        return self._server is not None

    async def __aenter__(self) -> WebhookReceiver:
        await self.up()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.down()

    def respond_with(
        self,
        status: int,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
        *,
        times: int | None = None,
        when: Callable[[bytes], bool] | None = None,
    ) -> None:
        """Set how requests are answered.

        Args:
            status: the HTTP status to answer with.
            headers: response headers (``retry-after``, ``location``, ...).
            delay: seconds to wait before answering; a long one simulates a hung receiver.
            times: answer only the next ``times`` requests this way (after any one-off answers
                already queued), then go back to the standing answer. None makes this the
                standing answer for every later request and drops queued one-offs and rules.
            when: answer this way every request whose body it accepts, before any other
                answer (the first matching rule wins); ``times`` does not apply.
        """
        reply = Reply(status, tuple((headers or {}).items()), delay)
        if when is not None:
            self._rules.append((when, reply))
        elif times is None:
            self._default = reply
            self._once.clear()
            self._rules.clear()
        else:
            self._once.extend([reply] * times)

    async def down(self) -> None:
        """Stop serving: new connections are refused. Requests still waiting get 503."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self._release.set()
        await server.stop()

    async def up(self) -> None:
        """Serve (again) on the same port."""
        if self._server is not None:
            return
        self._release = asyncio.Event()

        async def app(scope: _Scope, receive: _Receive, send: _Send) -> None:
            # A plain coroutine function: uvicorn would take a bound method for ASGI 2.
            await self._handle(scope, receive, send)

        server = AsgiServer(app, self._host, self.port)
        self.port = server.port
        try:
            await server.start()
        except BaseException:
            await server.stop()
            raise
        self._server = server

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedRequest]:
        """Wait until at least ``count`` requests have arrived; return the first ``count``.

        Raises:
            TimeoutError: fewer arrived within ``timeout`` seconds.
        """
        await self.wait_until(lambda requests: len(requests) >= count, timeout)
        return self.requests[:count]

    async def wait_until(
        self, predicate: Callable[[list[ReceivedRequest]], bool], timeout: float = 5.0
    ) -> None:
        """Wait until ``predicate(requests)`` holds; it is checked as each request arrives.

        Raises:
            TimeoutError: it did not hold within ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: predicate(self.requests))
        except TimeoutError:
            raise TimeoutError(
                f"webhook receiver: condition not met within {timeout:g} s"
                f" ({len(self.requests)} requests received)"
            ) from None

    async def _handle(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """Serve one ASGI connection scope: record, wait if told to, answer."""
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if body is None:
            return
        reply = next((reply for match, reply in self._rules if match(body)), None)
        if reply is None:
            reply = self._once.popleft() if self._once else self._default
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.requests.append(
            ReceivedRequest(
                scope["method"], scope["path"], headers, body, time.time(), reply.status
            )
        )
        async with self._changed:
            self._changed.notify_all()
        status = reply.status
        if reply.delay > 0:
            release = self._release
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(reply.delay):
                    await release.wait()
            status = 503 if release.is_set() else status
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers],
            }
        )
        await send({"type": "http.response.body", "body": b""})


async def _read_body(receive: _Receive) -> bytes | None:
    """Return the whole request body, or None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
