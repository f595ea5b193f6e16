"""Instructions per event of each stage of the daemon's path, in one process, under callgrind.

The loop of ``bench.calldrain`` (frame text -> protocol core -> ``Event.create`` -> the
session's id stamp -> the tracker's admit and merge -> the runner's queue -> its workers and a
no-op handler), without the socket, each stage over all ``--events`` events of the drain
stream before the next (as a drain's backlog is), with call state on and no call store.
Python runs under valgrind's callgrind with instrumentation off; each stage switches it on,
then dumps its count (``callgrind_control``), so a stage's figure is its own instructions
over the events (a few hundred an event of it are the control calls themselves, the same
in every tree). A warm-up pass of the same size runs first. The figure the shared machine's
load cannot move: two runs agree within 1 %.

With ``--store``, the tracker has the daemon's call store (a :class:`CallStore` in a
temporary directory and its :class:`Persister`: admit and merge then ask the filter of the
calls let go of, as in the daemon), and a last stage, ``batch``, is the persister's batch of
the stage's events (``Persister.flush``: its loop side and its worker thread's, callgrind
counting every thread), with the calls it lets go of afterwards (as many stay in memory as
``bench.instructions``' drain leaves there: 1,000 of 1,733 calls); ``admit`` is then each
event's admit and merge, one after the other as the dispatcher has them.

``python -m bench.hotstages [--events N] [--store] [--before TREE ...]`` (``TREE``: another
checkout, ``git archive <commit> | tar -x -C TREE``, whose ``listener`` is imported instead).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import ROOT

__all__ = ["STAGES", "main"]

STAGES = ("receive", "create", "stamp", "admit", "merge", "offer", "workers", "batch")
_TOTALS = re.compile(r"^totals:\s+(\d+)", re.MULTILINE)
_TRIGGER = re.compile(r"^desc: Trigger: dump (\w+)", re.MULTILINE)


async def _stages(events: int, store: bool) -> None:
    """The stages, each between a switch on and a dump (run under callgrind)."""
    import orjson

    import listener.service.daemon  # noqa: F401  (the daemon's heap)
    from bench.callcost import _Nothing
    from bench.server import call_event
    from listener.calls.persister import Persister
    from listener.calls.store import CallStore
    from listener.calls.tracker import CallTracker
    from listener.core.events import Event
    from listener.core.ids import EventIds
    from listener.dispatch.dispatcher import Dispatcher, HandlerRunner, RunnerSettings
    from listener.dispatch.handler import Context
    from listener.realtime.protocol import ChannelProtocol

    pid = str(os.getpid())

    def control(*argv: str) -> None:
        subprocess.run(["callgrind_control", *argv, pid], check=True, capture_output=True)

    first = 10_000
    for counted in (False, True):
        frames = [
            orjson.dumps([None, None, "events", *call_event(seq)]).decode()
            for seq in range(first, first + events)
        ]
        first += events
        protocol, ids, handler = ChannelProtocol("events"), EventIds(), _Nothing()
        context = Context(rpc=None, config=None, name=handler.name, state_dir=Path("."))  # type: ignore[arg-type]
        runner = HandlerRunner(handler, RunnerSettings(name=handler.name), context)
        tracker = CallTracker()
        folder = tempfile.TemporaryDirectory(prefix="sippet-bench-stages-store-")
        persister = (
            Persister(
                CallStore(Path(folder.name) / "calls.sqlite3"), tracker, lambda now: now,
                retain=86400.0, resident_ended=events * 1000 // 5200,
            )
            if store
            else None
        )  # fmt: skip
        dispatcher = Dispatcher([runner], tracker)
        dispatcher.start()
        await asyncio.sleep(0)

        def stage(name: str, on: bool, counted: bool = counted) -> None:
            if not counted:
                return
            if on:
                control("-i", "on")
            else:
                control(f"--dump={name}")
                control("-i", "off")

        stage("receive", True)
        messages = [protocol.receive(frame)[0] for frame in frames]
        stage("receive", False)
        now = time.time()
        stage("create", True)
        built = [Event.create(m.event, m.payload, "events", now, 188) for m in messages]  # type: ignore[union-attr]
        stage("create", False)
        stage("stamp", True)
        for event in built:
            ids.stamp(event)
        stage("stamp", False)
        if persister is None:
            stage("admit", True)
            for event in built:
                tracker.admit(event)
            stage("admit", False)
            stage("merge", True)
            calls = [tracker.merge(event) for event in built]
            stage("merge", False)
        else:
            # Each event's admit, then its merge, as the dispatcher has them: with a store,
            # a call's first admit asks the filter and its merge reuses the answer, which
            # all admits before all merges would not (every event's would ask).
            stage("admit", True)
            calls = [tracker.merge(event) for event in built if tracker.admit(event)]
            stage("admit", False)
        stage("offer", True)
        for event, call in zip(built, calls, strict=True):
            runner.offer(event, call)
        stage("offer", False)
        stage("workers", True)
        await runner.drain()
        stage("workers", False)
        await runner.stop()
        if persister is not None:
            stage("batch", True)
            await persister.flush()
            stage("batch", False)
            await persister.close()
        folder.cleanup()


def _measure(tree: Path, events: int, store: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="sippet-bench-stages-") as scratch:
        # This file runs in the child (another tree may not have it); its imports come
        # from ``tree``.
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", "-q",
             f"--callgrind-out-file={scratch}/callgrind.out.%p", sys.executable, __file__,
             "--child", str(events), *(["--store"] if store else [])],
            env=env, cwd=tree, check=True, capture_output=True, timeout=1200,
        )  # fmt: skip
        figures = {}
        for dump in Path(scratch).glob("callgrind.out.*.*"):
            text = dump.read_text(errors="replace")
            name, total = _TRIGGER.search(text), _TOTALS.search(text)
            if name and total:
                figures[name.group(1)] = int(total.group(1)) / events
        return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotstages", description=__doc__)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--before", type=Path, action="append", default=[])
    parser.add_argument("--store", action="store_true", help="with the call store and its batch")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(_stages(args.child, args.store))
        return 0
    if shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    began = time.strftime("%H:%M:%S")
    trees = [("this tree", ROOT), *((tree.name, tree) for tree in args.before)]
    results = {label: _measure(tree, args.events, args.store) for label, tree in trees}
    print(f"{began}-{time.strftime('%H:%M:%S')}: instructions per event, {args.events:,} events"
          " of the drain stream, in one process under callgrind"
          + (", with the call store" if args.store else ""))  # fmt: skip
    print("| stage | " + " | ".join(label for label, _ in trees) + " |")
    print("|---|" + "---:|" * len(trees))
    for name in (*(s for s in STAGES if any(s in f for f in results.values())), "all"):
        cells = [
            sum(figures.values()) if name == "all" else figures.get(name, 0.0)
            for figures in results.values()
        ]
        print(f"| {name} | " + " | ".join(f"{cell:,.0f}" for cell in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
