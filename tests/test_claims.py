"""Each handler runs once per event across instances sharing a store (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path

import psycopg
import pytest

from listener.cluster.claims import Claims
from listener.cluster.database import make_pool
from listener.cluster.store import SharedStore
from listener.cluster.url import StoreUrl
from listener.core import metrics
from listener.core.events import Event
from listener.dispatch.dispatcher import Dispatcher, HandlerRunner, RunnerSettings
from listener.dispatch.handler import Context, FunctionHandler
from listener.testing import FakeSippet, running_daemon, settle
from tests.tcpproxy import proxied


def event(n: int) -> Event:
    return Event("transcript_delta", {"seq": n}, "events", 0.0, id=f"evt_{n}")


async def test_three_instances_claiming_the_same_events_each_get_a_disjoint_share(
    store: StoreUrl,
) -> None:
    pools = [make_pool(store, size=4) for _ in range(3)]
    for pool in pools:
        await pool.open(wait=True)
    try:
        instances = [Claims(pool, store, holder) for pool, holder in zip(pools, "abc", strict=True)]
        keys = [(event(n), handler) for n in range(150) for handler in ("log", "rpc")]
        # All ask for every (event, handler) at once, each in an order of its own, as
        # instances hearing one stream do: their batches overlap in every way (and must
        # never deadlock).
        asks: list[tuple[str, str, Awaitable[bool]]] = []
        for seed, claims in enumerate(instances):
            mine = list(keys)
            random.Random(seed).shuffle(mine)
            asks += [(ev.id, handler, claims.claim(ev, handler, 30)) for ev, handler in mine]
        granted = await asyncio.gather(*(ask for *_, ask in asks))
        for claims in instances:
            await claims.close()
    finally:
        for pool in pools:
            await pool.close()
    winners = Counter(
        (ev_id, handler) for (ev_id, handler, _), ok in zip(asks, granted, strict=True) if ok
    )
    assert len(winners) == 300
    assert set(winners.values()) == {1}
    async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
        rows = await (
            await conn.execute("SELECT count(*), count(DISTINCT id) FROM sippet_events")
        ).fetchone()
    assert rows == (150, 150)


async def test_two_daemons_on_one_store_run_each_handler_once_per_event(
    fake: FakeSippet, store: StoreUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The harness takes its store as an argument only: the environment is not looked at.
    monkeypatch.setenv("SIPPET_STORE_URL", "postgresql://nobody@127.0.0.1:1/none")
    handled: list[tuple[str, str, str]] = []

    def recorder(instance: str, name: str) -> FunctionHandler:
        async def record(ev: Event, ctx: Context[None]) -> None:
            handled.append((instance, name, ev.id))

        return FunctionHandler(record, name=name)

    skipped = metrics.HANDLER_OUTCOMES.labels(handler="crm", outcome="elsewhere")
    skipped_before = skipped.value
    async with (
        running_daemon(
            fake, [recorder("one", "audit"), recorder("one", "crm")], store=store.conninfo
        ) as one,
        running_daemon(
            fake, [recorder("two", "audit"), recorder("two", "crm")], store=store.conninfo
        ) as two,
    ):
        for n in range(30):
            await fake.call_event("incoming_call", f"call-{n}")
            await fake.broadcast("transcript_delta", {"callUuid": f"call-{n}", "text": "hi"})
            await fake.call_event("call_ended", f"call-{n}")
        for daemon in (one, two):
            await settle(daemon, 90)
    # Both instances heard everything; between them, each handler ran once per event.
    assert (one.dispatcher.received, two.dispatcher.received) == (90, 90)
    per_handler = Counter((name, ev_id) for _, name, ev_id in handled)
    assert len(per_handler) == 2 * 90
    assert set(per_handler.values()) == {1}
    # The instance that lost a claim counted it.
    assert skipped.value - skipped_before == 90


async def test_while_the_store_does_not_answer_handlers_run_without_a_wait_per_event(
    store: StoreUrl, tmp_path: Path
) -> None:
    async with proxied(store) as (proxy, via):
        pool = make_pool(via, size=1, connect_timeout=2)
        await pool.open(wait=True)
        seen: list[str] = []

        async def record(ev: Event, ctx: Context[None]) -> None:
            seen.append(ev.id)

        def instance() -> Dispatcher:
            runner = HandlerRunner(
                FunctionHandler(record, name="audit"),
                RunnerSettings("audit", concurrency=1),
                Context(rpc=None, config=None, name="audit", state_dir=tmp_path),  # type: ignore[arg-type]
                Claims(pool, via, "a", timeout=0.3),
            )
            dispatcher = Dispatcher([runner])
            dispatcher.start()
            return dispatcher

        first, second = instance(), instance()
        try:
            first.submit(event(1))
            await first.drain()
            proxy.freeze()
            # One handler at a time: each unanswered claim waiting its 0.3 s would take 6 s.
            for n in range(2, 22):
                first.submit(event(n))
            async with asyncio.timeout(2):
                await first.drain()
            # Better twice than never: the unanswered claims still ran the handler.
            assert seen == [f"evt_{n}" for n in range(1, 22)]
            # Back in touch, another instance hearing the first event is told no.
            proxy.thaw()
            second.submit(event(1))
            await second.drain()
            assert len(seen) == 21
            await first.stop(1)
            await second.stop(1)
        finally:
            proxy.thaw()
            await pool.close()


async def test_prune_forgets_old_events_with_their_claims(store: StoreUrl) -> None:
    shared = SharedStore(store, holder="a")
    await shared.open()
    try:
        for n in range(3):
            assert await shared.claims.claim(event(n), "audit", 30)
        async with await psycopg.AsyncConnection.connect(store.conninfo, autocommit=True) as conn:
            await conn.execute(
                "UPDATE sippet_events SET recorded_at = now() - interval '2 hours'"
                " WHERE id <> 'evt_2'"
            )
            assert await shared.prune(3600) == 2
            assert await shared.prune(3600) == 0
            left = await (await conn.execute("SELECT event_id FROM sippet_claims")).fetchall()
        assert left == [("evt_2",)]
        # A forgotten event is new again (it is older than any id window or call retention).
        assert await shared.claims.claim(event(0), "audit", 30)
    finally:
        await shared.close()


async def test_a_claim_lapsed_unfinished_is_found_and_taken_over_once(store: StoreUrl) -> None:
    pools = [make_pool(store, size=2), make_pool(store, size=2)]
    for pool in pools:
        await pool.open(wait=True)
    try:
        dead, alive = (
            Claims(pool, store, name, grace=0.3) for pool, name in zip(pools, "ab", strict=True)
        )
        lapsing, finished = event(1), event(2)
        assert await dead.claim(lapsing, "audit", 0)
        assert await dead.claim(finished, "audit", 0)
        dead.done(finished, "audit")
        await dead.flush()
        # While the lease runs, nobody else may take it, and it is not lapsed yet.
        assert not await alive.claim(lapsing, "audit", 30)
        assert await alive.expired() == []
        await asyncio.sleep(0.4)
        [(found, handler)] = await alive.expired()
        assert (found, handler) == (lapsing, "audit")
        # The first to claim it again takes it over; the lease is then fresh.
        assert await alive.claim(found, "audit", 30)
        assert not await dead.claim(found, "audit", 30)
        assert await alive.expired() == []
        # A finished one is never taken over.
        assert not await alive.claim(finished, "audit", 30)
    finally:
        for pool in pools:
            await pool.close()


async def test_a_gap_both_instances_shared_is_reconciled_by_each_and_handled_once(
    fake: FakeSippet, store: StoreUrl
) -> None:
    handled: list[tuple[str, str, str | None, str]] = []
    arrived = asyncio.Condition()

    def recorder(instance: str) -> FunctionHandler:
        async def record(ev: Event, ctx: Context[None]) -> None:
            handled.append((instance, ev.name, ev.call_key, ev.origin))
            async with arrived:
                arrived.notify_all()

        return FunctionHandler(record, name="audit", events=["incoming_call", "call_*"])

    reconcile = {"reconcile": True}
    async with (
        running_daemon(fake, [recorder("one")], calls=reconcile, store=store.conninfo) as one,
        running_daemon(fake, [recorder("two")], calls=reconcile, store=store.conninfo) as two,
    ):
        await fake.call_event("incoming_call", "c-1")
        await fake.outage(1.0)
        # Nobody hears these.
        await fake.call_event("call_answered", "c-1")
        await fake.call_event("incoming_call", "c-2")
        async with asyncio.timeout(15), arrived:
            await arrived.wait_for(lambda: len(handled) >= 3)
        for daemon in (one, two):
            await daemon.dispatcher.drain()
        await asyncio.sleep(0.3)
        # Each instance's own map has what the gap hid (its handlers see it as ctx.call).
        for daemon in (one, two):
            answered, ringing = daemon.tracker.get("c-1"), daemon.tracker.get("c-2")
            assert answered is not None
            assert ringing is not None
            assert (answered.status, ringing.status) == ("answered", "ringing")
    transitions = sorted((name, key, origin) for _, name, key, origin in handled)
    assert transitions == [
        ("call_answered", "c-1", "reconcile"),
        ("incoming_call", "c-1", "realtime"),
        ("incoming_call", "c-2", "reconcile"),
    ]


async def test_a_daemon_started_while_the_store_is_down_runs_and_uses_it_once_it_is_up(
    fake: FakeSippet, store: StoreUrl
) -> None:
    seen: list[str] = []

    async def record(ev: Event, ctx: Context[None]) -> None:
        seen.append(ev.id)

    async with proxied(store) as (proxy, via):
        proxy.refusing = True
        handler = FunctionHandler(record, name="audit")
        async with running_daemon(fake, [handler], store=via.conninfo) as daemon:
            shared = daemon.store
            assert shared is not None
            assert not shared.ready.is_set()
            assert "store not answering" in daemon.status_line()
            # Without the store the handler runs all the same (no claim to take).
            await fake.broadcast("transcript_delta", {"n": 1})
            await settle(daemon, 1)
            proxy.refusing = False
            async with asyncio.timeout(15):
                await shared.ready.wait()
            await fake.broadcast("transcript_delta", {"n": 2})
            await settle(daemon, 2)
            assert "store not answering" not in daemon.status_line()
    assert len(seen) == 2
    async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
        claimed = await (await conn.execute("SELECT event_id FROM sippet_claims")).fetchall()
    assert claimed == [(seen[1],)]
