"""Each handler runs once per event across instances sharing a store (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import psycopg
import pytest

from listener.cluster.claims import ClaimRefused, Claims
from listener.cluster.database import StoreError, make_pool
from listener.cluster.leader import LeaseSettings
from listener.cluster.spool import Spool, SpoolError
from listener.cluster.store import SharedStore
from listener.cluster.url import StoreUrl
from listener.core import metrics
from listener.core.events import Event
from listener.dispatch.dispatcher import Dispatcher, HandlerRunner, RunnerSettings
from listener.dispatch.handler import Context, FunctionHandler
from listener.service.status_view import view
from listener.testing import FakeSippet, running_daemon, settle
from tests.tcpproxy import proxied


def event(n: int) -> Event:
    return Event("transcript_delta", {"seq": n}, "events", 0.0, id=f"evt_{n}")


async def opened(path: Path) -> Spool:
    spool = Spool(path)
    await spool.open()
    return spool


@contextlib.asynccontextmanager
async def instance(store: StoreUrl, tmp_path: Path, **settings: float) -> AsyncIterator[Claims]:
    """One instance's claims ("a", a pool of one), its spool under ``tmp_path``; all closed
    after."""
    pool = make_pool(store, size=1)
    await pool.open(wait=True)
    claims = Claims(pool, store, "a", await opened(tmp_path / "a"), **settings)
    try:
        yield claims
    finally:
        await claims.close()
        await claims.spool.close()
        await pool.close()


async def test_three_instances_claiming_the_same_events_each_get_a_disjoint_share(
    store: StoreUrl, tmp_path: Path
) -> None:
    pools = [make_pool(store, size=4) for _ in range(3)]
    for pool in pools:
        await pool.open(wait=True)
    try:
        instances = [
            Claims(pool, store, holder, await opened(tmp_path / holder))
            for pool, holder in zip(pools, "abc", strict=True)
        ]
        keys = [(event(n), handler) for n in range(150) for handler in ("log", "rpc")]
        # All ask for every (event, handler) at once, each in an order of its own, as
        # instances hearing one stream do: their batches overlap in every way (and must
        # never deadlock).
        asks: list[tuple[str, str, Awaitable[bool | None]]] = []
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


async def test_while_the_store_is_down_claims_wait_in_the_spool_and_run_once_when_it_is_back(
    store: StoreUrl, tmp_path: Path
) -> None:
    handled: list[tuple[str, str]] = []
    async with proxied(store) as (proxy, via):
        pools = [make_pool(via, size=1, connect_timeout=2) for _ in "ab"]
        claims: list[Claims] = []
        dispatchers: list[Dispatcher] = []
        drains: list[asyncio.Task[None]] = []
        for pool, name in zip(pools, "ab", strict=True):
            await pool.open(wait=True)

            async def record(ev: Event, ctx: Context[None], name: str = name) -> None:
                handled.append((name, ev.id))

            claims.append(Claims(pool, via, name, await opened(tmp_path / name), timeout=0.3))
            runner = HandlerRunner(
                FunctionHandler(record, name="audit"),
                RunnerSettings("audit", concurrency=1),
                Context(rpc=None, config=None, name="audit", state_dir=tmp_path),  # type: ignore[arg-type]
                claims[-1],
            )
            dispatchers.append(Dispatcher([runner]))
            dispatchers[-1].start()

            async def redeliver(ev: Event, handler: str, runner: HandlerRunner = runner) -> None:
                assert handler == "audit"
                await (runner.offer(ev) or asyncio.sleep(0))

            drains.append(asyncio.create_task(claims[-1].drain(redeliver)))
        try:
            for dispatcher in dispatchers:
                dispatcher.submit(event(1))
                await dispatcher.drain()
            proxy.refusing = True
            proxy.cut()
            # One handler at a time: each unanswered claim waiting its 0.3 s would take 6 s.
            async with asyncio.timeout(2):
                for dispatcher in dispatchers:
                    for n in range(2, 22):
                        dispatcher.submit(event(n))
                    await dispatcher.drain()
            # Nobody can tell who takes them: nobody runs them, each instance keeps them.
            assert handled == [("a", "evt_1")]
            assert [c.down for c in claims] == [True, True]
            assert [(c.spool.events, c.spool.entries) for c in claims] == [(20, 20), (20, 20)]
            proxy.refusing = False
            async with asyncio.timeout(10):
                # The spools have no event for being empty: nothing else waits for one.
                while any(c.spool.entries for c in claims):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                for dispatcher in dispatchers:
                    await dispatcher.drain()
            assert not any(c.down for c in claims)
        finally:
            proxy.refusing = False
            for task in drains:
                task.cancel()
            for dispatcher in dispatchers:
                await dispatcher.stop(1)
            for each in claims:
                await each.close()
                await each.spool.close()
            for pool in pools:
                await pool.close()
    # Each event handled once between them, and each instance took its share in order.
    assert sorted(ev_id for _, ev_id in handled) == sorted(f"evt_{n}" for n in range(1, 22))
    for name in "ab":
        mine = [int(ev_id[4:]) for who, ev_id in handled if who == name]
        assert mine == sorted(mine), str(handled)


@pytest.mark.parametrize("asked", ["handed back from the spool", "as the events came"])
async def test_a_claim_won_while_an_earlier_one_of_its_handler_failed_waits_behind_it(
    store: StoreUrl, tmp_path: Path, asked: str
) -> None:
    handled: list[str] = []
    async with proxied(store) as (proxy, via):
        pool = make_pool(via, size=2, connect_timeout=2)
        await pool.open()
        await pool.resize(2, 2)
        await pool.wait()

        async def use(held: asyncio.Barrier) -> None:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
                await held.wait()

        # Both connections used a moment ago, so that the answer lost is a claim's (not
        # the pool's check of a connection it has not handed out yet).
        both = asyncio.Barrier(2)
        await asyncio.gather(use(both), use(both))
        claims = Claims(pool, via, "a", await opened(tmp_path / "a"), timeout=0.3)

        async def record(ev: Event, ctx: Context[None]) -> None:
            handled.append(ev.id)

        runner = HandlerRunner(
            FunctionHandler(record, name="audit"),
            RunnerSettings("audit", concurrency=1),
            Context(rpc=None, config=None, name="audit", state_dir=tmp_path),  # type: ignore[arg-type]
            claims,
        )
        dispatcher = Dispatcher([runner])
        dispatcher.start()

        async def redeliver(ev: Event, handler: str) -> None:
            await (runner.offer(ev) or asyncio.sleep(0))

        # The first claim is answered by the store (which takes it) but the answer is lost
        # with its connection, while the second, asked meanwhile, goes out on the pool's
        # other connection and is won (first, or after the first failed).
        proxy.losing_once = True
        if asked == "handed back from the spool":
            # Spooled during an outage that is over.
            for n in (1, 2):
                await claims.spool.add(event(n), "audit", 5)
        else:
            dispatcher.submit(event(1))
            # A turn apart, so that the two claims go out as two statements.
            await asyncio.sleep(0)
            dispatcher.submit(event(2))
        drain = asyncio.create_task(claims.drain(redeliver))
        try:
            async with asyncio.timeout(10):
                while len(handled) < 2 or claims.spool.entries:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                await dispatcher.drain()
        finally:
            drain.cancel()
            await dispatcher.stop(1)
            await claims.close()
            await claims.spool.close()
            await pool.close()
    assert not proxy.losing_once
    assert handled == ["evt_1", "evt_2"]
    assert not claims.down


async def test_prune_forgets_old_events_with_their_claims(store: StoreUrl, tmp_path: Path) -> None:
    shared = SharedStore(store, tmp_path / "spool", holder="a")
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


async def test_a_claim_lapsed_unfinished_is_found_and_taken_over_once(
    store: StoreUrl, tmp_path: Path
) -> None:
    pools = [make_pool(store, size=2), make_pool(store, size=2)]
    for pool in pools:
        await pool.open(wait=True)
    try:
        dead, alive = [
            Claims(pool, store, name, await opened(tmp_path / name), grace=0.3)
            for pool, name in zip(pools, "ab", strict=True)
        ]
        lapsing, finished = event(1), event(2)
        assert await dead.claim(lapsing, "audit", 0)
        assert await dead.claim(finished, "audit", 0)
        dead.done(finished, "audit")
        await dead.flush()
        # While the lease runs, nobody else may take it, and it is not lapsed yet.
        assert not await alive.claim(lapsing, "audit", 30)
        assert await alive.expired() == []
        async with asyncio.timeout(5):
            # Until the lease has passed, by the database's clock.
            while not (lapsed := await alive.expired()):  # noqa: ASYNC110 (the store has no event)
                await asyncio.sleep(0.02)
        [(found, handler)] = lapsed
        assert (found, handler) == (lapsing, "audit")
        # The first to claim it again takes it over; the lease is then fresh.
        assert await alive.claim(found, "audit", 30)
        assert not await dead.claim(found, "audit", 30)
        assert await alive.expired() == []
        # A finished one is never taken over.
        assert not await alive.claim(finished, "audit", 30)
        async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
            rows = await (
                await conn.execute("SELECT event_id, holder, takeovers FROM sippet_claims")
            ).fetchall()
        assert sorted(rows) == [("evt_1", "b", 1), ("evt_2", "a", 0)]
    finally:
        for pool in pools:
            await pool.close()


async def test_a_gap_both_instances_shared_is_handled_once_and_known_to_both(
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
        # Each instance's own map has what the gap hid (its handlers see it as ctx.call): the
        # leader's from list_calls, the other's from the shared call map, a batch later.
        for daemon in (one, two):
            async with asyncio.timeout(5):
                while not (  # noqa: ASYNC110 (another daemon's batch writes the shared map)
                    (answered := daemon.tracker.get("c-1"))
                    and (ringing := daemon.tracker.get("c-2"))
                    and (answered.status, ringing.status) == ("answered", "ringing")
                ):
                    await asyncio.sleep(0.05)
    transitions = sorted((name, key, origin) for _, name, key, origin in handled)
    assert transitions == [
        ("call_answered", "c-1", "reconcile"),
        ("incoming_call", "c-1", "realtime"),
        ("incoming_call", "c-2", "reconcile"),
    ]


async def test_a_daemon_started_while_the_store_is_down_spools_from_the_first_event(
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
            # Nobody could say whether another instance takes it: it waits.
            await fake.broadcast("transcript_delta", {"n": 1})
            await settle(daemon, 1)
            assert seen == []
            assert "store not answering; 1 events spooled" in daemon.status_line()
            assert daemon.readiness() == (True, "joined; store not answering; 1 events spooled")
            page = dict(
                (row[0], row[1])
                for row in view(daemon.board.snapshot(), admin=False)["tables"]["link"]
            )
            assert page["Shared store"] == {"t": "not answering; 1 events spooled", "c": "bad"}
            proxy.refusing = False
            async with asyncio.timeout(15):
                await shared.ready.wait()
                while shared.claims.spool.entries:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            await fake.broadcast("transcript_delta", {"n": 2})
            await settle(daemon, 2)
            assert "store" not in daemon.status_line()
            assert daemon.readiness() == (True, "joined")
    assert len(seen) == 2
    async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
        rows = await (await conn.execute("SELECT event_id FROM sippet_claims")).fetchall()
    assert sorted(row[0] for row in rows) == sorted(seen)


async def test_a_claim_the_store_refuses_outright_is_neither_spooled_nor_retried(
    store: StoreUrl, tmp_path: Path
) -> None:
    async with instance(store, tmp_path) as claims:
        # No text in PostgreSQL holds a NUL: no later attempt could do better.
        with pytest.raises(ClaimRefused):
            await claims.claim(event(1), "bad\x00name", 30)
        assert (claims.down, claims.spool.entries) == (False, 0)
        assert await claims.claim(event(1), "audit", 30)
        # Nor one that cannot be sent at all (JSON has no integers past 64 bits), and the
        # handler's next claim is not held up behind it.
        unsendable = Event("transcript_delta", {"seq": 2**70}, "events", 0.0, id="evt_big")
        with pytest.raises(ClaimRefused, match="cannot send the claims"):
            await claims.claim(unsendable, "audit", 30)
        assert await claims.claim(event(2), "audit", 30)


async def test_a_claim_won_before_it_was_spooled_is_leased_anew_when_handed_back(
    store: StoreUrl, tmp_path: Path
) -> None:
    answers: list[bool | None] = []
    async with (
        instance(store, tmp_path, timeout=0.3, grace=15) as claims,
        await psycopg.AsyncConnection.connect(store.conninfo, autocommit=True) as conn,
    ):

        async def redeliver(ev: Event, handler: str) -> None:
            answers.append(await claims.claim(ev, handler, 30))

        assert await claims.claim(event(1), "audit", 30)
        # What a long stay in the spool leaves of its lease.
        await conn.execute("UPDATE sippet_claims SET lease_until = now() + interval '1 s'")
        await claims.spool.add(event(1), "audit", 30)
        drain = asyncio.create_task(claims.drain(redeliver))
        try:
            async with asyncio.timeout(10):
                while claims.spool.entries:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        finally:
            drain.cancel()
        cursor = await conn.execute(
            "SELECT extract(epoch FROM lease_until - now()), takeovers FROM sippet_claims"
        )
        [(left, takeovers)] = await cursor.fetchall()
    # Still this instance's, and covering the handler's 30 s and the grace again.
    assert answers == [True]
    assert (float(left) > 40, takeovers) == (True, 0)


async def claim_rows(store: StoreUrl) -> dict[str, tuple[bool, bool]]:
    """Each claim by event id: whether it is marked done, and whether its lease has passed."""
    async with await psycopg.AsyncConnection.connect(store.conninfo, autocommit=True) as conn:
        rows = await (
            await conn.execute(
                "SELECT event_id, done_at IS NOT NULL, lease_until <= now() FROM sippet_claims"
            )
        ).fetchall()
    return {event_id: (done, lapsed) for event_id, done, lapsed in rows}


async def test_a_mark_the_store_does_not_take_is_kept_on_disk_and_a_restart_gives_back_the_rest(
    store: StoreUrl, tmp_path: Path
) -> None:
    path = tmp_path / "spool.sqlite3"
    async with proxied(store) as (proxy, via):
        pool = make_pool(via, size=2, connect_timeout=1)
        await pool.open(wait=True)
        spool = Spool(path)
        await spool.open("a-1")
        first = Claims(pool, via, "a-1", spool, timeout=0.5)
        try:
            for n in (1, 2, 3):
                assert await first.claim(event(n), "audit", 30)
            # Handled; then the store goes away before the mark is written.
            first.done(event(1), "audit")
            proxy.refusing = True
            proxy.cut()
            with pytest.raises(StoreError):
                await first.flush()
            assert spool.marks == 1
            # evt_2 was being handled, evt_3 waited: the process is killed. (Its spool file
            # is closed as the kernel closes it; ``first`` is not: no flush, no goodbye to
            # the store.)
        finally:
            await spool.close()
            await pool.close()
            proxy.refusing = False

    # Another instance on the same state dir at once: refused.
    again = Spool(path)
    await again.open("a-2")
    with pytest.raises(SpoolError, match="state_dir of its own"):
        await Spool(path).open("a-3")
    pool = make_pool(store, size=2)
    await pool.open(wait=True)
    second = Claims(pool, store, "a-2", again)
    try:
        assert (again.previous_holders, again.marks) == (["a-1"], 1)
        assert await second.release(again.previous_holders) == 2
        await again.forget_holders(["a-1"])
        # The kept mark reached the store first: evt_1 is not handed out again.
        assert await claim_rows(store) == {
            "evt_1": (True, False),
            "evt_2": (False, True),
            "evt_3": (False, True),
        }
        assert again.marks == 0
        assert sorted(ev.id for ev, _ in await second.expired()) == ["evt_2", "evt_3"]
    finally:
        await second.close()
        await again.close()
        await pool.close()
    # Each start's name stays until its claims were given back: a start killed before it
    # could (the store away all along) leaves its own, and its predecessor's, to the next.
    for holder, earlier in (("a-3", ["a-2"]), ("a-4", ["a-2", "a-3"])):
        reopened = Spool(path)
        await reopened.open(holder)
        assert (reopened.previous_holders, reopened.marks) == (earlier, 0)
        await reopened.close()


async def test_a_mark_the_store_is_slow_to_take_is_kept_on_disk_meanwhile(
    store: StoreUrl, tmp_path: Path
) -> None:
    async with proxied(store) as (proxy, via):
        pool = make_pool(via, size=2, connect_timeout=5)
        await pool.open(wait=True)
        spool = await opened(tmp_path / "spool.sqlite3")
        claims = Claims(pool, via, "a", spool, timeout=5)
        try:
            for n in (1, 2):
                assert await claims.claim(event(n), "audit", 30)
            claims.done(event(1), "audit")
            proxy.freeze()
            flushing = asyncio.create_task(claims.flush())

            async def on_disk(count: int) -> None:
                async with asyncio.timeout(2):
                    # Written by the spool's thread: nothing to wait on but the count.
                    while spool.marks < count:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)

            await on_disk(1)
            # One taken while that write hangs waits behind it, and is kept on disk too.
            claims.done(event(2), "audit")
            await on_disk(2)
            assert not flushing.done()
            proxy.thaw()
            await flushing
            await claims.flush()
            assert spool.marks == 0
            assert await claim_rows(store) == {"evt_1": (True, False), "evt_2": (True, False)}
        finally:
            proxy.thaw()
            await claims.close()
            await spool.close()
            await pool.close()


async def test_a_new_leader_waits_a_lease_period_before_handing_out_lapsed_claims(
    store: StoreUrl, tmp_path: Path
) -> None:
    pool = make_pool(store, size=2)
    await pool.open(wait=True)
    other = Claims(pool, store, "b", await opened(tmp_path / "b"), grace=0.0)
    lease = LeaseSettings(ttl=1.0, renew_every=0.1)
    leader = SharedStore(store, tmp_path / "a" / "spool", holder="a", lease=lease)
    handed: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()

    async def redeliver(ev: Event, handler: str) -> None:
        handed.append((ev.id, loop.time()))

    try:
        # Both lapse at once (no lease beyond the handler's timeout of 0): evt_1 was done
        # and its mark reaches the store a moment after the leader took over, evt_2 never.
        assert await other.claim(event(1), "audit", 0)
        assert await other.claim(event(2), "audit", 0)
        await leader.open()
        running = asyncio.create_task(leader.run(3600, redeliver))
        await asyncio.wait_for(leader.elector.leading.wait(), 10)
        led_at = loop.time()
        other.done(event(1), "audit")
        await other.flush()
        async with asyncio.timeout(10):
            # Handed out by the leader's own task: nothing to wait on but the list.
            while not handed:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    finally:
        await leader.close()
        await other.close()
        await other.spool.close()
        await pool.close()
    [(event_id, at)] = handed
    assert event_id == "evt_2"
    assert at - led_at >= lease.ttl * 0.9
