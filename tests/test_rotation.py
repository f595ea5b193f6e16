"""Token rotation under load, against a real fake Sippet on loopback: nothing lost, nothing
doubled, however long the handover's held events take to deliver."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx

from listener.core.events import Event
from listener.realtime.connection import EventSink
from listener.realtime.session import Session
from listener.realtime.tokens import TokenSource
from listener.testing import FakeSippet
from tests.conftest import Collector, fast_settings


def slowly(collector: Collector, delay: float) -> EventSink:
    """A handler that is behind: every event makes the intake wait ``delay`` seconds
    (the back-pressure of a full handler queue), so the sockets' frames pile up unread."""

    def deliver(event: Event) -> Awaitable[Any]:
        collector(event)
        return asyncio.sleep(delay)

    return deliver


@contextlib.asynccontextmanager
async def running(
    fake: FakeSippet, http: httpx.AsyncClient, deliver: EventSink, **overrides: Any
) -> AsyncIterator[Session]:
    session = Session(
        fast_settings(fake.base_url, **overrides),
        TokenSource(http, fake.base_url, fake.api_key),
        deliver,
    )
    task = asyncio.create_task(session.run())
    try:
        async with asyncio.timeout(10):
            await session.joined.wait()
        yield session
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await session.stop()


async def burst(fake: FakeSippet, start: int, count: int, pad: int = 0) -> int:
    for seq in range(start, start + count):
        payload = {"callUuid": f"c-{seq}", "seq": seq, "pad": "x" * pad}
        await fake.broadcast("incoming_call", payload)
    return start + count


async def drained(fake: FakeSippet, events: Collector) -> None:
    """Wait until a marker sent now has been delivered: everything before it has been too,
    or never will be."""
    await fake.broadcast("marker", {"seq": -1})
    while not events.events or events.events[-1].name != "marker":
        await events.wait_for(len(events.events) + 1)


async def test_events_arriving_while_held_events_are_delivered_are_not_lost(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    # A backlog on the new socket takes a while to deliver at the handler's pace; the new
    # socket goes on hearing events meanwhile, and they must follow the backlog.
    fake.token_ttl = 2.0
    events = Collector()
    async with running(fake, http, slowly(events, 0.002), rotate_at=0.5) as session:
        sent = await burst(fake, 0, 10)
        await fake.wait_until(lambda: fake.joins >= 2)
        sent = await burst(fake, sent, 300)
        # 100 events/s, under the handler's pace, until the rotation is over (and the held
        # events go on behind it, the later ones behind them).
        while session.rotations == 0:
            sent = await burst(fake, sent, 2)
            await asyncio.sleep(0.02)
        await drained(fake, events)
    # A second one may come while the backlog drains on a busy machine: a rotation no longer
    # waits for the events it held back.
    assert session.rotations >= 1
    assert session.reconnects == 0
    seqs = events.payloads("seq")[:-1]
    assert sorted(seqs) == list(range(sent)), "lost or duplicated events"
    assert seqs == list(range(sent)), "events out of order"
