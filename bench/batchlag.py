"""``python -m bench.batchlag``: how late the event loop runs while a call store batch is made.

In one process, as the daemon has it: a :class:`CallTracker` that heard ``--events`` events
of the drain stream (``bench.server.call_event``: three lifecycle events of each new call), a
:class:`CallStore` in a temporary directory and the :class:`Persister` that writes the batch
(``flush``: its loop side on the event loop, ``CallStore.save`` on its worker thread), the
daemon's GC settings and no collection due. A ticker task on the same loop sleeps 1 ms at a
time and notes how late it wakes: an event arriving then waits as long for the loop. Each
pass: 100 ms of ticks with nothing else running (``idle``: the machine's own lateness, the
reference), then one batch; its ticks are split by what ran when they woke, ``thread`` (the
worker thread's ``save``: the loop waits for the GIL) and ``loop`` (the rest of ``flush``,
on the loop itself: the changed calls and ids taken, and the calls let go of afterwards).
``--switch S`` adds passes with ``sys.setswitchinterval(S)`` (5 ms by default), alternated.

Against an older tree, from its root: ``PYTHONPATH=. python NEW/bench/batchlag.py`` (its
``listener`` and ``bench`` are imported).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.callcost import streams
from bench.scenarios import percentile
from listener.calls.persister import Persister
from listener.calls.store import CallStore
from listener.dispatch.dispatcher import Dispatcher

__all__ = ["main"]

_TICK = 0.001
_IDLE = 0.1
# A pass's figures: ms late of each idle tick, of each tick in the thread's save and in the
# loop's part, the batch's wall ms, its CPU µs per event (both threads).
_Pass = tuple[list[float], list[float], list[float], float, float]


class _TimedStore(CallStore):
    """A store that notes when its ``save`` ran (on the worker thread)."""

    saves: list[tuple[float, float]]

    def save(self, now: float, **batch: Any) -> None:
        began = time.perf_counter()
        try:
            super().save(now, **batch)
        finally:
            self.saves.append((began, time.perf_counter()))


async def _pass(events: int) -> _Pass:
    stream = streams(events)[0]
    with tempfile.TemporaryDirectory(prefix="sippet-batchlag-") as folder:
        store = _TimedStore(Path(folder) / "calls.sqlite3")
        store.saves = []
        tracker = stream.tracker()
        persister = Persister(store, tracker, lambda now: now, retain=86400.0)
        for event in stream.stamped():
            if tracker.admit(event):
                tracker.merge(event)
        # The daemon's worker thread is up long before a batch; the tracker's objects
        # collected now, so that no collection lands in the batch.
        await asyncio.to_thread(gc.collect)
        ticks: list[tuple[float, float]] = []
        stop = False

        async def ticker() -> None:
            while not stop:
                began = time.perf_counter()
                await asyncio.sleep(_TICK)
                ended = time.perf_counter()
                ticks.append((ended, (ended - began - _TICK) * 1000))

        task = asyncio.create_task(ticker())
        await asyncio.sleep(_IDLE)
        began, cpu = time.perf_counter(), time.process_time()
        await persister.flush()
        ended, cpu = time.perf_counter(), time.process_time() - cpu
        await asyncio.sleep(2 * _TICK)
        stop = True
        await task
        await persister.close()
    saved_from, saved_to = store.saves[0]
    idle: list[float] = []
    thread: list[float] = []
    loop: list[float] = []
    for at, late in ticks:
        if at < began:
            idle.append(late)
        elif at - late / 1000 - _TICK < ended:
            (thread if saved_from < at < saved_to else loop).append(late)
    return idle, thread, loop, (ended - began) * 1000, cpu * 1e6 / events


def _spread(values: list[float]) -> str:
    values = values or [0.0]
    return f"{percentile(values, 50):.2f} / {percentile(values, 99):.2f} / {max(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batchlag", description=__doc__)
    parser.add_argument(
        "--events", type=int, action="append", help="events per batch (500 and 10,000)"
    )
    parser.add_argument("--passes", type=int, default=5, help="passes per size and setting")
    parser.add_argument("--switch", type=float, action="append", default=[])
    args = parser.parse_args(argv)
    sizes = args.events or [500, 10_000]
    # The daemon's GC settings: a dispatcher's first start in a process settles the heap.
    Dispatcher([]).start()
    default = sys.getswitchinterval()
    settings = [default, *args.switch]
    print(f"{time.strftime('%H:%M:%S')}: {args.passes} passes per row; ms late, p50 / p99 / max")
    print("| events | switch interval | idle | thread (save) | loop (flush) | batch ms |"
          " µs CPU/event |")  # fmt: skip
    print("|---:|---:|---|---|---|---:|---:|")
    for events in sizes:
        results: dict[float, list[_Pass]] = {setting: [] for setting in settings}
        for _ in range(args.passes):
            for setting in settings:
                sys.setswitchinterval(setting)
                results[setting].append(asyncio.run(_pass(events)))
        sys.setswitchinterval(default)
        for setting, passes in results.items():
            idle = [late for one in passes for late in one[0]]
            thread = [late for one in passes for late in one[1]]
            loop = [late for one in passes for late in one[2]]
            wall = statistics.median(one[3] for one in passes)
            cpu = statistics.median(one[4] for one in passes)
            print(f"| {events:,} | {setting * 1000:g} ms | {_spread(idle)} | {_spread(thread)}"
                  f" | {_spread(loop)} | {wall:.1f} | {cpu:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
