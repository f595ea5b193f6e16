"""The composition root: settings in, a running daemon out.

Builds the shared HTTP pool, the token source, the RPC client, the handlers and the dispatcher
and the session supervisor; runs them until asked to stop; then stops them in order: leave the
channel (no new events), let handlers drain for ``service.drain_timeout``, tear handlers down,
close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence

import httpx
import structlog

from listener.config import Settings, SippetSettings
from listener.connection import EventSink, LinkSettings
from listener.dispatch import Dispatcher, DispatchReport, HandlerRunner
from listener.errors import HandlerLoadError
from listener.handler import Context
from listener.registry import LoadedHandler
from listener.rpc import RpcClient
from listener.session import Session, SessionSettings
from listener.tokens import TokenSource

__all__ = ["Daemon", "session_settings", "stop_on_signals"]

_log = structlog.get_logger(__name__)


def session_settings(sippet: SippetSettings) -> SessionSettings:
    """Map the ``[sippet]`` section onto the supervisor's settings."""
    link = LinkSettings(
        topic=sippet.topic,
        heartbeat_interval=sippet.heartbeat_interval,
        join_timeout=sippet.join_timeout,
        connect_timeout=sippet.connect_timeout,
        close_timeout=sippet.close_timeout,
        max_message_size=sippet.max_message_size,
    )
    return SessionSettings(
        base_url=sippet.base_url,
        link=link,
        rotate_at=sippet.rotate_at,
        stable_after=sippet.stable_after,
        backoff_initial=sippet.backoff_initial,
        backoff_max=sippet.backoff_max,
        rotation_retry=sippet.rotation_retry,
    )


class Daemon:
    """Keeps the channel joined and feeds every event to the handlers until stopped.

    Args:
        settings: the whole configuration.
        api_key: the organisation's secret key.
        handlers: the loaded handlers (see ``listener.registry``).
        sink: instead of handlers, one callable that takes every event (``tail`` uses it).
    """

    def __init__(
        self,
        settings: Settings,
        api_key: str,
        handlers: Sequence[LoadedHandler] = (),
        *,
        sink: EventSink | None = None,
    ) -> None:
        sippet = settings.sippet
        self.settings = settings
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=10.0))
        self.rpc = RpcClient(sippet.base_url, api_key, http=self._http)
        tokens = TokenSource(
            self._http,
            sippet.base_url,
            api_key,
            attempts=sippet.mint_attempts,
            backoff_initial=sippet.backoff_initial,
            backoff_max=sippet.backoff_max,
        )
        self.handlers = list(handlers)
        self.contexts = [
            Context(
                rpc=self.rpc,
                config=item.handler.config,
                name=item.settings.name,
                state_dir=settings.service.state_dir,
            )
            for item in self.handlers
        ]
        self.dispatcher = Dispatcher(
            [
                HandlerRunner(item.handler, item.settings, context)
                for item, context in zip(self.handlers, self.contexts, strict=True)
            ]
        )
        self.session = Session(session_settings(sippet), tokens, sink or self.dispatcher.submit)
        self.report: DispatchReport | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Set up the handlers, run until ``stop`` is set, then shut down in order.

        Raises:
            HandlerLoadError: a handler's ``setup`` failed; nothing was connected.
        """
        await self._setup()
        self.dispatcher.start()
        runner = asyncio.create_task(self.session.run(), name="sippet-session")
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if runner.done():
                runner.result()
        finally:
            runner.cancel()
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            await self.session.stop()
            self.report = await self.dispatcher.stop(self.settings.service.drain_timeout)
            await self._teardown()
            await self._http.aclose()

    async def _setup(self) -> None:
        for item, context in zip(self.handlers, self.contexts, strict=True):
            try:
                await item.handler.setup(context)
            except Exception as exc:
                await self._http.aclose()
                raise HandlerLoadError(
                    item.settings.name, f"setup failed: {type(exc).__name__}: {exc}"
                ) from None

    async def _teardown(self) -> None:
        for item in self.handlers:
            try:
                await item.handler.teardown()
            except Exception as exc:
                _log.error(
                    "handler teardown failed",
                    handler=item.settings.name,
                    error=f"{type(exc).__name__}: {exc}",
                )


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGINT or SIGTERM (a second SIGINT interrupts at once, as usual)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            loop.remove_signal_handler(signal.SIGINT)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
