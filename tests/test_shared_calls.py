"""The call map and the gap record in the shared PostgreSQL store (listener.calls.shared): two
instances' stores on one real server (behind a proxy that refuses, for the store going down),
then two real daemon processes: one started after a call began knows it, and a call_ended
both missed is rebuilt once, by the leader, and known to both."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, LiteralString

import httpx
import psycopg
import pytest
from structlog.testing import capture_logs

from listener.calls.persister import Persister
from listener.calls.reconciler import Reconciler, ReconcileSettings
from listener.calls.shared import ClusterCalls, SharedCallStore
from listener.calls.state import CallRecord, shared_origins
from listener.calls.tracker import CallTracker
from listener.cluster.store import SharedStore
from listener.cluster.url import StoreUrl
from listener.core.events import Event
from listener.core.ids import lifecycle_id
from listener.rpc.client import RpcClient
from listener.service.daemon import Daemon
from listener.service.status_view import view
from listener.testing import FakeSippet, running_daemon
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


def opened(
    directory: Path,
    url: StoreUrl,
    timeout: float = 2.0,
    leads: Callable[[], bool] = lambda: True,
) -> SharedCallStore:
    """A call store in ``directory`` (made if need be) of an instance sharing ``url``."""
    directory.mkdir(exist_ok=True)
    return SharedCallStore(
        directory / "calls.sqlite3",
        url=url,
        timeout=timeout,
        leads=leads,
        covers=True,
        # "The last minute" at open is counted from the records' own times.
        clock=lambda: NOW + 10,
    )


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
            assert calls.not_sharing
            # The map goes on locally.
            assert {r.call_key for r in calls.calls()} == {"c0", "c1"}
            proxy.refusing = False
            # Within the retry interval the store is not tried again.
            await asyncio.to_thread(calls.save, NOW + 2, calls=[ringing("c2", NOW + 2)])
            assert calls.not_sharing
            assert set(await shared_calls(store)) == {"c0"}
            await asyncio.sleep(0.35)
            await asyncio.to_thread(calls.save, NOW + 3, calls=[ringing("c3", NOW + 3)])
            assert not calls.not_sharing
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
    follower = await asyncio.to_thread(opened, tmp_path / "f", store, leads=lambda: False)
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
            # The first listed calls on its first start; the second, a follower, took the
            # leader's moment and calls from the shared map.
            await eventually(
                lambda: reconciled([first], "listed") and reconciled([second], "followed")
            )
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


async def execute(
    url: StoreUrl, query: LiteralString, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url.conninfo, autocommit=True) as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchall() if cursor.description else []


async def until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait for ``predicate()`` (sync or async) to hold."""
    async with asyncio.timeout(timeout):
        while True:
            value = predicate()
            if not isinstance(value, bool):
                value = await value
            if value:
                return
            await asyncio.sleep(0.05)


async def connections(url: StoreUrl) -> int:
    """The daemon's connections to the test's database (its application_name)."""
    [(count,)] = await execute(
        url,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'sippet-listener'",
    )
    return int(count)


@contextlib.asynccontextmanager
async def leading(fake: FakeSippet, store: StoreUrl) -> AsyncIterator[Daemon]:
    """A daemon on ``store`` (with the harness's ``[calls] reconcile`` off), once it leads."""
    async with running_daemon(fake, [], store=store.conninfo) as daemon:
        shared = daemon.store
        assert shared is not None
        await until(lambda: shared.elector.is_leader)
        yield daemon


async def test_a_leader_that_does_not_reconcile_shares_its_calls_but_no_covered_moment(
    fake: FakeSippet, store: StoreUrl
) -> None:
    async with leading(fake, store):
        await fake.call_event("incoming_call", "c1")
        await until(lambda: _has(store, "c1"))
    # It heard c1, but a gap of its own it would not have rebuilt: no moment claims that the
    # cluster missed nothing (a follower or a new leader would take its gap as covered).
    assert await execute(store, "SELECT name, at FROM sippet_moments") == []


async def _has(store: StoreUrl, key: str) -> bool:
    return key in await shared_calls(store)


async def test_a_leader_whose_call_map_the_store_does_not_take_says_so_and_stays_ready(
    fake: FakeSippet, store: StoreUrl
) -> None:
    async with leading(fake, store) as daemon:
        # The claims' tables answer; the call map's does not.
        await execute(store, "ALTER TABLE sippet_calls RENAME TO sippet_calls_away")
        await fake.call_event("incoming_call", "c1")
        said = "store not taking the call map; kept locally"
        await until(lambda: said in daemon.readiness()[1])
        # Still ready: it works from its own file.
        assert daemon.readiness() == (True, f"joined; {said}")
        assert f"; {said}" in daemon.status_line()
        assert store_row(daemon) == {
            "t": "answering; not taking the call map, kept locally",
            "c": "warn",
        }
        await execute(store, "ALTER TABLE sippet_calls_away RENAME TO sippet_calls")
        # Tried again a connect_timeout (5 s) later, with what it kept.
        await until(lambda: daemon.readiness() == (True, "joined"), timeout=15)
        assert said not in daemon.status_line()
        assert store_row(daemon) == {"t": "answering", "c": "ok"}
        assert await _has(store, "c1")


def store_row(daemon: Daemon) -> object:
    """The status page's "Shared store" cell."""
    rows = view(daemon.board.snapshot(), admin=False)["tables"]["link"]
    return dict((row[0], row[1]) for row in rows)["Shared store"]


async def test_a_follower_holds_no_connection_to_the_shared_map(
    tmp_path: Path, store: StoreUrl
) -> None:
    leads = False
    calls = await asyncio.to_thread(opened, tmp_path / "a", store, leads=lambda: leads)
    try:
        # It read the cluster's calls at open, then let go of its connection.
        await until(lambda: _connections_are(store, 0))
        await asyncio.to_thread(calls.save, NOW, calls=[ringing("c1")], seen_until=NOW)
        assert await connections(store) == 0
        # A leader keeps one between its batches; once it no longer leads, it lets go.
        leads = True
        await asyncio.to_thread(calls.save, NOW + 1, calls=[ringing("c2", NOW + 1)])
        assert await connections(store) == 1
        leads = False
        await asyncio.to_thread(calls.save, NOW + 2, calls=[ringing("c3", NOW + 2)])
        await until(lambda: _connections_are(store, 0))
    finally:
        calls.close()
    assert set(await shared_calls(store)) == {"c1", "c2"}


async def _connections_are(store: StoreUrl, count: int) -> bool:
    # A backend ends a moment after its client closed.
    return await connections(store) == count


async def test_the_persister_closes_the_shared_call_store_off_the_event_loop(
    tmp_path: Path, store: StoreUrl
) -> None:
    class Watched(SharedCallStore):
        closed_on: threading.Thread | None = None

        def close(self) -> None:
            self.closed_on = threading.current_thread()
            super().close()

    calls = await asyncio.to_thread(
        Watched, tmp_path / "calls.sqlite3", url=store, timeout=2.0, leads=lambda: True, covers=True
    )
    persister = Persister(calls, CallTracker(), lambda now: None, retain=3600.0)
    await persister.close()
    # Its connection's close is network I/O: on the worker thread, never the loop's.
    assert calls.closed_on is not None
    assert calls.closed_on is not threading.current_thread()


def test_a_record_that_only_adds_fields_is_adopted_and_never_moves_a_call_back() -> None:
    tracker = CallTracker()
    ended = CallRecord(
        "c1", "ended", NOW + 9, "+100", None, NOW, None, NOW + 9,
        shared_origins({"ringing": "realtime", "ended": "realtime"}),
    )  # fmt: skip
    tracker.load([ringing("c2"), ended], set(), NOW)
    # Another instance's late view of c1 (heard later, still ringing there), and the same
    # view of c2 as here with the callee in it.
    late = CallRecord(
        "c1", "ringing", NOW + 20, "+100", "+200", NOW - 1,
        origins=shared_origins({"ringing": "reconcile"}),
    )  # fmt: skip
    callee = CallRecord(
        "c2", "ringing", NOW, "+100", "+300", NOW, origins=shared_origins({"ringing": "realtime"})
    )
    assert tracker.adopt([late, callee, ringing("c2")], []) == 2
    assert tracker.get("c1") == CallRecord(
        "c1", "ended", NOW + 20, "+100", "+200", NOW, None, NOW + 9, ended.origins
    )  # fmt: skip
    assert tracker.get("c2") == callee
    assert {r.call_key for r in tracker.state.changed()} == {"c1", "c2"}
    # Further along there, it missed the answer heard here: where each came from is kept.
    answered = CallRecord(
        "c3", "answered", NOW + 2, None, None, NOW, NOW + 2, None,
        shared_origins({"ringing": "realtime", "answered": "realtime"}),
    )  # fmt: skip
    tracker.adopt([answered], [])
    reconciled_end = CallRecord(
        "c3", "ended", NOW + 30, None, None, NOW, None, NOW + 30,
        shared_origins({"ringing": "realtime", "ended": "reconcile"}),
    )  # fmt: skip
    assert tracker.adopt([reconciled_end], []) == 1
    record = tracker.get("c3")
    assert record is not None
    assert (record.status, record.answered_at) == ("ended", NOW + 2)
    assert dict(record.origins) == {
        "ringing": "realtime", "answered": "realtime", "ended": "reconcile",
    }  # fmt: skip


async def test_a_store_opened_later_takes_what_the_shared_map_adds_to_calls_it_knows(
    tmp_path: Path, store: StoreUrl
) -> None:
    follower = tmp_path / "b"
    ended = CallRecord(
        "c2", "ended", NOW + 9, "+100", None, NOW, None, NOW + 9,
        shared_origins({"ringing": "realtime", "ended": "realtime"}),
    )  # fmt: skip
    # And c3 ended here ten minutes ago.
    gone = NOW - 600
    long_ended = CallRecord(
        "c3", "ended", gone, "+100", None, gone - 5, None, gone,
        shared_origins({"ringing": "realtime", "ended": "realtime"}),
    )  # fmt: skip
    mine = await asyncio.to_thread(opened, follower, store, leads=lambda: False)
    try:
        await asyncio.to_thread(mine.save, NOW + 9, calls=[ringing("c1"), ended, long_ended])
    finally:
        mine.close()
    # The leader heard the same of c1 with its callee, c2 only ring (with its callee), and
    # never c3's end.
    leader = await asyncio.to_thread(opened, tmp_path / "a", store)
    try:
        known = CallRecord(
            "c1",
            "ringing",
            NOW,
            "+100",
            "+200",
            NOW,
            origins=shared_origins({"ringing": "realtime"}),
        )
        await asyncio.to_thread(
            leader.save,
            NOW,
            calls=[known, replace(ringing("c2"), to_number="+300"), ringing("c3", gone - 5)],
        )
    finally:
        leader.close()
    again = await asyncio.to_thread(opened, follower, store, leads=lambda: False)
    try:
        records = {record.call_key: record for record in again.calls()}
    finally:
        again.close()
    assert records["c1"] == known
    assert records["c2"] == replace(ended, to_number="+300")
    assert records["c3"] == long_ended


async def test_a_follower_reads_the_shared_map_on_a_worker_thread_on_a_connection_of_its_own(
    tmp_path: Path, store: StoreUrl
) -> None:
    leader = await asyncio.to_thread(opened, tmp_path / "a", store)
    try:
        await asyncio.to_thread(
            leader.save, NOW, calls=[ringing("c1")], handled_calls=[("c1", "incoming_call")]
        )
    finally:
        leader.close()
    await execute(
        store,
        "INSERT INTO sippet_calls (call_key, status, last_event_at, origins)"
        " VALUES ('c-bad', 'ringing', %s, 'not json')",
        (NOW,),
    )

    class Watched(ClusterCalls):
        read_on: threading.Thread | None = None

        def _calls_since(self, since: float) -> tuple[list[CallRecord], list[tuple[str, str]]]:
            self.read_on = threading.current_thread()
            return super()._calls_since(since)

    # Never opened: its pool (the claims') is not what the follower's reads wait for.
    cluster = Watched(SharedStore(store, tmp_path / "spool.sqlite3"))
    with capture_logs() as logs:
        records, handled = await cluster.calls_since(NOW - 60)
    # Every open call of the cluster, made into records: not work for the event loop.
    assert cluster.read_on is not None
    assert cluster.read_on is not threading.current_thread()
    assert [record.call_key for record in records] == ["c1"]
    assert handled == [("c1", "incoming_call")]
    assert [line["call_key"] for line in logs if line["log_level"] == "warning"] == ["c-bad"]
    await until(lambda: _connections_are(store, 0))


class Hurried:
    """A wall clock whose every reading is ``step`` seconds later than the one before: a
    follower's 10 s wait for the leader passes in a few of its 0.2 s looks."""

    def __init__(self, step: float) -> None:
        self._readings = itertools.count(time.time(), step)

    def __call__(self) -> float:
        return next(self._readings)


@contextlib.asynccontextmanager
async def following(
    fake: FakeSippet, store: StoreUrl, tmp_path: Path, clock: Callable[[], float]
) -> AsyncIterator[tuple[Reconciler, CallTracker, list[Event]]]:
    """A reconciler of a follower (its store's elector never runs) after a gap that ended
    now, running its passes; yields it, its call map and what it emitted."""
    shared = SharedStore(store, tmp_path / "spool.sqlite3")
    await shared.open()
    emitted: list[Event] = []
    tracker = CallTracker()
    async with httpx.AsyncClient() as http:
        reconciler = Reconciler(
            ReconcileSettings(),
            RpcClient(fake.base_url, fake.api_key, http=http),
            tracker,
            emitted.append,
            topic="events",
            clock=clock,
            cluster=ClusterCalls(shared),
        )
        now = time.time()
        reconciler.resume(now - 30)
        reconciler.joined(now)
        task = asyncio.create_task(reconciler.run())
        try:
            yield reconciler, tracker, emitted
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await shared.close()


def list_calls(fake: FakeSippet) -> int:
    return sum(1 for r in fake.rpc_requests if r.body["action"] == "list_calls")


async def test_a_follower_lists_calls_itself_when_the_leader_does_not_cover_its_gap_in_time(
    fake: FakeSippet, store: StoreUrl, tmp_path: Path
) -> None:
    await fake.call_event("incoming_call", "c1")
    # The cluster's moment stays before this follower's join (a leader whose link is down).
    await execute(
        store, "INSERT INTO sippet_moments VALUES ('covered_until', %s)", (time.time() - 20,)
    )
    with capture_logs() as logs:
        async with following(fake, store, tmp_path, Hurried(4.0)) as (reconciler, _, emitted):
            async with asyncio.timeout(10):
                await reconciler.caught_up.wait()
    assert [line["event"] for line in logs if line["log_level"] == "warning"] == [
        "the leader has not covered this gap in the shared call map; listing calls here"
    ]
    assert list_calls(fake) == 1
    assert [(event.name, event.call_key, event.origin) for event in emitted] == [
        ("incoming_call", "c1", "reconcile")
    ]


async def test_a_follower_takes_a_gap_the_leader_covered_from_the_shared_map(
    fake: FakeSippet, store: StoreUrl, tmp_path: Path
) -> None:
    leader = await asyncio.to_thread(opened, tmp_path / "a", store)
    try:
        # What the leader rebuilt of the gap, and its moment past the follower's join.
        record = ringing("c1", time.time())
        await asyncio.to_thread(
            leader.save,
            NOW,
            calls=[record],
            handled_calls=[("c1", "incoming_call")],
            seen_until=time.time() + 60,
        )
    finally:
        leader.close()
    with capture_logs() as logs:
        async with following(fake, store, tmp_path, time.time) as (reconciler, tracker, emitted):
            async with asyncio.timeout(10):
                await reconciler.caught_up.wait()
            assert tracker.get("c1") == record
    assert "reconciled from the shared call map" in [line["event"] for line in logs]
    assert (list_calls(fake), emitted) == (0, [])
