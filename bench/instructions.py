"""Instructions per event, socket -> handler: a figure the shared machine's load cannot move.

On two cores shared with other sessions, CPU time per event moves by 2x between runs (cache
and frequency contention). Here each client's driver runs under valgrind's callgrind with
instrumentation off; it is switched on (``callgrind_control -i on``) for one drain of
``--events`` events (streamed while the client reads, all of the process's threads
counted) and the count is dumped a few seconds after the last has reached the handler (so
that the call store's batch of them is in it); the instructions executed (``Ir``) are
divided by the events. Deterministic up to the batching the timing allows (how many frames
each socket read brings), so two runs agree to a few percent where CPU time does not.

With ``--rate R`` the counted events are streamed at ``R`` events/s instead (the latency
row's way, ``bench.scenarios``' 500/s): each arrives alone, so what a lone event costs is
counted, a socket read, a loop turn and a task wake-up each, where a drain shares those over
the events of a read. The table then says what share of the events had reached the handler
before the server sent the next (``alone``): under callgrind a client runs ~50 x slower, so
a rate it cannot follow alone shows there. Each event is recorded (``expect``'s ``keep``,
the same few hundred instructions in every client) for that share, read once the count is
dumped. The per-second work (timers, the call store's batch) is then shared by fewer events:
part of a lone event's cost.

Clients: the bare loop, this tree's daemon, with ``--before TREE`` another checkout's (as
in ``bench.hotpath``; repeatable, each labelled by its directory's name), and with
``--no-calls`` each daemon with call state off, with ``--no-store`` each with call state on and
no call store (``bench/drivers/callstate.py``'s ``persist: false``, as ``tail`` runs): the
store's batch, on the persister's thread, is what tells the two apart.

``python -m bench.instructions [--events N] [--rate R] [--before TREE] [--no-calls]
[--no-store] [--dumps]``; ``--dumps`` keeps each client's dump (``callgrind-TAG.out``, under
``bench/results/instructions/``) for ``callgrind_annotate --inclusive=yes``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.peers import BARE, DAEMON, Client
from bench.procs import ROOT, BenchServer, Driver
from bench.scenarios import _SEQ

__all__ = ["Count", "main", "measure"]

# Seconds the process is left to finish its work after the last event (under callgrind).
_SETTLE = 4.0
_TOTALS = re.compile(r"^summary:\s+(\d+)", re.MULTILINE)


def _wrapper(directory: Path) -> Path:
    """An interpreter that runs Python under callgrind, instrumentation off at start."""
    script = directory / "python-under-callgrind"
    out = directory / "callgrind.out.%p"
    script.write_text(
        "#!/bin/sh\n"
        f"exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file={out}"
        f' -q {sys.executable} "$@"\n'
    )
    script.chmod(0o755)
    return script


def _control(*argv: str) -> None:
    done = subprocess.run(
        ["callgrind_control", *argv], check=True, capture_output=True, text=True, timeout=120
    )
    if "OK" not in done.stdout:
        # callgrind_control exits 0 whatever happened.
        raise RuntimeError(f"callgrind_control {' '.join(argv)}: {done.stdout}{done.stderr}")


def _tool_pid(pid: int) -> str:
    """The callgrind process under the driver's pid (``valgrind`` is a script that starts
    the tool as its child)."""
    children = [
        child
        for path in Path(f"/proc/{pid}/task").glob("*/children")
        for child in path.read_text().split()
    ]
    return children[0] if children else str(pid)


@dataclass(frozen=True, slots=True)
class Count:
    """One client's count: instructions per event, and with a rate the share of its
    events that reached the handler before the server sent the next (None for a drain)."""

    per_event: float
    alone: float | None = None


def _alone(records: list[list[float]], rate: float) -> float:
    """The share of ``records`` (``[seq, ts, received]``) handled within one interval of
    the stream: before the next event was sent, so that nothing queued behind it."""
    gap = 1.0 / rate
    return sum(1 for _, ts, received in records if received - ts < gap) / len(records)


def measure(
    server: BenchServer,
    client: Client,
    root: Path,
    events: int,
    logs: Path,
    tag: str,
    *,
    rate: float = 0.0,
    keep_dump: bool = False,
) -> Count:
    """Instructions per event of ``events`` reaching a fresh driver of ``client``: one
    drain, or streamed at ``rate`` events/s."""
    with tempfile.TemporaryDirectory(prefix="sippet-bench-ir-") as scratch:
        directory = Path(scratch)
        python = _wrapper(directory)
        log = logs / f"instructions-{tag}.log"
        driver = Driver(client.label, python, client.script, server, log, client.options,
                        root=root)  # fmt: skip
        alone = None
        try:
            driver.expect(200)
            server.stream(200, _SEQ.take(200))
            driver.wait(timeout=300, records=False)
            pid = _tool_pid(driver.pid)
            driver.expect(events, keep=bool(rate))
            _control("-i", "on", pid)
            # Paced, this answers once the last event is sent; the settle below covers it.
            server.stream(events, _SEQ.take(events), rate=rate)
            if not rate:
                driver.wait(timeout=600, records=False)
            # What the events cost after the handler too: the call store's batch of them,
            # which waits for a lull (on a drain, after its last event). Without this wait
            # it fell inside the count in some runs and not in others (+22,000 a event).
            time.sleep(_SETTLE)
            _control("--dump", pid)
            _control("-i", "off", pid)
            if rate:
                # Read once counted: the answer's JSON is not the events' cost.
                records = driver.wait(timeout=60)["records"]
                if len(records) != events:
                    raise RuntimeError(f"{tag}: {len(records)} of {events} events handled")
                alone = _alone(records, rate)
            time.sleep(0.5)
        finally:
            driver.quit()
        total = 0
        # The requested dump (``callgrind.out.PID.1``): what ran while instrumented.
        for dump in directory.glob("callgrind.out.*.*"):
            found = _TOTALS.findall(dump.read_text(errors="replace"))
            total += sum(int(value) for value in found)
            if keep_dump:
                shutil.copyfile(dump, logs / f"callgrind-{tag}.out")
        return Count(total / events, alone)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument(
        "--events", type=int, help="events counted (default 5,000; 1,000 with --rate)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="stream the counted events at this many a second, each alone (default: a drain)",
    )
    parser.add_argument(
        "--dumps", action="store_true", help="keep each client's dump for callgrind_annotate"
    )
    parser.add_argument(
        "--before",
        type=Path,
        action="append",
        default=[],
        help="another checkout's tree (repeatable; each is labelled by its directory's name)",
    )
    parser.add_argument("--no-calls", action="store_true", help="also with call state off")
    parser.add_argument("--no-store", action="store_true", help="also without a call store")
    args = parser.parse_args(argv)
    events = args.events or (1000 if args.rate else 5000)
    if shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    logs = ROOT / "bench" / "results" / "instructions"
    logs.mkdir(parents=True, exist_ok=True)
    off = Client(DAEMON.key, DAEMON.label, "callstate.py", options={"call_state": False})
    no_store = Client(DAEMON.key, DAEMON.label, "callstate.py", options={"persist": False})
    clients: list[tuple[str, Client, Path]] = [("bare", BARE, ROOT), ("ours", DAEMON, ROOT)]
    for tree in args.before:
        clients.append((tree.name, DAEMON, tree))
    if args.no_store:
        clients.append(("ours, no store", no_store, ROOT))
        for tree in args.before:
            clients.append((f"{tree.name}, no store", no_store, tree))
    if args.no_calls:
        clients.append(("ours, calls off", off, ROOT))
        for tree in args.before:
            clients.append((f"{tree.name}, calls off", off, tree))
    os.environ.setdefault("PYTHONHASHSEED", "0")
    server = BenchServer(logs / "server.log")
    began = time.strftime("%H:%M:%S")
    try:
        server.call("/configure", {"token_ttl": 3600})
        figures = [
            (label, measure(server, c, root, events, logs, label.replace(" ", "-").replace(",", ""),
                            rate=args.rate, keep_dump=args.dumps))
            for label, c, root in clients
        ]  # fmt: skip
    finally:
        server.close()
    how = f"{events:,} at {args.rate:g}/s" if args.rate else f"one drain of {events:,}"
    print(f"{began}-{time.strftime('%H:%M:%S')}: instructions per event, {how} under"
          " callgrind, every thread")  # fmt: skip
    print("| client | instructions/event | vs bare |" + (" alone |" if args.rate else ""))
    print("|---|---:|---:|" + ("---:|" if args.rate else ""))
    bare = figures[0][1].per_event
    for label, count in figures:
        alone = "" if count.alone is None else f" {count.alone:.1%} |"
        print(f"| {label} | {count.per_event:,.0f} | {count.per_event / bare:.2f} x |{alone}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
