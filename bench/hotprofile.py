"""Where each microsecond of the daemon's per-event CPU goes, socket -> handler start.

py-spy samples the daemon's loop thread (``bench/drivers/daemon.py``, the drain row's
client) while the server floods it, as ``python -m bench``'s hot-path profile does; each
busy sample is charged to a component by its innermost frame of ours (time in a library
goes to the line of ours that called it), and the samples become microseconds per event:
``samples / rate / events handled while sampling``. With ``--before TREE`` (another
checkout, as in ``bench.hotpath``) the two trees are profiled alternately, ``--rounds``
each, and the table has a column per tree (the median of its rounds).

``python -m bench.hotprofile [--seconds S] [--rounds N] [--before TREE]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from bench.peers import DAEMON
from bench.procs import ROOT, BenchServer, Driver
from bench.profile import RATE, Profile, record
from bench.scenarios import _SEQ

__all__ = ["COMPONENTS", "components", "main"]

# (component, what a frame's location or function must contain), the first match wins; a
# sample is matched on its innermost frame of ours.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("websockets: socket read, frame parse, inflate", ("data_received", "realtime/frames.py")),
    ("websockets: recv, the read loop", ("Connection._read", "_Received.")),
    ("frame decode: orjson, protocol core", ("realtime/protocol.py",)),
    ("ids: stamp, lifecycle ids", ("core/ids.py", "stamp_id", "_read_id", "_stamped")),
    ("event: Event.create, call key", ("core/events.py",)),
    ("call state: admit, merge, store batch", ("listener/calls/",)),
    ("dispatcher: submit, queue", ("Dispatcher.", "HandlerRunner.offer", "_Queue.put")),
    ("metrics", ("core/metrics.py",)),
    ("worker: take, lanes, invoke, context, deadline", ("dispatch/",)),
    ("handler (the bench's record)", ("drivers/",)),
)
_OURS = ("listener/", "drivers/")


def components(profile: Profile) -> Counter[str]:
    """Busy samples of the loop thread per component (``event loop, other`` for the rest)."""
    counts: Counter[str] = Counter()
    for frames, count in profile.only("MainThread").stacks:
        ours = [frame for frame in frames[1:] if any(part in frame for part in _OURS)]
        name = "event loop, other"
        if ours:
            inner = ours[-1]
            name = next((c for c, marks in COMPONENTS if any(m in inner for m in marks)), name)
        counts[name] += count
    return counts


def _profile(
    server: BenchServer, seconds: float, logs: Path, root: Path, tag: str
) -> dict[str, float]:
    """One fresh daemon from ``root``, sampled under a flood: µs per event per component."""
    log = logs / f"hotprofile-{tag}.log"
    driver = Driver(DAEMON.label, Path(sys.executable), DAEMON.script, server, log,
                    DAEMON.options, root=root)  # fmt: skip
    output = logs / f"hotprofile-{tag}.raw"
    try:
        driver.expect(5000, keep=False)
        server.stream(5000, _SEQ.take(5000))
        driver.wait(timeout=30, records=False)
        first = int(driver.stats()["received"])
        spy = record(driver.pid, output, seconds)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            driver.expect(20_000, keep=False)
            server.stream(20_000, _SEQ.take(20_000))
            driver.wait(timeout=60, records=False)
        spy.wait(timeout=seconds + 60)
        events = int(driver.stats()["received"]) - first
    finally:
        driver.quit()
    # The flood runs past the sampling window by at most one chunk: a slight undercount.
    per_event = 1e6 / RATE / max(events, 1)
    return {name: count * per_event for name, count in components(Profile(output)).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotprofile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", type=Path, help="another checkout's tree")
    args = parser.parse_args(argv)
    logs = ROOT / "bench" / "results" / "hotprofile"
    logs.mkdir(parents=True, exist_ok=True)
    trees = [("this tree", ROOT)] + ([("before", args.before)] if args.before else [])
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
    server = BenchServer(logs / "server.log")
    began = time.strftime("%H:%M:%S")
    try:
        server.call("/configure", {"token_ttl": 3600})
        for index in range(args.rounds):
            for label, root in trees if index % 2 == 0 else trees[::-1]:
                tag = f"{label.replace(' ', '-')}-{index}"
                results[label].append(_profile(server, args.seconds, logs, root, tag))
    finally:
        server.close()
    names = [name for name, _ in COMPONENTS] + ["event loop, other"]
    labels = [label for label, _ in trees]
    print(f"{began}-{time.strftime('%H:%M:%S')}: µs of the loop thread per event under py-spy,"
          f" median of {args.rounds} rounds (each round's figures in brackets)")  # fmt: skip
    print("| component | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for name in [*names, "all"]:
        cells = []
        for label in labels:
            runs = [sum(r.values()) if name == "all" else r.get(name, 0.0) for r in results[label]]
            cells.append(f"{statistics.median(runs):.2f} ({', '.join(f'{v:.2f}' for v in runs)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
