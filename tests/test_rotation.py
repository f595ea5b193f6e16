"""Token rotation under load, against a real fake Sippet on loopback: nothing lost, nothing
doubled, however many events the handover holds back or however its old socket ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx

from listener.core.events import Event
from listener.realtime.session import Session
from listener.realtime.tokens import TokenSource
from listener.testing import FakeSippet
from tests.conftest import Collector, fast_settings


class SlowCollector(Collector):
    """A handler that is behind: every event makes the intake wait ``delay`` seconds
    (the back-pressure of a full handler queue), so the sockets' frames pile up unread."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def __call__(self, event: Event) -> Awaitable[Any]:
        super().__call__(event)
        return asyncio.sleep(self.delay)


@contextlib.asynccontextmanager
async def running(
    fake: FakeSippet, http: httpx.AsyncClient, collector: Collector, **overrides: Any
) -> AsyncIterator[Session]:
    session = Session(
        fast_settings(fake.base_url, **overrides),
        TokenSource(http, fake.base_url, fake.api_key),
        collector,
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
    events = SlowCollector(0.002)
    async with running(fake, http, events, rotate_at=0.5) as session:
        sent = await burst(fake, 0, 10)
        await fake.wait_until(lambda: fake.joins >= 2)
        sent = await burst(fake, sent, 300)
        while session.rotations == 0:
            sent = await burst(fake, sent, 2)
            await asyncio.sleep(0.005)
        await drained(fake, events)
    assert session.rotations == 1
    assert session.reconnects == 0
    seqs = events.payloads("seq")[:-1]
    assert sorted(seqs) == list(range(sent)), "lost or duplicated events"
    assert seqs == list(range(sent)), "events out of order"


async def test_a_heartbeat_reply_behind_a_large_event_does_not_cost_the_event(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    # The reply to a heartbeat queues behind a 24 MB event (Sippet's AI audits run to several
    # MB) that takes longer than an interval to arrive: the link is busy, not deaf, and
    # dropping it would throw the event away half-received.
    events = Collector()
    async with running(fake, http, events, heartbeat_interval=0.02) as session:
        link = session.connection
        await fake.broadcast("ai_audit", {"seq": 0, "blob": "x" * (24 * 1024 * 1024)})
        await events.wait_for(1)
        # Two more heartbeats answered: the link lives on.
        beats = fake.heartbeats
        await fake.wait_until(lambda: fake.heartbeats >= beats + 2)
        assert link is not None
        assert not link.closed, "a busy link was taken for a deaf one"
    assert session.reconnects == 0
