"""Claims asked as events are queued, and staged handlers, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg

from listener.cluster.claims import Claims
from listener.cluster.database import make_pool
from listener.cluster.spool import Spool
from listener.cluster.url import StoreUrl
from listener.core import metrics
from listener.core.events import Event
from listener.dispatch.dispatcher import Dispatcher, HandlerRunner, RunnerSettings
from listener.dispatch.handler import Context, FunctionHandler, Handler
from listener.testing.receiver import WebhookReceiver
from listener.webhooks.config import WebhookConfig
from listener.webhooks.handler import WebhookHandler
from listener.webhooks.shared_outbox import open_shared
from tests.test_webhook_handler import SECRET


def call_event(n: int) -> Event:
    """The ``n``-th event of one call."""
    return Event.create(
        "transcript_delta", {"callUuid": "call-1", "n": n}, "events", 0.0, id=f"evt_{n}"
    )


def event_of(n: int, call: str, size: int = 0) -> Event:
    """Event ``n`` (``evt_n``), of ``call``."""
    return Event.create(
        "transcript_delta", {"callUuid": call, "n": n}, "events", 0.0, size, id=f"evt_{n}"
    )


def context(tmp_path: Path) -> Context[None]:
    return Context(rpc=None, config=None, name="audit", state_dir=tmp_path)  # type: ignore[arg-type]


@asynccontextmanager
async def instance(
    store: StoreUrl, tmp_path: Path, holder: str, **options: Any
) -> AsyncIterator[Claims]:
    pool = make_pool(store, size=2)
    await pool.open(wait=True)
    spool = Spool(tmp_path / holder)
    await spool.open()
    claims = Claims(pool, store, holder, spool, **options)
    try:
        yield claims
    finally:
        await claims.close()
        await spool.close()
        await pool.close()


async def claims_of(store: StoreUrl) -> dict[str, tuple[str, Any, bool]]:
    """Each claim of the ``audit`` handler: its holder, its lease's end, whether it is done."""
    async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
        rows = await (
            await conn.execute(
                "SELECT event_id, holder, lease_until, done_at IS NOT NULL FROM sippet_claims"
                " WHERE handler = 'audit'"
            )
        ).fetchall()
    return {event_id: (holder, lease, done) for event_id, holder, lease, done in rows}


async def until_claimed(store: StoreUrl, ids: set[str]) -> dict[str, tuple[str, Any, bool]]:
    async with asyncio.timeout(5):
        # The store has no event to wait on.
        while not ids <= (found := await claims_of(store)).keys():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return found


class Gated:
    """A handler that notes each event, then waits until the test opens its gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.handled: list[str] = []

    async def record(self, ev: Event, ctx: Context[None]) -> None:
        self.handled.append(ev.id)
        await self.gate.wait()

    def runner(self, claims: Claims, tmp_path: Path, **settings: Any) -> HandlerRunner:
        return HandlerRunner(
            FunctionHandler(self.record, name="audit"),
            RunnerSettings("audit", **settings),
            context(tmp_path),
            claims,
        )


async def one_worker_two_calls_claimed(
    claims: Claims, store: StoreUrl, tmp_path: Path, handle: Any
) -> Dispatcher:
    """A started dispatcher whose one worker handles ``evt_1`` (of ``call-1``) with
    ``handle`` while ``evt_2`` (of ``call-2``), claimed at intake, waits; once both claims
    are in the store."""
    runner = HandlerRunner(
        FunctionHandler(handle, name="audit"),
        RunnerSettings("audit", concurrency=1),
        context(tmp_path),
        claims,
    )
    dispatcher = Dispatcher([runner])
    dispatcher.start()
    dispatcher.submit(event_of(1, "call-1"))
    dispatcher.submit(event_of(2, "call-2"))
    await until_claimed(store, {"evt_1", "evt_2"})
    return dispatcher


async def test_a_queued_events_claim_is_taken_at_intake_a_calls_later_event_after_its_first(
    store: StoreUrl, tmp_path: Path
) -> None:
    gated = Gated()
    handled = gated.handled
    async with instance(store, tmp_path, "a") as a, instance(store, tmp_path, "b") as b:
        dispatcher = Dispatcher([gated.runner(a, tmp_path, concurrency=1)])
        dispatcher.start()
        try:
            first, other, second = call_event(1), event_of(4, "call-2"), call_event(2)
            for event in (first, other, second):
                dispatcher.submit(event)
            # The first event holds the one worker; the other call's event, queued behind
            # it, is claimed already. The first call's second event is claimed only after
            # its first (so that it would follow it into the spool, never pass it).
            found = await until_claimed(store, {"evt_1", "evt_4"})
            assert handled == ["evt_1"]
            assert {holder for holder, _, _ in found.values()} == {"a"}
            assert "evt_2" not in found
            # Another instance hearing it is told no.
            assert await b.claim(other, "audit", 30) is False
            gated.gate.set()
            await dispatcher.drain()
            await a.flush()
        finally:
            await dispatcher.stop(1)
    assert handled == ["evt_1", "evt_4", "evt_2"]
    assert all(done for _, _, done in (await claims_of(store)).values())


async def test_a_claim_asked_long_before_its_handler_starts_is_renewed_or_left_to_its_taker(
    store: StoreUrl, tmp_path: Path
) -> None:
    gated = Gated()
    handled = gated.handled
    elsewhere = metrics.HANDLER_OUTCOMES.labels(handler="audit", outcome="elsewhere")
    before = elsewhere.value
    # A grace of 0.2 s: a claim asked 0.1 s before its handler starts is renewed first.
    async with instance(store, tmp_path, "a", grace=0.2) as a:
        assert a.fresh_for == 0.1
        dispatcher = Dispatcher([gated.runner(a, tmp_path, timeout=5, concurrency=2)])
        dispatcher.start()
        try:
            # Five calls: two held by the workers, two claimed as they queue (twice the
            # concurrency pending at most), the fifth claimed as a worker takes it.
            for n in (1, 2, 3, 4, 5):
                dispatcher.submit(event_of(n, f"call-{n}"))
            asked = await until_claimed(store, {"evt_1", "evt_2", "evt_3", "evt_4"})
            assert "evt_5" not in asked
            await asyncio.sleep(0.15)
            # The fourth one's lease passed meanwhile, and another instance took it over.
            async with await psycopg.AsyncConnection.connect(
                store.conninfo, autocommit=True
            ) as conn:
                await conn.execute("UPDATE sippet_claims SET holder = 'b' WHERE event_id = 'evt_4'")
            gated.gate.set()
            await dispatcher.drain()
        finally:
            await dispatcher.stop(1)
    after = await claims_of(store)
    assert handled == ["evt_1", "evt_2", "evt_3", "evt_5"]
    assert elsewhere.value == before + 1
    # Renewed as its handler started: its lease ends later than the one asked at intake.
    assert after["evt_3"][1] > asked["evt_3"][1]
    assert after["evt_4"][:2] == ("b", asked["evt_4"][1])


class Staging(Handler[None]):
    """Stages each event (noted), then waits in handle() until the test lets it finish."""

    name = "audit"

    def __init__(self) -> None:
        super().__init__()
        self.staged: list[str] = []
        self.finished: list[str] = []
        self.waits: dict[str, asyncio.Future[None]] = {}
        self.both_staged = asyncio.Event()

    def stage_event(self, event: Event) -> bool:
        if event.id in self.waits:
            return False
        self.waits[event.id] = asyncio.get_running_loop().create_future()
        self.staged.append(event.id)
        if len(self.staged) == 2:
            self.both_staged.set()
        return True

    async def handle(self, event: Event, ctx: Context[None]) -> None:
        await self.waits[event.id]
        self.finished.append(event.id)


async def test_a_staged_handler_stages_the_next_event_while_the_first_waits_each_done_after_it(
    store: StoreUrl, tmp_path: Path
) -> None:
    handler = Staging()
    async with instance(store, tmp_path, "a") as a:
        runner = HandlerRunner(handler, RunnerSettings("audit"), context(tmp_path), a)
        dispatcher = Dispatcher([runner])
        dispatcher.start()
        try:
            dispatcher.submit(call_event(1))
            dispatcher.submit(call_event(2))
            async with asyncio.timeout(5):
                await handler.both_staged.wait()
            # In the call's order, and both still pending: a drain waits for them.
            assert handler.staged == ["evt_1", "evt_2"]
            assert runner.pending == 2
            await a.flush()
            assert [done for _, _, done in (await claims_of(store)).values()] == [False, False]
            handler.waits["evt_2"].set_result(None)
            handler.waits["evt_1"].set_result(None)
            await dispatcher.drain()
            await a.flush()
        finally:
            await dispatcher.stop(1)
    assert sorted(handler.finished) == ["evt_1", "evt_2"]
    assert all(done for _, _, done in (await claims_of(store)).values())


async def test_a_webhook_handler_stages_on_the_shared_store_only_and_handle_awaits_that_commit(
    store: StoreUrl, tmp_path: Path
) -> None:
    async with WebhookReceiver() as receiver:
        config = WebhookConfig.model_validate({"url": receiver.url, "secret": SECRET})
        alone, shared = WebhookHandler(config), WebhookHandler(config)
        shared.shared_outbox = functools.partial(open_shared, store, holder="a")
        ctx = Context(rpc=None, config=config, name="hooks", state_dir=tmp_path)  # type: ignore[arg-type]
        for handler in (alone, shared):
            await handler.setup(ctx)
        try:
            # On SQLite alone nothing is staged: handle() does it all.
            assert not alone.stage_event(call_event(1))
            staged = call_event(2)
            assert shared.stage_event(staged)
            assert not shared.stage_event(staged)
            await shared.handle(staged, ctx.for_event(staged))
            # Durable once handle() returns.
            async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
                query = "SELECT msg_id FROM sippet_deliveries"
                rows = await (await conn.execute(query)).fetchall()
            assert rows == [("evt_2",)]
            await receiver.wait_for(1, timeout=10)
        finally:
            for handler in (alone, shared):
                await handler.teardown(ctx)
    assert [request.headers["webhook-id"] for request in receiver.requests] == ["evt_2"]
