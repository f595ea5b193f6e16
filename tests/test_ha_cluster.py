"""Three real daemon processes on one PostgreSQL store, under failures: one SIGKILLed every
3 s under a stream, the leader killed, a gap all of them shared. The webhook receiver and the
fake's RPC log say what the cluster did, across its instances.

The rolling restart (SIGTERM) is in test_cluster_processes.py."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final

import psycopg
import pytest

from listener.cluster.url import StoreUrl
from listener.core.ids import lifecycle_id
from listener.testing import FakeSippet
from listener.testing.receiver import ReceivedRequest, WebhookReceiver
from tests.test_cluster_processes import SECRET, instances_of, settled, start_all
from tests.test_service import ServiceProcess

# At least: the stream goes on until the last kill (a restart slower than KILL_EVERY, on a
# busy machine, pushes the kills later).
EVENTS = 2000
RATE = 200.0
KILL_EVERY = 3.0
KILLS = 3
# The first kill, seconds into the 10 s stream: the third comes 6 s later, with slack for a
# restart slower than 3 s on a busy machine.
FIRST_KILL = 1.5
# Slack between this process's clock readings and the database's or the receiver's (one
# host, one clock; the readings lag on a busy machine).
CLOCKS = 0.5
# Every FINAL-th event matches the rpc rule.
FINAL = 10
# Short leases: a lapsed claim (handler timeout + lease_ttl) is handed out again within 3 s.
HANDLER_TIMEOUT = 2.0
LEASE_TTL = 1.0
LEASE = f"[store]\nlease_ttl = {LEASE_TTL}\nlease_renew = 0.25\n"


def handlers(receiver: WebhookReceiver, rpc_on: str, when: str = "") -> str:
    """A webhook to ``receiver`` and an rpc rule ending the event's call on ``rpc_on``."""
    timeout = f"timeout = {HANDLER_TIMEOUT}\n"
    return (
        f'[[handlers]]\nuse = "webhook"\nname = "crm"\n{timeout}url = "{receiver.url}"\n'
        f'secret = "{SECRET}"\n'
        f'[[handlers]]\nuse = "rpc"\nname = "hangup"\n{timeout}'
        f'[[handlers.rules]]\non = "{rpc_on}"\n{when}action = "end_call"\n'
        'input = { callUuid = "{call_key}" }\n'
    )


def ended_calls(fake: FakeSippet) -> Counter[str]:
    """How many times the rpc rule ended each call (list_calls goes through RPC too)."""
    return Counter(
        r.body["input"]["callUuid"] for r in fake.rpc_requests if r.body["action"] == "end_call"
    )


def hooks_by_event(requests: list[ReceivedRequest]) -> dict[tuple[str, str], set[str]]:
    """Each event's webhook-ids, by its name and its call (the events here have one each)."""
    ids: dict[tuple[str, str], set[str]] = {}
    for request in requests:
        body = request.json()
        event = (body["type"], body["data"]["callUuid"])
        ids.setdefault(event, set()).add(request.headers["webhook-id"])
    return ids


def distinct(requests: list[ReceivedRequest]) -> int:
    """How many webhook-ids arrived."""
    return len({request.headers["webhook-id"] for request in requests})


async def takeovers(store: StoreUrl) -> dict[tuple[str, str], tuple[float, float]]:
    """The claims taken over from an instance that died before it was done (after their lease
    lapsed, or once its next start gave them back), by (call, handler): when their event was
    recorded, and when the claim was last taken over (wall clock, the database's)."""
    query = (
        "SELECT e.payload->>'callUuid', c.handler, extract(epoch FROM e.recorded_at),"
        " extract(epoch FROM c.claimed_at)"
        " FROM sippet_claims c JOIN sippet_events e ON e.id = c.event_id"
        " WHERE c.takeovers > 0"
    )
    async with await psycopg.AsyncConnection.connect(store.conninfo, autocommit=True) as conn:
        rows = await (await conn.execute(query)).fetchall()
    return {(call, handler): (float(at), float(taken)) for call, handler, at, taken in rows}


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``check()`` holds; the state it reads lives in other processes."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


# How an instance covered a gap, by what its log says then: it listed calls itself, or took
# the leader's pass from the shared call map.
COVERED: Final = {"reconciled": "listed", "reconciled from the shared call map": "followed"}


def covered_how(instance: ServiceProcess) -> str | None:
    """How the instance covered its first gap, by its log (None: not yet)."""
    for line in instance.log_lines():
        how = COVERED.get(str(line.get("event")))
        if how is not None:
            return how
    return None


def reconciled(instances: list[ServiceProcess], how: str | None = None) -> bool:
    """Whether every instance has covered its first gap, ``how`` it was told to (``listed``
    or ``followed``) if given: from then on it asks list_calls only after a gap or for a
    refresh."""
    return all(covered_how(i) in ((how,) if how else COVERED.values()) for i in instances)


async def roles(instances: list[ServiceProcess]) -> dict[int, tuple[bool, int | None]]:
    """Each running instance's (leads, term) from its own ``/status``, by index."""
    found = {}
    for n, instance in enumerate(instances):
        if instance.process is not None and instance.process.returncode is None:
            cluster = (await instance.get("/status")).json()["link"]["cluster"]
            found[n] = (cluster["leader"], cluster["term"])
    return found


async def test_three_instances_killed_in_turn_under_a_stream_lose_nothing(
    tmp_path: Path, fake: FakeSippet, store: StoreUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPPET_STORE_URL", store.conninfo)
    heard: list[int] = []
    killed: list[float] = []
    async with WebhookReceiver() as receiver:
        config = handlers(receiver, "transcript_delta", "when = { final = true }\n")
        instances = instances_of(tmp_path, fake, config, LEASE, count=3, log_level="info")
        try:
            await start_all(instances)

            kills_done = asyncio.Event()

            async def stream() -> None:
                start = time.monotonic()
                n = 0
                while n < EVENTS or not kills_done.is_set():
                    payload = {"callUuid": f"c{n}", "seq": n, "final": n % FINAL == 0}
                    heard.append(await fake.broadcast("transcript_delta", payload))
                    n += 1
                    await asyncio.sleep(max(0.0, start + n / RATE - time.monotonic()))

            streaming = asyncio.create_task(stream())
            first = time.monotonic() + FIRST_KILL
            try:
                for n in range(KILLS):
                    await asyncio.sleep(first + n * KILL_EVERY - time.monotonic())
                    # One down at a time: the last one killed has joined again before the next.
                    await fake.wait_until(lambda: fake.joined_sockets >= 3, timeout=20)
                    victim = instances[n % 3].process
                    assert victim is not None
                    victim.kill()
                    killed.append(time.time())
                    await victim.wait()
                    await instances[n % 3].start()
            finally:
                # Whatever happened: the stream ends.
                kills_done.set()
            await streaming
            sent = len(heard)
            await receiver.wait_until(lambda r: len(r) >= sent and distinct(r) >= sent, 30)
            # A lapsed claim is handed out again, and marked done, on a live instance.
            await settled(store)
            await eventually(lambda: len(ended_calls(fake)) >= len(range(0, sent, FINAL)))
            await asyncio.sleep(0.5)
        finally:
            for instance in instances:
                await instance.stop()
    # Two instances at least were joined for each event: every one was heard, none is lost.
    assert len(heard) >= EVENTS
    assert min(heard) >= 2
    ids = hooks_by_event(receiver.requests)
    assert set(ids) == {("transcript_delta", f"c{n}") for n in range(sent)}
    assert all(len(hooks) == 1 for hooks in ids.values()), "an event under two webhook-ids"
    ended = ended_calls(fake)
    assert set(ended) == {f"c{n}" for n in range(0, sent, FINAL)}

    # Once per event, but for what a kill left unsure. A claim taken over (its holder died
    # before marking it done: it may have run) lapsed after a kill, between its event's
    # arrival and its takeover.
    taken_over = await takeovers(store)
    assert all(
        any(recorded - CLOCKS <= kill <= taken + CLOCKS for kill in killed)
        for recorded, taken in taken_over.values()
    ), "a claim lapsed with no kill to explain it"
    # Only such an event's rpc action may have fired twice.
    twice = {call for call, n in ended.items() if n > 1}
    assert twice <= {call for call, handler in taken_over if handler == "hangup"}
    # Likewise its webhook; or a delivery the receiver had when its sender was killed, before
    # the outbox recorded it as delivered, is sent again after the restart.
    copies: dict[str, list[float]] = {}
    for request in receiver.requests:
        copies.setdefault(request.json()["data"]["callUuid"], []).append(request.received_at)
    resent = {
        call
        for call, at in copies.items()
        if any(min(at) <= kill + CLOCKS < max(at) for kill in killed)
    }
    twice = {call for call, at in copies.items() if len(at) > 1}
    assert twice <= {call for call, handler in taken_over if handler == "crm"} | resent


async def test_a_killed_leader_is_replaced_within_two_lease_periods(
    tmp_path: Path, fake: FakeSippet, store: StoreUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPPET_STORE_URL", store.conninfo)
    instances = instances_of(tmp_path, fake, '[[handlers]]\nuse = "log"\n', LEASE, count=3)
    try:
        await start_all(instances)
        found: dict[int, tuple[bool, int | None]] = {}

        async def leaders() -> list[int]:
            found.update(await roles(instances))
            return [n for n, (leads, _) in found.items() if leads]

        async with asyncio.timeout(10):
            # Each process serves its own role: ask every 20 ms.
            while len(await leaders()) != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        [old] = await leaders()
        old_term = found[old][1]
        assert old_term is not None
        victim = instances[old].process
        assert victim is not None
        victim.kill()
        killed = time.monotonic()
        await victim.wait()
        found.clear()
        async with asyncio.timeout(10):
            while not await leaders():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        took = time.monotonic() - killed
        [new] = await leaders()
    finally:
        for instance in instances:
            await instance.stop()
    assert new != old
    assert took <= 2 * LEASE_TTL
    # A new term: the old leader's work can be told apart from the new one's.
    new_term = found[new][1]
    assert new_term is not None
    assert new_term > old_term
    assert [n for n, (leads, _) in found.items() if not leads] == [
        n for n in range(3) if n not in (old, new)
    ]


async def test_a_gap_all_instances_shared_is_reconciled_once_across_the_cluster(
    tmp_path: Path, fake: FakeSippet, store: StoreUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPPET_STORE_URL", store.conninfo)
    calls = [f"c-{n}" for n in range(10)]
    async with WebhookReceiver() as receiver:
        config = handlers(receiver, "call_ended")
        instances = instances_of(tmp_path, fake, config, LEASE + "[calls]\nreconcile = true\n", 3)
        try:
            await start_all(instances)
            for key in calls[:5]:
                assert await fake.call_event("incoming_call", key) == 3
            await receiver.wait_until(lambda r: distinct(r) >= 5)
            await eventually(lambda: reconciled(instances))
            joins = fake.joins
            listed = sum(1 for r in fake.rpc_requests if r.body["action"] == "list_calls")
            await fake.outage(1.0)
            await fake.wait_until(lambda: fake.joined_sockets == 0)
            # Nobody hears these: every instance is out.
            for key in calls[:5]:
                assert await fake.call_event("call_ended", key) == 0
            for key in calls[5:]:
                assert await fake.call_event("incoming_call", key) == 0
            await fake.wait_until(lambda: fake.joins >= joins + 3, timeout=20)
            # The leader asks list_calls after the gap and rebuilds the 10 transitions; the
            # others take them from the shared call map.
            await eventually(
                lambda: (
                    sum(1 for r in fake.rpc_requests if r.body["action"] == "list_calls")
                    >= listed + 1
                )
            )
            await receiver.wait_until(lambda r: distinct(r) >= 15, timeout=20)
            await settled(store)
            await asyncio.sleep(0.5)
            # Every instance's map has the calls the leader rebuilt (its /status lists the
            # open ones): the 5 that began in the gap, not the 5 that ended in it.
            for instance in instances:
                await instance.poll(
                    "/status",
                    lambda r: (
                        {call["call_key"] for call in r.json()["calls"]["open"]} == set(calls[5:])
                    ),
                )
        finally:
            for instance in instances:
                await instance.stop()
    assert sum(1 for r in fake.rpc_requests if r.body["action"] == "list_calls") == listed + 1
    ids = hooks_by_event(receiver.requests)
    rebuilt = {
        (body["type"], body["data"]["callUuid"])
        for body in (r.json() for r in receiver.requests)
        if body["origin"] == "reconcile"
    }
    assert rebuilt == {("call_ended", key) for key in calls[:5]} | {
        ("incoming_call", key) for key in calls[5:]
    }
    # Rebuilt or heard, a transition has one id: its name and call.
    assert ids == {
        (name, key): {lifecycle_id(name, key)}
        for name, keys in (("incoming_call", calls), ("call_ended", calls[:5]))
        for key in keys
    }
    webhook_ids = Counter(r.headers["webhook-id"] for r in receiver.requests)
    assert set(webhook_ids.values()) == {1}, "a transition delivered twice"
    assert ended_calls(fake) == Counter(calls[:5])
