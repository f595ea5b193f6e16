"""``python -m bench.statuspage``: the status page's load time with a big webhook backlog.

The real daemon (``sippet-listener run`` in its own process, production logging) with a
``log`` handler and a ``webhook`` destination whose receiver is down, fed by the fake Sippet
(in this process) ``--pending`` events (10,000 by default) and ``--calls`` open calls: every
event waits in the outbox, so the page shows that many pending deliveries, 200 recent events
and the open calls. Then, one after another on one keep-alive connection, ``--requests``
GETs of each path; their median and 95th percentile are printed, side by side with
``/healthz`` in the same run as the reference (the cost of an HTTP round trip to that
server at all). The target: ``/`` under 100 ms.

``--json`` prints the figures as JSON instead of a table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from listener.testing import FakeSippet

__all__ = ["main"]

_PATHS = ("/healthz", "/status", "/")
_SECRET = "whsec_" + base64.b64encode(b"\x07" * 32).decode()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _config(directory: Path, fake: FakeSippet, port: int) -> Path:
    dead_receiver = f"http://127.0.0.1:{_free_port()}/hook"
    path = directory / "config.toml"
    path.write_text(
        f'[sippet]\nbase_url = "{fake.base_url}"\n'
        f'[service]\nstate_dir = "{directory}"\nlog_format = "json"\n'
        f'metrics_listen = "127.0.0.1:{port}"\n'
        '[[handlers]]\nuse = "log"\nevents = ["incoming_call"]\n'
        f'[[handlers]]\nuse = "webhook"\nname = "crm"\nurl = "{dead_receiver}"\n'
        f'secret = "{_SECRET}"\n'
    )
    return path


async def _wait_pending(http: httpx.AsyncClient, count: int) -> None:
    async with asyncio.timeout(300):
        while True:
            with_stats = (await http.get("/status")).json()["destinations"][0]
            if (with_stats["pending"] or 0) >= count:
                return
            await asyncio.sleep(0.2)


async def _measure(pending: int, calls: int, requests: int) -> dict[str, Any]:
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench-statuspage-") as tmp:
        async with FakeSippet() as fake:
            config = _config(Path(tmp), fake, port)
            env = {**os.environ, "SIPPET_SECRET_KEY": fake.api_key}
            daemon = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "listener.service.cli",
                "run",
                "--config",
                str(config),
                env=env,
                stderr=(Path(tmp) / "daemon.log").open("wb"),
            )
            try:
                await fake.wait_until(lambda: fake.joined_sockets == 1, timeout=30)
                for index in range(calls):
                    await fake.call_event("incoming_call", f"call-{index}", fromNumber="+1")
                for index in range(pending - calls):
                    await fake.broadcast("note", {"n": index, "text": "x" * 100})
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    await _wait_pending(http, pending)
                    timings: dict[str, list[float]] = {path: [] for path in _PATHS}
                    for _ in range(requests):
                        for path in _PATHS:
                            began = time.perf_counter()
                            response = await http.get(path)
                            timings[path].append(time.perf_counter() - began)
                            response.raise_for_status()
                    page = len((await http.get("/")).content)
            finally:
                daemon.terminate()
                await daemon.wait()
    return {
        "pending": pending,
        "open_calls": calls,
        "requests": requests,
        "page_bytes": page,
        "ms": {
            path: {
                "median": statistics.median(values) * 1000,
                "p95": sorted(values)[int(len(values) * 0.95) - 1] * 1000,
            }
            for path, values in timings.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.statuspage", description=__doc__)
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(_measure(args.pending, args.calls, args.requests))
    if args.json:
        print(json.dumps(result))
        return 0
    reference = result["ms"]["/healthz"]["median"]
    print(
        f"{result['pending']} pending deliveries, {result['open_calls']} open calls,"
        f" {result['requests']} GETs of each; the page is {result['page_bytes']} bytes"
    )
    print("| path | median ms | p95 ms | median / /healthz |")
    print("|---|---|---|---|")
    for path, figures in result["ms"].items():
        ratio = figures["median"] / reference
        print(f"| `{path}` | {figures['median']:.1f} | {figures['p95']:.1f} | {ratio:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
