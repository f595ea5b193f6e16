"""sippet-listener end to end: the real ``Daemon``, configured with one ``webhook`` handler.

The configuration is what a user writes, loaded the way ``sippet-listener run`` loads it
(``parse_settings`` + ``load_handlers``): ``[sippet]`` with the fake's URL, ``[service]`` with
a fresh state directory, and one table::

    [[handlers]]
    use = "webhook"
    name = "e2e"
    url = "<the receiver>"
    secret = "whsec_..."

Everything else is a default: the handler's and the dispatcher's (32 events at once, queue
10,000), the destination's (8 in flight, the Svix retry schedule), production logging (JSON at
info on stderr). Every event is committed to the SQLite outbox before its first attempt: the worker
only ever attempts rows it read back from the file. ``stats`` also answers ``wal_bytes``, the
size of the outbox's WAL file (its high-water mark).

Options (JSON): ``url``, ``secret``; ``store``, a PostgreSQL URL: an instance of a cluster
sharing that store (``[store]``), instead of SQLite alone; ``handler``, extra keys for the
``[[handlers]]`` table (``concurrency``, ``max_in_flight``...); ``sippet``, overrides for
``[sippet]``; ``trace``: stamp each event along its path (``webhook_trace``) and hand the
stamps over with ``stats``;
``switch_interval``: ``sys.setswitchinterval`` (the GIL's, 5 ms by default), and ``pragmas``:
``{name: value}`` run on the outbox's connection once it is open, and ``modules``:
``{module: file}``, a module of ``listener`` loaded from another file (an older version, for
an A/B run side by side), for experiments.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import Recorder, driver_args, serve, start_daemon

from listener.cluster.url import StoreUrl
from listener.core.logs import configure_logging
from listener.dispatch.loader import load_handlers
from listener.service.config import parse_settings
from listener.service.daemon import Daemon


def _replace_module(name: str, path: str) -> None:
    """Load ``name`` from ``path`` before anything imports it."""
    import importlib.util

    if name in sys.modules:
        raise SystemExit(f"{name} is already imported: it cannot be replaced")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def _with_pragmas(pragmas: dict[str, Any]) -> None:
    """Run ``PRAGMA name = value`` on every outbox connection after its own set-up."""
    from listener.webhooks.outbox import Outbox

    setup = Outbox._create

    def patched(self: Outbox) -> None:
        setup(self)
        for name, value in pragmas.items():
            self.conn.execute(f"PRAGMA {name} = {value}")

    Outbox._create = patched  # type: ignore[method-assign]


async def main() -> None:
    args = driver_args(__doc__ or "")
    options: dict[str, Any] = json.loads(args.options)
    configure_logging("info", "json", stream=sys.stderr)
    for name, path in options.get("modules", {}).items():
        _replace_module(name, path)
    trace = bool(options.get("trace"))
    if trace:
        import webhook_trace

        webhook_trace.install()
    if "switch_interval" in options:
        sys.setswitchinterval(float(options["switch_interval"]))
    if options.get("pragmas"):
        _with_pragmas(options["pragmas"])
    with tempfile.TemporaryDirectory(prefix="sippet-bench-e2e-") as state_dir:
        table = {
            "use": "webhook",
            "name": "e2e",
            "url": options["url"],
            "secret": options["secret"],
            **options.get("handler", {}),
        }
        settings = parse_settings(
            {
                "sippet": {"base_url": args.base_url, **options.get("sippet", {})},
                "service": {"state_dir": state_dir},
                "handlers": [table],
            }
        )
        store = StoreUrl(options["store"]) if options.get("store") else None
        daemon = Daemon(settings, args.api_key, load_handlers(settings.handlers), store=store)
        shutdown = await start_daemon(daemon)

        def stats() -> dict[str, Any]:
            # The WAL's size on disk is its high-water mark: what checkpointing let it reach.
            wal = sum(path.stat().st_size for path in Path(state_dir).glob("*-wal"))
            answer = {
                "received": daemon.dispatcher.received,
                "status": daemon.status_line(),
                "wal_bytes": wal,
            }
            if trace:
                answer["trace"], answer["counts"] = webhook_trace.take()
            return answer

        # The receiver counts; the recorder only serves the command loop.
        await serve(Recorder(), {"client": "sippet-listener webhook"}, stats, shutdown)


if __name__ == "__main__":
    asyncio.run(main())
