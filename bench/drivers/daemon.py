"""sippet-listener: the real ``Daemon``, with one no-op handler subscribed to ``*``.

The handler records ``(seq, ts, time.time())`` when it starts, like every other client's
callback. Options (JSON): ``sippet`` overrides for the ``[sippet]`` section, ``handler``
overrides for the handler's dispatcher settings (``concurrency``, ``queue_size``...);
``loop``: ``SIPPET_EVENT_LOOP`` for this process (``asyncio`` or ``uvloop``: the daemon's own
choice, ``loop_factory``); for the soak (``bench.soak``): ``seqs``: N, count each ``seq`` below
N in a preallocated byte per seq instead of keeping records (memory stays flat over a million
events; ``stats`` then answers ``seen``, the counts in base64), and ``webhook``: ``{"url",
"secret"}``, a second handler, ``use = "webhook"`` from a configuration table, every other
setting its default; ``heap``: a directory: on each ``SIGUSR1``, write ``heap-N.json`` there
(RSS, glibc's ``mallinfo2``, live objects by type, and with ``tracemalloc`` the memory traced)
and, with ``tracemalloc`` (a number of frames), ``heap-N.pickle``, the allocations traced
(``tracemalloc.Snapshot.load``); ``bench.soak --heap`` sends it ten times over the stream, at
its end and at rest, and compares them. ``trim``: call ``malloc_trim(0)`` every that many
seconds (to tell what the allocator keeps from what Python holds). ``trace``: note
when the cyclic GC ran, the event loop's turns longer than 0.2 ms (asyncio's loop only) and
the call store's batches (the loop's part and the thread's), and answer them with ``stats``
as ``[start, end]`` wall-clock pairs (``bench.hotwait`` lines them up with the slowest
events); ``switch_interval``: ``sys.setswitchinterval`` for this process; ``gc``: the
collector's thresholds ``[g0, g1, g2]``, set once the daemon has started; ``persist``
(default true): false keeps no call store (``Daemon(persist=False)``, as ``tail`` runs);
``call_state`` (default true): false takes call state off the path as ``callstate.py``'s
option does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import gc
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import heap
from callstate import NoCalls
from common import Recorder, driver_args, serve, start_daemon

from listener.calls.persister import Persister
from listener.calls.store import CallStore
from listener.core.events import Event
from listener.core.logs import configure_logging
from listener.dispatch.dispatcher import RunnerSettings
from listener.dispatch.handler import Context, Handler
from listener.dispatch.loader import LoadedHandler, load_handlers
from listener.service.allocator import release_large_blocks
from listener.service.config import parse_settings
from listener.service.daemon import LOOP_ENV, Daemon, loop_factory


class _Record(Handler):
    """A no-op handler that notes each event."""

    name = "bench"

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = recorder

    async def handle(self, event: Event, ctx: Context) -> None:
        self._recorder.record(event.payload)


class _Seen(Handler):
    """A no-op handler that counts each ``seq`` (saturating at 255) in a fixed bytearray."""

    name = "bench"

    def __init__(self, recorder: Recorder, size: int) -> None:
        super().__init__()
        self._recorder = recorder
        self.seen = bytearray(size)
        # (seq, seconds from the server's ts to the handler) of every 1000th seq: how far
        # behind the stream the daemon runs, in a thousandth of the events' memory.
        self.lag: list[tuple[int, float]] = []

    async def handle(self, event: Event, ctx: Context) -> None:
        seq = event.payload.get("seq")
        if seq is None:  # the calls the stream's transcripts belong to, as they open
            return
        if self.seen[seq] < 255:
            self.seen[seq] += 1
        if seq % 1000 == 0:
            self.lag.append((seq, time.time() - event.payload["ts"]))
        self._recorder.count += 1


def _dump_heap_on_signal(directory: Path, daemon: Daemon) -> None:
    dumps = 0

    def dump() -> None:
        nonlocal dumps
        dumps += 1
        extra = {"at": time.time(), "rotations": daemon.session.rotations}
        heap.dump(directory, dumps, extra)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump)


async def _trim(every: float) -> None:
    while True:
        await asyncio.sleep(every)
        heap.malloc_trim()


class _Trace:
    """When the GC, the loop's long turns and the call store's batches ran (``trace``)."""

    # A turn shorter than this is not worth a record (most take tens of µs).
    LONG_TURN = 0.0002

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[float, float]]] = {
            "gc": [],
            "turn": [],
            "batch": [],
            "batch: SQLite (thread)": [],
        }
        self._gc_began = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        del info
        if phase == "start":
            self._gc_began = time.time()
        else:
            self.spans["gc"].append((self._gc_began, time.time()))

    def loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time each turn of asyncio's loop, less its wait in the selector (its private
        ``_run_once`` and ``_selector``; not on uvloop)."""
        run_once: Callable[[], None] | None = getattr(loop, "_run_once", None)
        selector = getattr(loop, "_selector", None)
        if run_once is None or selector is None:
            return
        turns, floor = self.spans["turn"], self.LONG_TURN
        select = selector.select
        waited = [0.0]

        def timed_select(timeout: float | None = None) -> Any:
            began = time.time()
            try:
                return select(timeout)
            finally:
                waited[0] = time.time() - began

        def timed() -> None:
            began = time.time()
            waited[0] = 0.0
            assert run_once is not None
            run_once()
            ended = time.time()
            if ended - began - waited[0] > floor:
                turns.append((began + waited[0], ended))

        selector.select = timed_select
        loop._run_once = timed  # type: ignore[attr-defined]

    def wrap(self, owner: type, name: str, span: str) -> None:
        """Note each call of ``owner.name`` (a coroutine function or a plain one)."""
        spans, original = self.spans[span], getattr(owner, name)
        if asyncio.iscoroutinefunction(original):

            @functools.wraps(original)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                began = time.time()
                try:
                    return await original(*args, **kwargs)
                finally:
                    spans.append((began, time.time()))

            setattr(owner, name, timed_async)
        else:

            @functools.wraps(original)
            def timed(*args: Any, **kwargs: Any) -> Any:
                began = time.time()
                try:
                    return original(*args, **kwargs)
                finally:
                    spans.append((began, time.time()))

            setattr(owner, name, timed)


async def main(args: argparse.Namespace) -> None:
    options: dict[str, Any] = json.loads(args.options)
    trace = _Trace() if options.get("trace") else None
    if trace is not None:
        trace.loop(asyncio.get_running_loop())
        # The batch's loop side (changed calls, rows to write, its wait for a lull is not in
        # it) and its thread side (the SQLite writes).
        trace.wrap(Persister, "flush", "batch")
        trace.wrap(CallStore, "save", "batch: SQLite (thread)")
    if "switch_interval" in options:
        sys.setswitchinterval(float(options["switch_interval"]))
    # Production logging (JSON at info) on stderr; stdout carries the command protocol.
    configure_logging("info", "json", stream=sys.stderr)
    recorder = Recorder()
    seen = _Seen(recorder, int(options["seqs"])) if "seqs" in options else None
    webhook = options.get("webhook")
    tables = [{"use": "webhook", "name": "soak", **webhook}] if webhook else []
    with tempfile.TemporaryDirectory(prefix="sippet-bench-") as state_dir:
        settings = parse_settings(
            {
                "sippet": {"base_url": args.base_url, **options.get("sippet", {})},
                "service": {"state_dir": state_dir},
                "handlers": tables,
                "calls": {} if options.get("call_state", True) else {"reconcile": False},
            }
        )
        runner = RunnerSettings(name="bench", events=("*",), **options.get("handler", {}))
        ours = LoadedHandler(seen or _Record(recorder), runner)
        daemon = Daemon(
            settings,
            args.api_key,
            [ours, *load_handlers(settings.handlers)],
            persist=bool(options.get("persist", True)),
        )
        if not options.get("call_state", True):
            daemon.session._deliver = daemon.session._sink
            daemon.dispatcher.tracker = NoCalls()
        shutdown = await start_daemon(daemon)
        if "gc" in options:
            gc.set_threshold(*options["gc"])

        if options.get("heap"):
            _dump_heap_on_signal(Path(options["heap"]), daemon)
        trimming = (
            asyncio.create_task(_trim(float(options["trim"]))) if options.get("trim") else None
        )

        def stats() -> dict[str, Any]:
            answer: dict[str, Any] = {
                "rotations": daemon.session.rotations,
                "reconnects": daemon.session.reconnects,
                "received": daemon.dispatcher.received,
                "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            }
            if seen is not None:
                answer["seen"] = base64.b64encode(seen.seen).decode()
                answer["lag"] = seen.lag
            if trace is not None:
                answer["spans"] = trace.spans
            return answer

        await serve(recorder, {"client": "sippet-listener"}, stats, shutdown)
        if trimming is not None:
            trimming.cancel()


if __name__ == "__main__":
    arguments = driver_args(__doc__ or "")
    # The loop exists before main() runs: chosen the way the daemon's command line chooses it.
    chosen = json.loads(arguments.options)
    os.environ[LOOP_ENV] = chosen.get("loop", "asyncio")
    release_large_blocks()  # as ``run`` does
    if chosen.get("tracemalloc"):
        tracemalloc.start(int(chosen["tracemalloc"]))
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main(arguments))
