"""Handlers for the loader tests, importable as ``tests.sample_handlers:<name>``."""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel, ConfigDict

from listener import Context, Event, Handler, handler

__all__ = [
    "BadPolicy",
    "BrokenSetup",
    "Declared",
    "Greeter",
    "Journal",
    "Lenient",
    "NotAHandler",
    "Shadowing",
    "plain",
    "tagged",
]


class Greeter(Handler):
    """Written before the generics: a nested ``Config`` and no type parameter."""

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


class BrokenSetup(Handler[None]):
    name = "broken-setup"

    async def setup(self, ctx: Context[None]) -> None:
        raise OSError("cannot reach the CRM")


class Declared(Handler[None]):
    """Declares its dispatcher policy in code."""

    timeout = 2.5
    concurrency = 1
    on_full = "drop"


class BadPolicy(Handler[None]):
    concurrency = 0


async def plain(event: Event, ctx: Context[None]) -> None:
    del event, ctx


@handler(events=["call_*"], name="tagged-calls", timeout=4.0, queue_size=50)
async def tagged(event: Event, ctx: Context[None]) -> None:
    del event
    ctx.log.info("tagged")


class Journal(Handler):
    """Appends ``start <pid> <id>`` to ``path``, then ``done <pid> <id>`` after ``delay``
    seconds: which process ran what, as another process sees it. With ``field``, each line
    ends with that payload field too."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str
        delay: float = 0.0
        field: str | None = None

    def _write(self, what: str, event: Event) -> None:
        extra = "" if self.config.field is None else f" {event.field(self.config.field)}"
        # One short O_APPEND write per line: lines of several processes never interleave.
        with open(self.config.path, "a", encoding="utf-8") as journal:
            journal.write(f"{what} {os.getpid()} {event.id}{extra}\n")

    async def handle(self, event: Event, ctx: Context) -> None:
        self._write("start", event)
        await asyncio.sleep(self.config.delay)
        self._write("done", event)


NotAHandler = 42
