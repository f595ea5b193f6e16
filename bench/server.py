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
- ``POST /calls/open`` ``{"count", "prefix"}``: ``count`` calls ``<prefix>-<n>`` ring and are
  answered (``FakeSippet.call_event``, so the call table has them and every joined socket
  hears both events); ``POST /calls/outage`` ``{"end", "prefix", "seconds", "timeout"}``:
  an outage of ``seconds`` (sockets closed, upgrades refused), during which the first
  ``end`` of those calls end, heard by no socket; answers once a socket joined again, with
  the server's ``time.time()`` of that join; ``POST /calls/close``: every open call ends
  (heard live), then the table is emptied. For ``bench.reconcile``.

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
                Route("/calls/open", self.open_calls, methods=["POST"]),
                Route("/calls/outage", self.calls_outage, methods=["POST"]),
                Route("/calls/close", self.close_calls, methods=["POST"]),
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

    async def open_calls(self, request: Request) -> JSONResponse:
        body = await request.json()
        count, prefix = int(body["count"]), str(body["prefix"])
        heard = 0
        for index in range(count):
            if index % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            key = f"{prefix}-{index}"
            heard += await self.fake.call_event(
                "incoming_call", key, fromNumber="+15550100", toNumber="+15557654321"
            )
            heard += await self.fake.call_event("call_answered", key)
        return JSONResponse({"opened": count, "heard": heard})

    async def calls_outage(self, request: Request) -> JSONResponse:
        body = await request.json()
        fake, timeout = self.fake, float(body["timeout"])
        joins = fake.joins
        await fake.outage(float(body["seconds"]))
        try:
            await fake.wait_until(lambda: fake.joined_sockets == 0, timeout=timeout)
            heard = 0
            for index in range(int(body["end"])):
                heard += await fake.call_event("call_ended", f"{body['prefix']}-{index}")
            ended_at = time.time()
            await fake.wait_until(lambda: fake.joins > joins, timeout=timeout)
        except TimeoutError:
            return JSONResponse({"rejoined": False})
        return JSONResponse(
            {
                "rejoined": True,
                "rejoined_at": fake.join_times[-1],
                "ended_at": ended_at,
                "heard": heard,
            }
        )

    async def close_calls(self, request: Request) -> JSONResponse:
        del request
        table = self.fake.calls
        still_open = [key for key, row in table.rows.items() if row["endedAt"] is None]
        for key in still_open:
            await self.fake.call_event("call_ended", key)
        table.rows.clear()
        return JSONResponse({"closed": len(still_open)})


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
