"""Issue #14's three targets, interleaved: socket -> handler, and at rest.

``python -m bench`` runs each client once, one after the other, so a busy moment of the
shared machine lands on one of them. Here the clients alternate, a fresh driver per round
and the order rotated every round, each doing the drain row's method (2 drains), 3 s of the
latency row's, and its idle RSS 2 s after the join; then ``sippet-listener run`` itself
(``bench.imports.idle_run``) for each tree, alternated. Figures are medians over the rounds,
with every run listed.

Clients: the bare loop, this tree's daemon on asyncio and (when installed) on uvloop, and
with ``--before TREE`` the daemon of another checkout (``git archive <commit> | tar -x -C
TREE``), its driver and its ``listener`` package run from that tree (``PYTHONPATH``), in this
venv: the before/after of a change, side by side in one run. ``--no-calls`` also runs the
daemons with call state off (``bench/drivers/callstate.py``'s ``"call_state": false``: the session
hands events on without ids, the dispatcher's tracker admits all and knows no call).

``python -m bench.hotpath [smoke|quick|full] [--before TREE] [--no-calls] [--python PY]``
(``PY``: the interpreter of the ``run`` rows, e.g. ``bench/.venvs/production/bin/python``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.imports import idle_run
from bench.peers import BARE, DAEMON, DAEMON_UVLOOP, Client
from bench.procs import ROOT, BenchServer, Driver, rss_mib
from bench.scenarios import Rounds

__all__ = ["LATENCY_SECONDS", "ROUNDS", "Variant", "main", "measure", "rows"]

ROUNDS = {"smoke": (1, 500), "quick": (4, 10_000), "full": (6, 20_000)}
LATENCY_SECONDS = 3.0
_SETTLE = 2.0


@dataclass(kw_only=True)
class Variant(Rounds):
    """One client's rounds: its drains, latency p99s and idle RSS."""

    label: str
    client: Client
    root: Path = ROOT
    idle: list[float] = field(default_factory=list)
    run_idle: list[float] = field(default_factory=list)


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _round(variant: Variant, server: BenchServer, events: int, logs: Path) -> None:
    client = variant.client
    log = logs / f"hotpath-{variant.label.replace(' ', '-')}.log"
    python = Path(sys.executable)
    driver = Driver(variant.label, python, client.script, server, log, client.options,
                    root=variant.root)  # fmt: skip
    try:
        time.sleep(_SETTLE)
        variant.idle.append(rss_mib(driver.process.pid))
        variant.run(server, driver, events, LATENCY_SECONDS)
    finally:
        driver.quit()


def measure(
    server: BenchServer,
    mode: str,
    logs: Path,
    before: Path | None = None,
    no_calls: bool = False,
    python: Path | None = None,
    idle_runs: bool = True,
) -> list[Variant]:
    """Run the rounds; return each variant, the bare loop first (``idle_runs``: also
    ``sippet-listener run``'s idle RSS per round, for this tree and ``before``)."""
    rounds, events = ROUNDS[mode]
    ours = [(DAEMON, "ours")]
    if _has_uvloop():
        ours.append((DAEMON_UVLOOP, "ours uvloop"))
    variants = [Variant(label="bare", client=BARE)]
    for client, label in ours:
        variants.append(Variant(label=label, client=client))
    if before is not None:
        variants.append(Variant(label="before", client=DAEMON, root=before))
    if no_calls:
        options = {"sippet": {"stable_after": 0.5}, "call_state": False}
        off = Client(DAEMON.key, DAEMON.label, "callstate.py", options=options)
        variants.append(Variant(label="ours, calls off", client=off))
        if before is not None:
            variants.append(Variant(label="before, calls off", client=off, root=before))
    for index in range(rounds):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            _round(variant, server, events, logs)
        for variant in variants if idle_runs else ():
            if variant.label in ("ours", "before"):
                variant.run_idle.append(idle_run(server, logs, python=python, root=variant.root))
    return variants


def rows(variants: list[Variant]) -> list[tuple[str, str, str, str]]:
    """(client, drain, latency, idle) per variant of :func:`measure`, the bare loop first,
    ratios against it."""
    bare = variants[0]
    out = []
    for variant in variants:
        rate, cpu, p99 = _med(variant.rates), _med(variant.cpu_us), _med(variant.p99)
        drain = (
            f"{rate:,.0f}/s ({', '.join(f'{r:,.0f}' for r in variant.rates)}); {cpu:.1f} µs CPU"
            f" ({', '.join(f'{c:.1f}' for c in variant.cpu_us)})"
        )
        latency = f"p99 {p99:.2f} ms ({', '.join(f'{p:.2f}' for p in variant.p99)})"
        idle = f"driver {_med(variant.idle):.1f} MiB"
        if variant.run_idle:
            idle += f"; `run` {_med(variant.run_idle):.1f} MiB"
        if variant is not bare:
            drain += f": {rate / _med(bare.rates):.2f} x, CPU {cpu / _med(bare.cpu_us):.2f} x"
            latency += f": {p99 / _med(bare.p99):.2f} x"
            if variant.run_idle:
                idle += f": {_med(variant.run_idle) / _med(bare.idle):.2f} x"
        out.append((variant.label, drain, latency, idle))
    return out


def _has_uvloop() -> bool:
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    parser.add_argument("mode", nargs="?", default="quick", choices=tuple(ROUNDS))
    parser.add_argument("--before", type=Path, help="another checkout's tree, for a before")
    parser.add_argument("--no-calls", action="store_true", help="also run with call state off")
    parser.add_argument(
        "--python",
        type=Path,
        help="the interpreter of the `run` idle rows (bench/.venvs/production/bin/python:"
        " as `pip install sippet-listener` runs it, without the dev extras)",
    )
    args = parser.parse_args(argv)
    logs = ROOT / "bench" / "results" / "hotpath"
    logs.mkdir(parents=True, exist_ok=True)
    server = BenchServer(logs / "server.log")
    began = time.strftime("%H:%M:%S")
    try:
        server.call("/configure", {"token_ttl": 3600})
        python = args.python.absolute() if args.python else None
        table = rows(measure(server, args.mode, logs, args.before, args.no_calls, python))
    finally:
        server.close()
    rounds, events = ROUNDS[args.mode]
    header = f"{began}-{time.strftime('%H:%M:%S')}: {rounds} rounds, each client: 2 drains"
    print(f"{header} of {events:,}, {LATENCY_SECONDS:g} s at 500/s; ratios against the bare loop")
    print("| client | drain (median; runs) | latency at 500/s | idle RSS |")
    print("|---|---|---|---|")
    for cells in table:
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
