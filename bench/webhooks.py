"""The sending side of the webhook benchmarks, in a process of its own.

``python -m bench.webhooks MODE --url URL --count N --concurrency C``, with MODE:

- ``outbox``: the real ``WebhookForwarder`` (durable SQLite outbox, Standard Webhooks
  signatures, ``max_in_flight = C``); all N events are submitted at once and the clock stops
  when the N-th 2xx answer arrives.
- ``plain``: the reference, C tasks POSTing the same-sized body with one ``httpx.AsyncClient``
  (C pooled connections), no signature, no storage.
- ``signed``: ``plain`` plus the Standard Webhooks signature of every request, to separate
  the signing cost from the outbox's.
- ``backlog``: the receiver is down; N events are submitted through the forwarder (the first
  attempts fail and the destination is probed, one request at a time) and the process prints
  ``{"submitted": ...}``; once told ``up`` on stdin (the receiver is back), it reports how
  long the outbox took to empty. Probes are at most 0.5 s apart (the default is 5 s), so that
  the figure is the drain rather than the wait for the next probe. If stdin closes instead
  (the parent is gone), it exits; every wait is bounded by ``--timeout``.

Prints one JSON line with ``seconds``, ``rate`` (deliveries/s) and ``cpu`` (this process's
CPU time over the wall time: 1.0 is one core saturated).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.drivers.common import say
from bench.server import call_event
from listener.core.events import Event
from listener.core.logs import configure_logging
from listener.core.metrics import REGISTRY
from listener.webhooks.destination import Destination
from listener.webhooks.forwarder import WebhookForwarder
from listener.webhooks.outbox import Outbox
from listener.webhooks.signing import encode_body, new_message_id
from listener.webhooks.signing import sign_headers as sign

_DESTINATION = "bench"
_PROBE_INTERVAL = 0.5


def _secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _events(count: int) -> list[Event]:
    return [Event.create(*call_event(seq), "events", time.time()) for seq in range(count)]


def _counted(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(
        f"sippet_listener_{name}", {"destination": _DESTINATION, **labels}
    )
    return value or 0.0


def _delivered() -> float:
    return _counted("webhook_deliveries_total", outcome="delivered")


async def _until_delivered(forwarder: WebhookForwarder, count: int) -> None:
    """Wait until ``count`` deliveries were answered with a 2xx and their outcome committed."""
    while _delivered() < count:
        await forwarder.wait_committed()


def _forwarder(url: str, concurrency: int, state: Path) -> WebhookForwarder:
    destination = Destination(
        name=_DESTINATION,
        url=url,
        secrets=(_secret(),),
        max_in_flight=concurrency,
        max_probe_interval=_PROBE_INTERVAL,
    )
    return WebhookForwarder([destination], state / "outbox.sqlite3")


async def _outbox(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    events = _events(args.count)
    async with _forwarder(args.url, args.concurrency, state) as forwarder:
        began, cpu = time.perf_counter(), time.process_time()
        for event in events:
            forwarder.submit(event)
        async with asyncio.timeout(args.timeout):
            await _until_delivered(forwarder, args.count)
        seconds = time.perf_counter() - began
        cpu = time.process_time() - cpu
    return {"seconds": seconds, "rate": args.count / seconds, "cpu": cpu / seconds}


async def _plain(args: argparse.Namespace, *, signed: bool) -> dict[str, Any]:
    msg_id = new_message_id()
    body = encode_body(msg_id, _events(1)[0])
    secret = (_secret(),)
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    remaining = args.count

    async def post(client: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            headers = {"content-type": "application/json"}
            if signed:
                headers.update(sign(secret, msg_id, int(time.time()), body))
            response = await client.post(args.url, content=body, headers=headers)
            response.raise_for_status()

    async with httpx.AsyncClient(limits=limits) as client:
        began, cpu = time.perf_counter(), time.process_time()
        async with asyncio.timeout(args.timeout):
            await asyncio.gather(*(post(client) for _ in range(args.concurrency)))
        seconds = time.perf_counter() - began
        cpu = time.process_time() - cpu
    return {"seconds": seconds, "rate": args.count / seconds, "cpu": cpu / seconds}


async def _backlog(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    events = _events(args.count)
    loop = asyncio.get_running_loop()
    async with _forwarder(args.url, args.concurrency, state) as forwarder:
        began = time.perf_counter()
        committed = None
        for event in events:
            committed = forwarder.submit(event)
        if committed is not None:
            await committed
        say({"submitted": args.count, "committed_after": time.perf_counter() - began})
        if not await loop.run_in_executor(None, sys.stdin.readline):
            sys.exit("bench.webhooks: standard input closed before 'up': the parent is gone")
        up = time.perf_counter()
        failed = _counted("webhook_deliveries_total", outcome="failed")
        probes = _counted("webhook_probes_total")
        async with asyncio.timeout(args.timeout):
            await _until_delivered(forwarder, args.count)
            delivered = time.perf_counter() - up
            while True:
                with Outbox(state / "outbox.sqlite3") as outbox:
                    (stats,) = outbox.stats(time.time(), [_DESTINATION])
                if stats.pending == 0:
                    break
                await forwarder.wait_committed()
        seconds = time.perf_counter() - up
    return {
        "seconds": seconds,
        "delivered_after": delivered,
        "rate": args.count / seconds,
        "failed_attempts_in_outage": failed,
        "probes_in_outage": probes,
        "dead": stats.dead,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("outbox", "plain", "signed", "backlog"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    configure_logging("warning", "json", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="sippet-bench-webhooks-") as state:
        if args.mode == "outbox":
            result = await _outbox(args, Path(state))
        elif args.mode == "backlog":
            result = await _backlog(args, Path(state))
        else:
            result = await _plain(args, signed=args.mode == "signed")
    say({"pid": os.getpid(), **result})


if __name__ == "__main__":
    asyncio.run(main())
