"""A TCP proxy on loopback whose link can be frozen: a network partition between a client
and a real server, without touching either."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from listener.cluster.url import StoreUrl


class FreezableProxy:
    """Forwards every connection to ``(host, port)``; :meth:`freeze` stops moving bytes
    (held, not refused, like a partition), :meth:`thaw` moves them again. With ``refusing``
    set, new connections are closed at once (a server down, or not up yet)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.refusing = False
        # Set: the server's next answer is dropped and its connection closed (the server did
        # what it was asked; the client never hears it).
        self.losing = False
        # Set: only the next answer is lost (then ``losing`` is off again).
        self.losing_once = False

    async def __aenter__(self) -> FreezableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        await self._server.wait_closed()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every connection open now (a server restarted, a link reset; with
        ``refusing``: a server gone)."""
        for task in list(self._tasks):
            task.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Tracked, and every socket closed however it ends: a connection held while frozen
        # outlived the proxy otherwise, and its sockets were collected (with a warning that
        # failed whatever test ran then) after the loop had closed.
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            if self.refusing:
                return
            await self._flowing.wait()
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer)),
                asyncio.ensure_future(self._pump(up_reader, writer, answers=True)),
            ]
            self._tasks.update(pumps)
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                    self._tasks.discard(pump)
        finally:
            self._tasks.discard(task)
            for side in (writer, up_writer):
                if side is not None:
                    side.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: bool = False
    ) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()
            if answers and (self.losing or self.losing_once):
                self.losing_once = False
                return
            writer.write(data)
            await writer.drain()


@contextlib.asynccontextmanager
async def proxied(url: StoreUrl) -> AsyncIterator[tuple[FreezableProxy, StoreUrl]]:
    """A proxy in front of the store at ``url``, and the URL that goes through it."""
    target = urlsplit(url.conninfo)
    assert target.hostname is not None
    assert target.port is not None
    async with FreezableProxy(target.hostname, target.port) as proxy:
        yield proxy, StoreUrl(url.conninfo.replace(f":{target.port}/", f":{proxy.port}/"))
