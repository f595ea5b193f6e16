"""The measurements. Each one starts the processes it needs, measures, stops them, and
returns plain figures; ``bench.run`` turns them into table rows.

Only one client is connected to a server at a time (a broadcast reaches every joined socket),
except in the footprint run, where the reference and ours share the flood on purpose.
"""

from __future__ import annotations

import itertools
import math
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.peers import BARE, DAEMON, Client
from bench.procs import BenchServer, Child, Driver, cpu_seconds, quiet, rss_mib
from bench.profile import Profile, record

__all__ = [
    "QUIET_BEFORE_LATENCY",
    "RECOVERY_TIMEOUT",
    "Footprint",
    "Mode",
    "Rotation",
    "Rounds",
    "Seq",
    "SocketResult",
    "Webhooks",
    "footprint",
    "percentile",
    "profile_hot_path",
    "profile_webhooks",
    "rotation",
    "socket_client",
    "warm_up",
    "webhooks",
]

# After an unpaced flood to a stopped client, time for the server to push what the kernel
# buffers take before the client is resumed.
_SETTLE = 0.5
_RECOVERY_GAP = 0.75
RECOVERY_TIMEOUT = 15.0
_LATENCY_RATE = 500.0
# The latency rows are the steady stream's: each starts once every client has had this long
# at rest after the drains, the same for all. Without it the daemon's call store writes the
# last drain's 10,000 events' batch (due within its 1 s interval, ~50-100 ms of work on
# its thread) inside the stream, and that one batch was the daemon's slowest 1 %:
# `python -m bench.hotwait --pause 0` 3.5 x the bare loop's p99, `--pause 1` 0.94 x. The end
# to end rows (bench.endtoend, bench.ha) rest as long: after a drain an instance still
# writes its outbox's marks and its call map's batch, and a cluster's store takes them.
QUIET_BEFORE_LATENCY = 1.5
_ROTATION_RATE = 200.0
_FLOOD_CHUNK = 50_000


@dataclass(frozen=True, slots=True)
class Mode:
    """How big a run is."""

    name: str
    drain_events: int
    drain_runs: int
    warmup: int
    latency_seconds: float
    recovery_trials: int
    peer_recovery_trials: int
    rotation_seconds: float
    rotation_ttl: float
    webhook_count: int
    webhook_runs: int
    backlog: int
    outage_seconds: float
    footprint_events: int
    idle_seconds: float
    profile_seconds: float
    peers: bool


@dataclass
class SocketResult:
    """Throughput, latency and recovery of one client."""

    client: Client
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    lost: int = 0
    latency_ms: list[float] = field(default_factory=list)
    latency_lost: int = 0
    recovery: list[float] = field(default_factory=list)
    recovery_failures: int = 0
    error: str | None = None

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class Seq:
    """Event numbers, unique over the whole run."""

    def __init__(self) -> None:
        self._next = 0

    def take(self, count: int) -> int:
        start, self._next = self._next, self._next + count
        return start


_SEQ = Seq()


def warm_up(server: BenchServer, driver: Driver, count: int) -> None:
    """Stream ``count`` events to a fresh client and let it come to rest after them."""
    driver.expect(count)
    server.stream(count, _SEQ.take(count))
    driver.wait(timeout=30)
    quiet(driver.pid)


def _drain(server: BenchServer, driver: Driver, count: int) -> tuple[float, int, float | None]:
    """One drain run: stop the client, queue ``count`` events, resume it, time the backlog.

    The drain's CPU counts until the client is at rest again (see :func:`bench.procs.quiet`):
    what a drain leaves to do after its last event is its own cost, not the next drain's.
    Callers start it from a client at rest (:func:`warm_up`).

    Returns:
        (events/s from SIGCONT to the last event, events missing, client CPU µs per event,
        the work left after the last event included).

    Raises:
        RuntimeError: twice the client heard the whole backlog before it was resumed.
    """
    for _ in range(2):
        driver.expect(count)
        driver.pause()
        try:
            server.stream(count, _SEQ.take(count))
            time.sleep(_SETTLE)
            resumed = time.time()
        finally:
            driver.resume()
        answer = driver.wait(timeout=30 + count / 1000)
        records = answer["records"]
        if not records:
            return 0.0, count, None
        last = max(received for _, _, received in records)
        after = quiet(driver.pid)
        if last > resumed:
            cpu = (answer["cpu"] + after) * 1e6 / count if answer["cpu"] is not None else None
            return len(records) / (last - resumed), count - len(records), cpu
        # Once in a full run (6da4b92's, bench/README.md) the bare loop's first drain ended 0.38 s
        # before its resume, a rate of -52,736/s that went into the median: a stop that did
        # not hold is not a drain, so it is run again.
        print(f"[bench] {driver.name}: the backlog came before the resume; again", file=sys.stderr)
    raise RuntimeError(f"{driver.name} heard each backlog before it was resumed")


def _latency(server: BenchServer, driver: Driver, seconds: float) -> tuple[list[float], int]:
    """Stream at 500 events/s after a rest; return the latencies in ms (handler start -
    server ts)."""
    time.sleep(QUIET_BEFORE_LATENCY)
    count = int(_LATENCY_RATE * seconds)
    driver.expect(count)
    server.stream(count, _SEQ.take(count), rate=_LATENCY_RATE)
    records = driver.wait(timeout=10)["records"]
    return [(received - ts) * 1000 for _, ts, received in records], count - len(records)


@dataclass
class Rounds:
    """What the interleaved A/Bs (``bench.hotpath``, and through it ``python -m bench``'s #14
    rows) gather of one client: each drain's rate and CPU µs per event, each round's latency
    p99 (ms)."""

    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)

    def run(self, server: BenchServer, driver: Driver, events: int, seconds: float) -> None:
        """One round of a fresh driver: a warm-up of 1,000, 2 drains of ``events``,
        ``seconds`` at 500/s."""
        warm_up(server, driver, 1000)
        for _ in range(2):
            rate, _, cpu = _drain(server, driver, events)
            self.rates.append(rate)
            if cpu is not None:
                self.cpu_us.append(cpu)
        latencies, _ = _latency(server, driver, seconds)
        if latencies:
            self.p99.append(percentile(latencies, 99))


def socket_client(
    client: Client, python: Path, server: BenchServer, mode: Mode, logs: Path
) -> SocketResult:
    """Throughput (drain), latency at 500/s and recovery from ``drop_all`` of one client."""
    result = SocketResult(client)
    driver = Driver(
        client.label, python, client.script, server, logs / f"{client.key}.log", client.options
    )
    try:
        warm_up(server, driver, mode.warmup)
        for _ in range(mode.drain_runs):
            rate, lost, cpu = _drain(server, driver, mode.drain_events)
            result.rates.append(rate)
            result.lost += lost
            if cpu is not None:
                result.cpu_us.append(cpu)
        result.latency_ms, result.latency_lost = _latency(server, driver, mode.latency_seconds)
        trials = mode.peer_recovery_trials if client.is_peer else mode.recovery_trials
        for _ in range(trials if client is not BARE else 0):
            time.sleep(_RECOVERY_GAP)
            answer = server.call("/drop", {"timeout": RECOVERY_TIMEOUT}, RECOVERY_TIMEOUT + 10)
            if not answer["rejoined"]:
                result.recovery_failures += 1
                break
            result.recovery.append(answer["seconds"])
    except (RuntimeError, TimeoutError) as exc:
        result.error = str(exc).splitlines()[0]
    finally:
        driver.quit()
    return result


@dataclass
class Rotation:
    """A stream across short-lived tokens, with a server that closes expired sockets."""

    client: Client
    sent: int = 0
    received: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    rotations: int | None = None
    reconnects: int | None = None
    mints: int = 0
    refused_upgrades: int = 0
    error: str | None = None


def rotation(client: Client, python: Path, mode: Mode, logs: Path) -> Rotation:
    """Stream 200 events/s for ``rotation_seconds`` while tokens expire every few seconds."""
    result = Rotation(client)
    server = BenchServer(logs / f"server-rotation-{client.key}.log")
    server.call(
        "/configure",
        {"token_ttl": mode.rotation_ttl, "behaviour": {"expiry_action": "close_socket"}},
    )
    driver: Driver | None = None
    try:
        driver = Driver(
            client.label,
            python,
            client.script,
            server,
            logs / f"{client.key}-rotation.log",
            client.options,
        )
        count = int(_ROTATION_RATE * mode.rotation_seconds)
        driver.expect(count)
        server.stream(count, 0, rate=_ROTATION_RATE)
        seqs = [seq for seq, _, _ in driver.wait(timeout=3)["records"]]
        stats = driver.stats()
        server_stats = server.call("/stats")
        unique = set(seqs) & set(range(count))
        result.sent = count
        result.received = len(seqs)
        result.lost = count - len(unique)
        result.duplicates = len(seqs) - len(set(seqs))
        result.out_of_order = sum(1 for a, b in itertools.pairwise(seqs) if b < a)
        result.rotations = stats.get("rotations")
        result.reconnects = stats.get("reconnects")
        result.mints = server_stats["mints"]
        result.refused_upgrades = server_stats["upgrades_refused"]
    except (RuntimeError, TimeoutError) as exc:
        result.error = str(exc).splitlines()[0]
    finally:
        if driver is not None:
            driver.quit()
        server.close()
    return result


@dataclass
class Footprint:
    """Memory and idle CPU of one client process."""

    client: Client
    idle_rss: float = 0.0
    trace: list[float] = field(default_factory=list)  # RSS after each chunk of the flood
    after_rss: float = 0.0
    events: int = 0
    idle_cpu: float = 0.0
    idle_seconds: float = 0.0

    @property
    def second_half_growth(self) -> float:
        """RSS growth over the second half of the flood: what a leak would show."""
        return self.after_rss - self.trace[(len(self.trace) - 1) // 2]


def footprint(
    server: BenchServer, mode: Mode, logs: Path, ours: tuple[Client, ...] = (DAEMON,)
) -> list[Footprint]:
    """Idle RSS after join, idle CPU, then RSS after a flood (the limit and ours, together)."""
    clients = (BARE, *ours)
    drivers = [
        Driver(
            c.label,
            Path(sys.executable),
            c.script,
            server,
            logs / f"{c.key}-footprint.log",
            c.options,
        )
        for c in clients
    ]
    results = [Footprint(c) for c in clients]
    try:
        time.sleep(min(2.0, mode.idle_seconds))
        began = time.monotonic()
        cpu = [cpu_seconds(d.pid) for d in drivers]
        for result, driver in zip(results, drivers, strict=True):
            result.idle_rss = rss_mib(driver.pid)
        time.sleep(mode.idle_seconds)
        elapsed = time.monotonic() - began
        for result, driver, before in zip(results, drivers, cpu, strict=True):
            result.idle_seconds = elapsed
            result.idle_cpu = (cpu_seconds(driver.pid) - before) / elapsed
        sent = 0
        # At least ten chunks, so that the second half of the trace is past any plateau.
        size = max(1, min(_FLOOD_CHUNK, mode.footprint_events // 10))
        while sent < mode.footprint_events:
            chunk = min(size, mode.footprint_events - sent)
            for driver in drivers:
                driver.expect(chunk, keep=False)
            server.stream(chunk, _SEQ.take(chunk))
            for result, driver in zip(results, drivers, strict=True):
                result.events += driver.wait(timeout=60 + chunk / 2000, records=False)["count"]
                result.trace.append(rss_mib(driver.pid))
            sent += chunk
        time.sleep(min(1.0, mode.idle_seconds))
        for result, driver in zip(results, drivers, strict=True):
            result.after_rss = rss_mib(driver.pid)
    finally:
        for driver in drivers:
            driver.quit()
    return results


def profile_hot_path(server: BenchServer, seconds: float, logs: Path) -> Profile:
    """Sample the daemon with py-spy while the server floods it (live, client-bound)."""
    driver = Driver(
        DAEMON.label,
        Path(sys.executable),
        DAEMON.script,
        server,
        logs / "sippet-profile.log",
        DAEMON.options,
    )
    output = logs / "profile-hot-path.raw"
    try:
        driver.expect(5000, keep=False)
        server.stream(5000, _SEQ.take(5000))
        driver.wait(timeout=30, records=False)
        spy = record(driver.pid, output, seconds)
        end = time.monotonic() + seconds + 0.5
        while time.monotonic() < end:
            driver.expect(20_000, keep=False)
            server.stream(20_000, _SEQ.take(20_000))
            driver.wait(timeout=60, records=False)
        spy.wait(timeout=seconds + 60)
    finally:
        driver.quit()
    return Profile(output)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _receiver(port: int, logs: Path) -> tuple[Child, str]:
    receiver = Child([sys.executable, "-m", "bench.receiver", str(port)], logs / "receiver.log")
    return receiver, str(receiver.read(timeout=20)["url"])


def _sender(mode: str, url: str, count: int, logs: Path) -> Child:
    argv = [sys.executable, "-m", "bench.webhooks", mode, "--url", url, "--count", str(count)]
    return Child(argv, logs / f"webhooks-{mode}.log")


@dataclass
class Webhooks:
    """Deliveries/s of each sender, and the backlog drain."""

    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # medians, and "rates"
    backlog: dict[str, Any] = field(default_factory=dict)


def webhooks(mode: Mode, logs: Path) -> Webhooks:
    """Plain httpx, signed httpx and the outbox against one receiver; then the backlog."""
    result = Webhooks()
    port = _free_port()
    receiver, url = _receiver(port, logs)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "signed": [], "outbox": []}
    try:
        # Interleaved, so that a noisy neighbour spreads over every sender alike.
        for _ in range(mode.webhook_runs):
            for sender_mode, done in runs.items():
                before = cpu_seconds(receiver.pid)
                sender = _sender(sender_mode, url, mode.webhook_count, logs)
                try:
                    run = sender.read(timeout=60 + mode.webhook_count / 50)
                finally:
                    sender.close()
                run["receiver_cpu"] = (cpu_seconds(receiver.pid) - before) / run["seconds"]
                done.append(run)
    finally:
        receiver.close()
    for sender_mode, done in runs.items():
        result.runs[sender_mode] = {
            key: statistics.median(run[key] for run in done)
            for key in ("rate", "cpu", "receiver_cpu")
        }
        result.runs[sender_mode]["rates"] = [run["rate"] for run in done]
    sender = _sender("backlog", url, mode.backlog, logs)
    try:
        result.backlog = sender.read(timeout=120 + mode.backlog / 100)
        time.sleep(mode.outage_seconds)
        receiver, _ = _receiver(port, logs)
        try:
            result.backlog.update(sender.request({"up": True}, timeout=120 + mode.backlog / 100))
        finally:
            receiver.close()
    finally:
        sender.close()
    return result


def profile_webhooks(seconds: float, logs: Path) -> Profile:
    """Sample the outbox sender with py-spy while it delivers to a live receiver."""
    output = logs / "profile-webhooks.raw"
    receiver, url = _receiver(_free_port(), logs)
    try:
        sender = _sender("outbox", url, int(2000 * seconds) + 2000, logs)
        try:
            time.sleep(1.0)
            record(sender.pid, output, seconds).wait(timeout=seconds + 60)
            sender.read(timeout=300)
        finally:
            sender.close()
    finally:
        receiver.close()
    return Profile(output)
