"""The metrics and health endpoint: ``/metrics``, ``/healthz`` and ``/readyz`` on loopback.

``/healthz`` answers 200 while the process serves requests at all (liveness). ``/readyz``
answers 200 only while the events channel is joined and its heartbeats are answered, 503
otherwise, with the reason in the body (readiness). A shared store that does not answer
leaves it at 200, the reason saying so (``joined; store not answering; N events spooled``):
the instance still hears and keeps every event (see ``Daemon.readiness``). The status page
(:mod:`.status_app`) adds its routes to the same server, and its background work runs while
it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from listener.core import metrics
from listener.service.asgi import AsgiServer

__all__ = ["HealthServer"]


class HealthServer:
    """Serves the endpoints; ``readiness`` returns (ready, reason) on each ``/readyz``.

    Raises:
        OSError: from the constructor, when the address cannot be bound (in use, not local).
    """

    def __init__(
        self,
        host: str,
        port: int,
        readiness: Callable[[], tuple[bool, str]],
        *,
        routes: Sequence[BaseRoute] = (),
        background: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self._readiness = readiness
        app = Starlette(
            routes=[
                Route("/metrics", self._metrics),
                Route("/healthz", self._healthz),
                Route("/readyz", self._readyz),
                *routes,
            ]
        )
        self._server = AsgiServer(app, host, port)
        self.port = self._server.port
        self._background = background
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start serving (and the background work)."""
        await self._server.start()
        if self._background is not None:
            self._task = asyncio.create_task(self._background(), name="health-background")

    async def stop(self) -> None:
        """Stop serving."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._server.stop()

    async def _metrics(self, request: Request) -> Response:
        del request
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, request: Request) -> Response:
        del request
        return JSONResponse({"status": "alive"})

    async def _readyz(self, request: Request) -> Response:
        del request
        ready, reason = self._readiness()
        return JSONResponse({"ready": ready, "reason": reason}, status_code=200 if ready else 503)
