"""The handler API: what a plugin writes, and what it is given.

A handler is a class::

    class Notify(Handler):
        name = "notify"
        events = ("call_*",)

        class Config(BaseModel):
            channel: str

        async def handle(self, event: Event, ctx: Context) -> None:
            ctx.log.info("call event", channel=self.config.channel)

or a plain async function, with the :func:`handler` decorator when it needs options::

    @handler(events=["incoming_call"])
    async def greet(event: Event, ctx: Context) -> None:
        await ctx.rpc.run("who_am_i", fields=["id"])

The daemon subscribes each handler to its ``events`` (globs; ``*`` for every event, including
names it has never heard of), asks :meth:`Handler.matches` for a finer filter, and calls
:meth:`Handler.handle` with a :class:`Context`. A handler that raises or overruns its timeout
is logged and counted; it never delays another handler or the socket. Events of one call
reach a handler in arrival order; events of different calls are handled in parallel.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import structlog
from pydantic import BaseModel

from listener.core.events import Event
from listener.rpc.client import RpcClient

__all__ = ["Context", "FunctionHandler", "Handler", "HandlerFunction", "handler"]

HandlerFunction: TypeAlias = Callable[[Event, "Context"], Awaitable[None]]


class Context:
    """What a handler is given with each event (and at :meth:`Handler.setup`).

    Attributes:
        rpc: the Sippet RPC client, shared and pooled.
        config: the handler's validated config section (an instance of its ``Config`` model,
            or None when it has none).
        name: the handler's name, as in logs and metrics.
        state_dir: a directory the handler may keep files in (created on demand by the
            caller of ``mkdir``); it survives restarts.
        event: the event being handled (None during setup and teardown).
    """

    __slots__ = ("_log", "config", "event", "name", "rpc", "state_dir")

    def __init__(
        self,
        *,
        rpc: RpcClient,
        config: Any,
        name: str,
        state_dir: Path,
        event: Event | None = None,
    ) -> None:
        self.rpc = rpc
        self.config = config
        self.name = name
        self.state_dir = state_dir
        self.event = event
        self._log: Any = None

    @property
    def log(self) -> Any:
        """A structlog logger bound to the handler and, while handling, the event and call."""
        # Bound on first use: most events are handled without logging anything.
        if self._log is None:
            log = structlog.get_logger("handler").bind(handler=self.name)
            if self.event is not None:
                log = log.bind(event_name=self.event.name, call_key=self.event.call_key)
            self._log = log
        return self._log

    def for_event(self, event: Event) -> Context:
        """A copy of this context for handling ``event``."""
        return Context(
            rpc=self.rpc, config=self.config, name=self.name, state_dir=self.state_dir, event=event
        )


class Handler:
    """Base class of class-based handlers. Override :meth:`handle`; the rest is optional.

    Class attributes:
        name: the default name in logs, metrics and config (``name = ...`` in config overrides
            it, so one class can serve twice with different settings).
        events: event-name globs the handler subscribes to; config may override them.
        Config: a pydantic model for the handler's config section (every key of its
            ``[[handlers]]`` table besides the dispatcher's own: ``use``, ``name``,
            ``events``, ``timeout``, ``concurrency``, ``queue_size``, ``on_full``). Unknown
            keys are errors. None: the handler takes no settings.
    """

    name: str = ""
    events: Sequence[str] = ("*",)
    Config: ClassVar[type[BaseModel] | None] = None

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def matches(self, event: Event) -> bool:
        """A finer filter than ``events``: return False to skip ``event``. Must be cheap."""
        del event
        return True

    async def setup(self, ctx: Context) -> None:
        """Prepare (open clients, warm caches) before the first event. Raising stops start-up."""

    async def handle(self, event: Event, ctx: Context) -> None:
        """Act on one event."""
        raise NotImplementedError(f"{type(self).__name__} must implement handle()")

    async def teardown(self) -> None:
        """Release what :meth:`setup` took; called on stop and when a reload removes it."""

    def status(self) -> str | None:
        """A few words for the service status line (``systemctl status``), or None."""
        return None


class FunctionHandler(Handler):
    """A plain async function as a handler (made by :func:`handler` or by the loader)."""

    def __init__(
        self,
        function: HandlerFunction,
        *,
        name: str,
        events: Sequence[str],
        when: Callable[[Event], bool] | None = None,
        config: Any = None,
    ) -> None:
        super().__init__(config)
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"handler {name!r} must be an async function")
        self.function = function
        self.name = name
        self.events = tuple(events)
        self._when = when

    def matches(self, event: Event) -> bool:
        return self._when is None or self._when(event)

    async def handle(self, event: Event, ctx: Context) -> None:
        await self.function(event, ctx)


def handler(
    *,
    events: Sequence[str] = ("*",),
    name: str | None = None,
    when: Callable[[Event], bool] | None = None,
) -> Callable[[HandlerFunction], FunctionHandler]:
    """Turn an async function into a handler.

    Args:
        events: event-name globs to subscribe to.
        name: the handler's name (default: the function's name).
        when: an extra, cheap filter on the event.

    Raises:
        TypeError: at decoration time, if the function is not ``async def``.
    """

    def decorate(function: HandlerFunction) -> FunctionHandler:
        return FunctionHandler(function, name=name or function.__name__, events=events, when=when)

    return decorate
