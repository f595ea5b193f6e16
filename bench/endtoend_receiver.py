"""The end-to-end rows' webhook receiver, in a process of its own: it timestamps arrivals.

Each request becomes ``(seq, ts, arrived)``: ``seq`` and ``ts`` are the fake Sippet's
``data.seq`` and ``data.ts`` (``time.time()`` when the server built the event), ``arrived`` the
receiver's ``time.time()`` once the body was read. Both clocks are the same host's. The first
:data:`_VERIFY` requests after each ``reset`` are checked with the ``standardwebhooks``
library (signature, timestamp, the body's ``id`` equal to ``webhook-id``); bodies are parsed
and checked between collections, and signatures on ``wait``, outside the measured window.

Two servers, both answering every request with 200 on keep-alive connections:

- ``lean`` (the default): an ``asyncio.Protocol`` that splits requests on ``Content-Length``
  (both forwarders send one) and answers ``200`` with an empty body: about 20 µs of CPU per
  request, so that on a 2-core machine the receiver takes as little as possible from the
  forwarders it measures (a real receiver is on another host);
- ``uvicorn``: ``listener.testing.WebhookReceiver``, as in the other webhook rows: 130 to
  200 µs per request, one core at about 6,000 requests/s.

Run: ``python -m bench.endtoend_receiver SECRET [--server lean|uvicorn]``. It prints
``{"url": ..., "pid": ...}`` once it listens, then answers JSON-line commands on stdin until
it closes:

- ``{"cmd": "reset"}``: forget what arrived; answers ``{"ok": true}``.
- ``{"cmd": "wait", "count": N, "timeout": T}``: wait until N requests arrived since the
  reset (or T seconds passed); answers ``{"count", "records": [[seq, ts, arrived], ...],
  "verified", "bad": [reasons], "cpu"}`` (``cpu``: this process's CPU seconds since the
  reset).
- ``{"cmd": "down"}`` / ``{"cmd": "up"}``: stop serving (connections refused, open ones
  closed) / serve again on the same port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook

from bench.drivers.common import command_queue, say
from listener.testing.receiver import WebhookReceiver

# Requests verified after each reset: enough to catch a bad signer, cheap enough to keep.
_VERIFY = 200
_COLLECT_EVERY = 0.02
_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"

# (headers, or the raw head to parse them from if verified; body; arrived)
Arrival = tuple[dict[str, str] | bytes, bytes, float]


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {
        name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines)
    }


class _Lean(asyncio.Protocol):
    """One keep-alive connection: requests framed by Content-Length, each answered 200."""

    def __init__(self, server: _LeanServer) -> None:
        self._server = server
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._server.connections.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        buffer = self._buffer + data if self._buffer else data
        arrivals = self._server.arrivals
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            at = head.lower().find(b"\r\ncontent-length:")
            if at < 0:
                transport.write(_BAD)
                transport.close()
                return
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            total = end + 4 + length
            if len(buffer) < total:
                break
            arrivals.append((head, buffer[end + 4 : total], time.time()))
            transport.write(_OK)
            buffer = buffer[total:]
        self._buffer = buffer


class _LeanServer:
    def __init__(self) -> None:
        self.arrivals: list[tuple[bytes, bytes, float]] = []
        self.connections: set[asyncio.Transport] = set()
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def up(self) -> None:
        # Naming IPPROTO_TCP makes asyncio set TCP_NODELAY (see listener.service.asgi).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Lean(self), sock=sock, backlog=128
        )

    async def down(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for transport in list(self.connections):
            transport.close()
        await self._server.wait_closed()
        self._server = None

    def take(self) -> list[Arrival]:
        arrivals, self.arrivals = self.arrivals, []
        return arrivals  # type: ignore[return-value]  # heads as bytes: parsed if verified


class _Uvicorn:
    def __init__(self) -> None:
        self.receiver = WebhookReceiver()

    @property
    def url(self) -> str:
        return self.receiver.url

    async def up(self) -> None:
        await self.receiver.up()

    async def down(self) -> None:
        await self.receiver.down()

    def take(self) -> list[Arrival]:
        requests, self.receiver.requests = self.receiver.requests, []
        return [(r.headers, r.body, r.received_at) for r in requests]


class _Collector:
    def __init__(self, server: _LeanServer | _Uvicorn, secret: str) -> None:
        self.server = server
        self.webhook = Webhook(secret)
        self.records: list[tuple[Any, Any, float]] = []
        self.sample: list[Arrival] = []
        self.cpu = time.process_time()

    def reset(self) -> None:
        self.server.take()
        self.records = []
        self.sample = []
        self.cpu = time.process_time()

    def collect(self) -> None:
        arrivals = self.server.take()
        if not arrivals:
            return
        room = _VERIFY - len(self.sample)
        if room > 0:
            self.sample.extend(arrivals[:room])
        append = self.records.append
        for _, body, arrived in arrivals:
            data = orjson.loads(body).get("data", {})
            append((data.get("seq"), data.get("ts"), arrived))

    def verify(self) -> tuple[int, list[str]]:
        verified, bad = 0, []
        for head, body, _ in self.sample:
            headers = _headers(head) if isinstance(head, bytes) else head
            try:
                envelope = self.webhook.verify(body, headers)
                if envelope.get("id") != headers.get("webhook-id"):
                    raise ValueError("body id != webhook-id")
            except Exception as exc:  # the library raises assorted types
                bad.append(f"{type(exc).__name__}: {exc}")
            else:
                verified += 1
        return verified, bad[:5]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("secret")
    parser.add_argument("--server", choices=("lean", "uvicorn"), default="lean")
    args = parser.parse_args()
    server = _LeanServer() if args.server == "lean" else _Uvicorn()
    await server.up()
    collector = _Collector(server, args.secret)
    loop = asyncio.get_running_loop()
    commands = command_queue()
    say({"url": server.url, "pid": os.getpid(), "server": args.server})

    async def collecting() -> None:
        while True:
            await asyncio.sleep(_COLLECT_EVERY)
            collector.collect()

    collector_task = asyncio.create_task(collecting())
    try:
        while True:
            command = json.loads(await commands.get())
            name = command.get("cmd")
            if name == "reset":
                collector.reset()
                say({"ok": True})
            elif name == "wait":
                count, deadline = int(command["count"]), loop.time() + float(command["timeout"])
                while True:
                    collector.collect()
                    if len(collector.records) >= count or loop.time() >= deadline:
                        break
                    await asyncio.sleep(_COLLECT_EVERY)
                cpu = time.process_time() - collector.cpu
                verified, bad = collector.verify()
                say(
                    {
                        "count": len(collector.records),
                        "records": collector.records,
                        "verified": verified,
                        "bad": bad,
                        "cpu": cpu,
                    }
                )
            elif name in ("down", "up"):
                await (server.down() if name == "down" else server.up())
                say({"ok": True})
            elif name == "quit":
                break
            else:
                say({"error": f"unknown command {name!r}"})
    finally:
        collector_task.cancel()
        await server.down()


if __name__ == "__main__":
    asyncio.run(main())
