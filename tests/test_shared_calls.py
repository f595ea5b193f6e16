"""The call map and the gap record in the shared PostgreSQL store (listener.calls.shared): two
instances' stores on one real server (behind a proxy that refuses, for the store going down),
then two real daemon processes: one started after a call began knows it, and a call_ended
both missed is rebuilt once, by the leader, and known to both."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from listener.calls.shared import SharedCallStore
from listener.calls.state import CallRecord, shared_origins
from listener.calls.tracker import CallTracker
from listener.cluster.url import StoreUrl
from listener.core.events import Event
from listener.core.ids import lifecycle_id
from listener.testing import FakeSippet
from listener.testing.receiver import WebhookReceiver
from tests.tcpproxy import proxied
from tests.test_cluster_processes import instances_of, settled, start_all
from tests.test_ha_cluster import LEASE, ended_calls, eventually, handlers, reconciled
from tests.test_service import ServiceProcess

NOW = 1_800_000_000.0


def ringing(key: str, at: float = NOW) -> CallRecord:
    return CallRecord(
        key, "ringing", at, "+100", None, at, origins=shared_origins({"ringing": "realtime"})
    )


def opened(directory: Path, url: StoreUrl, timeout: float = 2.0) -> SharedCallStore:
    directory.mkdir(exist_ok=True)
    path = directory / "calls.sqlite3"
    return SharedCallStore(path, url=url, timeout=timeout, leads=lambda: True)


async def shared_calls(url: StoreUrl) -> dict[str, tuple[str, float | None, float | None]]:
    """The shared map's calls: status, answered and ended times."""
    async with await psycopg.AsyncConnection.connect(url.conninfo, autocommit=True) as conn:
        rows = await (
            await conn.execute("SELECT call_key, status, answered_at, ended_at FROM sippet_calls")
        ).fetchall()
    return {key: (status, answered, ended) for key, status, answered, ended in rows}


def test_a_call_another_instance_got_further_with_is_adopted_with_its_handled_events() -> None:
    tracker = CallTracker()
    tracker.load([ringing("c1")], set(), NOW)
    ended = CallRecord(
        "c1", "ended", NOW + 9, None, "+200", NOW - 1, None, NOW + 9,
        shared_origins({"ringing": "realtime", "ended": "reconcile"}),
    )  # fmt: skip
    adopted = tracker.adopt(
        [ended, ringing("c2"), ringing("c1", NOW - 5)],
        [("c1", "incoming_call"), ("c1", "call_ended"), ("c2", "incoming_call")],
    )
    assert adopted == 2
    record = tracker.get("c1")
    assert record is not None
    # Its status, times and origins; what this map knew fills what it lacked.
    assert (record.status, record.from_number, record.to_number, record.started_at) == (
        "ended", "+100", "+200", NOW - 1,
    )  # fmt: skip
    assert dict(record.origins) == {"ringing": "realtime", "ended": "reconcile"}
    assert {r.call_key for r in tracker.state.changed()} == {"c1", "c2"}
    # Handed on by another instance: its twin is not handed on here again, and the store
    # takes the marks with the next batch.
    twin = Event.create(
        "call_ended", {"callUuid": "c1"}, "t", NOW + 10, id=lifecycle_id("call_ended", "c1")
    )
    assert not tracker.admit(twin)
    assert sorted(tracker.unsaved()[1]) == [
        ("c1", "call_ended"), ("c1", "incoming_call"), ("c2", "incoming_call"),
    ]  # fmt: skip


async def test_a_store_opened_later_reads_the_calls_and_moment_another_shared(
    tmp_path: Path, store: StoreUrl
) -> None:
    first = await asyncio.to_thread(opened, tmp_path / "a", store)
    await asyncio.to_thread(
        first.save,
        NOW,
        calls=[ringing("c1")],
        handled_calls=[("c1", "incoming_call")],
        seen_until=NOW + 5,
    )
    second = await asyncio.to_thread(opened, tmp_path / "b", store)
    try:
        assert [r.call_key for r in second.calls(NOW - 60)] == ["c1"]
        assert second.handled_calls() == [("c1", "incoming_call")]
        assert second.last_seen() == NOW + 5
        # Both go on: the shared row keeps the furthest status, and what either knew. The
        # second saw the answer (its time), the first the end; a moment never goes back.
        ended = CallRecord(
            "c1", "ended", NOW + 9, "+100", None, NOW, None, NOW + 9,
            shared_origins({"ringing": "realtime", "ended": "realtime"}),
        )  # fmt: skip
        answered = CallRecord(
            "c1", "answered", NOW + 2, "+100", "+200", NOW, NOW + 2, None,
            shared_origins({"ringing": "realtime", "answered": "realtime"}),
        )  # fmt: skip
        await asyncio.to_thread(first.save, NOW + 9, calls=[ended], seen_until=NOW + 9)
        await asyncio.to_thread(second.save, NOW + 10, calls=[answered], seen_until=NOW + 3)
    finally:
        first.close()
        second.close()
    assert await shared_calls(store) == {"c1": ("ended", NOW + 2, NOW + 9)}
    third = await asyncio.to_thread(opened, tmp_path / "c", store)
    try:
        [record] = third.calls(NOW - 60)
        assert (record.status, record.to_number, third.last_seen()) == ("ended", "+200", NOW + 9)
    finally:
        third.close()


async def test_what_the_store_did_not_take_reaches_it_from_the_local_file_once_it_does(
    tmp_path: Path, store: StoreUrl
) -> None:
    local = tmp_path / "a"
    async with proxied(store) as (proxy, via):
        calls = await asyncio.to_thread(opened, local, via, 0.3)
        try:
            await asyncio.to_thread(calls.save, NOW, calls=[ringing("c0")], seen_until=NOW)
            proxy.refusing = True
            proxy.cut()
            await asyncio.to_thread(calls.save, NOW + 1, calls=[ringing("c1", NOW + 1)])
            assert calls.down
            # The map goes on locally.
            assert {r.call_key for r in calls.calls()} == {"c0", "c1"}
            proxy.refusing = False
            # Within the retry interval the store is not tried again.
            await asyncio.to_thread(calls.save, NOW + 2, calls=[ringing("c2", NOW + 2)])
            assert calls.down
            assert set(await shared_calls(store)) == {"c0"}
            await asyncio.sleep(0.35)
            await asyncio.to_thread(calls.save, NOW + 3, calls=[ringing("c3", NOW + 3)])
            assert not calls.down
            assert set(await shared_calls(store)) == {"c0", "c1", "c2", "c3"}

            # Killed while the store was down: the next start's first batch hands it over.
            proxy.refusing = True
            proxy.cut()
            await asyncio.to_thread(calls.save, NOW + 4, calls=[ringing("c4", NOW + 4)])
        finally:
            calls.close()
        proxy.refusing = False
        calls = await asyncio.to_thread(opened, local, via, 0.3)
        try:
            await asyncio.to_thread(calls.save, NOW + 5, seen_until=NOW + 5)
        finally:
            calls.close()
    assert set(await shared_calls(store)) == {"c0", "c1", "c2", "c3", "c4"}


async def test_only_the_leader_writes_the_shared_map(tmp_path: Path, store: StoreUrl) -> None:
    (tmp_path / "f").mkdir()
    follower = await asyncio.to_thread(
        SharedCallStore,
        tmp_path / "f" / "calls.sqlite3",
        url=store,
        timeout=2.0,
        leads=lambda: False,
    )
    try:
        await asyncio.to_thread(follower.save, NOW, calls=[ringing("c1")], seen_until=NOW)
        assert [r.call_key for r in follower.calls()] == ["c1"]
    finally:
        follower.close()
    assert await shared_calls(store) == {}


async def test_the_leader_prunes_the_shared_map_of_calls_older_than_it_keeps(
    tmp_path: Path, store: StoreUrl
) -> None:
    leader = await asyncio.to_thread(opened, tmp_path / "a", store)
    try:
        old, recent = ringing("c-old", NOW - 7200), ringing("c-new", NOW)
        await asyncio.to_thread(leader.save, NOW, calls=[old, recent], seen_until=NOW)
        assert set(await shared_calls(store)) == {"c-old", "c-new"}
        await asyncio.to_thread(leader.prune, NOW - 3600)
    finally:
        leader.close()
    assert set(await shared_calls(store)) == {"c-new"}


async def open_keys(instance: ServiceProcess) -> set[str]:
    """The open calls in the instance's map, from its own ``/status``."""
    response = await instance.get("/status")
    return {call["call_key"] for call in response.json()["calls"]["open"]}


def local_status(directory: Path, key: str) -> str | None:
    """The call's status in an instance's own call store (written by another process)."""
    with sqlite3.connect(directory / "calls.sqlite3") as conn:
        row = conn.execute("SELECT status FROM calls WHERE call_key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


async def test_an_instance_started_later_knows_the_calls_and_a_shared_gap_is_listed_once(
    tmp_path: Path, fake: FakeSippet, store: StoreUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPPET_STORE_URL", store.conninfo)

    def listed() -> int:
        return sum(1 for r in fake.rpc_requests if r.body["action"] == "list_calls")

    async with WebhookReceiver() as receiver:
        config = handlers(receiver, "call_ended")
        first, second = instances_of(
            tmp_path, fake, config, LEASE + "[calls]\nreconcile = true\n", 2, "info"
        )
        try:
            await start_all([first])
            assert await fake.call_event("incoming_call", "c1") == 1
            async with asyncio.timeout(10):
                while "c1" not in await shared_calls(store):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            # The second never heard c1 begin: it reads it from the shared map at start.
            await start_all([second])
            assert "c1" in await open_keys(second)
            await eventually(lambda: reconciled([first, second]))
            before = listed()
            joins = fake.joins
            await fake.outage(1.0)
            await fake.wait_until(lambda: fake.joined_sockets == 0)
            assert await fake.call_event("call_ended", "c1") == 0
            await fake.wait_until(lambda: fake.joins >= joins + 2, timeout=20)
            for instance in (first, second):
                await instance.poll("/status", lambda r: not r.json()["calls"]["open"])
            await receiver.wait_until(
                lambda requests: any(r.json()["type"] == "call_ended" for r in requests)
            )
            await settled(store)
            gap_listed = listed() - before
            # The follower's own file takes the call as ended too (it outlives a restart).
            async with asyncio.timeout(10):
                while local_status(tmp_path / "b", "c1") != "ended":  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            for instance in (first, second):
                await instance.stop()
    assert gap_listed == 1
    assert (await shared_calls(store))["c1"][0] == "ended"
    ended = [r.json() for r in receiver.requests if r.json()["type"] == "call_ended"]
    assert [(body["data"]["callUuid"], body["origin"]) for body in ended] == [("c1", "reconcile")]
    assert ended_calls(fake) == Counter(["c1"])
