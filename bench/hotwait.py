"""Where the slowest 1 % of events wait, at 500/s: the latency row's p99, taken apart.

The latency row's method (``bench.scenarios``: the server streams at 500/s, each event's
latency is the handler's wall clock minus the server's send time) on the bare loop and on
the daemon with ``trace`` on (``bench/drivers/daemon.py``: the cyclic GC's collections, the
asyncio loop's turns longer than 0.2 ms, the call store's batches and their SQLite writes on
the persister's thread, each a ``[start, end]`` pair). Each of the slowest 1 % of the
daemon's events is charged to the first of those that overlaps its time in flight (send ->
handler start), in that order, else to ``nothing traced`` (the server, the kernel, the
machine's other processes). Variants (``--variant 'LABEL={options}'``: ``switch_interval``,
``gc`` thresholds, ``loop``) run beside the daemon as shipped, rounds alternating, a fresh
driver each, after a warm-up and a drain of ``--drain`` events (as the latency row follows
the drains). ``--before TREE`` adds another checkout's daemon (as in ``bench.hotpath``; its
driver may not trace, and is then only timed).

``python -m bench.hotwait [--seconds S] [--rounds N] [--drain N] [--pause S]
[--before TREE] [--variant L=JSON ...]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.peers import BARE, DAEMON, Client
from bench.procs import ROOT, BenchServer, Driver
from bench.scenarios import _LATENCY_RATE, _SEQ, percentile

__all__ = ["CAUSES", "main", "slowest"]

#: The spans a slow event is charged to, the first overlapping one wins.
CAUSES = ("gc", "batch: SQLite (thread)", "batch", "turn")
_NOTHING = "nothing traced"

# (seq, server send time, handler start): the drivers' records.
_Record = tuple[Any, float, float]


@dataclass
class _Variant:
    label: str
    client: Client
    root: Path = ROOT
    p99: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    causes: Counter[str] = field(default_factory=Counter)
    waits: dict[str, list[float]] = field(default_factory=dict)
    spans: dict[str, list[float]] = field(default_factory=dict)
    # Latencies (ms) of the events in flight during a call store batch.
    in_batch: list[float] = field(default_factory=list)


def slowest(
    records: list[_Record], spans: dict[str, list[list[float]]], share: float = 0.01
) -> list[tuple[str, float]]:
    """(cause, latency in ms) of the slowest ``share`` of ``records``."""
    ordered = sorted(records, key=lambda record: record[2] - record[1], reverse=True)
    out = []
    for _, sent, started in ordered[: max(1, int(len(ordered) * share))]:
        cause = next(
            (
                name
                for name in CAUSES
                if any(begin < started and end > sent for begin, end in spans.get(name, ()))
            ),
            _NOTHING,
        )
        out.append((cause, (started - sent) * 1000))
    return out


def _round(
    variant: _Variant, server: BenchServer, seconds: float, drain: int, pause: float, logs: Path
) -> None:
    client = variant.client
    traced = client is not BARE
    options = {**client.options, **({"trace": True} if traced else {})}
    log = logs / f"hotwait-{variant.label.replace(' ', '-')}.log"
    driver = Driver(variant.label, Path(sys.executable), client.script, server, log, options,
                    root=variant.root)  # fmt: skip
    try:
        for count in (1000, drain):
            driver.expect(count, keep=False)
            server.stream(count, _SEQ.take(count))
            driver.wait(timeout=120, records=False)
        time.sleep(pause)
        began = time.time()
        count = int(_LATENCY_RATE * seconds)
        driver.expect(count)
        server.stream(count, _SEQ.take(count), rate=_LATENCY_RATE)
        records = driver.wait(timeout=seconds + 30)["records"]
        spans = driver.stats().get("spans", {}) if traced else {}
    finally:
        driver.quit()
    latencies = [(started - sent) * 1000 for _, sent, started in records]
    variant.p99.append(percentile(latencies, 99))
    variant.p50.append(percentile(latencies, 50))
    if not spans:
        return
    spans = {name: [span for span in kept if span[1] > began] for name, kept in spans.items()}
    for name, kept in spans.items():
        variant.spans.setdefault(name, []).extend((end - start) * 1000 for start, end in kept)
    batches = spans.get("batch", [])
    variant.in_batch.extend(
        (started - sent) * 1000
        for _, sent, started in records
        if any(begin < started and end > sent for begin, end in batches)
    )
    for cause, ms in slowest(records, spans):
        variant.causes[cause] += 1
        variant.waits.setdefault(cause, []).append(ms)


def _variant(text: str) -> _Variant:
    label, _, options = text.partition("=")
    merged = {**DAEMON.options, **json.loads(options)}
    return _Variant(label, Client(DAEMON.key, label, DAEMON.script, options=merged))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotwait", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="at 500/s, per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--drain", type=int, default=10_000, help="events drained first")
    parser.add_argument(
        "--pause",
        type=float,
        default=1.0,
        help="seconds between the drain and the stream (0: as the latency row, which follows"
        " the drains at once, so the drain's call store batch lands in the stream)",
    )
    parser.add_argument("--variant", action="append", default=[], type=_variant)
    parser.add_argument("--before", type=Path, help="another checkout's tree")
    args = parser.parse_args(argv)
    logs = ROOT / "bench" / "results" / "hotwait"
    logs.mkdir(parents=True, exist_ok=True)
    variants = [_Variant("bare loop", BARE), _Variant("daemon", DAEMON), *args.variant]
    if args.before:
        variants.append(_Variant(f"daemon, {args.before.name}", DAEMON, args.before))
    server = BenchServer(logs / "server.log")
    began = time.strftime("%H:%M:%S")
    try:
        server.call("/configure", {"token_ttl": 3600})
        for index in range(args.rounds):
            order = variants[index % len(variants) :] + variants[: index % len(variants)]
            for variant in order:
                _round(variant, server, args.seconds, args.drain, args.pause, logs)
    finally:
        server.close()
    print(f"{began}-{time.strftime('%H:%M:%S')}: {args.rounds} rounds of {args.seconds:g} s at"
          f" 500/s, each {args.pause:g} s after a drain of {args.drain:,}; medians")  # fmt: skip
    print("| client | p50 ms | p99 ms (rounds) | slowest 1 %: charged to (count, median ms) |")
    print("|---|---:|---:|---|")
    bare = statistics.median(variants[0].p99)
    for variant in variants:
        p99 = statistics.median(variant.p99)
        ratio = "" if variant is variants[0] else f"; {p99 / bare:.2f} x"
        causes = "; ".join(
            f"{cause} {count} ({statistics.median(variant.waits[cause]):.2f})"
            for cause, count in variant.causes.most_common()
        )
        rounds = ", ".join(f"{value:.2f}" for value in variant.p99)
        print(f"| {variant.label} | {statistics.median(variant.p50):.2f} | {p99:.2f} ({rounds})"
              f"{ratio} | {causes} |")  # fmt: skip
    print()
    print("| client | events in flight during a call store batch | their p50 / p99 / max ms |")
    print("|---|---:|---|")
    for variant in variants[1:]:
        if variant.in_batch:
            waits = variant.in_batch
            print(f"| {variant.label} | {len(waits)} | {percentile(waits, 50):.2f} /"
                  f" {percentile(waits, 99):.2f} / {max(waits):.2f} |")  # fmt: skip
    print()
    print("| client | span | count | median ms | max ms | total ms |")
    print("|---|---|---:|---:|---:|---:|")
    for variant in variants[1:]:
        for name, spans in variant.spans.items():
            if spans:
                print(f"| {variant.label} | {name} | {len(spans)} | {statistics.median(spans):.2f}"
                      f" | {max(spans):.2f} | {sum(spans):.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
