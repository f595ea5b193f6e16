"""Run the real daemon, with your handlers, against a fake Sippet: for tests.

::

    async with running_daemon(fake_sippet, [MyHandler(MyConfig(...))]) as daemon:
        await fake_sippet.broadcast("incoming_call", {"callUuid": "c-1"})
        await settle(daemon, events=1)
        assert fake_sippet.rpc_requests[0].body["action"] == "end_call"
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from listener.cluster.url import StoreUrl
from listener.dispatch.handler import Handler
from listener.dispatch.loader import LoadedHandler, load_handler, loaded_instance
from listener.service.config import parse_settings
from listener.service.daemon import Daemon
from listener.testing.server import FakeSippet

__all__ = ["running_daemon", "settle"]

_FAST = {
    "heartbeat_interval": 1.0,
    "join_timeout": 2.0,
    "connect_timeout": 2.0,
    "close_timeout": 1.0,
    "backoff_initial": 0.05,
    "backoff_max": 0.5,
}


def _loaded(item: Handler | LoadedHandler | Mapping[str, Any], index: int) -> LoadedHandler:
    if isinstance(item, LoadedHandler):
        return item
    if isinstance(item, Handler):
        return loaded_instance(item)
    return load_handler(item, f"handlers[{index}]")


@contextlib.asynccontextmanager
async def running_daemon(
    fake: FakeSippet,
    handlers: Sequence[Handler | LoadedHandler | Mapping[str, Any]],
    *,
    sippet: Mapping[str, Any] | None = None,
    service: Mapping[str, Any] | None = None,
    calls: Mapping[str, Any] | None = None,
    store: str | None = None,
    join_timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Daemon]:
    """Start a daemon on ``fake`` with ``handlers``; yield it once joined; stop it after.

    Args:
        fake: the server to connect to.
        handlers: handler instances (fed as they declare: timeout, concurrency, ...), loaded
            handlers, or ``[[handlers]]`` tables as dicts (``{"use": "log"}``), which go
            through the same loader as a config file.
        sippet: overrides for the ``[sippet]`` section (short intervals are the default).
        service: overrides for the ``[service]`` section (``state_dir`` defaults to a fresh
            temporary directory).
        calls: overrides for the ``[calls]`` section. Reconciliation is off unless
            ``{"reconcile": True}``: its ``list_calls`` requests would take the replies a test
            scripts for its handler (``script_rpc``) and show in ``rpc_requests``.
        store: a PostgreSQL URL: run as one instance of a cluster sharing that store
            (several daemons on one store each run a handler once per event between them).
            Without it none is used, whatever ``$SIPPET_STORE_URL`` says.
        join_timeout: how long to wait for the first join.
        tls: what the daemon checks the server's certificate against (for a ``FakeSippet``
            serving TLS: a context trusting the test's certificate authority).
    """
    with tempfile.TemporaryDirectory(prefix="sippet-listener-test-") as state_dir:
        settings = parse_settings(
            {
                "sippet": {"base_url": fake.base_url, **_FAST, **(sippet or {})},
                "service": {
                    "state_dir": str(Path(state_dir)),
                    "drain_timeout": 2.0,
                    **(service or {}),
                },
                "calls": {"reconcile": False, **(calls or {})},
            }
        )
        loaded = [_loaded(item, index) for index, item in enumerate(handlers)]
        shared = StoreUrl(store) if store is not None else None
        daemon = Daemon(settings, fake.api_key, loaded, store=shared, tls=tls)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        joined = asyncio.create_task(daemon.session.joined.wait())
        try:
            await asyncio.wait(
                {task, joined}, timeout=join_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if task.done():
                task.result()
            if not joined.done():
                raise TimeoutError(f"the daemon did not join within {join_timeout}s")
            yield daemon
        finally:
            joined.cancel()
            stop.set()
            await task


async def settle(daemon: Daemon, events: int, timeout: float = 10.0) -> None:
    """Wait until ``events`` events have arrived and every handler is done with them."""
    async with asyncio.timeout(timeout):
        await daemon.dispatcher.wait_received(events)
        await daemon.dispatcher.drain()
