"""uvloop against asyncio's loop, interleaved: the A/B behind the ``[fast]`` extra.

The throughput and latency rows run each client once, one after the other, so a busy moment
of the shared machine lands on one of them. Here the two loops alternate, a fresh daemon
driver (``bench/drivers/daemon.py``, ``"loop": ...``) per round and the order flipped every
round, each doing the drain row's method and 3 s of the latency row's; the figures are the
medians over the rounds, with every run listed.

``python -m bench.loops [smoke|quick|full]`` runs it alone (its own server).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.peers import DAEMON, DAEMON_UVLOOP, Client
from bench.procs import ROOT, BenchServer, Driver
from bench.scenarios import Rounds

__all__ = ["ROUNDS", "rows"]

ROUNDS = {"smoke": (1, 500), "quick": (4, 10_000), "full": (6, 20_000)}
_LATENCY_SECONDS = 3.0


@dataclass(kw_only=True)
class _Loop(Rounds):
    client: Client


def rows(server: BenchServer, mode: str, logs: Path) -> list[tuple[str, str, str, str, str]]:
    """(measure, client, result, reference, target): asyncio's row first, uvloop's against it."""
    rounds, events = ROUNDS[mode]
    loops = (_Loop(client=DAEMON), _Loop(client=DAEMON_UVLOOP))
    for round_ in range(rounds):
        for loop in loops if round_ % 2 == 0 else loops[::-1]:
            client = loop.client
            log = logs / f"loops-{client.key}.log"
            driver = Driver(client.label, Path(sys.executable), client.script, server, log,
                            client.options)  # fmt: skip
            try:
                loop.run(server, driver, events, _LATENCY_SECONDS)
            finally:
                driver.quit()
    base = loops[0]
    out = []
    measure = (
        f"uvloop vs asyncio, interleaved: {rounds} rounds of 2 drains of {events:,}"
        f" + {_LATENCY_SECONDS:g} s at 500/s"
    )
    for loop in loops:
        rate, cpu = statistics.median(loop.rates), statistics.median(loop.cpu_us or [0.0])
        p99 = statistics.median(loop.p99 or [0.0])
        result = (
            f"{rate:,.0f} events/s (runs {', '.join(f'{r:,.0f}' for r in loop.rates)});"
            f" {cpu:.1f} µs CPU/event (runs {', '.join(f'{c:.1f}' for c in loop.cpu_us)});"
            f" latency p99 {p99:.2f} ms (rounds {', '.join(f'{p:.2f}' for p in loop.p99)})"
        )
        if loop is base:
            reference = "reference"
        else:
            base_cpu = statistics.median(base.cpu_us or [0.0])
            reference = (
                f"{rate / statistics.median(base.rates):.2f} x asyncio's rate;"
                f" CPU {cpu / base_cpu if base_cpu else 0.0:.2f} x"
            )
        out.append((measure, loop.client.label, result, reference, ""))
    return out


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "quick"
    logs = ROOT / "bench" / "results" / "loops"
    logs.mkdir(parents=True, exist_ok=True)
    server = BenchServer(logs / "server.log")
    try:
        server.call("/configure", {"token_ttl": 3600})
        for cells in rows(server, mode, logs):
            print(" | ".join(cells))
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
