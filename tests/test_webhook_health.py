"""A destination's health, its rate limit and its success ratio, on a clock the test turns."""

from __future__ import annotations

import pytest

from listener.core.retry import RETRY_AFTER_CAP, BackoffPolicy
from listener.webhooks.health import Health, Outage, SuccessRatio, probe_policy
from listener.webhooks.ratelimit import TokenBucket

# 1, 2, 4 s between probes: no jitter, so that the test knows each one.
STEADY = BackoffPolicy(initial=2.0, cap=4.0, jitter=0.0, first=1.0)


def test_a_healthy_destination_uses_every_slot() -> None:
    health = Health(STEADY)
    assert health.allowance(8, 0.0) == (8, None)
    assert health.answered(0.0) is None
    assert health.unhealthy_for(0.0) is None


def test_the_first_failure_pauses_everything_but_one_probe_on_the_backoff() -> None:
    """Unhealthy: nothing until the probe is due, then one at a time; each failed probe
    waits longer, other failures do not move the probe."""
    health = Health(STEADY)
    assert health.failed(10.0, None, probe=False) is True
    assert health.allowance(8, 10.5) == (0, 0.5)
    assert health.failed(10.6, None, probe=False) is False
    assert health.allowance(8, 10.6) == pytest.approx((0, 0.4))
    assert health.allowance(8, 11.0) == (1, None)
    health.probe_started()
    assert health.allowance(8, 11.0) == (0, None)
    assert health.failed(11.1, None, probe=True) is False
    health.probe_ended()
    assert health.allowance(8, 12.0) == pytest.approx((0, 1.1))
    assert health.allowance(0, 20.0) == (0, None)
    assert health.unhealthy_for(15.0) == 5.0


def test_retry_after_is_a_lower_bound_on_the_next_probe_capped_by_the_shared_policy() -> None:
    health = Health(STEADY)
    health.failed(0.0, 30.0, probe=False)
    assert health.allowance(1, 0.0) == (0, 30.0)
    health.probe_started()
    health.failed(30.0, 0.0, probe=True)
    health.probe_ended()
    assert health.allowance(1, 30.0) == (0, 2.0)
    # An attempt that was running when the outage began may only push the probe later.
    health.failed(30.0, 10**9, probe=False)
    assert health.allowance(1, 30.0) == (0, RETRY_AFTER_CAP)


def test_an_answer_ends_the_outage_and_resets_the_backoff() -> None:
    health = Health(STEADY)
    health.failed(100.0, None, probe=False)
    for at in (101.0, 103.0):
        health.probe_started()
        health.failed(at, None, probe=True)
        health.probe_ended()
    health.probe_started()
    assert health.answered(107.0) == Outage(seconds=7.0, probes=3)
    health.probe_ended()
    assert health.allowance(8, 107.0) == (8, None)
    health.failed(200.0, None, probe=False)
    assert health.allowance(1, 200.0) == (0, 1.0)


def test_probe_policy_starts_at_a_second_or_the_cap() -> None:
    assert probe_policy(5.0) == BackoffPolicy(initial=1.0, cap=5.0, first=1.0)
    assert probe_policy(0.05).delay(0) == 0.05
    assert probe_policy(0.0).delay(3) == 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_paces_starts_after_a_burst_of_25_milliseconds() -> None:
    clock = Clock()
    bucket = TokenBucket(200.0, clock)
    assert bucket.available() == 5
    bucket.take(5)
    assert bucket.available() == 0
    assert bucket.wait() == pytest.approx(0.005)
    clock.now = 0.0125
    assert bucket.available() == 2
    clock.now = 10.0
    assert bucket.available() == 5


def test_token_bucket_holds_its_rate_over_a_long_run() -> None:
    """Starting whenever a token is there, at random moments: at most rate x time + burst."""
    clock = Clock()
    bucket = TokenBucket(50.0, clock)
    started = 0
    while clock.now < 10.0:
        ready = bucket.available()
        bucket.take(ready)
        started += ready
        clock.now += max(bucket.wait(), 0.003)
    assert 50 * 10.0 * 0.95 <= started <= 50 * 10.0 + 1.5


def test_a_slow_bucket_still_lets_one_through() -> None:
    clock = Clock()
    bucket = TokenBucket(0.5, clock)
    assert bucket.available() == 1
    bucket.take(1)
    assert bucket.wait() == pytest.approx(1.0)


def test_success_ratio_follows_the_last_minute() -> None:
    ratio = SuccessRatio(half_life=60.0)
    assert ratio.observe(False, 0.0) == 0.0
    assert ratio.observe(True, 0.0) == 0.5
    # A minute later, the old attempts weigh half as much as the new one.
    assert ratio.observe(True, 60.0) == pytest.approx(1.5 / 2.0)
    for second in range(600):
        value = ratio.observe(True, 60.0 + second)
    assert value > 0.99
