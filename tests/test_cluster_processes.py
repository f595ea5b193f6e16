"""Two real daemon processes on one PostgreSQL store, under a stream: restarted one at a time,
or with the store stopped for 10 s (one of them SIGKILLed meanwhile), the webhook receiver
gets every event under one webhook-id, and a handler runs once per event (a delivery the
killed instance could not record goes out again under its id: at least once)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from listener.cluster.spool import SPOOL_FILE
from listener.cluster.url import StoreUrl
from listener.testing import FakeSippet
from listener.testing.receiver import WebhookReceiver
from tests.postgres import PostgresServer
from tests.test_service import ServiceProcess

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EVENTS = 300


def instances_of(
    tmp_path: Path,
    fake: FakeSippet,
    handlers: str,
    extra: str = "",
    count: int = 2,
    log_level: str = "debug",
) -> list[ServiceProcess]:
    """``count`` daemons (not started) with the same configuration, each its own state dir."""
    instances = []
    for name in "abcdefgh"[:count]:
        (tmp_path / name).mkdir()
        instance = ServiceProcess(tmp_path / name, fake)
        instance.write_config(handlers, extra=extra, log_level=log_level)
        instances.append(instance)
    return instances


def two_instances(
    tmp_path: Path, fake: FakeSippet, handlers: str, extra: str = ""
) -> list[ServiceProcess]:
    """Two daemons (not started) with the same configuration, each its own state dir."""
    return instances_of(tmp_path, fake, handlers, extra)


async def start_all(instances: list[ServiceProcess]) -> None:
    for instance in instances:
        await instance.start()
    for instance in instances:
        await instance.message("READY=1", timeout=20)


async def open_claims(store: StoreUrl) -> int:
    """Claims not yet marked done, lapsed or not: work the cluster still owes."""
    async with await psycopg.AsyncConnection.connect(store.conninfo, autocommit=True) as conn:
        row = await (
            await conn.execute("SELECT count(*) FROM sippet_claims WHERE done_at IS NULL")
        ).fetchone()
    assert row is not None
    return int(row[0])


async def settled(store: StoreUrl, timeout: float = 15.0) -> None:
    """Wait until every claim is marked done: nothing lapsed is left to hand out again."""
    async with asyncio.timeout(timeout):
        # The claims are written by other processes: look every 0.1 s.
        while await open_claims(store):  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_a_rolling_restart_of_two_instances_loses_and_doubles_nothing(
    tmp_path: Path, fake: FakeSippet, store: StoreUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPPET_STORE_URL", store.conninfo)
    async with WebhookReceiver() as receiver:
        hook = f'[[handlers]]\nuse = "webhook"\nname = "crm"\nurl = "{receiver.url}"\n'
        hook += f'secret = "{SECRET}"\n'
        instances = two_instances(tmp_path, fake, hook)
        try:
            await start_all(instances)

            async def stream() -> None:
                for n in range(EVENTS):
                    await fake.broadcast("transcript_delta", {"callUuid": f"c{n % 7}", "seq": n})
                    await asyncio.sleep(0.01)

            streaming = asyncio.create_task(stream())
            # One at a time: stop it (it drains and resigns), start it, wait until it joined.
            for instance in instances:
                await asyncio.sleep(0.3)
                assert await instance.signal_and_wait(signal.SIGTERM) == 0
                await instance.start()
                await instance.message("READY=1", timeout=20)
            await streaming
            await receiver.wait_until(
                lambda requests: len({r.headers["webhook-id"] for r in requests}) >= EVENTS,
                timeout=20,
            )
            await asyncio.sleep(0.5)
        finally:
            for instance in instances:
                await instance.stop()
    ids = Counter(r.headers["webhook-id"] for r in receiver.requests)
    seqs = {json.loads(r.body)["data"]["seq"] for r in receiver.requests}
    assert seqs == set(range(EVENTS))
    assert len(ids) == EVENTS
    assert set(ids.values()) == {1}


async def test_an_instance_killed_mid_handle_leaves_the_event_to_another(
    tmp_path: Path, fake: FakeSippet, store: StoreUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPPET_STORE_URL", store.conninfo)
    journal = tmp_path / "journal.txt"
    journal.touch()
    handler = (
        '[[handlers]]\nuse = "tests.sample_handlers:Journal"\nname = "journal"\n'
        f'timeout = 1.0\npath = "{journal}"\ndelay = 0.8\n'
    )
    lease = "[store]\nlease_ttl = 1.0\nlease_renew = 0.25\n"
    instances = two_instances(tmp_path, fake, handler, lease)
    try:
        await start_all(instances)
        await fake.broadcast("participant_joined", {"callUuid": "c1", "memberId": "m1"})

        def lines() -> list[list[str]]:
            return [line.split() for line in journal.read_text().splitlines()]

        async with asyncio.timeout(10):
            # Another process writes the journal: look every 20 ms.
            while not lines():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        [(_, first, event_id)] = lines()
        victim = next(i for i in instances if i.process and str(i.process.pid) == first)
        survivor = next(i for i in instances if i is not victim)
        assert victim.process is not None
        assert survivor.process is not None
        victim.process.kill()
        await victim.process.wait()
        # Its claim lapses (timeout + lease_ttl); the leader hands the event out again.
        async with asyncio.timeout(10):
            while not any(line[0] == "done" for line in lines()):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
    finally:
        for instance in instances:
            await instance.stop()
    assert lines() == [
        ["start", first, event_id],
        ["start", str(survivor.process.pid), event_id],
        ["done", str(survivor.process.pid), event_id],
    ]


async def test_deliveries_held_by_a_killed_instance_go_out_from_the_other_under_their_ids(
    tmp_path: Path, fake: FakeSippet, store: StoreUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPPET_STORE_URL", store.conninfo)
    count = 6
    async with WebhookReceiver() as receiver:
        # Hung: every attempt stays in flight, its row leased by the instance attempting it.
        receiver.respond_with(200, delay=60)
        hook = f'[[handlers]]\nuse = "webhook"\nname = "crm"\nurl = "{receiver.url}"\n'
        hook += f'secret = "{SECRET}"\nmax_probe_interval = 0.2\n'
        lease = "[store]\nlease_ttl = 2.0\nlease_renew = 0.5\n"
        instances = two_instances(tmp_path, fake, hook, lease)
        try:
            await start_all(instances)
            for n in range(count):
                await fake.broadcast("call_started", {"callUuid": f"c{n}", "seq": n})
            await receiver.wait_for(count, timeout=10)
            held = await _holders(store)
            assert sum(len(ids) for ids in held.values()) == count
            # The holder's pid is its name's second part (host:pid:random).
            victim_pid, victim_ids = max(held.items(), key=lambda item: len(item[1]))
            victim = next(i for i in instances if i.process and i.process.pid == victim_pid)
            survivor = next(i for i in instances if i is not victim)
            assert victim.process is not None
            victim.process.kill()
            await victim.process.wait()
            # Down: the survivor's own attempts get a 503 and it probes; the victim's leases
            # pass meanwhile.
            await receiver.down()
            async with asyncio.timeout(10):
                # Until the victim's leases have passed, by the database's clock.
                while victim_pid in await _holders(store):  # noqa: ASYNC110 (a query, no event)
                    await asyncio.sleep(0.1)
            back = time.time()
            receiver.respond_with(200)
            await receiver.up()
            await receiver.wait_until(
                lambda requests: (
                    len({r.headers["webhook-id"] for r in requests if r.received_at >= back})
                    >= count
                ),
                timeout=20,
            )
            await asyncio.sleep(0.5)
            assert survivor.process is not None
            assert survivor.process.returncode is None
        finally:
            for instance in instances:
                await instance.stop()
    first = [r.headers["webhook-id"] for r in receiver.requests[:count]]
    after = Counter(r.headers["webhook-id"] for r in receiver.requests if r.received_at >= back)
    assert sorted(after) == sorted(first)
    assert set(after.values()) == {1}
    assert victim_ids <= set(after)
    async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
        rows = await (
            await conn.execute(
                "SELECT count(*) FROM sippet_deliveries WHERE delivered_at IS NOT NULL"
            )
        ).fetchone()
    assert rows == (count,)


async def _holders(store: StoreUrl) -> dict[int, set[str]]:
    """The msg ids each process holds under a live lease, by pid."""
    async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
        rows = await (
            await conn.execute(
                "SELECT holder, msg_id FROM sippet_deliveries WHERE lease_until > now()"
            )
        ).fetchall()
    held: dict[int, set[str]] = {}
    for holder, msg_id in rows:
        held.setdefault(int(holder.split(":")[1]), set()).add(msg_id)
    return held


def spooled_events(state_dir: Path) -> int:
    """The events waiting in an instance's spool, read as an operator would (sqlite3)."""
    with contextlib.closing(sqlite3.connect(state_dir / SPOOL_FILE)) as spool:
        (count,) = spool.execute("SELECT count(*) FROM events").fetchone()
    return int(count)


async def test_postgres_stopped_10_s_loses_nothing_runs_handlers_once_a_killed_instance_drains(
    tmp_path: Path,
    fake: FakeSippet,
    postgres: PostgresServer,
    store: StoreUrl,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIPPET_STORE_URL", store.conninfo)
    journal = tmp_path / "journal.txt"
    journal.touch()
    # 100 a second: 1 s before the store stops, 10 s (or more, on a slow machine) without
    # it, and 1.5 s after it is back.
    after_resume = 150
    async with WebhookReceiver() as receiver:
        handlers = (
            f'[[handlers]]\nuse = "tests.sample_handlers:Journal"\nname = "journal"\n'
            f'path = "{journal}"\nfield = "seq"\n'
            f'[[handlers]]\nuse = "webhook"\nname = "crm"\nurl = "{receiver.url}"\n'
            f'secret = "{SECRET}"\n'
        )
        instances = two_instances(tmp_path, fake, handlers, "[store]\nconnect_timeout = 1.0\n")
        a, b = instances
        streaming: asyncio.Task[None] | None = None
        try:
            for instance in instances:
                # A watchdog of 1 s refreshes STATUS= every 0.5 s.
                await instance.start(watchdog_usec=1_000_000)
            for instance in instances:
                await instance.message("READY=1", timeout=20)
            sent = 0
            # How many were sent when the store came back.
            resumed: asyncio.Future[int] = asyncio.get_running_loop().create_future()

            loop = asyncio.get_running_loop()
            start = loop.time()

            async def stream() -> None:
                nonlocal sent
                while not resumed.done() or sent < resumed.result() + after_resume:
                    n = sent
                    await fake.broadcast("transcript_delta", {"callUuid": f"c{n % 7}", "seq": n})
                    sent = n + 1
                    # 100 a second at most, whatever a broadcast takes.
                    await asyncio.sleep(start + sent / 100 - loop.time())

            streaming = asyncio.create_task(stream())
            await asyncio.sleep(1)
            stopped_at = time.time()
            await asyncio.to_thread(postgres.halt)
            stopped = loop.time()
            # Still ready (it hears every event and keeps it), and saying why it waits.
            text = await a.poll("/readyz", lambda r: "store not answering" in r.json()["reason"])
            assert json.loads(text)["ready"] is True
            assert re.fullmatch(
                r"joined; store not answering; \d+ events spooled", json.loads(text)["reason"]
            )
            async with asyncio.timeout(10):
                while "store not answering" not in (status := await b.message("STATUS=")):
                    pass
            assert re.search(r"; store not answering; \d+ events spooled;", status)
            # Killed while events wait in its spool: they are on disk.
            await asyncio.sleep(1)
            assert a.process is not None
            a.process.kill()
            killed_at = time.time()
            await a.process.wait()
            kept = spooled_events(tmp_path / "a")
            assert kept > 0
            # Restarted while the store is still down: it spools from its first event.
            await a.start()
            await a.message("READY=1", timeout=20)
            await a.poll("/readyz", lambda r: "store not answering" in r.json()["reason"])
            await asyncio.sleep(stopped + 10 - loop.time())
            # From this thread: the server ends with the thread that starts it.
            postgres.resume()
            resumed.set_result(sent)
            await streaming
            events = sent

            def done() -> Counter[int]:
                lines = [line.split() for line in journal.read_text().splitlines()]
                return Counter(int(line[3]) for line in lines if line[0] == "done")

            # Events whose webhook handle() was waiting for the store when its instance was
            # killed: the restarted instance gives back what its previous start left claimed
            # (once the marks it kept on disk are in), and the leader's next sweep (every
            # lease_renew, 5 s) hands them out again, long before their claims would lapse.
            await receiver.wait_until(
                lambda requests: len({r.headers["webhook-id"] for r in requests}) >= events,
                timeout=30,
            )
            # Every claim ends marked done: one the killed instance handled and could not
            # mark would have been handed out again by now (and doubled in the journal).
            await settled(store)
            async with asyncio.timeout(10):
                # Other processes write the journal: look every 0.1 s.
                while len(done()) < events:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            # Both spools drain (the instance that lost a claim is told no), and meanwhile
            # a double would show up, if there were one.
            async with asyncio.timeout(20):
                while any(spooled_events(tmp_path / name) for name in "ab"):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            readyz = [(await instance.get("/readyz")).json()["reason"] for instance in instances]
        finally:
            if streaming is not None:
                streaming.cancel()
            for instance in instances:
                await instance.stop()
            # Later tests share the server.
            postgres.ensure_running()
    assert readyz == ["joined", "joined"]
    handled = done()
    assert set(handled) == set(range(events))
    assert set(handled.values()) == {1}
    ids = Counter(r.headers["webhook-id"] for r in receiver.requests)
    assert len(ids) == events
    # At least once: a delivery the killed instance made as the store went down got its 2xx
    # but could not record it, so it goes out again, under the same webhook-id (receivers
    # dedupe by it). Any other resend is a double.
    first_arrival: dict[str, float] = {}
    for request in receiver.requests:
        first_arrival.setdefault(request.headers["webhook-id"], request.received_at)
    resent = {msg_id for msg_id, count in ids.items() if count > 1}
    assert set(ids.values()) <= {1, 2}
    assert all(stopped_at - 0.5 <= first_arrival[msg_id] <= killed_at for msg_id in resent), resent
    assert {json.loads(r.body)["data"]["seq"] for r in receiver.requests} == set(range(events))
