"""The public API's types, pinned: mypy checks this file (see pyproject.toml); nothing runs it.

Every ``assert_type`` is what a plugin author's type checker sees; every
``# type: ignore[code]`` is a mistake it must catch (``warn_unused_ignores`` fails the check
the day one stops being caught).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, assert_type

from pydantic import BaseModel
from structlog.typing import FilteringBoundLogger

from listener import Context, Event, Handler, RpcClient, ValidationResult, handler


class NotifyConfig(BaseModel):
    url: str
    retries: int = 2


class Notify(Handler[NotifyConfig]):
    events = ("call_ended",)
    timeout = 5.0
    on_full = "drop"

    async def setup(self, ctx: Context[NotifyConfig]) -> None:
        assert_type(ctx.config, NotifyConfig)
        assert_type(ctx.event, Event | None)
        assert_type(ctx.state_dir, Path)

    async def handle(self, event: Event, ctx: Context[NotifyConfig]) -> None:
        assert_type(self.config, NotifyConfig)
        assert_type(self.config.retries, int)
        assert_type(ctx.config, NotifyConfig)
        assert_type(ctx.rpc, RpcClient)
        assert_type(ctx.log, FilteringBoundLogger)
        assert_type(ctx.name, str)
        # run() returns the envelope's data, decoded JSON of any shape.
        assert_type(await ctx.rpc.run("who_am_i", fields=["id"]), Any)
        assert_type(await ctx.rpc.validate("end_call", input={}), ValidationResult)
        async for item in ctx.rpc.pages("list_contacts", fields=["id"]):
            assert_type(item, dict[str, Any])
        await ctx.rpc.run("end_call", input=["not", "a", "mapping"])  # type: ignore[arg-type]

    async def on_error(self, event: Event, error: Exception, ctx: Context[NotifyConfig]) -> None:
        assert_type(ctx.for_event(event), Context[NotifyConfig])

    async def teardown(self, ctx: Context[NotifyConfig]) -> None:
        assert_type(ctx.config.url, str)


class Ping(Handler[None]):
    async def handle(self, event: Event, ctx: Context[None]) -> None:
        assert_type(self.config, None)
        assert_type(ctx.config, None)


class Untyped(Handler):
    """Written before the generics: ``config`` is Any, as it always was."""

    async def handle(self, event: Event, ctx: Context) -> None:
        assert_type(self.config, Any)
        assert_type(ctx.config, Any)


Notify(NotifyConfig(url="https://chat.example.com/hook"))
Ping()
Notify(Ping())  # type: ignore[call-overload]
Handler[int]  # type: ignore[type-var]


class Forgetful(Handler[NotifyConfig]):
    def __init__(self) -> None:
        # A handler with settings must pass them on. (mypy does not see ``Notify()`` itself:
        # it does not hold a constructor's self-typed overloads against a subclass.)
        super().__init__()  # type: ignore[call-arg]


class Policy(Handler[None]):
    concurrency = "eight"  # type: ignore[assignment]
    on_full = "block"  # type: ignore[assignment]


@handler(events=["call_*"], name="greet", when=lambda event: event.call_key is not None)
async def greet(event: Event, ctx: Context[None]) -> None:
    assert_type(ctx.rpc, RpcClient)


assert_type(greet, Handler[None])


async def alert(event: Event, error: Exception, ctx: Context[None]) -> None:
    ctx.log.warning("handler failed", error=str(error))


@handler(timeout=2.5, concurrency=1, queue_size=100, queue_bytes=1 << 20, on_error=alert)
async def guarded(event: Event, ctx: Context[None]) -> None:
    pass


@handler(timeout="soon")  # type: ignore[arg-type]
async def late(event: Event, ctx: Context[None]) -> None:
    pass


@handler(on_full="block")  # type: ignore[arg-type]
async def blocking(event: Event, ctx: Context[None]) -> None:
    pass


@handler()  # type: ignore[arg-type]
def not_async(event: Event, ctx: Context[None]) -> None:
    pass


@handler()  # type: ignore[arg-type]
async def wants_settings(event: Event, ctx: Context[NotifyConfig]) -> None:
    pass
