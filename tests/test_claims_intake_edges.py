"""Claims asked at intake, at their edges (real PostgreSQL): an oversize event behind a staged
one, a claim that lapsed while its event waited, a call whose first claim went to the spool,
a stop that abandons queued events, a renewal while the store does not answer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg

from listener.cluster.url import StoreUrl
from listener.core.events import Event
from listener.dispatch.dispatcher import Dispatcher, HandlerRunner, RunnerSettings
from listener.dispatch.handler import FunctionHandler
from tests.tcpproxy import proxied
from tests.test_claims_intake import (
    Staging,
    call_event,
    context,
    event_of,
    instance,
    one_worker_two_calls_claimed,
)


async def test_an_oversize_event_waiting_for_nothing_pending_goes_in_once_a_staged_one_ends(
    store: StoreUrl, tmp_path: Path
) -> None:
    handler = Staging()
    async with instance(store, tmp_path, "a") as claims:
        runner = HandlerRunner(
            handler, RunnerSettings("audit", queue_bytes=100), context(tmp_path), claims
        )
        dispatcher = Dispatcher([runner])
        dispatcher.start()
        try:
            assert dispatcher.submit(event_of(1, "call-1", 500)) is None
            async with asyncio.timeout(5):
                while "evt_1" not in handler.waits:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            wait = dispatcher.submit(event_of(2, "call-2", 500))
            assert wait is not None
            handler.waits["evt_1"].set_result(None)
            # The staged event's end leaves nothing pending: the intake goes on.
            async with asyncio.timeout(5):
                await wait
        finally:
            await dispatcher.stop(0.5)


async def expire(store: StoreUrl, event_id: str) -> None:
    """Let the lease of ``event_id``'s claim pass, as time would."""
    async with await psycopg.AsyncConnection.connect(store.conninfo, autocommit=True) as conn:
        await conn.execute(
            "UPDATE sippet_claims SET lease_until = now() - interval '1 second'"
            " WHERE event_id = %s",
            (event_id,),
        )


async def test_a_claim_whose_lease_passed_is_not_renewed(store: StoreUrl, tmp_path: Path) -> None:
    async with instance(store, tmp_path, "a") as claims:
        event = event_of(1, "call-1")
        assert await claims.claim(event, "audit", 30) is True
        assert await claims.renew(event, "audit", 30) is True
        await expire(store, "evt_1")
        # The leader's sweep hands it out again: the copy's claim is the one to run it.
        assert await claims.renew(event, "audit", 30) is False


async def test_a_copy_of_an_event_that_waits_here_is_not_queued_again(
    store: StoreUrl, tmp_path: Path
) -> None:
    gate = asyncio.Event()
    runs: list[str] = []

    async def first_held(event: Event, ctx: Any) -> None:
        runs.append(event.id)
        if event.id == "evt_1":
            await gate.wait()

    async with instance(store, tmp_path, "a") as claims:
        dispatcher = await one_worker_two_calls_claimed(claims, store, tmp_path, first_held)
        try:
            # evt_2's claim lapsed while it waited; the sweep offers a copy of it here.
            await expire(store, "evt_2")
            runner = dispatcher.runners[0]
            pending = runner.pending
            assert runner.offer(event_of(2, "call-2"), None) is None
            assert runner.pending == pending
            gate.set()
            await dispatcher.drain()
        finally:
            await dispatcher.stop(1)
    assert runs == ["evt_1", "evt_2"]


async def test_a_calls_later_event_follows_its_first_into_the_spool_not_past_it(
    store: StoreUrl, tmp_path: Path
) -> None:
    seen: list[str] = []

    async def record(event: Event, ctx: Any) -> None:
        seen.append(event.id)

    # Another session holds the first event's row: its claim does not answer in time.
    blocker = await psycopg.AsyncConnection.connect(store.conninfo)
    await blocker.execute(
        "INSERT INTO sippet_events (id, name, topic, payload, received_at, origin, size,"
        " first_by) VALUES ('evt_1', 'transcript_delta', 'events', '{}', 0, 'realtime', 0, 'x')"
    )
    try:
        async with instance(store, tmp_path, "a", timeout=0.5) as claims:
            runner = HandlerRunner(
                FunctionHandler(record, name="audit"),
                RunnerSettings("audit"),
                context(tmp_path),
                claims,
            )
            dispatcher = Dispatcher([runner])
            dispatcher.start()
            try:
                dispatcher.submit(call_event(1))
                await asyncio.sleep(0.01)
                dispatcher.submit(call_event(2))
                async with asyncio.timeout(5):
                    while claims.spool.events < 2:  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                assert seen == []
            finally:
                await dispatcher.stop(0.2)
    finally:
        await blocker.rollback()
        await blocker.close()


async def test_a_stop_gives_back_the_claims_won_for_queued_events_it_abandons(
    store: StoreUrl, tmp_path: Path
) -> None:
    gate = asyncio.Event()

    async def held(event: Event, ctx: Any) -> None:
        await gate.wait()

    async with instance(store, tmp_path, "a") as claims:
        dispatcher = await one_worker_two_calls_claimed(claims, store, tmp_path, held)
        await dispatcher.stop(0.1)
    async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
        rows = await (
            await conn.execute(
                "SELECT event_id, lease_until > now() FROM sippet_claims WHERE handler = 'audit'"
            )
        ).fetchall()
    # The one mid-handle lapses a lease later, as before; the queued one at once.
    assert dict(rows) == {"evt_1": True, "evt_2": False}


async def test_a_claim_asked_long_ago_runs_at_once_while_the_store_does_not_answer(
    store: StoreUrl, tmp_path: Path
) -> None:
    gate = asyncio.Event()
    seen: list[str] = []

    async def first_held(event: Event, ctx: Any) -> None:
        seen.append(event.id)
        if event.id == "evt_1":
            await gate.wait()

    # Claims time out after 3 s: a renewal sent into the partition would wait that long.
    async with (
        proxied(store) as (proxy, through),
        instance(through, tmp_path, "a", grace=0.2, timeout=3.0) as claims,
    ):
        dispatcher = await one_worker_two_calls_claimed(claims, store, tmp_path, first_held)
        try:
            await asyncio.sleep(0.2)  # longer ago than fresh_for (0.1 s)
            proxy.freeze()
            try:
                claims.not_answering()  # as after any claim the store did not answer
                gate.set()
                began = time.monotonic()
                async with asyncio.timeout(10):
                    while "evt_2" not in seen:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                assert time.monotonic() - began < 3.0
            finally:
                proxy.thaw()
        finally:
            await dispatcher.stop(0.2)
