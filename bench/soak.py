"""``python -m bench --soak``: a million events through faults, rotations and a receiver outage.

Four processes: the fake Sippet (``bench.server``), the daemon (``bench/drivers/daemon.py``:
the real ``Daemon`` with a handler that counts each ``seq`` and a ``webhook`` handler from a
configuration table, every setting its default), the webhook receiver
(``bench.endtoend_receiver``, lean) and this one, which drives them:

- the server streams ``events`` call events at ``events / duration`` per second (1,000,000 in
  600 s: 1,667/s, about half of what the webhook path drains on this machine, so that the
  backlog of each outage is caught up before the next), tokens live 2 s and expired sockets
  are closed (a rotation about every 1.5 s);
- every ``every`` seconds one fault of :data:`CYCLE`, in turn; the server answers each once
  a socket joined again, with the times on its clock;
- the daemon's RSS is read every second.

Then the stream ends, the receiver is given time to get every handled event, and the figures
come from the records of all three: the seqs broadcast while no socket was joined (nobody
heard them), each seq's count at the handler, the seqs at the receiver, the server's joins
and its intervals with no socket joined.

``--duration S`` scales the run (events = 1,667 x S): ``--soak --duration 60`` is a
development run of about a minute and a half.

``--heap`` (a debugging run, its figures not the soak's: the dumps stop the daemon for a
moment): the daemon writes what its memory is made of (``bench/drivers/heap.py``) ten times
over the stream (``--heap S``: every S s), at its end and at rest, and ``soak-heap.md`` in the
logs compares them; ``--tracemalloc N`` adds the allocations traced with N frames and their
growth from half time to the end, by traceback; ``--trim S`` calls ``malloc_trim(0)`` in the
daemon every S seconds.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.peers import DAEMON
from bench.procs import BenchServer, Child, Driver, cpu_seconds, rss_mib

__all__ = ["CYCLE", "Fault", "Soak", "rows", "run"]

RATE = 1_000_000 / 600
TOKEN_TTL = 2.0
HEARTBEAT = 1.0
WINDOW = 3.0  # refused upgrades, refused mints
RECEIVER_DOWN = 5.0
EVERY = 6.0
# The stream is transcript deltas of this many open calls: the call map stays the same size,
# so that the RSS shows what the daemon keeps per event, not the calls it keeps for
# calls.retain_ended (a day by default; see bench/README.md).
CALLS = 100
# A link counts as healthy after 2 heartbeats answered (the default, 5 s, is most of the gap
# between two faults here).
_SIPPET = {"heartbeat_interval": HEARTBEAT, "stable_after": 2 * HEARTBEAT}
CYCLE = (
    "drop_1006",
    "refuse_upgrades",
    "malformed",
    "drop_1011",
    "silence",
    "receiver_down",
    "refuse_mints",
)
# Seconds not joined that each fault may cost, from the reference point the target names.
_TARGETS: dict[str, tuple[float, str]] = {
    "drop_1006": (1.0, "joined <= 1 s after the drop"),
    "drop_1011": (1.0, "joined <= 1 s after the drop"),
    "refuse_upgrades": (3.0, "joined <= 3 s after the window ends"),
    "refuse_mints": (3.0, "joined <= 3 s after the window ends"),
    "silence": (2 * HEARTBEAT, "joined <= 2 heartbeats after the silence starts"),
}
_LABELS = {
    "drop_1006": "drop, code 1006",
    "drop_1011": "drop, code 1011",
    "refuse_upgrades": f"upgrades refused (403) for {WINDOW:g} s",
    "refuse_mints": f"mints refused (503) for {WINDOW:g} s",
    "silence": "silence (heartbeats unanswered)",
    "malformed": "malformed frames, one of 2 MB",
    "receiver_down": f"webhook receiver down {RECEIVER_DOWN:g} s",
}


@dataclass
class Fault:
    """One fault as the server (or, for the receiver, this process) timed it."""

    kind: str
    began: float
    window_end: float
    joined_at: float | None
    not_joined: float = 0.0  # seconds with no socket joined, from began to the next fault

    # When a socket was joined again: the end of the last interval with none joined that
    # began during this fault (``began`` itself if there was none; None: still none joined).
    back_at: float | None = None

    @property
    def rejoin(self) -> float | None:
        """Seconds from the target's reference point to being joined again (None: never)."""
        if self.back_at is None:
            return None
        reference = self.window_end if self.kind.startswith("refuse") else self.began
        return max(0.0, self.back_at - reference)


@dataclass
class Soak:
    """What a soak measured."""

    events: int
    rate: float
    seconds: float = 0.0
    unheard: int = 0
    handled: int = 0
    handler_lost: int = 0
    lost_seqs: list[int] = field(default_factory=list)  # the first few
    lost_ranges: list[tuple[int, int]] = field(default_factory=list)  # all, [first, last]
    stream_began: float = 0.0
    handler_duplicates: int = 0
    delivered: int = 0
    receiver_lost: int = 0
    receiver_duplicates: int = 0
    rss: list[tuple[float, float]] = field(default_factory=list)  # (time, MiB)
    faults: list[Fault] = field(default_factory=list)
    rss_at_rest: float = 0.0  # once the receiver had everything, 2 s later
    cpu: float = 0.0  # the daemon's CPU time over the stream / its wall time (1.0: one core)
    lag: list[tuple[int, float]] = field(default_factory=list)  # (seq, s behind), 1 in 1000
    catch_up: float = 0.0  # seconds from the stream's end to the receiver's last arrival
    rotations: int = 0
    reconnects: int = 0
    mints: int = 0
    loop: str = ""

    def rss_at(self, moment: float) -> float:
        """Median RSS over the 10 s up to ``moment`` (a queue's bursts come and go)."""
        window = [mib for at, mib in self.rss if moment - 10 <= at <= moment]
        return statistics.median(window or [self.rss[-1][1]])


def _sample_rss(
    pid: int,
    into: list[tuple[float, float]],
    done: threading.Event,
    dump_every: float,
    dumped: list[float],
) -> None:
    """RSS every second; with ``dump_every``, a heap dump (``SIGUSR1``) that often."""
    began = time.time()
    while not done.wait(1.0):
        try:
            into.append((time.time(), rss_mib(pid)))
            if dump_every and time.time() - began >= (len(dumped) + 1) * dump_every:
                dumped.append(time.time())
                os.kill(pid, signal.SIGUSR1)
        except (OSError, RuntimeError):
            return


def _not_joined(gaps: list[list[float | None]], start: float, end: float) -> float:
    total = 0.0
    for gap_start, gap_end in gaps:
        assert gap_start is not None
        stop = end if gap_end is None else gap_end
        total += max(0.0, min(stop, end) - max(gap_start, start))
    return total


def run(
    duration: float,
    logs: Path,
    say: Callable[[str], None],
    loop: str = "asyncio",
    rate: float = RATE,
    heap: int | None = None,
    trim: float = 0.0,
    heap_every: float = 0.0,
) -> Soak:
    """One soak of ``duration`` seconds of stream; ``heap``: heap dumps (every
    ``heap_every`` s, or ten over the stream), with tracemalloc's tracebacks of that many
    frames if not 0 (see the module's docstring)."""
    events = int(rate * duration)
    result = Soak(events, rate)
    server = BenchServer(logs / "soak-server.log")
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    receiver = Child(
        [sys.executable, "-m", "bench.endtoend_receiver", secret], logs / "soak-receiver.log"
    )
    driver: Driver | None = None
    try:
        url = str(receiver.read(timeout=20)["url"])
        server.call(
            "/configure", {"token_ttl": TOKEN_TTL, "behaviour": {"expiry_action": "close_socket"}}
        )
        options = {
            "sippet": _SIPPET,
            "seqs": events,
            "webhook": {"url": url, "secret": secret},
            "loop": loop,
        }
        dumps, dumped = logs / "soak-heap", list[float]()
        if heap is not None:
            dumps.mkdir(exist_ok=True)
            for old in dumps.glob("heap-*"):
                old.unlink()
            options.update(heap=str(dumps), tracemalloc=heap)
        if trim:
            options["trim"] = trim
        driver = Driver(
            DAEMON.label,
            Path(sys.executable),
            DAEMON.script,
            server,
            logs / "soak-daemon.log",
            options,
        )
        driver.expect(0, keep=False)
        streamed: dict[str, Any] = {}

        server.call("/calls/open", {"count": CALLS, "prefix": "bench"})

        def stream() -> None:
            body = {"count": events, "start": 0, "rate": rate, "calls": CALLS}
            streamed.update(server.call("/stream", body, timeout=120 + duration))

        streaming = threading.Thread(target=stream, daemon=True)
        sampled = threading.Event()
        dump_every = (heap_every or duration / 10) if heap is not None else 0.0
        sampler = threading.Thread(
            target=_sample_rss,
            args=(driver.pid, result.rss, sampled, dump_every, dumped),
            daemon=True,
        )
        began = time.time()
        cpu_before = cpu_seconds(driver.pid)
        streaming.start()
        sampler.start()
        index = 0
        while streaming.is_alive():
            next_at = began + (index + 1) * EVERY
            streaming.join(max(0.0, next_at - time.time()))
            if not streaming.is_alive() or time.time() - began > duration - EVERY:
                break
            kind = CYCLE[index % len(CYCLE)]
            index += 1
            if kind == "receiver_down":
                down = time.time()
                receiver.request({"cmd": "down"})
                time.sleep(RECEIVER_DOWN)
                receiver.request({"cmd": "up"})
                result.faults.append(Fault(kind, down, time.time(), None))
            else:
                answer = server.call("/fault", {"kind": kind, "window": WINDOW}, timeout=60)
                result.faults.append(
                    Fault(kind, answer["began"], answer["window_end"], answer["joined_at"])
                )
            if index % len(CYCLE) == 0:
                say(f"soak: {index} faults, {time.time() - began:.0f} s")
        streaming.join(timeout=duration + 120)
        result.seconds = time.time() - began
        result.cpu = (cpu_seconds(driver.pid) - cpu_before) / result.seconds
        sampled.set()
        if heap is not None:
            dumped.append(time.time())
            os.kill(driver.pid, signal.SIGUSR1)
        result.unheard = sum(last - first + 1 for first, last in streamed["unheard"])
        heard = bytearray(b"\x01") * events
        for first, last in streamed["unheard"]:
            heard[first : last + 1] = bytes(last - first + 1)
        stats = driver.stats()
        seen = base64.b64decode(stats["seen"])
        result.handled = sum(1 for count in seen if count)
        # The receiver gets what the handler handled (and the ringing and answering of the
        # CALLS calls, which carry no seq), once the outbox caught up: wait while it moves.
        ended = time.time()
        everything, delivered, last_count = result.handled + 2 * CALLS, {}, -1
        while True:
            delivered = receiver.request(
                {"cmd": "wait", "count": everything, "timeout": 30}, timeout=120
            )
            if delivered["count"] >= everything or delivered["count"] == last_count:
                break
            last_count = delivered["count"]
        arrivals = [arrived for seq, _, arrived in delivered["records"] if seq is not None]
        result.catch_up = max(arrivals, default=ended) - ended
        seen = base64.b64decode(driver.stats()["seen"])
        result.handled = sum(1 for count in seen if count)
        lost = [seq for seq, (h, s) in enumerate(zip(heard, seen, strict=True)) if h and not s]
        result.handler_lost, result.lost_seqs = len(lost), lost[:20]
        for seq in lost:
            if result.lost_ranges and result.lost_ranges[-1][1] == seq - 1:
                result.lost_ranges[-1] = (result.lost_ranges[-1][0], seq)
            else:
                result.lost_ranges.append((seq, seq))
        result.stream_began = began
        result.handler_duplicates = sum(count - 1 for count in seen if count > 1)
        arrived = [int(seq) for seq, _, _ in delivered["records"] if seq is not None]
        unique = set(arrived)
        result.delivered = len(unique)
        result.receiver_duplicates = len(arrived) - len(unique)
        result.receiver_lost = sum(
            1 for seq, count in enumerate(seen) if count and seq not in unique
        )
        result.rotations, result.reconnects = stats["rotations"], stats["reconnects"]
        result.loop = stats["loop"]
        result.lag = [(int(seq), float(lag)) for seq, lag in stats["lag"]]
        result.mints = int(server.call("/stats")["mints"])
        gaps = server.call("/gaps")
        ends = [f.began for f in result.faults[1:]] + [began + result.seconds]
        for fault, end in zip(result.faults, ends, strict=True):
            fault.not_joined = _not_joined(gaps, fault.began, end)
            during = [gap for gap in gaps if fault.began <= (gap[0] or 0.0) < end]
            fault.back_at = during[-1][1] if during else fault.began
        time.sleep(2.0)
        result.rss_at_rest = rss_mib(driver.pid)
        if heap is not None:
            dumped.append(time.time())
            os.kill(driver.pid, signal.SIGUSR1)
            report = heap_report(dumps, len(dumped), began + duration / 2)
            (logs / "soak-heap.md").write_text(report)
            say(f"soak: heap dumps compared in {logs / 'soak-heap.md'}")
    finally:
        if driver is not None:
            driver.quit()
        receiver.close()
        server.close()
    return result


def _lag(soak: Soak) -> str:
    """How far behind the stream the handler ran, in each half (1 seq in 1000)."""
    if not soak.lag:
        return "no lag samples"
    half = soak.events // 2
    halves = [
        [lag for seq, lag in soak.lag if seq < half],
        [lag for seq, lag in soak.lag if seq >= half],
    ]
    parts = [
        f"median {statistics.median(lags):.2f} s, max {max(lags):.2f} s" for lags in halves if lags
    ]
    return "handler behind the server by " + " / ".join(parts) + " (first / second half)"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def rows(soak: Soak) -> list[tuple[str, str, str, str, str]]:
    """(measure, client, result, reference, target) rows: one per phase of the cycle, then the
    stream, the handler, the receiver and the memory."""
    client = f"sippet-listener (Daemon, {soak.loop} loop)"
    out = []
    for kind in CYCLE:
        faults = [f for f in soak.faults if f.kind == kind]
        if not faults:
            continue
        not_joined = [f.not_joined for f in faults]
        result = (
            f"{len(faults)} faults; not joined median {statistics.median(not_joined):.2f} s,"
            f" max {max(not_joined):.2f} s"
        )
        target = ""
        if kind in _TARGETS:
            limit, text = _TARGETS[kind]
            rejoins = [f.rejoin for f in faults]
            missing = sum(1 for r in rejoins if r is None)
            timed = [r for r in rejoins if r is not None]
            result += f"; joined again after median {statistics.median(timed or [0]):.2f} s,"
            result += f" max {max(timed or [0]):.2f} s"
            if missing:
                result += f"; {missing} never re-joined within 30 s"
            target = f"{_verdict(not missing and max(timed) <= limit)} ({text})"
        out.append((f"soak phase: {_LABELS[kind]}", client, result, "", target))
    heard = soak.events - soak.unheard
    rate = soak.events / soak.seconds if soak.seconds else 0.0
    out.append(
        (
            f"soak: {soak.events:,} events at {soak.rate:,.0f}/s, tokens of {TOKEN_TTL:g} s,"
            f" a fault every {EVERY:g} s",
            client,
            f"{soak.seconds:.0f} s ({rate:,.0f}/s); daemon CPU {soak.cpu:.0%} of a core;"
            f" {_lag(soak)}; {heard:,} heard by a joined socket,"
            f" {soak.unheard:,} broadcast while none was ({soak.unheard / soak.events:.1%});"
            f" {soak.rotations} rotations, {soak.reconnects} reconnects, {soak.mints} mints",
            "",
            "",
        )
    )
    out.append(
        (
            "soak: at the handler (by seq)",
            client,
            f"{soak.handled:,} handled; lost {soak.handler_lost} of those heard;"
            f" duplicates {soak.handler_duplicates}",
            "",
            f"{_verdict(soak.handler_lost == 0 and soak.handler_duplicates == 0)}"
            " (0 lost, 0 duplicates)",
        )
    )
    if soak.lost_seqs:
        # Where they were lost: the seq's moment in the paced stream, and the fault before it.
        where = []
        for seq in [first for first, _ in soak.lost_ranges[:5]]:
            at = soak.stream_began + seq / soak.rate
            before = [f for f in soak.faults if f.began <= at]
            after = f"{at - before[-1].began:.2f} s after {before[-1].kind}" if before else "start"
            where.append(f"{seq} ({after})")
        ranges = len(soak.lost_ranges)
        detail = f"{ranges} runs of lost seqs, the first at: {', '.join(where)}"
        out[-1] = (*out[-1][:2], f"{out[-1][2]}; {detail}", *out[-1][3:])
    out.append(
        (
            "soak: at the webhook receiver (by seq)",
            client,
            f"{soak.delivered:,} delivered, the last {soak.catch_up:.0f} s after the stream"
            f" ended; not delivered {soak.receiver_lost} of those handled (waited while"
            f" deliveries came); duplicates {soak.receiver_duplicates}",
            "",
            f"{_verdict(soak.receiver_lost == 0 and soak.receiver_duplicates == 0)}"
            " (0 lost, 0 duplicates)",
        )
    )
    start = soak.rss[0][0]
    end = soak.rss[-1][0]
    middle = soak.rss_at(start + (end - start) / 2)
    last = soak.rss_at(end)
    growth = last - middle
    out.append(
        (
            "soak: daemon RSS",
            client,
            f"{soak.rss[0][1]:.1f} MiB at start, {middle:.1f} at half time, {last:.1f} at the"
            f" end ({growth:+.1f} over the second half), peak {max(m for _, m in soak.rss):.1f};"
            f" {soak.rss_at_rest:.1f} at rest after the stream",
            "",
            f"{_verdict(growth <= 1.0)} (<= 1 MiB over the second half)",
        )
    )
    return out


def _mib(size: float) -> str:
    return f"{size / 2**20:.2f}"


def heap_report(directory: Path, count: int, half_time: float, timeout: float = 120.0) -> str:
    """Compare the daemon's heap dumps (``heap-1.json`` ... ``heap-<count>.json``; the last
    two at the stream's end and at rest): the layers at each, and the live objects by type
    and, if traced, the allocations by traceback, from the dump nearest ``half_time`` to the
    end of the stream and to rest."""
    deadline = time.time() + timeout
    while len(list(directory.glob("heap-*.json"))) < count and time.time() < deadline:
        time.sleep(0.5)
    records = [
        json.loads(path.read_text())
        for path in sorted(directory.glob("heap-*.json"), key=lambda p: int(p.stem[5:]))
    ]
    if not records:
        return "no heap dumps\n"
    lines = [
        "| dump | s | RSS | glibc brk heap | glibc mmap | glibc in use | glibc free held"
        " | pymalloc arenas | pymalloc in use | traced | rotations |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = records[0]["at"]
    for index, record in enumerate(records, 1):
        info, pymalloc = record["mallinfo2"], record["pymalloc"]
        lines.append(
            f"| {index} | {record['at'] - first:.0f} | {record['rss_kib'] / 1024:.1f}"
            f" | {_mib(info.get('arena', 0))} | {_mib(info.get('hblkhd', 0))}"
            f" | {_mib(info.get('uordblks', 0))} | {_mib(info.get('fordblks', 0))}"
            f" | {_mib(pymalloc.get('total', 0))} ({pymalloc.get('arenas', 0)})"
            f" | {_mib(pymalloc.get('allocated_blocks', 0))}"
            f" | {_mib(record.get('traced', 0))} | {record['rotations']} |"
        )
    half = min(range(len(records)), key=lambda i: abs(records[i]["at"] - half_time))
    for label, later in (("end of the stream", len(records) - 2), ("rest", len(records) - 1)):
        if later <= half:
            continue
        lines += ["", f"## From half time (dump {half + 1}) to the {label} (dump {later + 1})", ""]
        before, after = records[half]["types"], records[later]["types"]
        grown = sorted(
            ((after.get(name, 0) - before.get(name, 0), name) for name in {*before, *after}),
            reverse=True,
        )
        lines.append(
            "live objects by type, most grown: "
            + ", ".join(f"{name} {diff:+d}" for diff, name in grown[:12])
        )
        pickles = [directory / f"heap-{i + 1}.pickle" for i in (half, later)]
        if all(path.exists() for path in pickles):
            old, new = (tracemalloc.Snapshot.load(str(path)) for path in pickles)
            ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
            stats = new.filter_traces(ignore).compare_to(old.filter_traces(ignore), "traceback")
            total = sum(stat.size_diff for stat in stats)
            lines += ["", f"traced: {total / 2**20:+.2f} MiB in all; the 15 most grown:", ""]
            for stat in stats[:15]:
                lines.append(f"- {stat.size_diff / 1024:+.1f} KiB, {stat.count_diff:+d} blocks:")
                lines += [f"    {line}" for line in stat.traceback.format()[-12:]]
    return "\n".join(lines) + "\n"
