"""The status page's live feed: server-sent events, one view per change.

A ticker (:meth:`Feed.run`) makes the view every ``interval`` while anyone listens, once for
all listeners of a kind (with or without the admin's buttons), and hands it to each client
only if it changed. A client holds one message at most: a newer view replaces the one it has
not taken yet, since a view is the whole page. So a client that reads slowly, or never,
costs its connection's own write buffer (uvicorn stops writing to it at its high-water mark
and only that client's task waits) and nothing else: never the ticker, the socket or the
handlers. A client that goes away is forgotten at once; beyond :data:`MAX_CLIENTS` a new one
is refused with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_CLIENTS", "Client", "Feed"]

MAX_CLIENTS = 32
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    # nginx would otherwise buffer the stream (see the README's reverse proxy section).
    (b"x-accel-buffering", b"no"),
]


class Client:
    """One listener: the latest message it has not taken yet, and whether it waits for it."""

    def __init__(self, admin: bool) -> None:
        self.admin = admin
        self.latest: bytes | None = None
        self.ready = asyncio.Event()
        # True while a write to it waits for the client to read (tests look).
        self.stalled = False

    def offer(self, message: bytes) -> None:
        self.latest = message
        self.ready.set()

    def take(self) -> bytes | None:
        message, self.latest = self.latest, None
        self.ready.clear()
        return message


class Feed:
    """Serves ``/events`` and feeds its clients.

    Args:
        snapshot: the daemon's current state, made once per tick for every listener.
        make_view: a snapshot's view, for a client with (True) or without admin buttons.
        is_admin: whether a request's scope belongs to a signed-in admin.
        interval: seconds between looks.
    """

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        make_view: Callable[[dict[str, Any], bool], dict[str, Any]],
        is_admin: Callable[[dict[str, Any]], bool],
        interval: float = 0.25,
    ) -> None:
        self._snapshot = snapshot
        self._make_view = make_view
        self._is_admin = is_admin
        self._interval = interval
        self.clients: set[Client] = set()
        self._last: dict[bool, bytes] = {}
        self._closing = asyncio.Event()

    def close(self) -> None:
        """End every stream (the server is stopping): each client gets the end of its
        response, so that the server need not wait for them or cancel them."""
        self._closing.set()

    def _message(self, snapshot: dict[str, Any], admin: bool) -> bytes:
        text = json.dumps(
            self._make_view(snapshot, admin), separators=(",", ":"), ensure_ascii=False
        )
        return f"data: {text}\n\n".encode()

    def tick(self) -> None:
        """Offer each client the current view, if it changed since the last tick."""
        # One snapshot serves both kinds of listener: it walks every call and event.
        snapshot: dict[str, Any] | None = None
        for admin in (False, True):
            listeners = [client for client in self.clients if client.admin == admin]
            if not listeners:
                self._last.pop(admin, None)
                continue
            if snapshot is None:
                snapshot = self._snapshot()
            message = self._message(snapshot, admin)
            if message == self._last.get(admin):
                continue
            self._last[admin] = message
            for client in listeners:
                client.offer(message)

    async def run(self) -> None:
        """Tick every ``interval`` until cancelled."""
        while True:
            if self.clients:
                self.tick()
            await asyncio.sleep(self._interval)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if len(self.clients) >= MAX_CLIENTS:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"too many status page clients"})
            return
        client = Client(self._is_admin(scope))
        client.offer(self._message(self._snapshot(), client.admin))
        self.clients.add(client)
        gone = asyncio.ensure_future(_disconnected(receive))
        closing = asyncio.ensure_future(self._closing.wait())
        ended = {gone, closing}
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            while not (gone.done() or closing.done()):
                waiting = asyncio.ensure_future(client.ready.wait())
                await asyncio.wait({waiting, *ended}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                message = client.take()
                if message is None or gone.done() or closing.done():
                    continue
                client.stalled = True
                sending = asyncio.ensure_future(
                    send({"type": "http.response.body", "body": message, "more_body": True})
                )
                # A client that stops reading parks only this task; one that leaves ends it.
                await asyncio.wait({sending, *ended}, return_when=asyncio.FIRST_COMPLETED)
                client.stalled = False
                if not sending.done():
                    sending.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sending
                    return
            if not gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.clients.discard(client)
            gone.cancel()
            closing.cancel()


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
