"""Call state and reconciliation, end to end: real daemon, real sockets, a real receiver, and
a real process for restarts. Gaps are made with the fake's outage (sockets dropped, upgrades
refused, calls going on) and by stopping the daemon."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from structlog.testing import capture_logs

from listener import CallRecord, Context, Event, Handler
from listener.calls.reconcile import CALL_FIELDS
from listener.core import metrics
from listener.core.ids import lifecycle_id
from listener.service.daemon import Daemon
from listener.testing import FakeSippet, running_daemon, settle
from listener.testing.receiver import WebhookReceiver
from tests.conftest import Collector
from tests.test_service import ServiceProcess

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
RECONCILE = {"reconcile": True}
ORDER = ("incoming_call", "call_answered", "call_ended")


class Seen(Handler):
    """Records each event it handles, with its origin, id and ``ctx.call`` as of the event."""

    name = "seen"

    def __init__(self) -> None:
        super().__init__()
        self.collected = Collector()
        self.calls: list[CallRecord | None] = []

    async def handle(self, event: Event, ctx: Context) -> None:
        self.calls.append(ctx.call)
        self.collected(event)

    async def wait_for(self, count: int) -> None:
        await self.collected.wait_for(count)

    @property
    def handled(self) -> list[tuple[str, str | None, str, str, CallRecord | None]]:
        pairs = zip(self.collected.events, self.calls, strict=True)
        return [(e.name, e.call_key, e.origin, e.id, call) for e, call in pairs]

    def transitions(self) -> list[tuple[str, str | None, str]]:
        return [(event.name, event.call_key, event.origin) for event in self.collected.events]


class Journal(Handler):
    """Appends each event as a JSON line to ``record``: for a daemon in another process."""

    name = "journal"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        record: Path

    async def handle(self, event: Event, ctx: Context) -> None:
        line = {"event": event.name, "call": event.call_key, "origin": event.origin, "id": event.id}
        with self.config.record.open("a") as record:
            record.write(json.dumps(line) + "\n")


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(f"sippet_listener_{name}", labels) or 0.0


async def caught_up(daemon: Daemon, timeout: float = 10.0) -> None:
    await asyncio.wait_for(daemon.reconciler.caught_up.wait(), timeout)


def list_calls_times(fake: FakeSippet) -> list[float]:
    """When each list_calls request arrives, from now on."""
    times: list[float] = []
    fake.rpc_listeners.append(
        lambda request: (
            times.append(time.time()) if request.body["action"] == "list_calls" else None
        )
    )
    return times


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as server:
        yield server


async def test_an_outage_is_reconciled_once_in_per_call_order_with_the_realtime_ids(
    fake: FakeSippet, receiver: WebhookReceiver
) -> None:
    seen = Seen()
    hook = {"use": "webhook", "url": receiver.url, "secret": SECRET}
    asked = list_calls_times(fake)
    gaps = counter("gaps_total", cause="link")
    calls = [f"c-{n}" for n in range(20)]
    with capture_logs() as logs:
        async with running_daemon(fake, [seen, hook], calls=RECONCILE) as daemon:
            await caught_up(daemon)
            for key in calls[:10]:
                await fake.call_event("incoming_call", key, fromNumber="+15550100")
            for key in calls[:5]:
                await fake.call_event("call_answered", key)
            await seen.wait_for(15)
            await fake.outage(2.0)
            # Nobody hears these: the calls go on while no socket is joined.
            for key in calls[:10]:
                await fake.call_event("call_ended", key)
            for key in calls[10:]:
                await fake.call_event("incoming_call", key)
            for key in calls[10:15]:
                await fake.call_event("call_answered", key)
            for key in calls[15:]:
                await fake.call_event("call_ended", key)
            await fake.wait_until(lambda: fake.joins >= 2)
            await seen.wait_for(45)
            await caught_up(daemon)
            await settle(daemon, 45)
            await receiver.wait_for(45)
    missed = seen.handled[15:]
    # Answered before the outage: only the end was missed. Rang and ended unanswered: no
    # call_answered is made up. New in the outage: each transition its row shows.
    expected = {
        **{key: ["call_ended"] for key in calls[:10]},
        **{key: ["incoming_call", "call_answered"] for key in calls[10:15]},
        **{key: ["incoming_call", "call_ended"] for key in calls[15:]},
    }
    by_call: dict[str, list[str]] = {}
    for name, call_key, origin, event_id, call in missed:
        assert call_key is not None
        assert call is not None
        assert (origin, event_id, call.origins[call.status]) == (
            "reconcile",
            lifecycle_id(name, call_key),
            "reconcile",
        )
        by_call.setdefault(call_key, []).append(name)
    assert by_call == expected
    everything = [(name, key) for name, key, *_ in seen.handled]
    assert len(set(everything)) == len(everything) == 45, "a transition was handled twice"
    # The receiver got each one once, under the same id, origin in the body, row as data.
    bodies = [request.json() for request in receiver.requests]
    assert {request.headers["webhook-id"] for request in receiver.requests} == {
        body["id"] for body in bodies
    }
    assert sorted(body["id"] for body in bodies) == sorted(
        event_id for *_, event_id, _ in seen.handled
    )
    rebuilt = [body for body in bodies if body["origin"] == "reconcile"]
    assert len(rebuilt) == 30
    for body in rebuilt:
        row = fake.calls.rows[body["data"]["callUuid"]]
        assert body["data"] == {name: row[name] for name in CALL_FIELDS}
    # Recorded: a gap of about the outage's length, and list_calls within 1 s of the rejoin.
    assert counter("gaps_total", cause="link") == gaps + 1
    [gap] = [line for line in logs if line["event"] == "gap in the realtime link"]
    assert 1.9 <= gap["seconds"] < 4
    rejoined = fake.join_times[1]
    assert any(rejoined <= at < rejoined + 1.0 for at in asked)


async def test_a_realtime_event_after_its_reconciled_twin_is_not_delivered_again(
    fake: FakeSippet,
) -> None:
    seen = Seen()
    duplicates = counter("events_duplicate_total", event="incoming_call")
    async with running_daemon(fake, [seen], calls=RECONCILE) as daemon:
        await caught_up(daemon)
        await fake.outage(0.3)
        await fake.call_event("incoming_call", "c-1")
        await fake.wait_until(lambda: fake.joins >= 2)
        await seen.wait_for(1)
        await caught_up(daemon)
        # The channel delivers it after all, late.
        received = daemon.dispatcher.received
        await fake.broadcast("incoming_call", fake.calls.rows["c-1"])
        await settle(daemon, received + 1)
    assert seen.transitions() == [("incoming_call", "c-1", "reconcile")]
    assert counter("events_duplicate_total", event="incoming_call") == duplicates + 1


async def test_a_periodic_refresh_finds_a_call_ended_lost_without_a_gap(
    fake: FakeSippet,
) -> None:
    seen = Seen()
    interval = 0.3
    asked = list_calls_times(fake)
    calls = {"reconcile": True, "reconcile_interval": interval}
    with capture_logs() as logs:
        async with running_daemon(fake, [seen], calls=calls) as daemon:
            await caught_up(daemon)
            await fake.call_event("incoming_call", "c-1")
            await fake.call_event("call_answered", "c-1")
            await seen.wait_for(2)
            # Sippet ends the call but the channel drops the event: no gap anywhere. The
            # first refresh that asks fails, and waits for the next interval.
            fake.script_rpc(action="list_calls", status=500, body={})
            fake.calls.apply("call_ended", "c-1", time.time())
            await seen.wait_for(3)
            # Nothing is open any more, so a refresh has nothing to ask: an absence takes time.
            after = len(asked)
            await asyncio.sleep(2 * interval)
            assert len(asked) == after
    assert seen.transitions()[-1] == ("call_ended", "c-1", "reconcile")
    assert fake.joins == 1
    assert [line["reason"] for line in logs if line["event"] == "list_calls refresh failed"] == [
        "request"
    ]
    # The first start's load, a failed refresh, the one that found it: never two within an
    # interval.
    assert len(asked) >= 3
    assert all(b - a >= interval * 0.9 for a, b in itertools.pairwise(asked))


async def test_the_first_start_loads_open_calls_and_emits_nothing_for_them(
    fake: FakeSippet,
) -> None:
    now = time.time()
    fake.calls.apply("incoming_call", "c-ringing", now - 30, fromNumber="+15550101")
    fake.calls.apply("incoming_call", "c-answered", now - 20, fromNumber="+15550102")
    fake.calls.apply("call_answered", "c-answered", now - 10)
    fake.calls.apply("incoming_call", "c-over", now - 50)
    fake.calls.apply("call_ended", "c-over", now - 40)
    seen = Seen()
    with capture_logs() as logs:
        async with running_daemon(fake, [seen], calls=RECONCILE) as daemon:
            await caught_up(daemon)
            assert seen.handled == []
            ringing, answered = daemon.tracker.get("c-ringing"), daemon.tracker.get("c-answered")
            assert ringing is not None
            assert answered is not None
            assert (ringing.status, answered.status) == ("ringing", "answered")
            assert daemon.tracker.get("c-over") is None, "only open calls are loaded"
            await fake.call_event("call_ended", "c-answered")
            await seen.wait_for(1)
    [(name, key, origin, _, call)] = seen.handled
    assert (name, key, origin) == ("call_ended", "c-answered", "realtime")
    assert call is not None
    assert (call.status, call.from_number) == ("ended", "+15550102")
    assert call.origins == {"ringing": "reconcile", "answered": "reconcile", "ended": "realtime"}
    assert any(line["event"] == "first start: no call history" for line in logs)


async def test_list_calls_failing_keeps_the_gap_open_until_it_answers(fake: FakeSippet) -> None:
    seen = Seen()
    before = {
        reason: counter("reconcile_failures_total", reason=reason)
        for reason in ("request", "rpc_error", "malformed", "unknown_status")
    }
    with capture_logs() as logs:
        async with running_daemon(fake, [seen], calls=RECONCILE) as daemon:
            await caught_up(daemon)
            await fake.call_event("incoming_call", "c-1")
            await seen.wait_for(1)
            await fake.outage(0.3)
            await fake.call_event("call_answered", "c-1")
            await fake.call_event("call_ended", "c-1")
            await fake.call_event("incoming_call", "c-2")
            for reply in (
                {"status": 500, "body": {"error": "boom"}},
                {"body": {"success": False, "errors": [{"type": "forbidden", "message": "no"}]}},
                {"body": {"success": True, "data": {"calls": []}}},
                {
                    "body": {
                        "success": True,
                        "data": [
                            7,
                            {"status": "ringing"},
                            {"callUuid": "ghost", "status": "beamed"},
                        ],
                    }
                },
            ):
                fake.script_rpc(action="list_calls", **reply)
            await fake.wait_until(lambda: fake.joins >= 2)
            # The socket and handlers go on while list_calls fails.
            await fake.call_event("incoming_call", "c-3")
            await seen.wait_for(2)
            assert not daemon.reconciler.caught_up.is_set()
            await caught_up(daemon)
            await settle(daemon, 5)
    assert seen.transitions() == [
        ("incoming_call", "c-1", "realtime"),
        ("incoming_call", "c-3", "realtime"),
        ("call_answered", "c-1", "reconcile"),
        ("call_ended", "c-1", "reconcile"),
        ("incoming_call", "c-2", "reconcile"),
    ]
    assert {
        reason: counter("reconcile_failures_total", reason=reason) - count
        for reason, count in before.items()
    } == {
        "request": 1,
        "rpc_error": 1,
        "malformed": 1,
        "unknown_status": 1,
    }
    warned = [
        line for line in logs if line["event"] == "list_calls pass failed; the gap stays open"
    ]
    assert [line["reason"] for line in warned] == [
        "request",
        "rpc_error",
        "malformed",
        "unknown_status",
    ]


async def test_ctx_call_is_the_call_as_of_its_event_and_ctx_calls_the_live_map(
    fake: FakeSippet,
) -> None:
    gate = asyncio.Event()
    views: list[tuple[str, str | None, str | None]] = []

    class Held(Handler):
        name = "held"
        concurrency = 1

        async def handle(self, event: Event, ctx: Context) -> None:
            await gate.wait()
            live = ctx.calls.get(str(event.call_key))
            views.append(
                (
                    event.name,
                    None if ctx.call is None else ctx.call.status,
                    None if live is None else live.status,
                )
            )

    async with running_daemon(fake, [Held()]) as daemon:
        for name in ORDER:
            await fake.call_event(name, "c-1")
        await daemon.dispatcher.wait_received(3)
        gate.set()
        await settle(daemon, 3)
        assert [record.call_key for record in daemon.tracker.open_calls()] == []
    assert views == [
        ("incoming_call", "ringing", "ended"),
        ("call_answered", "answered", "ended"),
        ("call_ended", "ended", "ended"),
    ]


async def call_map(service: ServiceProcess) -> list[dict[str, Any]]:
    """What ``sippet-listener calls --json`` prints for the service's state directory."""
    listed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "listener.service.cli",
        "calls",
        "--config",
        str(service.config),
        "--json",
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, _ = await listed.communicate()
    assert listed.returncode == 0
    return [json.loads(line) for line in out.decode().splitlines()]


@pytest.fixture
async def service(tmp_path: Path, fake: FakeSippet) -> AsyncIterator[ServiceProcess]:
    process = ServiceProcess(tmp_path, fake)
    yield process
    await process.stop()


async def test_calls_that_ended_while_the_daemon_was_stopped_are_delivered_after_a_restart(
    service: ServiceProcess, fake: FakeSippet, tmp_path: Path
) -> None:
    record = tmp_path / "journal.jsonl"
    service.write_config(
        handlers=f'[[handlers]]\nuse = "tests.test_calls_daemon:Journal"\nrecord = "{record}"\n',
        extra="[calls]\nreconcile_interval = 30.0\n",
    )
    calls = [f"c-{n}" for n in range(6)]
    await service.start()
    await service.message("READY=1")
    for key in [*calls, "c-open"]:
        await fake.call_event("incoming_call", key)
    for key in calls[:3]:
        await fake.call_event("call_answered", key)
    await service.poll("/metrics", lambda r: 'handler="journal",outcome="ok"} 10.0' in r.text)
    assert await service.signal_and_wait(signal.SIGTERM) == 0

    # Stopped: the calls go on without it.
    for key in calls:
        await fake.call_event("call_ended", key)
    await fake.call_event("incoming_call", "c-new")
    await fake.call_event("call_ended", "c-new")

    await service.start()
    await service.message("READY=1")
    await service.poll("/metrics", lambda r: 'handler="journal",outcome="ok"} 8.0' in r.text)
    # Read while the daemon runs (its last second of changes may not be written yet).
    running = await call_map(service)
    assert await service.signal_and_wait(signal.SIGTERM) == 0
    stopped = await call_map(service)

    lines = [json.loads(line) for line in record.read_text().splitlines()]
    first, second = lines[:10], lines[10:]
    assert {line["origin"] for line in first} == {"realtime"}
    assert sorted((line["event"], line["call"]) for line in second) == sorted(
        [("call_ended", key) for key in calls]
        + [("incoming_call", "c-new"), ("call_ended", "c-new")]
    )
    assert all(
        line["origin"] == "reconcile" and line["id"] == lifecycle_id(line["event"], line["call"])
        for line in second
    )
    restarts = [line for line in service.log_lines() if line["event"] == "gap in the realtime link"]
    assert [line["cause"] for line in restarts] == ["restart"]
    # The map, open calls first.
    for rows in (running, stopped):
        ended = [row["status"] == "ended" for row in rows]
        assert ended == sorted(ended)
        assert {"c-open", *calls} <= {row["call"] for row in rows}
    assert {row["call"] for row in stopped} == {*calls, "c-new", "c-open"}
    assert [(row["call"], row["status"]) for row in stopped[:1]] == [("c-open", "ringing")]
    assert {row["status"] for row in stopped[1:]} == {"ended"}
    assert {row["origins"]["ended"] for row in stopped[1:]} == {"reconcile"}
