"""sippet-listener: the real ``Daemon``, with one no-op handler subscribed to ``*``.

The handler records ``(seq, ts, time.time())`` when it starts, like every other client's
callback. Options (JSON): ``sippet`` overrides for the ``[sippet]`` section, ``handler``
overrides for the handler's dispatcher settings (``concurrency``, ``queue_size``...).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from typing import Any

from common import Recorder, driver_args, serve

from listener.core.events import Event
from listener.core.logs import configure_logging
from listener.dispatch.dispatcher import RunnerSettings
from listener.dispatch.handler import Context, Handler
from listener.dispatch.loader import LoadedHandler
from listener.service.config import parse_settings
from listener.service.daemon import Daemon


class _Record(Handler):
    """A no-op handler that notes each event."""

    name = "bench"

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = recorder

    async def handle(self, event: Event, ctx: Context) -> None:
        self._recorder.record(event.payload)


async def main() -> None:
    args = driver_args(__doc__ or "")
    options: dict[str, Any] = json.loads(args.options)
    # Production logging (JSON at info) on stderr; stdout carries the command protocol.
    configure_logging("info", "json", stream=sys.stderr)
    recorder = Recorder()
    with tempfile.TemporaryDirectory(prefix="sippet-bench-") as state_dir:
        settings = parse_settings(
            {
                "sippet": {"base_url": args.base_url, **options.get("sippet", {})},
                "service": {"state_dir": state_dir},
            }
        )
        runner = RunnerSettings(name="bench", events=("*",), **options.get("handler", {}))
        daemon = Daemon(settings, args.api_key, [LoadedHandler(_Record(recorder), runner)])
        stop = asyncio.Event()
        running = asyncio.create_task(daemon.run(stop))
        joined = asyncio.create_task(daemon.session.joined.wait())
        await asyncio.wait({running, joined}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            running.result()
        if not joined.done():
            raise SystemExit("the daemon did not join within 10 s")

        def stats() -> dict[str, Any]:
            return {
                "rotations": daemon.session.rotations,
                "reconnects": daemon.session.reconnects,
                "received": daemon.dispatcher.received,
            }

        async def shutdown() -> None:
            stop.set()
            await running

        await serve(recorder, {"client": "sippet-listener"}, stats, shutdown)


if __name__ == "__main__":
    asyncio.run(main())
