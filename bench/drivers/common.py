"""What every driver shares: the token, the event record, the heartbeat, the command loop,
and starting the daemon itself (``start_daemon``) for the drivers that run it in-process.

Standard library only: the peers' drivers import it from their own virtualenvs.

A driver mints a session token (``POST /api/realtime/session`` with ``x-api-key``), connects
its client, joins ``events`` and prints one JSON line ``{"ready": true, ...}``. It then answers
commands, one JSON line in and one out:

- ``{"cmd": "expect", "count": N, "keep": true}``: forget what was recorded and wait for N
  events from now on; ``keep: false`` only counts (for floods of a million events).
- ``{"cmd": "wait", "timeout": T, "records": true}``: wait until N events arrived or T seconds
  passed; answer ``{"count": n, "cpu": s, "records": [[seq, ts, received], ...]}``, where
  ``cpu`` is the process's CPU time from the ``expect`` to the N-th event (null if it did
  not come): unlike rates, it hardly moves when other processes compete for the cores.
- ``{"cmd": "stats"}``: the count and what the client knows about itself (rotations...).
- ``{"cmd": "quit"}``, or standard input closing: stop the client and exit.

Every callback does the same thing as the peers' baseline: it appends ``(payload.seq,
payload.ts, time.time())``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

__all__ = [
    "Recorder",
    "command_queue",
    "driver_args",
    "heartbeat",
    "mint_token",
    "say",
    "serve",
    "socket_url",
    "start_daemon",
]

# A driver left behind by a crashed orchestrator exits by itself after this long.
MAX_LIFETIME = 1800.0


class Recorder:
    """Counts events and, unless told otherwise, keeps ``(seq, ts, received)`` for each."""

    __slots__ = ("count", "cpu", "done", "keep", "records", "started", "target")

    def __init__(self) -> None:
        self.count = 0
        self.keep = True
        self.records: list[tuple[Any, Any, float]] = []
        self.target = 0
        self.done = asyncio.Event()
        self.started = time.process_time()
        self.cpu: float | None = None

    def record(self, payload: dict[str, Any]) -> None:
        """Note one event (call first thing in the client's callback)."""
        now = time.time()
        if self.keep:
            self.records.append((payload.get("seq"), payload.get("ts"), now))
        self.count += 1
        if self.count == self.target:
            self.cpu = time.process_time() - self.started
            self.done.set()

    def expect(self, count: int, keep: bool) -> None:
        """Start a new record, waiting for ``count`` events."""
        self.count = 0
        self.keep = keep
        self.records = []
        self.target = count
        self.done = asyncio.Event()
        self.cpu = None
        self.started = time.process_time()
        if count <= 0:
            self.done.set()


def driver_args(description: str) -> argparse.Namespace:
    """The arguments every driver takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base-url", required=True, help="the fake Sippet's HTTP root")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--topic", default="events")
    parser.add_argument("--options", default="{}", help="driver-specific options, as JSON")
    return parser.parse_args()


def mint_token(base_url: str, api_key: str) -> str:
    """Mint a session token with the standard library's HTTP client."""
    request = urllib.request.Request(  # noqa: S310 - the URL is the bench's own loopback server
        f"{base_url}/api/realtime/session",
        data=b"{}",
        method="POST",
        headers={"x-api-key": api_key, "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return str(json.loads(response.read())["token"])


async def heartbeat(ws: Any, every: float = 30.0) -> None:
    """Send a Phoenix heartbeat on ``ws`` (anything with an async ``send``) every ``every`` s."""
    ref = 1
    while True:
        await asyncio.sleep(every)
        ref += 1
        await ws.send(json.dumps([None, str(ref), "phoenix", "heartbeat", {}]))


def socket_url(base_url: str, query: dict[str, str]) -> str:
    """``ws://host:port/socket/websocket?<query>`` for an ``http://host:port`` root."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, "/socket/websocket", urlencode(query), ""))


async def start_daemon(daemon: Any, timeout: float = 10.0) -> Callable[[], Awaitable[None]]:
    """Run a ``listener`` daemon until it has joined; return the coroutine that stops it.

    Typed loosely so this module stays standard-library only for the peers' drivers.
    """
    stop = asyncio.Event()
    running = asyncio.create_task(daemon.run(stop))
    joined = asyncio.create_task(daemon.session.joined.wait())
    await asyncio.wait({running, joined}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if running.done():
        running.result()
    if not joined.done():
        raise SystemExit(f"the daemon did not join within {timeout:g} s")

    async def shutdown() -> None:
        stop.set()
        await running

    return shutdown


def say(message: dict[str, Any]) -> None:
    """One JSON line on standard output, flushed: the orchestrator reads line by line."""
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _read_commands(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str]) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line)
    loop.call_soon_threadsafe(queue.put_nowait, '{"cmd": "quit"}')


def command_queue() -> asyncio.Queue[str]:
    """Standard input's lines, one command each, then a ``quit`` when it closes."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_read_commands, args=(loop, queue), daemon=True).start()
    return queue


async def serve(
    recorder: Recorder,
    ready: dict[str, Any],
    stats: Callable[[], dict[str, Any]] = dict,
    stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Announce readiness, then answer commands until told to quit."""
    loop = asyncio.get_running_loop()
    commands = command_queue()
    say({"ready": True, **ready})
    deadline = loop.time() + MAX_LIFETIME
    while True:
        async with asyncio.timeout_at(deadline):
            command = json.loads(await commands.get())
        name = command.get("cmd")
        if name == "expect":
            recorder.expect(int(command["count"]), bool(command.get("keep", True)))
            say({"ok": True})
        elif name == "wait":
            try:
                async with asyncio.timeout(float(command.get("timeout", 30.0))):
                    await recorder.done.wait()
            except TimeoutError:
                pass
            answer: dict[str, Any] = {"count": recorder.count, "cpu": recorder.cpu}
            if command.get("records", True):
                answer["records"] = recorder.records
            say(answer)
        elif name == "stats":
            say({"count": recorder.count, **stats()})
        elif name == "quit":
            if stop is not None:
                await stop()
            say({"bye": True})
            return
        else:
            say({"error": f"unknown command {name!r}"})
