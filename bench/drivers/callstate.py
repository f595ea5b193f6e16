"""sippet-listener for ``bench.reconcile``: the real ``Daemon``, one no-op handler on ``*``.

Like ``daemon.py`` (production logging, default dispatcher settings, a fresh state directory),
plus what the call-state rows need. Options (JSON):

- ``call_state`` (default true): false takes call state off the socket's path, in this
  process only, as it was before there was any: the session hands events on without an id
  (no ``EventIds``, no copy of the event), the dispatcher's tracker admits every event and
  knows no call, and reconciliation is off. Not a setting the daemon offers: ids and the map
  are what make delivery idempotent.
- ``persist`` (default true): false keeps no call store (the daemon's ``persist=False``, as
  ``tail`` runs it), to tell the store's share of the cost.
- ``sippet``, ``calls``: overrides for those config sections.
- ``uvloop`` (default false): run on uvloop's event loop (if installed), for a measure of it.
- ``gc``: experiments with the cyclic GC once the daemon has joined: ``"freeze"``
  (``gc.freeze()``), ``"off"`` (``gc.disable()``), or ``[g0, g1, g2]`` thresholds.

The handler records ``(seq, ts, time.time())`` as every client's callback does, and counts
the events rebuilt by reconciliation. ``stats`` adds ``reconciled`` (that count),
``caught_up`` (no gap waits for its pass) and ``list_calls`` (the wall-clock start and end of
each ``list_calls`` the reconciler made, oldest first).
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import tempfile
import time
from typing import Any

from common import Recorder, driver_args, serve, start_daemon

from listener.calls.state import CallRecord
from listener.calls.tracker import CallTracker
from listener.core.events import Event
from listener.core.logs import configure_logging
from listener.dispatch.dispatcher import RunnerSettings
from listener.dispatch.handler import Context, Handler
from listener.dispatch.loader import LoadedHandler
from listener.service.config import parse_settings
from listener.service.daemon import Daemon


class _Record(Handler):
    """A no-op handler that notes each event, and counts the reconciled ones."""

    name = "bench"

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = recorder
        self.reconciled = 0

    async def handle(self, event: Event, ctx: Context) -> None:
        self._recorder.record(event.payload)
        if event.origin == "reconcile":
            self.reconciled += 1


class NoCalls(CallTracker):
    """Admits every event and knows no call: the dispatcher as it was without call state."""

    def admit(self, event: Event) -> bool:
        del event
        return True

    def merge(self, event: Event) -> CallRecord | None:
        del event
        return None


async def main() -> None:
    args = driver_args(__doc__ or "")
    options: dict[str, Any] = json.loads(args.options)
    call_state = bool(options.get("call_state", True))
    configure_logging("info", "json", stream=sys.stderr)
    recorder = Recorder()
    handler = _Record(recorder)
    calls = dict(options.get("calls", {}))
    if not call_state:
        calls["reconcile"] = False
    with tempfile.TemporaryDirectory(prefix="sippet-bench-") as state_dir:
        settings = parse_settings(
            {
                "sippet": {"base_url": args.base_url, **options.get("sippet", {})},
                "service": {"state_dir": state_dir},
                "calls": calls,
            }
        )
        runner = RunnerSettings(name="bench", events=("*",))
        daemon = Daemon(
            settings,
            args.api_key,
            [LoadedHandler(handler, runner)],
            persist=bool(options.get("persist", True)),
        )
        if not call_state:
            session = daemon.session
            session._deliver = session._sink
            daemon.dispatcher.tracker = NoCalls()
        passes: list[tuple[float, float]] = []
        reconciler = daemon.reconciler
        list_calls = reconciler._list_calls

        async def timed(request: dict[str, Any]) -> list[Any]:
            began = time.time()
            try:
                return await list_calls(request)
            finally:
                passes.append((began, time.time()))

        reconciler._list_calls = timed  # type: ignore[method-assign]
        shutdown = await start_daemon(daemon)
        tune_gc = options.get("gc")
        if tune_gc == "freeze":
            gc.freeze()
        elif tune_gc == "off":
            gc.disable()
        elif tune_gc is not None:
            gc.set_threshold(*tune_gc)
        if call_state:
            # The first start's pass (an empty table: it loads nothing).
            await asyncio.wait_for(reconciler.caught_up.wait(), timeout=10)

        def stats() -> dict[str, Any]:
            return {
                "received": daemon.dispatcher.received,
                "reconciled": handler.reconciled,
                "caught_up": reconciler.caught_up.is_set(),
                "list_calls": passes,
            }

        await serve(
            recorder, {"client": "sippet-listener", "call_state": call_state}, stats, shutdown
        )


if __name__ == "__main__":
    if json.loads(driver_args(__doc__ or "").options).get("uvloop"):
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
