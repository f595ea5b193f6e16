"""sippet-listener: the real ``Daemon``, with one no-op handler subscribed to ``*``.

The handler records ``(seq, ts, time.time())`` when it starts, like every other client's
callback. Options (JSON): ``sippet`` overrides for the ``[sippet]`` section, ``handler``
overrides for the handler's dispatcher settings (``concurrency``, ``queue_size``...);
``loop``: ``SIPPET_EVENT_LOOP`` for this process (``asyncio`` or ``uvloop``: the daemon's own
choice, ``loop_factory``); for the soak (``bench.soak``): ``seqs``: N, count each ``seq`` below
N in a preallocated byte per seq instead of keeping records (memory stays flat over a million
events; ``stats`` then answers ``seen``, the counts in base64), and ``webhook``: ``{"url",
"secret"}``, a second handler, ``use = "webhook"`` from a configuration table, every other
setting its default; ``tracemalloc``: trace allocations from the join on, and answer
``grown``, the ten lines whose memory grew most since then, with ``stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
import time
import tracemalloc
from typing import Any

from common import Recorder, driver_args, serve, start_daemon

from listener.core.events import Event
from listener.core.logs import configure_logging
from listener.dispatch.dispatcher import RunnerSettings
from listener.dispatch.handler import Context, Handler
from listener.dispatch.loader import LoadedHandler, load_handlers
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


async def main(args: argparse.Namespace) -> None:
    options: dict[str, Any] = json.loads(args.options)
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
            }
        )
        runner = RunnerSettings(name="bench", events=("*",), **options.get("handler", {}))
        ours = LoadedHandler(seen or _Record(recorder), runner)
        daemon = Daemon(settings, args.api_key, [ours, *load_handlers(settings.handlers)])
        shutdown = await start_daemon(daemon)

        traced = tracemalloc.take_snapshot() if options.get("tracemalloc") else None

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
            if traced is not None:
                grown = tracemalloc.take_snapshot().compare_to(traced, "traceback")
                answer["grown"] = [
                    [stat.size_diff, stat.count_diff, stat.traceback.format()[-6:]]
                    for stat in grown[:10]
                ]
            return answer

        await serve(recorder, {"client": "sippet-listener"}, stats, shutdown)


if __name__ == "__main__":
    arguments = driver_args(__doc__ or "")
    # The loop exists before main() runs: chosen the way the daemon's command line chooses it.
    chosen = json.loads(arguments.options)
    os.environ[LOOP_ENV] = chosen.get("loop", "asyncio")
    if chosen.get("tracemalloc"):
        tracemalloc.start(12)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main(arguments))
