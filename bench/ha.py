"""High availability end to end: two instances on one PostgreSQL store, next to one on SQLite.

The end-to-end rows (:mod:`bench.endtoend`: fake Sippet -> the real ``Daemon`` with one
``webhook`` handler -> signed webhook -> receiver, each a process of its own), for three
set-ups of the same daemon, in the same run, against the same server and receiver:

- the reference: one instance, its SQLite files alone (no ``[store]``), as today by default;
- one instance of a cluster: the same, with a PostgreSQL store (every event recorded and
  claimed there before its handler runs);
- two instances of a cluster on that store: both hear every event, each claims it, the one
  that wins delivers it (from its own outbox).

Each round gives each set-up fresh processes: warm-up, a drain (every instance SIGSTOPped,
N events streamed, SIGCONT; rate = N / (last arrival - SIGCONT)) and, after 1.5 s at rest,
latency at 500 events/s (server send -> receiver arrival). Rounds rotate the order. Lost and
doubled events are counted by ``seq`` (a double: two instances delivered one event).

The PostgreSQL server is the test suite's (:mod:`tests.postgres`: the system's binaries or
the ``pgserver`` wheel, on loopback, fsync off), started for the run and removed after it;
one database for all rounds.

Run: ``python -m bench.ha [smoke|quick|full] [--concurrency N]...`` (quick by default;
``--concurrency``: one more set-up, two instances whose handler runs N events at once).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.endtoend import (
    SIZES,
    WEBHOOK_DAEMON,
    Bench,
    Contender,
    Receiver,
    Result,
    Seq,
    latency_figures,
    measure_round,
    new_secret,
)
from bench.procs import BenchServer, Driver
from bench.scenarios import percentile
from tests.postgres import postgres_server

__all__ = ["SETUPS", "SINGLE", "TWO", "Setup", "main", "measure", "table"]

_RATE_TARGET = 1000.0
_P99_TARGET_MS = 50.0


@dataclass(frozen=True, slots=True)
class Setup:
    """How many instances, and whether they share the PostgreSQL store."""

    key: str
    label: str
    instances: int
    store: bool
    concurrency: int | None = None


SINGLE = Setup("sqlite-1", "1 instance, SQLite (no [store]): reference", 1, False)
TWO = Setup("pg-2", "2 instances, one PostgreSQL store", 2, True)
SETUPS = (SINGLE, Setup("pg-1", "1 instance, PostgreSQL store", 1, True), TWO)


def _round(setup: Setup, result: Result, shared: Bench, store: str) -> None:
    options: dict[str, Any] = {"store": store} if setup.store else {}
    if setup.concurrency is not None:
        options["handler"] = {"concurrency": setup.concurrency}
    drivers: list[Driver] = []
    try:
        for n in range(setup.instances):
            drivers.append(shared.driver(result.contender, f"ha-{setup.key}-{n}.log", **options))
        measure_round(drivers, result, shared)
    finally:
        for driver in drivers:
            driver.quit()


def measure(mode: str, logs: Path, setups: tuple[Setup, ...] = SETUPS) -> dict[str, Result]:
    """Every round of every set-up against one server, one receiver, one store."""
    size = SIZES[mode]
    secret = new_secret()
    results = {s.key: Result(Contender(s.key, s.label, WEBHOOK_DAEMON.script)) for s in setups}
    with postgres_server() as postgres:
        store = postgres.create_database("bench_ha")
        server = BenchServer(logs / "ha-server.log")
        try:
            server.call("/configure", {"token_ttl": 3600})
            receiver = Receiver(secret, "lean", logs / "ha-receiver.log")
            shared = Bench(server, receiver, size, Seq(), logs, secret)
            try:
                for index in range(size.rounds):
                    order = setups[index % len(setups) :] + setups[: index % len(setups)]
                    for setup in order:
                        result = results[setup.key]
                        if result.error:
                            continue
                        print(f"ha: round {index + 1}, {setup.label}", file=sys.stderr)
                        try:
                            _round(setup, result, shared, store)
                        except (RuntimeError, TimeoutError, OSError) as exc:
                            result.error = str(exc).splitlines()[0]
            finally:
                receiver.close()
        finally:
            server.close()
    return results


def table(
    results: dict[str, Result], mode: str, setups: tuple[Setup, ...] = SETUPS
) -> list[tuple[str, str, str, str, str]]:
    """The rows: (measure, set-up, result, vs reference, target)."""
    size = SIZES[mode]
    rounds = max((len(r.rates) for r in results.values()), default=0)
    drain = (
        f"HA end to end: drain {size.drain_events:,} x {rounds}, server -> instance(s) ->"
        " signed webhook -> receiver (events/s)"
    )
    latency = (
        f"HA end to end: latency at 500/s for {size.latency_seconds:g} s x {rounds},"
        " server send -> receiver arrival (ms)"
    )
    reference = results[SINGLE.key]
    reference_p99 = percentile(reference.latency_ms, 99) if reference.latency_ms else 0.0
    two = TWO.key
    rows = []
    for setup in setups:
        r = results[setup.key]
        if not r.rates:
            rows.append((drain, setup.label, f"failed: {r.error}", "", ""))
            continue
        runs = ", ".join(f"{rate:,.0f}" for rate in r.rates)
        failed = f"; then failed: {r.error}" if r.error else ""
        figures = (
            f"{r.rate:,.0f} (runs {runs}); {statistics.median(r.cpu_us):.0f} µs CPU/delivery"
            f" (all instances); {r.lost} lost, {r.duplicates} doubled{failed}"
        )
        versus = "reference" if setup is SINGLE else f"{r.rate / (reference.rate or 1):.2f} x"
        target = ""
        if setup.key == two:
            ok = r.rate >= _RATE_TARGET and not r.lost and not r.duplicates
            target = f"{'PASS' if ok else 'MISS'} (>= 1,000/s, 0 lost, 0 doubled)"
        rows.append((drain, setup.label, figures, versus, target))
    for setup in setups:
        r = results[setup.key]
        if not r.latency_ms:
            rows.append((latency, setup.label, f"failed: {r.error}", "", ""))
            continue
        p99 = percentile(r.latency_ms, 99)
        figures = latency_figures(r)
        versus = "reference" if setup is SINGLE else f"p99 {p99 / (reference_p99 or 1):.2f} x"
        target = ""
        if setup.key == two:
            target = f"{'PASS' if p99 <= _P99_TARGET_MS else 'MISS'} (p99 <= 50 ms)"
        rows.append((latency, setup.label, figures, versus, target))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.ha [smoke|quick|full]``: prints the rows' table."""
    import argparse

    from bench.run import RESULTS, Row, _table

    parser = argparse.ArgumentParser(prog="python -m bench.ha", description=__doc__)
    parser.add_argument("mode", nargs="?", choices=tuple(SIZES), default="quick")
    parser.add_argument(
        "--concurrency",
        type=int,
        action="append",
        default=[],
        help="also two instances with this handler concurrency (8 by default), same rounds",
    )
    args = parser.parse_args(argv)
    setups = SETUPS + tuple(
        Setup(f"pg-2-c{n}", f"{TWO.label}, handler concurrency {n}", 2, True, n)
        for n in args.concurrency
    )
    logs = RESULTS / f"{args.mode}-ha"
    logs.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    results = measure(args.mode, logs, setups)
    print(_table([Row(*cells) for cells in table(results, args.mode, setups)]))
    print(f"({time.monotonic() - began:.0f} s; logs in {logs})", file=sys.stderr)
    return 0 if all(not r.error for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
