"""The composition root: settings in, a running daemon out.

Builds the shared HTTP client, the token source and the session supervisor, runs them until
asked to stop, then stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import httpx

from listener.config import SippetSettings
from listener.connection import LinkSettings
from listener.events import Event
from listener.session import Session, SessionSettings
from listener.tokens import TokenSource

__all__ = ["Daemon", "session_settings", "stop_on_signals"]


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
    """Keeps the channel joined and hands every event to ``deliver`` until stopped.

    Args:
        sippet: the ``[sippet]`` settings.
        api_key: the organisation's secret key.
        deliver: called once per event, on the event loop; must not block.
    """

    def __init__(
        self, sippet: SippetSettings, api_key: str, deliver: Callable[[Event], None]
    ) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=10.0))
        tokens = TokenSource(
            self._http,
            sippet.base_url,
            api_key,
            attempts=sippet.mint_attempts,
            backoff_initial=sippet.backoff_initial,
            backoff_max=sippet.backoff_max,
        )
        self.session = Session(session_settings(sippet), tokens, deliver)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then leave the channel and close everything."""
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
            await self._http.aclose()


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGINT or SIGTERM (a second SIGINT interrupts at once, as usual)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            loop.remove_signal_handler(signal.SIGINT)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
