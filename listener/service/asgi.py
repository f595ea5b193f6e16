"""Serve an ASGI app in-process on a socket of our own, inside the running event loop.

Used by the embedded fake Sippet, the test webhook receiver and the metrics endpoint. uvicorn
is told to leave signals and logging alone: the daemon owns both.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Generator
from typing import Any

import uvicorn

__all__ = ["AsgiServer"]


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # SIGINT/SIGTERM belong to the daemon (or the test runner), not to this server.
        yield


class AsgiServer:
    """One ASGI app listening on ``host:port`` (port 0 picks a free one).

    Args:
        app: the ASGI application.
        host: the address to bind; loopback by default.
        port: the port, 0 for any free one; read the result from :attr:`port`.
        ws_max_size: the largest websocket message the server accepts.
        ssl_context: serve TLS with it (``https://`` and ``wss://``); plain otherwise.
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ws_max_size: int = 64 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # Naming IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets whose proto
        # says TCP, and without it every reply on a kept-alive connection waits ~40 ms.
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="websockets-sansio",
            ws_max_size=ws_max_size,
            ws_ping_interval=None,
            timeout_graceful_shutdown=1,
        )
        if ssl_context is not None:
            # uvicorn builds its own context from certificate files; a caller's (a test's
            # own authority) goes on the loaded config, which serve() then does not reload.
            config.load()
            config.ssl = ssl_context
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start serving; return once the socket accepts connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("ASGI server stopped during start-up")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Stop serving and release the socket."""
        if self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None
        self._socket.close()
