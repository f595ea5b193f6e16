"""``python -m bench.calldrain``: a drain in one process, call state on vs off, with the GC's share.

The daemon's path from a frame's text to the handler, without the socket: the protocol core
decodes each frame (``ChannelProtocol.receive``), the connection's ``Event.create``, the
session's id stamp, ``Dispatcher.submit`` into one runner with the default settings and a
no-op handler, and its workers, until the runner is drained. ``on`` is as shipped (ids, the
real ``CallTracker``); ``off`` gives no ids and uses a tracker that admits everything and
knows no call (as ``bench/drivers/callstate.py``'s ``call_state: false``). The modules the
daemon loads are imported first, so that the heap the cyclic GC walks is the daemon's size.

Per pass: ``--events`` events of the drain stream (``bench.server.call_event``), all queued
before the workers run (as a drain's backlog is); CPU time per event (``process_time``), and
the time spent in collections (``gc.callbacks``) per event with their count. Passes alternate
on and off; the median of ``--passes`` each is printed. ``--gc python`` restores Python's
collector settings after the dispatcher's first start (which freezes the heap and raises the
young threshold, see ``listener.dispatch.dispatcher``), to measure what that bought;
``--observed`` sets the status page's observer deques, as the daemon's status board does.

``--footprint N`` measures memory instead: N events of the drain stream (new calls, three
events each) through the dispatcher with the real tracker, a call store in a temporary
directory and its persister, a batch after each tenth of them (as the persister writes one a
second); the process's RSS before, at half time and at the end, and the calls the map holds
in memory.

Against an older tree, from its root: ``PYTHONPATH=. python NEW/bench/calldrain.py`` (its
``listener`` and ``bench`` are imported; ``--gc python`` needs this tree's dispatcher).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

import listener.service.daemon  # noqa: F401  (the daemon's heap)
from bench.callcost import _NoCalls, _Nothing
from bench.server import call_event
from listener.calls.tracker import CallTracker
from listener.core.events import Event
from listener.core.ids import EventIds
from listener.dispatch.dispatcher import Dispatcher, HandlerRunner, RunnerSettings
from listener.dispatch.handler import Context
from listener.realtime.protocol import ChannelProtocol, Message

__all__ = ["main"]

# Per pass: µs CPU per event, µs in the GC per event, collections.
_Figures = tuple[float, float, int]


def stamp(ids: EventIds, event: Event) -> Event:
    """The session's stamp; a tree from before ``EventIds.stamp`` made every id at once."""
    if hasattr(ids, "stamp"):
        return ids.stamp(event)
    from listener.core.events import stamp_id

    return stamp_id(event, ids.of(event))


class _Collections:
    """Time spent in the cyclic GC, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0
        self._began = 0.0
        gc.callbacks.append(self._note)

    def reset(self) -> None:
        self.seconds, self.count = 0.0, 0

    def _note(self, phase: str, info: dict[str, Any]) -> None:
        del info
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._began
            self.count += 1


async def _pass(
    on: bool, count: int, first: int, gcs: _Collections, observed: bool = False
) -> _Figures:
    handler = _Nothing()
    context = Context(rpc=None, config=None, name=handler.name, state_dir=Path("."))  # type: ignore[arg-type]
    runner = HandlerRunner(handler, RunnerSettings(name=handler.name), context)
    dispatcher = Dispatcher([runner], CallTracker() if on else _NoCalls())
    if observed:
        # As the status page's board does (listener/service/status.py).
        dispatcher.seen = deque(maxlen=200)
        runner.handled = deque(maxlen=200)
    dispatcher.start()
    ids, protocol = EventIds(), ChannelProtocol("events")
    frames = [
        orjson.dumps([None, None, "events", *call_event(seq)]).decode()
        for seq in range(first, first + count)
    ]
    await asyncio.sleep(0)
    gcs.reset()
    began = time.process_time()
    for data in frames:
        for message in protocol.receive(data):
            assert type(message) is Message
            event = Event.create(message.event, message.payload, "events", time.time(), len(data))
            wait = dispatcher.submit(stamp(ids, event) if on else event)
            if wait is not None:
                await wait
    await runner.drain()
    spent = time.process_time() - began
    await runner.stop()
    return spent / count * 1e6, gcs.seconds / count * 1e6, gcs.count


async def _run(
    count: int, passes: int, python_gc: bool, observed: bool
) -> dict[str, list[_Figures]]:
    gcs = _Collections()
    results: dict[str, list[_Figures]] = {"on": [], "off": []}
    if python_gc:
        from listener.dispatch.dispatcher import Dispatcher

        # A dispatcher's first start settles the heap, once per process: undone here, and
        # not done again.
        Dispatcher([]).start()
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
    first = 0
    for round_ in range(passes):
        for on in (True, False) if round_ % 2 == 0 else (False, True):
            figures = await _pass(on, count, first, gcs, observed)
            results["on" if on else "off"].append(figures)
            first += count
    return results


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _footprint(count: int) -> list[float]:
    """RSS (MiB) before, after each tenth of ``count`` events, with the map's size last."""
    from listener.calls.persister import Persister
    from listener.calls.store import CallStore

    handler = _Nothing()
    context = Context(rpc=None, config=None, name=handler.name, state_dir=Path("."))  # type: ignore[arg-type]
    runner = HandlerRunner(handler, RunnerSettings(name=handler.name), context)
    tracker = CallTracker()
    dispatcher = Dispatcher([runner], tracker)
    dispatcher.start()
    ids, protocol = EventIds(), ChannelProtocol("events")
    with tempfile.TemporaryDirectory() as state_dir:
        store = CallStore(Path(state_dir) / "calls.sqlite3")
        persister = Persister(store, tracker, lambda now: now, retain=86400.0)
        gc.collect()
        trace = [_rss_mib()]
        tenth = max(1, count // 10)
        for first in range(0, count, tenth):
            for seq in range(first, min(count, first + tenth)):
                data = orjson.dumps([None, None, "events", *call_event(seq)]).decode()
                for message in protocol.receive(data):
                    assert type(message) is Message
                    event = Event.create(message.event, message.payload, "events", time.time())
                    wait = dispatcher.submit(stamp(ids, event))
                    if wait is not None:
                        await wait
            await runner.drain()
            await persister.flush()
            gc.collect()
            trace.append(_rss_mib())
        await persister.close()
    await runner.stop()
    return [*trace, float(len(tracker.state))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.calldrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=10_000, help="events per pass")
    parser.add_argument("--passes", type=int, default=5, help="passes of each (the median)")
    parser.add_argument("--gc", choices=("shipped", "python"), default="shipped")
    parser.add_argument(
        "--observed", action="store_true", help="with the status page's observer deques set"
    )
    parser.add_argument("--footprint", type=int, metavar="N", help="RSS after N events")
    args = parser.parse_args(argv)
    if args.footprint:
        *trace, held = asyncio.run(_footprint(args.footprint))
        half = trace[len(trace) // 2]
        print(f"| {args.footprint:,} events | RSS before | half time | end | second half |")
        print("|---|---:|---:|---:|---:|")
        print(
            f"| MiB (calls held: {held:,.0f}) | {trace[0]:.1f} | {half:.1f} | {trace[-1]:.1f}"
            f" | {trace[-1] - half:+.1f} |"
        )
        return 0
    results = asyncio.run(_run(args.events, args.passes, args.gc == "python", args.observed))
    print(f"| {args.events:,} events, GC {args.gc} | µs CPU/event | of which GC | collections |")
    print("|---|---:|---:|---:|")
    for label, figures in results.items():
        cpu = statistics.median(figure[0] for figure in figures)
        in_gc = statistics.median(figure[1] for figure in figures)
        count = statistics.median(figure[2] for figure in figures)
        print(f"| call state {label} | {cpu:.2f} | {in_gc:.2f} | {count:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
