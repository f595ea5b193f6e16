"""Webhook delivery over real HTTP to a loopback receiver, with the outbox in a real file."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from structlog.testing import capture_logs

from listener.core.events import Event
from listener.core.metrics import REGISTRY
from listener.testing.receiver import ReceivedRequest, WebhookReceiver
from listener.webhooks.destination import Destination
from listener.webhooks.forwarder import ForwarderStateError, WebhookForwarder
from listener.webhooks.outbox import Outbox
from listener.webhooks.outbox_connection import OutboxError
from listener.webhooks.outbox_rows import DestinationStats
from listener.webhooks.signing import encode_body, sign_headers

SECRET = "whsec_" + base64.b64encode(b"\x01" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"\x02" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"\x03" * 32).decode()
FAST = (0.0, 0.05, 0.1)
POLL = 0.05
# Probes of an unhealthy destination every 50 ms instead of from 1 s up to 5 s.
PROBE = 0.05
REPO = Path(__file__).resolve().parents[1]


def destination(url: str, name: str = "hooks", **overrides: Any) -> Destination:
    settings: dict[str, Any] = {
        "secrets": (SECRET,),
        "retry_schedule": FAST,
        "max_probe_interval": PROBE,
        **overrides,
    }
    return Destination(name, url, **settings)


def event(i: int = 0, name: str = "call_started", call: str | None = None) -> Event:
    payload: dict[str, Any] = {"i": i}
    if call is not None:
        payload["callUuid"] = call
    return Event.create(name, payload, "events", time.time())


def numbers(requests: list[ReceivedRequest]) -> list[int]:
    """The ``i`` of each request's event, in arrival order."""
    return [request.json()["data"]["i"] for request in requests]


def ids(requests: list[ReceivedRequest]) -> list[str]:
    return [request.headers["webhook-id"] for request in requests]


async def eventually(
    forwarder: WebhookForwarder, check: Callable[[], bool], timeout: float = 5.0
) -> None:
    """Wait until ``check()``, which reads the outbox as the CLI does, holds after a commit."""
    async with asyncio.timeout(timeout):
        while not check():
            await forwarder.wait_committed()


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as started:
        yield started


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


@pytest.fixture
def cli(db: Path) -> Iterator[Outbox]:
    """The outbox as the CLI process opens it, next to the running forwarder."""
    with Outbox(db) as opened:
        yield opened


def stats(outbox: Outbox, name: str = "hooks") -> DestinationStats:
    return next(s for s in outbox.stats(time.time(), [name]) if s.name == name)


def deliveries_counted(name: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "sippet_listener_webhook_deliveries_total", {"destination": name, "outcome": outcome}
    )
    return value or 0.0


# Signing and the request.


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    """The signing matches the vector published with the spec."""
    headers = sign_headers(
        ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


def test_body_is_ascii_json_even_for_lone_surrogates() -> None:
    """Whatever string the channel delivered, the body encodes and round-trips."""
    received = Event.create("x", {"name": "Zoë \ud800"}, "events", 0.25)
    body = encode_body("msg_1", received)
    assert json.loads(body) == {
        "id": "msg_1",
        "type": "x",
        "occurred_at": "1970-01-01T00:00:00.250Z",
        "topic": "events",
        "origin": "realtime",
        "data": {"name": "Zoë \ud800"},
    }


async def test_request_is_signed_with_every_secret_and_shaped_per_spec(
    receiver: WebhookReceiver, db: Path
) -> None:
    """Each secret of a rotation verifies with the reference library; the body is the envelope."""
    hook = destination(receiver.url, secrets=(SECRET, OLD_SECRET), headers={"x-tenant": "t1"})
    sent = Event.create("call_started", {"callUuid": "c-1", "n": [1, 2]}, "events", 1.8e9 + 0.5)
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        forwarder.submit(sent)
        [request] = await receiver.wait_for(1)
    for secret in (SECRET, OLD_SECRET):
        Webhook(secret).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(request.body, request.headers)
    assert request.method == "POST"
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("sippet-listener/")
    assert request.headers["x-tenant"] == "t1"
    body = request.json()
    assert body == {
        "id": request.headers["webhook-id"],
        "type": "call_started",
        "occurred_at": "2027-01-15T08:00:00.500Z",
        "topic": "events",
        "origin": "realtime",
        "data": {"callUuid": "c-1", "n": [1, 2]},
    }
    assert datetime.fromisoformat(body["occurred_at"]) == datetime.fromtimestamp(1.8e9 + 0.5, UTC)
    assert body["id"].startswith("msg_")


async def test_only_matching_events_are_enqueued(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """Event globs pick what a destination gets; nothing else is even stored."""
    hook = destination(receiver.url, events=("call_*", "voicemail"))
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        for i, name in enumerate(["sms_received", "call_started", "voicemail", "calls"]):
            forwarder.submit(event(i, name))
        await receiver.wait_for(2)
    assert sorted(numbers(receiver.requests)) == [1, 2]
    assert (stats(cli).pending, stats(cli).dead) == (0, 0)


# Failures and their handling.


async def test_receiver_down_then_up_gets_everything(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """Refused connections are retried (probed) until the receiver is back."""
    await receiver.down()
    hook = destination(receiver.url, retry_schedule=(0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6))
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        for i in range(5):
            forwarder.submit(event(i))
        await eventually(forwarder, lambda: stats(cli).failing == 5)
        await receiver.up()
        requests = await receiver.wait_for(5)
        await eventually(forwarder, lambda: stats(cli).pending == 0)
    assert sorted(numbers(requests)) == [0, 1, 2, 3, 4]
    assert len(set(ids(requests))) == 5


async def test_gone_disables_the_destination_until_enabled(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """410 disables (persisted), deliveries wait; enabling from the CLI resumes them."""
    receiver.respond_with(410, times=1)
    hook = destination(receiver.url, max_in_flight=1)
    before = deliveries_counted("hooks", "gone")
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        for i in range(3):
            forwarder.submit(event(i))
        await eventually(forwarder, lambda: stats(cli).disabled)
        assert stats(cli).pending == 3
        assert len(receiver.requests) == 1
        assert cli.enable("hooks")
        requests = await receiver.wait_for(4)
        await eventually(forwarder, lambda: stats(cli).pending == 0)
    assert ids(requests)[0] in ids(requests)[1:]
    assert sorted(numbers(requests[1:])) == [0, 1, 2]
    assert deliveries_counted("hooks", "gone") == before + 1


@pytest.mark.parametrize(
    ("probe_interval", "retry_after", "gap"),
    [(PROBE, "1", 1.0), (0.6, "0", 0.6)],
    ids=["lengthens-the-backoff", "never-shortens-it"],
)
async def test_retry_after_is_a_lower_bound_on_the_next_probe(
    receiver: WebhookReceiver, db: Path, probe_interval: float, retry_after: str, gap: float
) -> None:
    """A 503's Retry-After may push the next attempt (the probe) later than the backoff,
    never sooner."""
    receiver.respond_with(503, {"retry-after": retry_after}, times=1)
    hook = destination(receiver.url, max_probe_interval=probe_interval)
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        forwarder.submit(event())
        first, second = await receiver.wait_for(2, timeout=5)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert gap - 0.05 <= second.received_at - first.received_at < gap + 0.5


async def test_a_retry_after_of_days_holds_the_probes_back(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """A 429 asking for days: no probe follows for now (the wait is capped at the daemon's one
    cap, :data:`~listener.core.retry.RETRY_AFTER_CAP`, see test_webhook_health), the delivery
    keeps all its attempts but the one that ended the healthy period."""
    receiver.respond_with(429, {"retry-after": "999999"}, times=1)
    async with WebhookForwarder([destination(receiver.url)], db, poll_interval=POLL) as forwarder:
        forwarder.submit(event())
        await receiver.wait_for(1)
        await eventually(forwarder, lambda: stats(cli).failing == 1)
        with pytest.raises(TimeoutError):
            await receiver.wait_for(2, timeout=20 * PROBE)
        assert "hooks unhealthy for" in forwarder.describe()
    [row] = cli.due("hooks", time.time(), 1)
    assert row.attempts == 1


async def test_redirect_is_a_failure_and_is_not_followed(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """A 3xx is a failed attempt; the Location is never requested."""
    async with WebhookReceiver() as elsewhere:
        receiver.respond_with(307, {"location": elsewhere.url})
        hook = destination(receiver.url, retry_schedule=(0, 0.05))
        async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
            forwarder.submit(event())
            await eventually(forwarder, lambda: stats(cli).dead == 1)
        assert elsewhere.requests == []
    [dead] = cli.dead_letters()
    assert (dead.attempts, dead.last_status, dead.reason) == (2, 307, "exhausted")


async def test_slow_attempt_times_out_and_is_retried(receiver: WebhookReceiver, db: Path) -> None:
    """An attempt longer than the timeout fails and the next one goes through."""
    receiver.respond_with(200, delay=10, times=1)
    hook = destination(receiver.url, timeout=0.2)
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        forwarder.submit(event())
        first, second = await receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert 0.2 <= second.received_at - first.received_at < 1.0


async def test_exhausted_schedule_dead_letters_then_replay_delivers_same_id(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """After the last attempt the receiver rejects, the delivery is dead; a CLI replay is
    picked up while running."""
    receiver.respond_with(422)
    async with WebhookForwarder([destination(receiver.url)], db, poll_interval=POLL) as forwarder:
        forwarder.submit(event())
        await eventually(forwarder, lambda: stats(cli).dead == 1)
        [dead] = cli.dead_letters()
        assert (dead.attempts, dead.last_status, dead.last_error) == (3, 422, "HTTP 422")
        assert len(receiver.requests) == len(FAST)
        receiver.respond_with(200)
        assert cli.replay(time.time(), msg_ids=[dead.msg_id]) == {"dead": 1}
        requests = await receiver.wait_for(4)
        await eventually(forwarder, lambda: stats(cli).pending == 0)
    assert set(ids(requests)) == {dead.msg_id}
    assert requests[-1].body == dead.body
    assert stats(cli).dead == 0


async def test_hung_destination_does_not_slow_a_live_one(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """A destination whose receiver hangs only occupies its own slots."""
    async with WebhookReceiver() as hung:
        hung.respond_with(200, delay=60)
        dead_end = destination(hung.url, "hung", max_in_flight=2)
        live = destination(receiver.url, "live")
        async with WebhookForwarder([dead_end, live], db, poll_interval=POLL) as forwarder:
            start = time.monotonic()
            for i in range(20):
                forwarder.submit(event(i))
            await receiver.wait_for(20)
            elapsed = time.monotonic() - start
            await hung.wait_for(2)
            assert len(hung.requests) == 2
            await forwarder.stop(grace=0)
    assert elapsed < 1.0
    assert (stats(cli, "live").pending, stats(cli, "hung").pending) == (0, 20)


async def test_max_in_flight_bounds_concurrent_attempts(
    receiver: WebhookReceiver, db: Path
) -> None:
    """No more than max_in_flight requests are open at once for a destination."""
    receiver.respond_with(200, delay=0.2)
    hook = destination(receiver.url, max_in_flight=2)
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        for i in range(4):
            forwarder.submit(event(i))
        requests = await receiver.wait_for(4)
    arrivals = sorted(request.received_at for request in requests)
    assert arrivals[2] - arrivals[0] >= 0.18


# Outages, health and pace.


def metric(name: str, destination: str = "hooks") -> float:
    value = REGISTRY.get_sample_value(f"sippet_listener_{name}", {"destination": destination})
    return value or 0.0


def counted(outbox: Outbox, requests: list[ReceivedRequest]) -> int:
    """How many recorded attempts of these requests' messages used up one of their own."""
    return sum(a.counted for msg_id in set(ids(requests)) for a in outbox.attempts(msg_id))


async def test_an_outage_is_probed_one_request_at_a_time_and_costs_no_attempts(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """The first 503 pauses the destination: one probe at a time, a line and a gauge when it
    goes unhealthy and when it recovers; then the whole backlog goes at once, nothing dead,
    and only the failure that began the outage counted against its delivery."""
    receiver.respond_with(503)
    hook = destination(receiver.url, max_in_flight=8)
    probes = metric("webhook_probes_total")
    with capture_logs() as logs:
        async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
            for i in range(20):
                forwarder.submit(event(i))
            # The 8 attempts that met the outage, then a run of probes.
            await receiver.wait_for(8 + 10)
            assert metric("webhook_destination_healthy") == 0
            receiver.respond_with(200)
            ended = time.time()
            await eventually(forwarder, lambda: stats(cli).pending == 0)
            drained = time.time() - ended
    probing = [r.received_at for r in receiver.requests[8:] if r.status == 503]
    gaps = [later - earlier for earlier, later in itertools.pairwise(probing)]
    # Jitter spreads probes over half to all of the 50 ms backoff, never two at once.
    assert min(gaps) >= PROBE / 2 - 0.005
    assert drained < 1.0
    delivered = [r for r in receiver.requests if r.status == 200]
    assert sorted(numbers(delivered)) == list(range(20))
    assert stats(cli).dead == 0
    assert counted(cli, receiver.requests) == 1
    assert metric("webhook_destination_healthy") == 1
    assert metric("webhook_probes_total") - probes >= 10
    assert 0 < metric("webhook_success_ratio") < 1
    health = [e for e in logs if "webhook destination" in e["event"]]
    assert [(e["log_level"], e["event"].split(":")[0]) for e in health] == [
        ("warning", "webhook destination unhealthy"),
        ("info", "webhook destination recovered"),
    ]
    recovered = health[1]
    assert recovered["outage_seconds"] > 10 * PROBE / 2
    assert recovered["probes"] >= 10
    assert 0 < recovered["backlog"] <= 20


async def test_a_408_is_a_timeout_of_the_destination_not_a_rejection(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """408 Request Timeout pauses the destination like our own timeout: probed past its
    three-step schedule, not buried as a rejected delivery, and delivered once answered."""
    receiver.respond_with(408)
    hook = destination(receiver.url, max_in_flight=1)
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        forwarder.submit(event())
        await receiver.wait_for(2 * len(FAST))
        receiver.respond_with(200)
        await eventually(forwarder, lambda: stats(cli).pending == 0)
    assert stats(cli).dead == 0
    [msg_id] = set(ids(receiver.requests))
    timeline = cli.attempts(msg_id)
    assert {a.error_class for a in timeline if a.status == 408} == {"timeout"}
    assert (timeline[-1].status, timeline[-1].error_class) == (200, None)


async def test_an_outage_far_longer_than_the_schedule_dead_letters_nothing(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """Refused for forty probes, over ten times the whole retry schedule (0.15 s): nothing
    dies before max_age, everything is delivered once the receiver is back."""
    await receiver.down()
    hook = destination(receiver.url, max_age=60)
    probes = metric("webhook_probes_total")
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        for i in range(10):
            forwarder.submit(event(i))
        outage = time.monotonic()
        # The outage must outlast ten whole schedules, however fast the probes came.
        await eventually(
            forwarder,
            lambda: (
                metric("webhook_probes_total") - probes >= 40
                and time.monotonic() - outage > 10 * sum(FAST)
            ),
        )
        assert stats(cli).dead == 0
        await receiver.up()
        await eventually(forwarder, lambda: stats(cli).pending == 0)
    assert sorted(numbers(receiver.requests)) == list(range(10))
    assert stats(cli).dead == 0


async def test_past_max_age_a_pending_delivery_is_a_dead_letter_and_not_before(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """max_age gives up on a delivery by its age, whatever its attempts."""
    await receiver.down()
    hook = destination(receiver.url, max_age=0.5)
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        for i in range(3):
            forwarder.submit(event(i))
        await eventually(forwarder, lambda: stats(cli).dead == 3)
    dead = cli.dead_letters()
    assert {d.reason for d in dead} == {"max_age"}
    assert all(0.5 <= d.dead_at - d.created_at < 0.5 + 0.5 for d in dead)


async def test_a_body_the_receiver_rejects_uses_up_its_schedule_alone(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """A 422 for one body while the others succeed: that delivery alone is retried on its
    schedule and becomes a dead letter; the destination stays healthy and the others flow."""
    receiver.respond_with(422, when=lambda body: b'"data":{"i":3}' in body)
    with capture_logs() as logs:
        async with WebhookForwarder(
            [destination(receiver.url)], db, poll_interval=POLL
        ) as forwarder:
            for i in range(10):
                forwarder.submit(event(i))
            await eventually(forwarder, lambda: (stats(cli).pending, stats(cli).dead) == (0, 1))
    [dead] = cli.dead_letters()
    assert json.loads(dead.body)["data"] == {"i": 3}
    assert (dead.attempts, dead.last_status, dead.reason) == (len(FAST), 422, "exhausted")
    timeline = cli.attempts(dead.msg_id)
    assert [(a.status, a.error_class, a.counted, a.probe) for a in timeline] == [
        (422, "rejected", True, False)
    ] * len(FAST)
    delivered = [r for r in receiver.requests if r.status == 200]
    assert sorted(numbers(delivered)) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert not any("unhealthy" in entry["event"] for entry in logs)


def rate(requests: list[ReceivedRequest]) -> float:
    """Requests per second from the first arrival to the last."""
    arrivals = sorted(r.received_at for r in requests)
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


async def test_rate_limit_is_held_within_five_percent_replays_included(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """40/s with 8 slots free: sent at 40/s, and a replay of what was delivered too."""
    hook = destination(receiver.url, rate_limit=40.0)
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        for i in range(60):
            forwarder.submit(event(i))
        sent = await receiver.wait_for(60, timeout=10)
        await eventually(forwarder, lambda: stats(cli).pending == 0)
        assert cli.replay(time.time(), sources=["delivered"]) == {"delivered": 60}
        resent = (await receiver.wait_for(120, timeout=10))[60:]
        await eventually(forwarder, lambda: stats(cli).pending == 0)
    assert 40 * 0.95 <= rate(sent) <= 40 * 1.05
    assert 40 * 0.95 <= rate(resent) <= 40 * 1.05
    assert sorted(ids(resent)) == sorted(ids(sent))


# Ordering.


async def test_per_call_ordering_holds_a_calls_later_event_behind_a_retry(
    receiver: WebhookReceiver, db: Path
) -> None:
    """per_call: a call's second event waits for its first; other calls go ahead."""
    receiver.respond_with(500, times=1)
    hook = destination(receiver.url, ordering="per_call", max_in_flight=1)
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        for i, call in enumerate(["x", "x", "y"]):
            forwarder.submit(event(i, call=call))
        requests = await receiver.wait_for(4)
    assert numbers(requests) == [0, 2, 0, 1]


async def test_without_ordering_later_events_overtake_a_retry(
    receiver: WebhookReceiver, db: Path
) -> None:
    """ordering = none: a failed delivery does not hold back the next one of its call."""
    receiver.respond_with(500, times=1)
    hook = destination(receiver.url, max_in_flight=1)
    async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
        for i, call in enumerate(["x", "x", "y"]):
            forwarder.submit(event(i, call=call))
        requests = await receiver.wait_for(4)
    assert numbers(requests) == [0, 1, 2, 0]


# Durability.


async def test_restart_redelivers_pending_rows_with_the_same_ids(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """An attempt cut off by stop, and a submit never attempted, go out after a restart."""
    receiver.respond_with(200, delay=60, times=1)
    hook = destination(receiver.url, max_in_flight=1)
    first_run = WebhookForwarder([hook], db, poll_interval=POLL)
    await first_run.start()
    first_run.submit(event(0))
    [cut_off] = await receiver.wait_for(1)
    first_run.submit(event(1))
    await first_run.stop(grace=0)
    assert stats(cli).pending == 2
    async with WebhookForwarder([hook], db, poll_interval=POLL) as second_run:
        requests = await receiver.wait_for(3)
        await eventually(second_run, lambda: stats(cli).pending == 0)
    assert numbers(requests[1:]) == [0, 1]
    assert requests[1].headers["webhook-id"] == cut_off.headers["webhook-id"]
    assert requests[1].body == cut_off.body


_CHILD = """
import asyncio, sys, time
from listener.webhooks.destination import Destination
from listener.webhooks.forwarder import WebhookForwarder
from listener.core.events import Event

async def main(url, db, secret):
    hook = Destination("hooks", url, (secret,), retry_schedule=(0, 60))
    forwarder = WebhookForwarder([hook], db)
    await forwarder.start()
    for i in range(20):
        forwarder.submit(Event.create("call_started", {"i": i}, "events", time.time()))
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_kill_9_loses_nothing(receiver: WebhookReceiver, db: Path, cli: Outbox) -> None:
    """A daemon killed mid-attempt: a new one delivers every event, in-flight ids unchanged."""
    receiver.respond_with(200, delay=60)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        receiver.url,
        str(db),
        SECRET,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # The child submits all 20 before its first commit, and attempts only committed rows:
        # 8 attempts seen means all 20 are on disk.
        in_flight = await receiver.wait_for(8, timeout=20)
    finally:
        child.kill()
        _, errors = await child.communicate()
    assert child.returncode == -9, errors.decode()
    assert stats(cli).pending == 20
    receiver.respond_with(200)
    async with WebhookForwarder([destination(receiver.url)], db, poll_interval=POLL) as forwarder:
        await receiver.wait_for(28)
        await eventually(forwarder, lambda: stats(cli).pending == 0)
    redelivered = receiver.requests[8:]
    assert sorted(numbers(redelivered)) == list(range(20))
    assert set(ids(in_flight)) <= set(ids(redelivered))


async def test_stop_lets_running_attempts_finish_within_grace(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """stop(grace) waits for an attempt in progress and records its success."""
    receiver.respond_with(200, delay=0.2)
    forwarder = WebhookForwarder([destination(receiver.url)], db, poll_interval=POLL)
    await forwarder.start()
    forwarder.submit(event())
    await receiver.wait_for(1)
    await forwarder.stop(grace=5)
    assert stats(cli).pending == 0


async def test_outbox_bound_moves_the_oldest_to_dead_letters_loudly(
    receiver: WebhookReceiver, db: Path, cli: Outbox
) -> None:
    """Beyond max_pending the oldest become dead letters, with a warning and a metric.

    The wait is on the report, not the table: a stop right after the eviction's commit must
    not leave it unreported.
    """
    hook = destination(receiver.url, max_pending=3, retry_schedule=(30,))
    before = deliveries_counted("hooks", "evicted")
    with capture_logs() as logs:
        async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
            for i in range(10):
                forwarder.submit(event(i))
            await eventually(forwarder, lambda: deliveries_counted("hooks", "evicted") > before)
    assert deliveries_counted("hooks", "evicted") == before + 7
    warnings = [entry for entry in logs if "bound reached" in entry["event"]]
    assert [(w["log_level"], w["reason"], w["count"]) for w in warnings] == [
        ("warning", "max_pending", 7)
    ]
    dead = cli.dead_letters()
    assert [json.loads(d.body)["data"]["i"] for d in dead] == list(range(7))
    assert {d.reason for d in dead} == {"max_pending"}
    assert stats(cli).pending == 3


async def test_eviction_committed_as_stop_cancels_the_claim_is_still_reported(
    receiver: WebhookReceiver, db: Path, cli: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox thread commits an eviction, a stop cancels the claim waiting for it: the
    eviction is still counted and logged."""
    committed, release = threading.Event(), threading.Event()
    evict = Outbox.evict

    def evict_then_stall(outbox: Outbox, *args: Any, **kwargs: Any) -> dict[str, int]:
        moved = evict(outbox, *args, **kwargs)
        if moved:
            committed.set()
            release.wait(5)
        return moved

    monkeypatch.setattr(Outbox, "evict", evict_then_stall)
    hook = destination(receiver.url, max_pending=1, retry_schedule=(30,))
    before = deliveries_counted("hooks", "evicted")
    forwarder = WebhookForwarder([hook], db, poll_interval=POLL)
    with capture_logs() as logs:
        await forwarder.start()
        forwarder.submit(event(0))
        forwarder.submit(event(1))
        assert await asyncio.to_thread(committed.wait, 5)
        [claiming] = [task for task in asyncio.all_tasks() if task.get_name() == "webhook-hooks"]
        stopping = asyncio.create_task(forwarder.stop())
        await asyncio.wait([claiming])
        assert claiming.cancelled()
        release.set()
        await stopping
    assert deliveries_counted("hooks", "evicted") == before + 1
    assert any("bound reached" in entry["event"] for entry in logs)
    assert stats(cli).dead == 1


async def test_failed_commit_is_retried_and_its_submits_wait_for_it(
    receiver: WebhookReceiver, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that fails keeps its batch; the retry commits it and settles the future."""
    add = Outbox.add
    calls = 0

    def fail_first_add(outbox: Outbox, deliveries: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OutboxError("outbox add failed: disk I/O error")
        add(outbox, deliveries)

    monkeypatch.setattr(Outbox, "add", fail_first_add)
    with capture_logs() as logs:
        async with WebhookForwarder([destination(receiver.url)], db, poll_interval=POLL) as hooks:
            committed = hooks.submit(event(7))
            assert committed is not None
            await asyncio.wait_for(committed, 5)
            [request] = await receiver.wait_for(1)
    assert numbers([request]) == [7]
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == [
        "webhook outbox commit failed"
    ]


async def test_receiver_going_down_answers_waiting_requests_and_refuses_new_ones() -> None:
    """down() releases delayed requests with 503, then connections are refused until up()."""
    async with WebhookReceiver() as hook, httpx.AsyncClient() as client:
        hook.respond_with(200, delay=60)
        waiting = asyncio.create_task(client.post(hook.url, content=b"{}"))
        await hook.wait_for(1)
        await hook.down()
        assert (await waiting).status_code == 503
        with pytest.raises(httpx.ConnectError):
            await client.post(hook.url, content=b"{}")
        hook.respond_with(204)
        await hook.up()
        assert (await client.post(hook.url, content=b"{}")).status_code == 204
        with pytest.raises(TimeoutError, match="2 requests received"):
            await hook.wait_for(3, timeout=0.01)


# Lifecycle, configuration and hygiene.


async def test_submit_outside_running_is_refused(db: Path) -> None:
    """submit before start or after stop raises; stop is idempotent."""
    forwarder = WebhookForwarder([destination("http://127.0.0.1:9/")], db, poll_interval=POLL)
    with pytest.raises(ForwarderStateError):
        forwarder.submit(event())
    await forwarder.stop()
    await forwarder.start()
    await forwarder.stop()
    await forwarder.stop()
    with pytest.raises(ForwarderStateError):
        forwarder.submit(event())
    with pytest.raises(ForwarderStateError):
        await forwarder.start()


async def test_logs_and_reprs_never_show_secrets(receiver: WebhookReceiver, db: Path) -> None:
    """Failures are logged without secrets, signatures or the URL."""
    receiver.respond_with(500, times=1)
    receiver.respond_with(410, times=1)
    hook = destination(receiver.url, secrets=(SECRET, OLD_SECRET), headers={"authorization": "x"})
    with capture_logs() as logs:
        async with WebhookForwarder([hook], db, poll_interval=POLL) as forwarder:
            forwarder.submit(event())
            await receiver.wait_for(2)
    text = repr(logs) + repr(hook)
    assert logs
    for secret in (SECRET, OLD_SECRET):
        assert secret not in text
        assert secret.removeprefix("whsec_") not in text
    assert "v1," not in text
    assert receiver.url not in text
    assert "authorization" not in repr(hook)


def test_forwarder_refuses_duplicate_destination_names() -> None:
    """Workers are keyed by name: two destinations sharing one are a programming error."""
    hook = destination("https://example.com/")
    with pytest.raises(ValueError, match="duplicate destination names: hooks"):
        WebhookForwarder([hook, hook], "unused.sqlite3")
