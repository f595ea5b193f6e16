"""The fake Sippet in a process of its own, plus a bench-only control endpoint.

``FakeSippet`` (``listener.testing``) serves the clients on one port; a second small ASGI app
on another port drives it for the benchmark without touching ``listener/testing``:

- ``POST /stream`` ``{"count", "rate", "start"}``: broadcast ``count`` call events with
  ``seq`` = start, start+1, ... and ``ts`` = the server's ``time.time()`` when the payload is
  built, at ``rate`` events/s (0: as fast as possible); answers when all are queued.
- ``POST /drop``: close every socket (``drop_all``, code 1012) and answer once a new join
  was accepted, with the seconds it took (server clock, from the drop to the join reply).
- ``POST /configure`` ``{"token_ttl", "behaviour"}``: change the TTL of tokens minted from
  now on, and any :class:`~listener.testing.server.Behaviour` field.
- ``GET /stats``: ``FakeSippet.stats()``.

Run: ``python -m bench.server``; it prints one JSON line with both URLs and the API key,
then serves until standard input closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from listener.service.asgi import AsgiServer
from listener.testing import FakeSippet

__all__ = ["call_event"]

_EVENTS = (("incoming_call", "ringing"), ("call_answered", "answered"), ("call_ended", "completed"))
# The control app yields to the event loop this often during an unpaced flood, so the
# sockets' writers run while it builds events.
_YIELD_EVERY = 500


def call_event(seq: int) -> tuple[str, dict[str, Any]]:
    """The ``seq``-th event of the stream: a small call event (three per call)."""
    name, status = _EVENTS[seq % 3]
    return name, {
        "seq": seq,
        "ts": time.time(),
        "callUuid": f"bench-call-{seq // 3}",
        "direction": "inbound",
        "fromNumber": "+15550100",
        "toNumber": "+15557654321",
        "status": status,
    }


class _Control:
    def __init__(self, fake: FakeSippet) -> None:
        self.fake = fake

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/stream", self.stream, methods=["POST"]),
                Route("/drop", self.drop, methods=["POST"]),
                Route("/configure", self.configure, methods=["POST"]),
                Route("/stats", self.stats, methods=["GET"]),
            ]
        )

    async def stream(self, request: Request) -> JSONResponse:
        body = await request.json()
        count, rate, start = int(body["count"]), float(body.get("rate", 0)), int(body["start"])
        fake = self.fake
        loop = asyncio.get_running_loop()
        began = loop.time()
        receivers = 0
        for index in range(count):
            if rate > 0:
                delay = began + index / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif index % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            receivers = await fake.broadcast(*call_event(start + index))
        return JSONResponse({"sent": count, "elapsed": loop.time() - began, "receivers": receivers})

    async def drop(self, request: Request) -> JSONResponse:
        body = await request.json()
        fake = self.fake
        joins = fake.joins
        began = time.perf_counter()
        await fake.drop_all()
        try:
            await fake.wait_until(lambda: fake.joins > joins, timeout=float(body["timeout"]))
        except TimeoutError:
            return JSONResponse({"rejoined": False})
        return JSONResponse({"rejoined": True, "seconds": time.perf_counter() - began})

    async def configure(self, request: Request) -> JSONResponse:
        body = await request.json()
        if "token_ttl" in body:
            self.fake.token_ttl = float(body["token_ttl"])
        for name, value in body.get("behaviour", {}).items():
            setattr(self.fake.behaviour, name, value)
        return JSONResponse(self.fake.stats())

    async def stats(self, request: Request) -> JSONResponse:
        del request
        return JSONResponse(self.fake.stats())


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def main() -> None:
    async with FakeSippet(api_key="sk_bench_fake_secret_key") as fake:
        control = AsgiServer(_Control(fake).app())
        await control.start()
        line = {
            "base_url": fake.base_url,
            "control_url": f"http://{control.host}:{control.port}",
            "api_key": fake.api_key,
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        try:
            await _stdin_closed()
        finally:
            await control.stop()


if __name__ == "__main__":
    asyncio.run(main())
