"""The spool of the claims the shared store did not answer: a real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from listener.cluster.claims import Claims
from listener.cluster.database import make_pool
from listener.cluster.spool import Spool
from listener.cluster.url import StoreUrl
from listener.core import metrics
from listener.core.events import Event
from listener.dispatch.dispatcher import Dispatcher, HandlerRunner, RunnerSettings
from listener.dispatch.handler import Context, FunctionHandler


def gauge() -> float:
    value = metrics.REGISTRY.get_sample_value("sippet_listener_spooled_events")
    assert value is not None
    return value


def event(n: int) -> Event:
    payload = {"callUuid": "c-1", "seq": n, "text": "héllo"}
    return Event.create("transcript_delta", payload, "events", 1700000000.5 + n, 90, id=f"evt_{n}")


async def test_entries_outlive_the_process_in_received_order_each_event_written_once(
    tmp_path: Path,
) -> None:
    before = gauge()
    spool = Spool(tmp_path / "state" / "spool.sqlite3")
    await spool.open()
    for ev, handler in [(event(1), "crm"), (event(1), "audit"), (event(2), "crm")]:
        await spool.add(ev, handler, 30.0)
    # Spooled again (an entry handed back whose claim failed once more): kept once.
    await spool.add(event(1), "crm", 30.0)
    assert (spool.events, spool.entries) == (2, 3)
    assert (spool.holds("crm"), spool.holds("audit"), spool.holds("rpc")) == (True, True, False)
    assert gauge() - before == 2
    await spool.close()
    assert gauge() == before

    again = Spool(tmp_path / "state" / "spool.sqlite3")
    await again.open()
    try:
        assert (again.events, again.entries, gauge() - before) == (2, 3, 2)
        entries = await again.oldest(10)
        assert [(e.event, e.handler, e.lease) for e in entries] == [
            (event(1), "crm", 30.0),
            (event(1), "audit", 30.0),
            (event(2), "crm", 30.0),
        ]
        assert entries[0].event.call_key == "c-1"
        # An event leaves with the last handler waiting for it.
        again.remove(entries[0])
        assert [e.seq for e in await again.oldest(10)] == [entries[1].seq, entries[2].seq]
        assert (again.events, again.holds("crm")) == (2, True)
        again.remove(entries[1])
        again.remove(entries[2])
        assert await again.oldest(10) == []
        assert (again.events, again.entries, gauge()) == (0, 0, before)
        # What comes next is behind what is there.
        await again.add(event(3), "crm", 5.0)
        await again.add(event(4), "crm", 5.0)
        assert [e.event.id for e in await again.oldest(1)] == ["evt_3"]
    finally:
        await again.close()


def instance(
    tmp_path: Path, spool: Spool, seen: list[str], when: Callable[[Event], bool] | None = None
) -> tuple[Claims, HandlerRunner, Dispatcher]:
    """One instance's claims and dispatcher, its store out of reach (nothing listens)."""
    nowhere = StoreUrl("postgresql://sippet@127.0.0.1:1/none")
    claims = Claims(make_pool(nowhere, size=1), nowhere, "a", spool, timeout=0.2)

    async def record(ev: Event, ctx: Context[None]) -> None:
        seen.append(ev.id)

    runner = HandlerRunner(
        FunctionHandler(record, name="audit", when=when),
        RunnerSettings("audit", timeout=0.1),
        Context(rpc=None, config=None, name="audit", state_dir=tmp_path),  # type: ignore[arg-type]
        claims,
    )
    dispatcher = Dispatcher([runner])
    dispatcher.start()
    claims.not_answering()
    return claims, runner, dispatcher


async def test_a_claim_neither_the_store_nor_the_spool_takes_runs_the_handler_anyway(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool.sqlite3")
    await spool.open()
    await spool.close()
    seen: list[str] = []
    _, _, dispatcher = instance(tmp_path, spool, seen)
    dispatcher.submit(event(1))
    await dispatcher.drain()
    await dispatcher.stop(1)
    # Better twice (another instance may have run it) than never.
    assert seen == ["evt_1"]


async def test_entries_handed_back_that_their_handler_does_not_take_leave_the_spool(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool.sqlite3")
    await spool.open()
    seen: list[str] = []
    taking = True
    claims, runner, dispatcher = instance(tmp_path, spool, seen, when=lambda ev: taking)
    try:
        for n in range(3):
            dispatcher.submit(event(n))
        await dispatcher.drain()
        assert spool.entries == 3
        # Its filter changed its mind: what is handed back is not taken, and must not hold up
        # what comes behind it for ever.
        taking = False

        async def redeliver(ev: Event, handler: str) -> None:
            await (runner.offer(ev) or asyncio.sleep(0))

        draining = asyncio.create_task(claims.drain(redeliver))
        async with asyncio.timeout(5):
            # The spool has no event for being empty: nothing else waits for one.
            while spool.entries:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        draining.cancel()
        assert await spool.oldest(10) == []
        assert seen == []
    finally:
        await dispatcher.stop(1)
        await spool.close()
