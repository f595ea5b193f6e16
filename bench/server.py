"""The fake Sippet in a process of its own, plus a bench-only control endpoint.

``FakeSippet`` (``listener.testing``) serves the clients on one port; a second small ASGI app
on another port drives it for the benchmark without touching ``listener/testing``:

- ``POST /stream`` ``{"count", "rate", "start", "calls"}``: broadcast ``count`` call events
  with ``seq`` = start, start+1, ... and ``ts`` = the server's ``time.time()`` when the payload
  is built, at ``rate`` events/s (0: as fast as possible); answers when all are queued. With
  ``calls``: transcript deltas over that many calls ``bench-<n>`` instead.
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
- ``POST /fault`` ``{"kind", "window"}``: one fault of the soak (``bench.soak``), answered
  once a socket joined again (or 30 s passed): ``drop_1006`` / ``drop_1011`` (every socket
  closed with that code), ``silence`` (heartbeats unanswered until the next join),
  ``refuse_upgrades`` (every socket closed, upgrades refused with 403 for ``window`` s),
  ``refuse_mints`` (every socket closed, mints answered 503 for ``window`` s), ``malformed``
  (every kind of malformed frame and a 2 MB one of garbage to every socket: no join is
  awaited, the link should stay up). Answers ``{"began", "window_end", "joined_at"}``
  (server clock; ``joined_at``: the first join after ``began``, null if none).
- ``GET /gaps``: every interval ``[start, end]`` (``end`` null while it lasts) in which no
  socket was joined to the topic, polled every 10 ms since the server started.
- ``/stream`` also answers ``unheard``: the ``[first, last]`` ranges of ``seq`` that it
  broadcast while no socket was joined, or while a fault's closes were on their way (queued
  behind a close, never sent): nobody could hear them.

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
_GAP_POLL = 0.01
_REJOIN_TIMEOUT = 30.0
# Larger than any event, far below max_message_size (64 MiB): the daemon must skip it whole.
_GARBAGE = b"\xff" + b"garbage " * (2 * 1024 * 1024 // 8)


def transcript_event(seq: int, calls: int) -> tuple[str, dict[str, Any]]:
    """The ``seq``-th event of a stream of transcript deltas over ``calls`` known calls
    (``bench-<n>``, opened with ``/calls/open``), as the soak streams them."""
    return "call_transcript_delta", {
        "seq": seq,
        "ts": time.time(),
        "callUuid": f"bench-{seq % calls}",
        "speaker": "caller",
        "contentIndex": seq // calls,
        "content": "I need help with my order.",
    }


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
        self.gaps: list[list[float | None]] = []
        # From a fault's drop_all to the next join: the sockets still count as joined, but
        # what is broadcast now is queued behind their close and never sent.
        self.closing = False

    async def watch_gaps(self) -> None:
        """Note every interval in which no socket is joined (for ``GET /gaps``)."""
        fake = self.fake
        while True:
            joined = fake.joined_sockets > 0
            open_gap = bool(self.gaps) and self.gaps[-1][1] is None
            if not joined and not open_gap:
                self.gaps.append([time.time(), None])
            elif joined and open_gap:
                self.gaps[-1][1] = time.time()
            await asyncio.sleep(_GAP_POLL)

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
                Route("/fault", self.fault, methods=["POST"]),
                Route("/gaps", self.get_gaps, methods=["GET"]),
            ]
        )

    async def stream(self, request: Request) -> JSONResponse:
        body = await request.json()
        count, rate, start = int(body["count"]), float(body.get("rate", 0)), int(body["start"])
        calls = int(body.get("calls", 0))
        fake = self.fake
        loop = asyncio.get_running_loop()
        began = loop.time()
        receivers = 0
        unheard: list[list[int]] = []
        for index in range(count):
            if rate > 0:
                delay = began + index / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif index % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            seq = start + index
            event = transcript_event(seq, calls) if calls else call_event(seq)
            receivers = await fake.broadcast(*event)
            if receivers == 0 or self.closing:
                if unheard and unheard[-1][1] == seq - 1:
                    unheard[-1][1] = seq
                else:
                    unheard.append([seq, seq])
        return JSONResponse(
            {
                "sent": count,
                "elapsed": loop.time() - began,
                "receivers": receivers,
                "unheard": unheard,
            }
        )

    async def fault(self, request: Request) -> JSONResponse:
        body = await request.json()
        kind, window = str(body["kind"]), float(body.get("window", 0.0))
        fake, behaviour = self.fake, self.fake.behaviour
        joins, began = fake.joins, time.time()
        window_end = began
        if kind in ("drop_1006", "drop_1011"):
            self.closing = True
            await fake.drop_all(code=int(kind.removeprefix("drop_")))
        elif kind == "silence":
            behaviour.answer_heartbeats = False
        elif kind in ("refuse_upgrades", "refuse_mints"):
            if kind == "refuse_upgrades":
                behaviour.upgrade_status = 403
            else:
                behaviour.mint_failures = 1_000_000
            self.closing = True
            await fake.drop_all()
            await asyncio.sleep(window)
            behaviour.upgrade_status, behaviour.mint_failures = None, 0
            window_end = time.time()
        elif kind == "malformed":
            await fake.send_malformed()
            # Bench-only reach into the fake's sockets: it has no call for a frame of our own.
            for sock in fake._sockets:
                sock.outbox.put_nowait(_GARBAGE)
            return JSONResponse({"began": began, "window_end": began, "joined_at": None})
        else:
            return JSONResponse({"error": f"unknown fault {kind!r}"}, status_code=400)
        try:
            await fake.wait_until(lambda: fake.joins > joins, timeout=_REJOIN_TIMEOUT)
            joined_at: float | None = fake.join_times[joins]
        except TimeoutError:
            joined_at = None
        finally:
            behaviour.answer_heartbeats = True
            self.closing = False
        return JSONResponse({"began": began, "window_end": window_end, "joined_at": joined_at})

    async def get_gaps(self, request: Request) -> JSONResponse:
        del request
        return JSONResponse(self.gaps)

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
        state = _Control(fake)
        control = AsgiServer(state.app())
        await control.start()
        watching = asyncio.create_task(state.watch_gaps())
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
            watching.cancel()
            await control.stop()


if __name__ == "__main__":
    asyncio.run(main())
