"""Where the daemon's CPU per delivery and its latency go, end to end.

Two looks, each against the same three processes as ``bench.endtoend``:

- **CPU** (:func:`cpu_profile`): py-spy samples a forwarder (all threads, 400/s) while it
  drains an unpaced flood; every busy sample is charged to one *component* by walking its
  stack from the innermost frame outwards to the first frame that names one (asyncio's own
  frames are charged to the component that called them; samples with no such frame are the
  event loop's own). Shares of the process's busy samples, and µs per delivery (the share of
  the process's CPU time over the window, from ``/proc``, divided by the deliveries the
  receiver saw in it; py-spy's pauses inflate the absolute figure, not the shares).
- **latency** (:func:`latency_trace`): the daemon with ``trace`` on
  (``bench/drivers/webhook_trace.py``) at 500 events/s: every event's time in each stage from
  the server's ``ts`` to the receiver's arrival; p50 / p99 of each stage, and the stages'
  mean over the slowest 1 % of events, which is where the p99 goes.

``python -m bench.endtoend_profile [smoke|quick|full]`` prints both as markdown; with
``--store N``, of a daemon on a PostgreSQL store beside N - 1 others (a database a look).
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.endtoend import LOOP, SIZES, WEBHOOK_DAEMON, Contender, Receiver, Seq
from bench.procs import BenchServer, Driver, cpu_seconds
from bench.profile import Profile, record
from bench.scenarios import percentile
from tests.postgres import postgres_server

__all__ = ["COMPONENTS", "cpu_profile", "latency_trace", "main"]

# (substring of a frame, component): the first rule matching a frame, walking outwards from
# the innermost, names the sample's component.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("structlog/", "logging"),
    ("logging/", "logging"),
    ("prometheus_client/", "metrics"),
    ("listener/core/metrics.py", "metrics"),
    ("encode_body (listener/webhooks/signing.py", "body: encode_body (json)"),
    ("new_message_id (listener/webhooks/signing.py", "body: encode_body (json)"),
    ("_body (", "body: encode_body (json)"),
    ("standardwebhooks/", "signing"),
    ("hmac.py", "signing"),
    ("listener/webhooks/signing.py", "signing"),
    ("h11/", "HTTP/1.1 (h11 + http1.py / the loop's own)"),
    ("listener/webhooks/http1.py", "HTTP/1.1 (h11 + http1.py / the loop's own)"),
    ("_exchange (", "HTTP/1.1 (h11 + http1.py / the loop's own)"),
    ("_read_answer (", "HTTP/1.1 (h11 + http1.py / the loop's own)"),
    ("_send_raw (", "HTTP/1.1 (h11 + http1.py / the loop's own)"),
    ("_send_h11 (", "HTTP/1.1 (h11 + http1.py / the loop's own)"),
    ("listener/webhooks/outbox.py", "outbox SQL (SQLite, outbox thread)"),
    ("_checkpoint (listener/webhooks/store.py", "WAL checkpoint (either thread)"),
    ("_Checkpointer.", "WAL checkpoint (either thread)"),
    ("listener/webhooks/store.py", "executor hops (store.run, thread pool)"),
    ("concurrent/futures/", "executor hops (store.run, thread pool)"),
    ("listener/webhooks/writer.py", "writer (batching, futures)"),
    ("listener/webhooks/worker.py", "worker (claim loop, attempts, judging)"),
    ("listener/webhooks/health.py", "worker (claim loop, attempts, judging)"),
    ("listener/webhooks/ratelimit.py", "worker (claim loop, attempts, judging)"),
    ("listener/webhooks/gauges.py", "housekeeping (gauges, prune)"),
    ("_housekeep (listener/webhooks/forwarder.py", "housekeeping (gauges, prune)"),
    ("listener/webhooks/forwarder.py", "submit (handler, forwarder)"),
    ("listener/webhooks/handler.py", "submit (handler, forwarder)"),
    ("listener/dispatch/", "dispatcher (queue, lanes, runner)"),
    ("listener/realtime/", "socket intake (websockets, decode)"),
    ("websockets/", "socket intake (websockets, decode)"),
    ("_receive (", "socket intake (websockets, decode)"),
    ("orjson", "socket intake (websockets, decode)"),
)
_LOOP_ITSELF = "event loop itself (scheduling, select, wake-ups)"


def _component(frames: list[str]) -> str:
    for frame in reversed(frames[1:]):
        for marker, component in COMPONENTS:
            if marker in frame:
                return component
    return _LOOP_ITSELF


@dataclass
class CpuProfile:
    """One forwarder's busy samples by component."""

    contender: Contender
    samples: Counter[str]
    threads: Counter[str]
    cpu_us: float
    deliveries: int
    seconds: float


def _flood(
    contender: Contender,
    server: BenchServer,
    receiver: Receiver,
    seq: Seq,
    seconds: float,
    rate_guess: float,
    logs: Path,
    secret: str,
) -> CpuProfile:
    options = {"url": receiver.url, "secret": secret, **contender.options}
    driver = Driver(
        contender.label,
        Path(sys.executable),
        contender.script,
        server,
        logs / f"e2e-profile-{contender.key}.log",
        options,
    )
    output = logs / f"e2e-profile-{contender.key}.raw"
    try:
        receiver.reset()
        start = seq.take(500)
        server.stream(500, start)
        receiver.wait(500, 30)
        count = int(rate_guess * (seconds + 2))
        receiver.reset()
        driver.pause()
        try:
            server.stream(count, seq.take(count))
            time.sleep(0.5)
        finally:
            driver.resume()
        time.sleep(0.5)
        began, cpu = time.time(), cpu_seconds(driver.pid)
        record(driver.pid, output, seconds).wait(timeout=seconds + 60)
        ended, cpu = time.time(), cpu_seconds(driver.pid) - cpu
        records = receiver.wait(count, 60 + count / 200)["records"]
        deliveries = sum(1 for _, _, arrived in records if began <= arrived <= ended)
    finally:
        driver.quit()
    profile = Profile(output)
    samples: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for thread in ("MainThread", "sippet-outbox", "sippet-checkpoint"):
        busy = profile.only(thread)
        stacks = [
            (frames, count)
            for frames, count in busy.stacks
            # The checkpointer's wait for its next look (an Event's timed wait).
            if not (thread == "sippet-checkpoint" and frames[-1].startswith("Condition.wait "))
        ]
        threads[thread] = sum(count for _, count in stacks)
        for frames, count in stacks:
            samples[_component(frames)] += count
    cpu_us = cpu * 1e6 / deliveries if deliveries else 0.0
    return CpuProfile(contender, samples, threads, cpu_us, deliveries, ended - began)


def cpu_profile(mode: str, logs: Path, seconds: float) -> list[CpuProfile]:
    """py-spy on the reference loop and on the daemon, each draining a flood."""
    from bench.endtoend import new_secret

    secret = new_secret()
    seq = Seq()
    server = BenchServer(logs / "e2e-profile-server.log")
    try:
        server.call("/configure", {"token_ttl": 3600})
        receiver = Receiver(secret, "lean", logs / "e2e-profile-receiver.log")
        try:
            return [
                _flood(LOOP, server, receiver, seq, seconds, 8000, logs, secret),
                _flood(WEBHOOK_DAEMON, server, receiver, seq, seconds, 3000, logs, secret),
            ]
        finally:
            receiver.close()
    finally:
        server.close()


def cpu_text(profiles: list[CpuProfile]) -> str:
    """A table: component, then share and µs/delivery for each forwarder."""
    components = sorted(
        {c for p in profiles for c in p.samples},
        key=lambda c: (
            -max(p.samples[c] / (sum(p.samples.values()) or 1) * p.cpu_us for p in profiles)
        ),
    )
    header = "| component | " + " | ".join(p.contender.label for p in profiles) + " |"
    lines = [header, "|---|" + "---|" * len(profiles)]
    for component in components:
        cells = []
        for p in profiles:
            total = sum(p.samples.values()) or 1
            share = p.samples[component] / total
            cells.append(f"{share:.1%} / {share * p.cpu_us:.0f} µs" if share else "")
        lines.append(f"| {component} | " + " | ".join(cells) + " |")
    totals = [
        f"{p.cpu_us:.0f} µs/delivery ({p.deliveries:,} deliveries in {p.seconds:.1f} s;"
        f" busy samples: {', '.join(f'{t} {n}' for t, n in p.threads.items())})"
        for p in profiles
    ]
    lines.append("| **all** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


# The stages, between consecutive stamps; "ts" is the server's, "arrived" the receiver's.
_PATH = (
    ("ts", "intake", "socket: server ts -> frame decoded"),
    ("intake", "asked", "dispatcher: queue -> claim asked (at intake, or by a handler worker)"),
    ("asked", "sent", "cluster claim: batched, waits for a pool slot"),
    ("sent", "answered_claim", "cluster claim: the statement (round trip)"),
    ("answered_claim", "handle", "claim answered -> handle or stage (a worker, the lane)"),
    ("handle", "flush", "writer: the previous commit's end, the batch gathered"),
    ("flush", "commit_start", "hop to the outbox thread"),
    (
        "commit_start",
        "commit_end",
        "commit, on the outbox thread (SQLite, or the store's statement)",
    ),
    ("commit_end", "committed", "hop back to the loop: _on_commit"),
    ("committed", "claim_start", "worker wakes, hop to the outbox thread (0: commit claimed)"),
    ("claim_start", "claim_end", "claim: the due rows, read (0: the commit claimed it)"),
    ("claim_end", "attempt", "hop back, a slot takes the row, its task starts"),
    ("attempt", "post", "sign, headers"),
    ("post", "arrived", "HTTP: request written -> receiver has the body"),
)


# The cluster claim's stamps, none without a store.
_CLAIM_STAMPS = ("asked", "sent", "answered_claim")


@contextmanager
def _traced(
    name: str, mode: str, logs: Path, options: dict[str, Any] | None
) -> Iterator[tuple[BenchServer, Receiver, list[Driver], Seq]]:
    """The three processes with the traced daemon first, warmed up; logs named
    ``e2e-{name}-*``. With ``instances`` in ``options`` (and a ``store``), that many
    daemons on the store, the others untraced: an event one of them delivers has no stamps.
    A ``store`` that is a callable gives each look a database of its own (the events' stable
    ids repeat from look to look, and a store remembers those handled)."""
    from bench.endtoend import new_secret

    size = SIZES[mode]
    secret = new_secret()
    seq = Seq()
    settings = dict(options or {})
    count = int(settings.pop("instances", 1))
    if callable(settings.get("store")):
        settings["store"] = settings["store"]()
    server = BenchServer(logs / f"e2e-{name}-server.log")
    try:
        server.call("/configure", {"token_ttl": 3600})
        receiver = Receiver(secret, "lean", logs / f"e2e-{name}-receiver.log")
        drivers: list[Driver] = []
        try:
            for n in range(count):
                drivers.append(
                    Driver(
                        WEBHOOK_DAEMON.label,
                        Path(sys.executable),
                        WEBHOOK_DAEMON.script,
                        server,
                        logs / f"e2e-{name}-daemon{'' if n == 0 else n}.log",
                        {"url": receiver.url, "secret": secret, "trace": n == 0, **settings},
                    )
                )
            receiver.reset()
            server.stream(size.warmup, seq.take(size.warmup))
            receiver.wait(size.warmup, 30)
            drivers[0].stats()
            yield server, receiver, drivers, seq
        finally:
            for driver in drivers:
                driver.quit()
            receiver.close()
    finally:
        server.close()


def latency_trace(
    mode: str, logs: Path, *, options: dict[str, Any] | None = None, rate: float = 500.0
) -> tuple[dict[str, list[float]], list[float], dict[str, float]]:
    """The traced daemon at ``rate`` events/s: each stage's ms per event, the totals, and
    its statements per second by kind."""
    with _traced("trace", mode, logs, options) as (server, receiver, drivers, seq):
        count = int(rate * max(SIZES[mode].latency_seconds, 2.0))
        receiver.reset()
        server.stream(count, seq.take(count), rate=rate)
        records = receiver.wait(count, 10)["records"]
        time.sleep(0.2)
        began = time.monotonic()
        stats = drivers[0].stats()
        # The counts since the warm-up's stats: the stream, its wait, and this pause.
        seconds = count / rate + (time.monotonic() - began)
        stamps = {int(k): v for k, v in stats["trace"].items()}
        counts: dict[str, int] = stats["counts"]
    names = ("ts", "intake", "asked", "sent", "answered_claim", "handle", "flush")
    names += ("commit_start", "commit_end", "committed")
    names += ("claim_start", "claim_end", "attempt", "post", "answered")
    stages: dict[str, list[float]] = {label: [] for _, _, label in _PATH}
    totals = []
    for seq_no, ts, arrived in records:
        got = stamps.get(seq_no)
        if got is None:
            continue
        at = dict(zip(names[1:], got, strict=True))
        # Without a store there is no cluster claim: its stamps are the handler's start.
        for name in _CLAIM_STAMPS:
            at[name] = at[name] or at["handle"]
        if not all(at.values()):
            continue
        at["ts"], at["arrived"] = ts, arrived
        for start, end, label in _PATH:
            stages[label].append((at[end] - at[start]) * 1000)
        totals.append((arrived - ts) * 1000)
    rates = {
        kind: counts.get(key, 0) / seconds
        for kind, key in (
            ("outbox commits", "commits"),
            ("outbox claims", "claims"),
            ("cluster claims", "cluster_claims"),
            ("cluster writes (done marks)", "cluster_writes"),
        )
    }
    for name in ("stats", "renew", "prune"):
        if f"{name}_us" in counts:
            rates[f"outbox thread in {name} (ms/s)"] = counts[f"{name}_us"] / 1000 / seconds
            rates[f"longest {name} (ms)"] = counts[f"{name}_max_us"] / 1000
    return stages, totals, rates


def flood_counts(
    mode: str, logs: Path, *, options: dict[str, Any] | None = None
) -> dict[str, float]:
    """The traced daemon draining a flood: its calls to the outbox thread, per delivery."""
    count = SIZES[mode].drain_events
    with _traced("counts", mode, logs, options) as (server, receiver, drivers, seq):
        receiver.reset()
        for driver in drivers:
            driver.pause()
        try:
            server.stream(count, seq.take(count))
            time.sleep(0.5)
        finally:
            for driver in drivers:
                driver.resume()
        receiver.wait(count, 60 + count / 200)
        time.sleep(0.3)
        counts: dict[str, int] = drivers[0].stats()["counts"]
    commits, claims = counts.get("commits", 0) or 1, counts.get("claims", 0) or 1
    return {
        "deliveries": count,
        "rows per commit": counts.get("rows", 0) / commits,
        "outcomes per commit": counts.get("outcomes", 0) / commits,
        "rows per claim": counts.get("claimed", 0) / claims,
        "rows claimed by their commit": counts.get("taken", 0) / count,
        "outbox-thread calls per delivery": (commits + claims) / count,
        "events per cluster claim statement": counts.get("cluster_claimed", 0)
        / (counts.get("cluster_claims", 0) or 1),
    }


def counts_text(counts: dict[str, float]) -> str:
    """One line."""
    return "; ".join(
        f"{name} {value:,.0f}" if name == "deliveries" else f"{name} {value:.2f}"
        for name, value in counts.items()
    )


def latency_text(
    stages: dict[str, list[float]], totals: list[float], rates: dict[str, float] | None = None
) -> str:
    """A table: each stage's p50, p99, mean, and mean over the slowest 1 % of events."""
    if not totals:
        return "no traced event reached the receiver"
    cut = percentile(totals, 99)
    slow = [index for index, total in enumerate(totals) if total >= cut]
    per_second = ", ".join(f"{kind} {rate:,.1f}" for kind, rate in (rates or {}).items())
    lines = [
        f"{len(totals):,} events; end to end p50 {percentile(totals, 50):.2f} ms,"
        f" p99 {cut:.2f} ms, max {max(totals):.2f} ms",
        *([f"statements per second (the traced instance): {per_second}"] if rates else []),
        "",
        "| stage | p50 ms | p99 ms | mean ms | mean over the slowest 1 % (ms) |",
        "|---|---|---|---|---|",
    ]
    for label, values in stages.items():
        tail = statistics.fmean(values[index] for index in slow)
        lines.append(
            f"| {label} | {percentile(values, 50):.3f} | {percentile(values, 99):.3f} |"
            f" {statistics.fmean(values):.3f} | {tail:.3f} |"
        )
    tail_total = statistics.fmean(totals[index] for index in slow)
    lines.append(
        f"| **server ts -> receiver arrival** | {percentile(totals, 50):.3f} | {cut:.3f} |"
        f" {statistics.fmean(totals):.3f} | {tail_total:.3f} |"
    )
    return "\n".join(lines)


def report(
    mode: str,
    logs: Path,
    seconds: float,
    *,
    cpu: bool = True,
    trace: bool = True,
    options: dict[str, Any] | None = None,
) -> str:
    """Both looks as markdown, for ``python -m bench``'s profiles section."""
    parts = ["### End to end webhooks: where the CPU per delivery and the latency go"]
    if cpu:
        parts += [
            f"CPU per delivery, by component, each forwarder draining a flood for {seconds:g} s"
            " under py-spy (share of the process's busy samples / µs per delivery):",
            cpu_text(cpu_profile(mode, logs, seconds)),
        ]
    if trace:
        parts += [
            "Calls to the outbox thread while the daemon drains a flood (traced):",
            counts_text(flood_counts(mode, logs, options=options)),
            "Latency at 500/s, by stage (the daemon, traced; server ts -> receiver arrival):",
            latency_text(*latency_trace(mode, logs, options=options)),
        ]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from bench.run import RESULTS

    parser = argparse.ArgumentParser(prog="python -m bench.endtoend_profile", description=__doc__)
    parser.add_argument("mode", nargs="?", choices=tuple(SIZES), default="quick")
    parser.add_argument("--seconds", type=float, default=8.0, help="py-spy's window")
    parser.add_argument("--no-cpu", action="store_true")
    parser.add_argument("--no-trace", action="store_true")
    parser.add_argument("--options", default="{}", help="extra daemon driver options (JSON)")
    parser.add_argument(
        "--store",
        type=int,
        metavar="INSTANCES",
        help="trace a daemon on a PostgreSQL store (the test suite's server, started for the"
        " run), beside INSTANCES - 1 untraced ones on it",
    )
    args = parser.parse_args(argv)
    logs = RESULTS / f"{args.mode}-e2e"
    logs.mkdir(parents=True, exist_ok=True)
    options = json.loads(args.options)
    with ExitStack() as stack:
        if args.store is not None:
            postgres = stack.enter_context(postgres_server())
            names = (f"bench_trace_{n}" for n in itertools.count())
            options.update(
                store=lambda: postgres.create_database(next(names)), instances=args.store
            )
        print(
            report(
                args.mode,
                logs,
                args.seconds,
                cpu=not args.no_cpu,
                trace=not args.no_trace,
                options=options,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
