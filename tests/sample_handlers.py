"""Handlers for the loader tests, importable as ``tests.sample_handlers:<name>``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from listener.core.events import Event
from listener.dispatch.handler import Context, Handler, handler

__all__ = [
    "BrokenSetup",
    "Greeter",
    "Lenient",
    "NotAHandler",
    "Shadowing",
    "plain",
    "tagged",
]


class Greeter(Handler):
    name = "greeter"
    events = ("incoming_call",)

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        greeting: str
        times: int = 1

    async def handle(self, event: Event, ctx: Context) -> None:
        ctx.log.info("greeting", greeting=self.config.greeting)


class Lenient(Handler):
    """Its model does not forbid unknown keys; the loader must anyway."""

    class Config(BaseModel):
        greeting: str = "hi"


class Shadowing(Handler):
    """Its model declares a key the dispatcher owns, which would never reach it."""

    class Config(BaseModel):
        timeout: float = 1.0


class BrokenSetup(Handler):
    name = "broken-setup"

    async def setup(self, ctx: Context) -> None:
        raise OSError("cannot reach the CRM")


async def plain(event: Event, ctx: Context) -> None:
    del event, ctx


@handler(events=["call_*"], name="tagged-calls")
async def tagged(event: Event, ctx: Context) -> None:
    del event, ctx


NotAHandler = 42
