"""End to end: fake Sippet -> forwarder -> signed webhook -> receiver, three processes.

Three forwarders read the same server's socket, one at a time (a broadcast reaches every
joined socket), and POST to the same receiver:

- the reference, ``bench/drivers/forward_loop.py`` in its ``h11`` style: a minimal non-durable
  loop (websockets + orjson, Standard Webhooks signing, 8 keep-alive HTTP/1.1 connections) on
  the usual libraries (``h11``, ``standardwebhooks``), called directly;
- the limit, the same loop in its ``raw`` style: HTTP/1.1 and the signature by hand;
- sippet-listener, ``bench/drivers/webhook_daemon.py``: the real ``Daemon`` from a
  configuration with one ``webhook`` handler, every default kept, every event committed to
  its SQLite outbox before its first attempt.

The receiver (``bench/endtoend_receiver.py``) timestamps each arrival and checks signatures.
Per round, each forwarder gets a process of its own, then, in this order:

1. warm-up: a few events, unpaced, all delivered;
2. drain: the forwarder is SIGSTOPped, N events are streamed unpaced (into the socket buffers
   and the server's queue), 0.5 s later SIGCONT; rate = N / (last arrival - SIGCONT);
   ``µs CPU/delivery`` = the forwarder's process CPU time (all threads, from ``/proc``) from
   SIGCONT until the receiver has all N, over N;
3. latency, after 1.5 s at rest: 500 events/s for a few seconds; latency = receiver arrival -
   the server's ``ts``.

Rounds rotate which forwarder goes first, so that a noisy neighbour spreads over both.

Then, the daemon alone (a non-durable loop has nothing to drain: it loses what arrives while
the receiver is down): **backlog after an outage**. The receiver goes down (connections
refused), N events are streamed, the daemon commits all of them (its status line says N
pending) while it probes the receiver; the receiver comes back; figures: the time from then
to the first arrival, and the drain rate, N / (last arrival - back up). The destination's
``max_probe_interval`` is 1 s here (5 s by default): with probes at most 1 s apart, the start
within 1 s measures the daemon, not the probe schedule.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import BenchServer, Child, Driver, cpu_seconds
from bench.scenarios import QUIET_BEFORE_LATENCY, Seq, percentile

__all__ = [
    "LIMIT",
    "LOOP",
    "SIZES",
    "WEBHOOK_DAEMON",
    "Bench",
    "Contender",
    "Receiver",
    "Result",
    "Seq",
    "Size",
    "latency_figures",
    "measure",
    "measure_round",
    "new_secret",
    "note",
    "table",
]

_SETTLE = 0.5
_LATENCY_RATE = 500.0
_LATENCY_TARGET_MS = 10.0
_RATIO_TARGET = 0.8
_BACKLOG_RATE_TARGET = 2000.0
_BACKLOG_START_TARGET = 1.0
_BACKLOG_PROBE_INTERVAL = 1.0
_PENDING = re.compile(r"(\d+) pending, \d+ dead")


@dataclass(frozen=True, slots=True)
class Size:
    """How big the end-to-end part of a run is."""

    drain_events: int
    rounds: int
    warmup: int
    latency_seconds: float
    backlog_events: int


SIZES = {
    "smoke": Size(drain_events=300, rounds=1, warmup=50, latency_seconds=0.6, backlog_events=500),
    "quick": Size(
        drain_events=5000, rounds=2, warmup=500, latency_seconds=4.0, backlog_events=20_000
    ),
    "full": Size(
        drain_events=20_000, rounds=3, warmup=1000, latency_seconds=10.0, backlog_events=100_000
    ),
}


@dataclass(frozen=True, slots=True)
class Contender:
    """One forwarder: its driver and its label in the table."""

    key: str
    label: str
    script: str
    options: dict[str, Any] = field(default_factory=dict)


LIMIT = Contender(
    "forward-raw",
    "limit: forwarding loop, HTTP and signing by hand (non-durable)",
    "forward_loop.py",
    {"style": "raw"},
)
LOOP = Contender(
    "forward-loop",
    "reference: forwarding loop on h11 + standardwebhooks (non-durable)",
    "forward_loop.py",
    {"style": "h11"},
)
WEBHOOK_DAEMON = Contender(
    "sippet-webhook",
    "sippet-listener (Daemon, webhook handler, durable outbox, defaults)",
    "webhook_daemon.py",
)
CONTENDERS = (LIMIT, LOOP, WEBHOOK_DAEMON)


@dataclass
class Result:
    """One forwarder's figures over every round."""

    contender: Contender
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    receiver_cpu_us: list[float] = field(default_factory=list)
    lost: int = 0
    duplicates: int = 0
    latency_ms: list[float] = field(default_factory=list)
    latency_p99s: list[float] = field(default_factory=list)
    latency_lost: int = 0
    verified: int = 0
    bad: list[str] = field(default_factory=list)
    error: str | None = None
    backlog: dict[str, Any] | None = None

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


class Receiver(Child):
    def __init__(self, secret: str, server: str, log: Path) -> None:
        argv = [sys.executable, "-m", "bench.endtoend_receiver", secret, "--server", server]
        super().__init__(argv, log)
        info = self.read(timeout=20)
        self.url: str = info["url"]

    def reset(self) -> None:
        self.request({"cmd": "reset"})

    def wait(self, count: int, timeout: float) -> dict[str, Any]:
        return self.request({"cmd": "wait", "count": count, "timeout": timeout}, timeout + 60)

    def wait_distinct(self, seqs: range, timeout: float) -> dict[str, Any]:
        """Wait until every one of ``seqs`` arrived (or ``timeout`` passed): a double (two
        instances of a cluster delivering one event) does not count for a missing one."""
        deadline = time.monotonic() + timeout
        asked = len(seqs)
        while True:
            answer = self.wait(asked, max(0.0, deadline - time.monotonic()))
            records = answer["records"]
            missing = len(set(seqs) - {record[0] for record in records})
            if not missing or len(records) < asked or time.monotonic() >= deadline:
                return answer
            asked = len(records) + missing


def note(result: Result, answer: dict[str, Any], seqs: range) -> list[list[Any]]:
    """Count what is missing or doubled; keep the signature check; return the records."""
    records: list[list[Any]] = answer["records"]
    seen = [record[0] for record in records]
    result.lost += len(set(seqs) - set(seen))
    result.duplicates += len(seen) - len(set(seen))
    result.verified += answer["verified"]
    result.bad += answer["bad"]
    return records


@dataclass(frozen=True, slots=True)
class Bench:
    """What every round shares: the server, the receiver, the sizes, the numbering."""

    server: BenchServer
    receiver: Receiver
    size: Size
    seq: Seq
    logs: Path
    secret: str

    def driver(self, contender: Contender, log: str, **options: Any) -> Driver:
        """A fresh process of ``contender``, its options over the receiver's URL and secret."""
        return Driver(
            contender.label,
            Path(sys.executable),
            contender.script,
            self.server,
            self.logs / log,
            {"url": self.receiver.url, "secret": self.secret, **contender.options, **options},
        )


def _round(contender: Contender, result: Result, shared: Bench) -> None:
    driver = shared.driver(contender, f"e2e-{contender.key}.log")
    try:
        measure_round([driver], result, shared)
    finally:
        driver.quit()


def measure_round(drivers: Sequence[Driver], result: Result, shared: Bench) -> None:
    """Warm-up, drain and latency (see the module's docstring) into ``result``, every one of
    ``drivers`` reading the server (the instances of one cluster, or a forwarder alone);
    CPU is theirs together."""
    server, receiver, size, seq = shared.server, shared.receiver, shared.size, shared.seq
    receiver.reset()
    start = seq.take(size.warmup)
    server.stream(size.warmup, start)
    seqs = range(start, start + size.warmup)
    note(result, receiver.wait_distinct(seqs, 30), seqs)

    count = size.drain_events
    receiver.reset()
    for driver in drivers:
        driver.pause()
    try:
        start = seq.take(count)
        server.stream(count, start)
        time.sleep(_SETTLE)
        cpu = sum(cpu_seconds(driver.pid) for driver in drivers)
        resumed = time.time()
    finally:
        for driver in drivers:
            driver.resume()
    seqs = range(start, start + count)
    answer = receiver.wait_distinct(seqs, 60 + count / 200)
    cpu = sum(cpu_seconds(driver.pid) for driver in drivers) - cpu
    records = note(result, answer, seqs)
    if records:
        last = max(arrived for _, _, arrived in records)
        # Events delivered, a double counted once.
        result.rates.append(len({record[0] for record in records}) / (last - resumed))
        result.cpu_us.append(cpu * 1e6 / len(records))
        result.receiver_cpu_us.append(answer["cpu"] * 1e6 / len(records))

    time.sleep(QUIET_BEFORE_LATENCY)
    count = int(_LATENCY_RATE * size.latency_seconds)
    receiver.reset()
    start = seq.take(count)
    server.stream(count, start, rate=_LATENCY_RATE)
    seqs = range(start, start + count)
    answer = receiver.wait_distinct(seqs, 10)
    lost = result.lost
    records = note(result, answer, seqs)
    result.latency_lost += result.lost - lost
    latencies = [(arrived - ts) * 1000 for _, ts, arrived in records]
    if latencies:
        result.latency_ms += latencies
        result.latency_p99s.append(percentile(latencies, 99))


def _backlog(contender: Contender, result: Result, shared: Bench) -> None:
    """The backlog after an outage (see the module's docstring); figures in ``result``."""
    server, receiver, size, seq = shared.server, shared.receiver, shared.size, shared.seq
    handler = {
        **contender.options.get("handler", {}),
        "max_probe_interval": _BACKLOG_PROBE_INTERVAL,
    }
    driver = shared.driver(contender, f"e2e-{contender.key}-backlog.log", handler=handler)
    count = size.backlog_events
    down = False
    try:
        receiver.request({"cmd": "down"})
        down = True
        receiver.reset()
        start = seq.take(count)
        began = time.time()
        server.stream(count, start)
        deadline = time.time() + 60 + count / 500
        while True:
            found = _PENDING.search(driver.stats()["status"])
            if found and int(found.group(1)) >= count:
                break
            if time.time() > deadline:
                raise TimeoutError(f"backlog: not all {count} committed within the deadline")
            time.sleep(0.2)
        committed = time.time() - began
        receiver.request({"cmd": "up"})
        down = False
        up = time.time()
        answer = receiver.wait(count, 60 + count / 200)
        wal = driver.stats()["wal_bytes"]
        records = note(result, answer, range(start, start + count))
        arrivals = sorted(arrived for _, _, arrived in records)
        if arrivals:
            result.backlog = {
                "wal_mib": wal / 2**20,
                "count": len(records),
                "committed": committed,
                "start": arrivals[0] - up,
                "rate": len(records) / (arrivals[-1] - up),
                "rate_after_start": len(records) / max(1e-9, arrivals[-1] - arrivals[0]),
            }
    finally:
        if down:
            receiver.request({"cmd": "up"})
        driver.quit()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def measure(
    mode: str,
    logs: Path,
    *,
    receiver_server: str = "lean",
    daemon_options: dict[str, Any] | None = None,
    only: tuple[str, ...] = (),
    variants: dict[str, dict[str, Any]] | None = None,
    rounds: int | None = None,
) -> list[Result]:
    """Every round of every forwarder against one server and one receiver.

    ``receiver_server``: ``lean`` or ``uvicorn`` (see ``bench/endtoend_receiver.py``);
    ``daemon_options``: extra options for the daemon's driver (experiments); ``only``: the
    keys of the forwarders to run (all if empty); ``variants``: more daemons, ``{label:
    driver options}``, run in the same rounds (A/B comparisons); ``rounds``: instead of the
    mode's.
    """
    size = SIZES[mode]
    if rounds is not None:
        size = dataclasses.replace(size, rounds=rounds)
    secret = new_secret()
    contenders = tuple(
        Contender(c.key, c.label, c.script, {**c.options, **(daemon_options or {})})
        if c is WEBHOOK_DAEMON
        else c
        for c in CONTENDERS
        if not only or c.key in only
    ) + tuple(
        Contender(
            f"{WEBHOOK_DAEMON.key}-{index}",
            f"{WEBHOOK_DAEMON.label} [{label}]",
            WEBHOOK_DAEMON.script,
            options,
        )
        for index, (label, options) in enumerate((variants or {}).items(), 1)
    )
    results = {c.key: Result(c) for c in contenders}
    seq = Seq()
    server = BenchServer(logs / "e2e-server.log")
    try:
        server.call("/configure", {"token_ttl": 3600})
        receiver = Receiver(secret, receiver_server, logs / "e2e-receiver.log")
        shared = Bench(server, receiver, size, seq, logs, secret)
        try:
            for index in range(size.rounds):
                shift = index % len(contenders)
                order = contenders[shift:] + contenders[:shift]
                for contender in order:
                    result = results[contender.key]
                    if result.error:
                        continue
                    try:
                        _round(contender, result, shared)
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        result.error = str(exc).splitlines()[0]
            for contender in contenders:
                result = results[contender.key]
                if contender.script != WEBHOOK_DAEMON.script or result.error:
                    continue
                try:
                    _backlog(contender, result, shared)
                except (RuntimeError, TimeoutError, OSError) as exc:
                    result.error = "backlog: " + str(exc).splitlines()[0]
        finally:
            receiver.close()
    finally:
        server.close()
    return list(results.values())


def _n(value: float) -> str:
    return f"{value:,.0f}"


def latency_figures(r: Result) -> str:
    """The latency phase's p50 / p99 / max over every run, each run's p99, what was lost."""
    p50, p99 = percentile(r.latency_ms, 50), percentile(r.latency_ms, 99)
    per_run = ", ".join(f"{value:.1f}" for value in r.latency_p99s)
    lost = f"; {r.latency_lost} lost" if r.latency_lost else ""
    return (
        f"p50 {p50:.2f} / p99 {p99:.2f} / max {max(r.latency_ms):.2f} (p99 per run {per_run}){lost}"
    )


def table(results: list[Result], mode: str) -> list[tuple[str, str, str, str, str]]:
    """The rows: (measure, client, result, vs reference, target)."""
    size = SIZES[mode]
    # The rounds run (a smaller figure if a forwarder failed, a larger one if asked for).
    size = dataclasses.replace(size, rounds=max((len(r.rates) for r in results), default=0))
    loop = next((r for r in results if r.contender.key == LOOP.key), Result(LOOP))
    limit = next((r for r in results if r.contender.key == LIMIT.key), Result(LIMIT))
    loop_p99 = percentile(loop.latency_ms, 99) if loop.latency_ms else 0.0
    drain = (
        f"end to end: drain {_n(size.drain_events)} x {size.rounds}, server -> forwarder ->"
        " signed webhook -> receiver (events/s)"
    )
    latency = (
        f"end to end: latency at 500/s for {size.latency_seconds:g} s x {size.rounds},"
        " server send -> receiver arrival (ms)"
    )
    rows = []
    for r in results:
        label = r.contender.label
        if not r.rates:
            rows.append((drain, label, f"failed: {r.error}", "", ""))
            continue
        checks = f"signatures: {r.verified} checked valid" + (
            f", {len(r.bad)} invalid ({r.bad[0]})" if r.bad else ""
        )
        missing = f"; {r.lost} lost, {r.duplicates} duplicates" if r.lost or r.duplicates else ""
        failed = f"; then failed: {r.error}" if r.error else ""
        runs = ", ".join(_n(rate) for rate in r.rates)
        figures = (
            f"{_n(r.rate)} (runs {runs}); {statistics.median(r.cpu_us):.0f} µs CPU/delivery"
            f" (receiver {statistics.median(r.receiver_cpu_us):.0f} µs); {checks}{missing}{failed}"
        )
        ratio = r.rate / loop.rate if loop.rate else 0.0
        reference = "reference" if r.contender.key == LOOP.key else f"{ratio:.2f} x loop"
        if r.contender.key == WEBHOOK_DAEMON.key and limit.rate:
            reference += f", {r.rate / limit.rate:.2f} x limit"
        target = ""
        if r.contender.key == WEBHOOK_DAEMON.key:
            verdict = "PASS" if ratio >= _RATIO_TARGET and not r.lost else "MISS"
            target = f"{verdict} (>= 0.8 x loop, every event durable before its first attempt)"
        rows.append((drain, label, figures, reference, target))
    for r in results:
        label = r.contender.label
        if not r.latency_ms:
            rows.append((latency, label, f"failed: {r.error}", "", ""))
            continue
        p99 = percentile(r.latency_ms, 99)
        figures = latency_figures(r)
        reference = (
            "reference"
            if r.contender.key == LOOP.key
            else f"p99 {p99 / (loop_p99 or 1):.2f} x loop"
        )
        target = ""
        if r.contender.key == WEBHOOK_DAEMON.key:
            target = f"{'PASS' if p99 <= _LATENCY_TARGET_MS else 'MISS'} (p99 <= 10 ms)"
        rows.append((latency, label, figures, reference, target))
    backlog = (
        f"end to end: backlog of {_n(size.backlog_events)} after a receiver outage"
        f" (max_probe_interval {_BACKLOG_PROBE_INTERVAL:g} s), back up -> drained"
    )
    for r in results:
        if r.contender.script != WEBHOOK_DAEMON.script:
            continue
        b = r.backlog
        if b is None:
            rows.append((backlog, r.contender.label, f"failed: {r.error}", "", ""))
            continue
        figures = (
            f"{_n(b['rate'])}/s from back up ({_n(b['rate_after_start'])}/s from the first"
            f" arrival); first arrival {b['start'] * 1000:.0f} ms after back up; {b['count']:,}"
            f" delivered; all committed {b['committed']:.1f} s after the stream began;"
            f" WAL file at most {b['wal_mib']:.1f} MiB"
        )
        ok = b["rate"] >= _BACKLOG_RATE_TARGET and b["start"] <= _BACKLOG_START_TARGET
        reference = f"{b['rate'] / loop.rate:.2f} x loop's drain" if loop.rate else ""
        target = f"{'PASS' if ok else 'MISS'} (>= 2,000/s, starting within 1 s)"
        rows.append((backlog, r.contender.label, figures, reference, target))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.endtoend``: only these rows (``python -m bench`` runs them too)."""
    import argparse
    import json

    from bench.run import RESULTS, Row, _table

    parser = argparse.ArgumentParser(prog="python -m bench.endtoend", description=__doc__)
    parser.add_argument("mode", nargs="?", choices=tuple(SIZES), default="quick")
    parser.add_argument("--receiver", choices=("lean", "uvicorn"), default="lean")
    parser.add_argument("--daemon-options", default="{}", help="extra driver options (JSON)")
    parser.add_argument("--only", action="append", default=[], help="a forwarder's key")
    parser.add_argument("--rounds", type=int, help="instead of the mode's")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help="one more daemon, with these driver options, in the same rounds",
    )
    args = parser.parse_args(argv)
    logs = RESULTS / f"{args.mode}-e2e"
    logs.mkdir(parents=True, exist_ok=True)
    results = measure(
        args.mode,
        logs,
        receiver_server=args.receiver,
        daemon_options=json.loads(args.daemon_options),
        only=tuple(args.only),
        rounds=args.rounds,
        variants={
            label: json.loads(options)
            for label, _, options in (item.partition("=") for item in args.variant)
        },
    )
    print(_table([Row(*cells) for cells in table(results, args.mode)]))
    return 0 if all(not r.error for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
