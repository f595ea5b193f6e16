"""The reconciler's record of gaps: what it logs and counts, and the moment the store keeps.

Its passes against a real fake Sippet are in ``test_calls_daemon``."""

from __future__ import annotations

from structlog.testing import capture_logs

from listener.calls.reconciler import Reconciler, ReconcileSettings
from listener.calls.tracker import CallTracker
from listener.core import metrics
from listener.rpc.client import RpcClient


def reconciler(*, enabled: bool) -> Reconciler:
    # Nothing is sent: passes run only in run(), which these tests never start.
    rpc = RpcClient("http://127.0.0.1:9", "sk_test_unused")
    return Reconciler(
        ReconcileSettings(enabled=enabled), rpc, CallTracker(), lambda event: None, topic="events"
    )


def seconds(cause: str) -> float:
    value = metrics.REGISTRY.get_sample_value("sippet_listener_gap_seconds_total", {"cause": cause})
    return value or 0.0


async def test_with_no_history_nothing_is_covered_until_the_first_join() -> None:
    gaps = reconciler(enabled=False)
    assert gaps.covered_until(50.0) is None
    with capture_logs() as logs:
        gaps.joined(60.0)
    assert [line["event"] for line in logs] == ["first start: no call history"]
    assert gaps.covered_until(70.0) == 70.0
    assert gaps.caught_up.is_set()


async def test_each_gap_is_recorded_and_covered_from_its_start_until_reconciled() -> None:
    gaps = reconciler(enabled=True)
    gaps.resume(100.0)
    restart, link = seconds("restart"), seconds("link")
    assert gaps.covered_until(105.0) == 100.0
    with capture_logs() as logs:
        gaps.joined(110.0)
        gaps.lost(120.0)
        gaps.lost(121.0)  # still the same gap
        gaps.joined(124.0)
    assert [(line["cause"], line["seconds"]) for line in logs] == [("restart", 10.0), ("link", 4.0)]
    assert (seconds("restart") - restart, seconds("link") - link) == (10.0, 4.0)
    # Neither gap has had its pass: the store must keep the earlier start.
    assert gaps.covered_until(130.0) == 100.0
    assert not gaps.caught_up.is_set()


async def test_without_reconciliation_a_join_closes_the_gap() -> None:
    gaps = reconciler(enabled=False)
    gaps.resume(100.0)
    gaps.joined(110.0)
    assert gaps.covered_until(130.0) == 130.0
    gaps.lost(140.0)
    assert gaps.covered_until(150.0) == 140.0
    assert not gaps.caught_up.is_set()
