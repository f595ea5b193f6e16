"""The session supervisor against a real fake Sippet on loopback: every failure mode."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from listener.core import metrics
from listener.realtime.session import Session
from listener.testing import FakeSippet
from listener.testing.traffic import call_payload
from tests.conftest import MS, RunSession


async def stream(fake: FakeSippet, rate: float, duration: float) -> int:
    """Broadcast ``{"seq": n}`` events at ``rate`` per second; return how many were sent."""
    sent = 0
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < duration:
        due = int(elapsed * rate) + 1
        while sent < due:
            await fake.broadcast("incoming_call", {"callUuid": f"c-{sent}", "seq": sent})
            sent += 1
        await asyncio.sleep(1 / rate)
    return sent


async def rejoined(fake: FakeSippet, session: Session, joins: int, timeout: float = 10) -> None:
    """Wait until the server has seen ``joins`` joins and the session knows it is joined."""
    async with asyncio.timeout(timeout):
        await fake.wait_until(lambda: fake.joins >= joins, timeout=timeout)
        await session.joined.wait()


async def test_joins_and_receives_events_in_every_spelling(
    fake: FakeSippet, run_session: RunSession
) -> None:
    async with run_session() as (session, events):
        fields = {"callUuid": "c-9", "fromNumber": "+15550100"}
        for style in ("camel", "snake", "nested"):
            await fake.broadcast("incoming_call", call_payload(dict(fields), style))
        await fake.broadcast("brand_new_event", {"anything": True})
        received = await events.wait_for(4)
    assert [e.call_key for e in received] == ["c-9", "c-9", "c-9", None]
    assert received[-1].name == "brand_new_event"
    assert received[1].payload == {"call_uuid": "c-9", "from_number": "+15550100"}
    assert all(e.topic == "events" for e in received)
    assert session.reconnects == 0


@pytest.mark.parametrize(
    ("expiry_action", "join_ref_pushes"),
    [
        ("close_socket", False),
        ("close_channel", False),
        ("close_socket", True),
    ],
)
async def test_rotations_under_a_steady_stream_lose_and_duplicate_nothing(
    fake: FakeSippet, run_session: RunSession, expiry_action: str, join_ref_pushes: bool
) -> None:
    fake.token_ttl = 0.8
    fake.behaviour.expiry_action = expiry_action  # type: ignore[assignment]
    fake.behaviour.join_checks_token = True
    fake.behaviour.broadcast_join_ref = join_ref_pushes
    async with run_session() as (session, events):
        sent = await stream(fake, rate=200, duration=2.6)
        await events.wait_for(sent)
        # Nothing more trickles in: every event arrived exactly once.
        await fake.broadcast("marker", {"seq": -1})
        await events.wait_for(sent + 1)
    seqs = events.payloads("seq")[:-1]
    assert session.rotations >= 3
    assert session.reconnects == 0
    assert sorted(seqs) == list(range(sent)), "lost or duplicated events"
    assert seqs == list(range(sent)), "events out of order"


async def test_silent_heartbeats_are_detected_and_the_link_replaced(
    fake: FakeSippet, run_session: RunSession
) -> None:
    interval = 300 * MS
    async with run_session(heartbeat_interval=interval) as (session, events):
        fake.behaviour.answer_heartbeats = False
        went_silent = time.monotonic()
        await rejoined(fake, session, 2)
        replaced_after = time.monotonic() - went_silent
        fake.behaviour.answer_heartbeats = True
        await fake.broadcast("incoming_call", {"seq": 1})
        await events.wait_for(1)
    assert session.reconnects >= 1
    # Declared dead within two intervals of going silent, rejoined right after.
    assert replaced_after < 2 * interval + 0.5


async def test_a_403_storm_is_paced_by_the_backoff(
    fake: FakeSippet, run_session: RunSession
) -> None:
    async with run_session(backoff_initial=40 * MS, backoff_max=320 * MS) as _:
        fake.behaviour.upgrade_status = 403
        storm_started = time.time()
        await fake.drop_all()
        await fake.wait_until(lambda: len(fake.upgrades) >= 8, timeout=10)
        fake.behaviour.upgrade_status = None
        await fake.wait_until(lambda: fake.joins >= 2)
    refused = [u.at for u in fake.upgrades if u.status == 403 and u.at >= storm_started]
    gaps = [b - a for a, b in itertools.pairwise(refused)]
    # Nominal schedule after the immediate re-mint: 0, 40, 80, 160, 320, 320 ... ms, each
    # jittered down by at most half. The first auth failure retries at once, once.
    nominal = [0.0, 0.04, 0.08, 0.16, 0.32, 0.32]
    for gap, expected in zip(gaps, nominal, strict=False):
        assert gap >= expected * 0.5 - 0.005, (gaps, nominal)
    assert sum(1 for gap in gaps if gap < 0.015) <= 2, gaps
    # Every auth-shaped refusal re-minted.
    assert fake.mints >= len(refused)


async def test_malformed_frames_amid_events_lose_nothing(
    fake: FakeSippet, run_session: RunSession
) -> None:
    before = metrics.FRAMES_MALFORMED._value.get()
    async with run_session() as (session, events):
        for seq in range(20):
            await fake.broadcast("incoming_call", {"seq": seq})
            if seq % 5 == 0:
                await fake.send_malformed()
        await events.wait_for(20)
        assert session.joined.is_set()
    assert events.payloads("seq") == list(range(20))
    assert session.reconnects == 0
    assert fake.joins == 1
    assert metrics.FRAMES_MALFORMED._value.get() - before >= 4 * 6


async def test_revoked_key_then_restored_recovers_without_restart(
    fake: FakeSippet, run_session: RunSession
) -> None:
    async with run_session() as (session, events):
        fake.revoke_key()
        await fake.drop_all()
        await fake.wait_until(lambda: fake.mint_refusals >= 3)
        assert not session.joined.is_set()
        fake.restore_key()
        await rejoined(fake, session, 2)
        await fake.broadcast("incoming_call", {"seq": 7})
        await events.wait_for(1)
    assert events.payloads("seq") == [7]


async def test_refused_join_re_mints_then_backs_off(
    fake: FakeSippet, run_session: RunSession
) -> None:
    async with run_session() as (session, _):
        fake.behaviour.refuse_joins = True
        mints_before = fake.mints
        await fake.drop_all()
        await fake.wait_until(lambda: fake.join_refusals >= 4)
        fake.behaviour.refuse_joins = False
        await rejoined(fake, session, 2)
    # Each refused join is taken as a refused token: a fresh one per attempt.
    assert fake.mints - mints_before >= fake.join_refusals


async def test_unsolicited_channel_close_rejoins_with_a_fresh_token(
    fake: FakeSippet, run_session: RunSession
) -> None:
    async with run_session() as (session, events):
        mints = fake.mints
        await fake.close_channels()
        await rejoined(fake, session, 2)
        await fake.broadcast("incoming_call", {"seq": 1})
        await events.wait_for(1)
    assert fake.mints == mints + 1
    assert session.reconnects == 1


async def test_server_restart_is_rejoined_at_once(
    fake: FakeSippet, run_session: RunSession
) -> None:
    async with run_session(backoff_initial=5.0) as (session, _):
        await fake.drop_all(code=1012)
        # backoff_initial is 5 s: only the immediate first retry can rejoin this fast.
        await rejoined(fake, session, 2, timeout=3)
        # The token is still good: no re-mint for a plain restart.
        assert fake.mints == 1


async def test_a_failing_link_is_not_hammered_when_the_server_drops_every_join(
    fake: FakeSippet, run_session: RunSession
) -> None:
    async with run_session(backoff_initial=50 * MS, backoff_max=200 * MS, stable_after=60.0) as (
        session,
        _,
    ):
        for joins in range(1, 6):
            await rejoined(fake, session, joins)
            await fake.drop_all()
            await fake.wait_until(lambda: fake.stats()["sockets"] == 0)
        await rejoined(fake, session, 6)
    # Reconnects are paced although each one joined: joining is not "stable".
    assert session.reconnects == 5
    assert session._backoff.attempt >= 5


async def test_large_events_are_received(fake: FakeSippet, run_session: RunSession) -> None:
    audit = {"callUuid": "c-1", "payload": {"transcript": "x" * (5 * 1024 * 1024)}}
    async with run_session() as (session, events):
        await fake.broadcast("call_ai_audit_event", audit)
        await fake.broadcast("incoming_call", {"seq": 2})
        received = await events.wait_for(2)
    assert received[0].payload == audit
    assert session.reconnects == 0


async def test_stop_leaves_the_channel(fake: FakeSippet, run_session: RunSession) -> None:
    async with run_session():
        assert fake.joined_sockets == 1
    await fake.wait_until(lambda: fake.stats()["sockets"] == 0)
