"""The handler API: what a plugin writes, and what it is given.

A handler is a class, generic over its settings model::

    class NotifyConfig(BaseModel):
        channel: str

    class Notify(Handler[NotifyConfig]):
        name = "notify"
        events = ("call_*",)
        timeout = 10.0

        async def handle(self, event: Event, ctx: Context[NotifyConfig]) -> None:
            ctx.log.info("call event", channel=self.config.channel)

or a plain async function, with the :func:`handler` decorator when it needs options::

    @handler(events=["incoming_call"], timeout=5.0)
    async def greet(event: Event, ctx: Context) -> None:
        await ctx.rpc.run("who_am_i", fields=["id"])

The daemon subscribes each handler to its ``events`` (globs; ``*`` for every event, including
names it has never heard of), asks :meth:`Handler.matches` for a finer filter, and calls
:meth:`Handler.handle` with a :class:`Context`. A handler that raises or overruns its timeout
is logged and counted, then told through :meth:`Handler.on_error`; it never delays another
handler or the socket. Events of one call reach a handler in arrival order; events of
different calls are handled in parallel.
"""

from __future__ import annotations

import functools
import inspect
import typing
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeAlias, TypedDict, Unpack, overload

import structlog
from pydantic import BaseModel
from structlog.typing import FilteringBoundLogger
from typing_extensions import TypeVar

from listener.calls.state import CallLookup, CallRecord, CallState
from listener.core.events import Event
from listener.rpc.client import RpcClient

__all__ = [
    "Context",
    "ErrorHook",
    "FunctionHandler",
    "Handler",
    "HandlerFunction",
    "OnFull",
    "Policy",
    "handler",
]

#: A handler's settings model, or None when it takes no settings. Unparameterised ``Handler``
#: and ``Context`` mean ``Any``, so handlers written before the generics still type-check.
ConfigT = TypeVar("ConfigT", bound=BaseModel | None, default=Any)

OnFull: TypeAlias = Literal["wait", "drop"]


class Policy(TypedDict, total=False):
    """How the dispatcher feeds a handler, as the handler declares it in code.

    The keys of its ``[[handlers]]`` table of the same names override these; what neither
    gives keeps the dispatcher's default (see ``docs/handlers.md``).

    Attributes:
        timeout: seconds one ``handle`` call may take before it is cancelled.
        concurrency: how many events it handles at once (one per call at most).
        queue_size: events that may wait for it before ``on_full`` applies.
        queue_bytes: bytes of events that may wait for it before ``on_full`` applies.
        on_full: ``wait`` (slow the intake, lose nothing) or ``drop`` (drop, warn, count).
    """

    timeout: float
    concurrency: int
    queue_size: int
    queue_bytes: int
    on_full: OnFull


_new = object.__new__


class Context(Generic[ConfigT]):
    """What a handler is given with each event (and at setup and teardown).

    Attributes:
        rpc: the Sippet RPC client, shared and pooled.
        config: the handler's validated settings (an instance of its model), or None when it
            takes none.
        name: the handler's name, as in logs and metrics.
        state_dir: a directory the handler may keep files in (created on demand by the
            caller of ``mkdir``); it survives restarts.
        event: the event being handled (None during setup and teardown).
        call: the event's call as of this event, merged into the call map before it was
            dispatched (None for an event of no call the map knows, and outside ``handle``).
            It does not change when later events of the call come in.
        calls: the live call map, shared by every handler: ``calls.get(call_key)`` is what
            the daemon knows of a call now, ``calls.open_calls()`` the calls not ended.
    """

    __slots__ = ("_log", "call", "calls", "config", "event", "name", "rpc", "state_dir")

    def __init__(
        self,
        *,
        rpc: RpcClient,
        config: ConfigT,
        name: str,
        state_dir: Path,
        event: Event | None = None,
        call: CallRecord | None = None,
        calls: CallLookup | None = None,
    ) -> None:
        self.rpc = rpc
        self.config = config
        self.name = name
        self.state_dir = state_dir
        self.event = event
        self.call = call
        self.calls: CallLookup = CallState() if calls is None else calls
        self._log: FilteringBoundLogger | None = None

    @property
    def log(self) -> FilteringBoundLogger:
        """A structlog logger bound to the handler and, while handling, the event and call."""
        # Bound on first use: most events are handled without logging anything.
        if self._log is None:
            log: FilteringBoundLogger = structlog.get_logger("handler").bind(handler=self.name)
            if self.event is not None:
                log = log.bind(event_name=self.event.name, call_key=self.event.call_key)
            self._log = log
        return self._log

    def for_event(self, event: Event, call: CallRecord | None = None) -> Context[ConfigT]:
        """A copy of this context for handling ``event``, of ``call`` as of this event."""
        # Slot by slot, not through __init__'s keywords: one is made per handled event, and
        # __init__ took 1.3-3.1 µs, this 0.3-0.5 (timeit in one process, best of 5); a
        # drain, ``bench.instructions``: 179,000 -> 175,000 instructions an event.
        context: Context[ConfigT] = _new(type(self))
        context.rpc = self.rpc
        context.config = self.config
        context.name = self.name
        context.state_dir = self.state_dir
        context.event = event
        context.call = call
        context.calls = self.calls
        context._log = None
        return context


class Handler(Generic[ConfigT]):
    """Base class of class-based handlers. Override :meth:`handle`; the rest is optional.

    ``Handler[Model]`` takes its settings as ``Model`` (a pydantic model): the loader validates
    the handler's ``[[handlers]]`` table against it, and ``self.config`` and ``ctx.config``
    are a ``Model``. ``Handler[None]`` takes no settings.

    Class attributes:
        name: the default name in logs, metrics and config (``name = ...`` in config overrides
            it, so one class can serve twice with different settings).
        events: event-name globs the handler subscribes to; config may override them.
        timeout, concurrency, queue_size, queue_bytes, on_full: the dispatcher's policy for
            this handler (see :class:`Policy`); None leaves it to the table, then the default.
        Config: the settings model; set from ``Handler[Model]``. Handlers written without
            the generic parameter may still set it themselves. Every key of the table besides
            the dispatcher's own (``use``, ``name``, ``events`` and the policy keys) is
            validated against it; unknown keys are errors. None: no settings.
    """

    name: str = ""
    events: Sequence[str] = ("*",)
    timeout: float | None = None
    concurrency: int | None = None
    queue_size: int | None = None
    queue_bytes: int | None = None
    on_full: OnFull | None = None
    Config: ClassVar[type[BaseModel] | None] = None
    config: ConfigT

    @overload
    def __init__(self: Handler[None]) -> None: ...

    @overload
    def __init__(self, config: ConfigT) -> None: ...

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _take_config_model(cls)
        _adapt_legacy_teardown(cls)

    def matches(self, event: Event) -> bool:
        """A finer filter than ``events``: return False to skip ``event``. Must be cheap."""
        del event
        return True

    async def setup(self, ctx: Context[ConfigT]) -> None:
        """Prepare (open clients, warm caches) before the first event. Raising stops start-up."""

    async def handle(self, event: Event, ctx: Context[ConfigT]) -> None:
        """Act on one event."""
        raise NotImplementedError(f"{type(self).__name__} must implement handle()")

    async def on_error(self, event: Event, error: Exception, ctx: Context[ConfigT]) -> None:
        """Called when :meth:`handle` raised ``error`` or overran its timeout (a
        :class:`TimeoutError`), after the daemon logged and counted it.

        It runs in the handler's worker, before the call's next event, within the handler's
        timeout. Whatever it raises is logged; nothing else happens.
        """

    async def teardown(self, ctx: Context[ConfigT]) -> None:
        """Release what :meth:`setup` took; called on stop and when a reload removes it."""

    def status(self) -> str | None:
        """A few words for the service status line (``systemctl status``), or None."""
        return None


def _take_config_model(cls: type[Handler[Any]]) -> None:
    """Set ``cls.Config`` from ``Handler[Model]``, the one place the loader reads it."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = typing.get_origin(base)
        arguments = typing.get_args(base)
        if not (isinstance(origin, type) and issubclass(origin, Handler)) or len(arguments) != 1:
            continue
        (model,) = arguments
        if model is type(None):
            model = None
        elif isinstance(model, TypeVar) or model is Any:
            # A generic subclass (its own subclasses name the model), or no model named.
            continue
        elif not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"{cls.__qualname__}: Handler[...] takes a pydantic model or None")
        declared = cls.__dict__.get("Config", model)
        if declared is not model:
            raise TypeError(
                f"{cls.__qualname__}: Config is {declared!r} but Handler[...] says {model!r}; "
                "drop the Config attribute"
            )
        cls.Config = model


def _adapt_legacy_teardown(cls: type[Handler[Any]]) -> None:
    """Keep ``teardown(self)`` overrides, written before it was given a context, working."""
    legacy = cls.__dict__.get("teardown")
    if legacy is None or _takes_context(legacy):
        return
    # stacklevel 3: the plugin's class statement, where the fix goes, not this module.
    warnings.warn(
        f"{cls.__module__}.{cls.__qualname__}.teardown(self) is deprecated: "
        "define teardown(self, ctx)",
        DeprecationWarning,
        stacklevel=3,
    )

    @functools.wraps(legacy)
    async def teardown(self: Handler[Any], ctx: Context[Any]) -> None:
        del ctx
        await legacy(self)

    cls.teardown = teardown  # type: ignore[method-assign]


def _takes_context(method: Callable[..., Any]) -> bool:
    try:
        inspect.signature(method).bind(None, None)
    except TypeError:
        return False
    return True


HandlerFunction: TypeAlias = Callable[[Event, Context[None]], Awaitable[None]]
ErrorHook: TypeAlias = Callable[[Event, Exception, Context[None]], Awaitable[None]]


class FunctionHandler(Handler[None]):
    """A plain async function as a handler (made by :func:`handler` or by the loader)."""

    def __init__(
        self,
        function: HandlerFunction,
        *,
        name: str,
        events: Sequence[str] = ("*",),
        when: Callable[[Event], bool] | None = None,
        on_error: ErrorHook | None = None,
        **policy: Unpack[Policy],
    ) -> None:
        super().__init__()
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"handler {name!r} must be an async function")
        if on_error is not None and not inspect.iscoroutinefunction(on_error):
            raise TypeError(f"the on_error hook of handler {name!r} must be an async function")
        self.function = function
        self.name = name
        self.events = tuple(events)
        self._when = when
        self._on_error = on_error
        vars(self).update(policy)

    def matches(self, event: Event) -> bool:
        return self._when is None or self._when(event)

    async def handle(self, event: Event, ctx: Context[None]) -> None:
        await self.function(event, ctx)

    async def on_error(self, event: Event, error: Exception, ctx: Context[None]) -> None:
        if self._on_error is not None:
            await self._on_error(event, error, ctx)


def handler(
    *,
    events: Sequence[str] = ("*",),
    name: str | None = None,
    when: Callable[[Event], bool] | None = None,
    on_error: ErrorHook | None = None,
    **policy: Unpack[Policy],
) -> Callable[[HandlerFunction], Handler[None]]:
    """Turn an async function into a handler.

    Args:
        events: event-name globs to subscribe to.
        name: the handler's name (default: the function's name).
        when: an extra, cheap filter on the event (the function form of
            :meth:`Handler.matches`).
        on_error: an async ``(event, error, ctx)`` called when the function raised or timed
            out (the function form of :meth:`Handler.on_error`).
        policy: ``timeout``, ``concurrency``, ``queue_size``, ``queue_bytes``, ``on_full``
            (see :class:`Policy`); the handler's ``[[handlers]]`` table overrides them.

    Raises:
        TypeError: at decoration time, if the function or the hook is not ``async def``.
    """

    def decorate(function: HandlerFunction) -> Handler[None]:
        return FunctionHandler(
            function,
            name=name or function.__name__,
            events=events,
            when=when,
            on_error=on_error,
            **policy,
        )

    return decorate
