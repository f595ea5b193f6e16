"""The one retry policy: statuses, Retry-After, the backoff schedule, the tenacity adapter."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
import tenacity

from listener.core.retry import (
    AUTH_STATUSES,
    NO_DELAY,
    RETRY_AFTER_CAP,
    RETRYABLE_STATUSES,
    Backoff,
    BackoffPolicy,
    TenacityWait,
    honour_retry_after,
    is_retryable_status,
    retry_after_seconds,
)

NOW = 1_800_000_000.0


def test_statuses() -> None:
    assert {401, 403} == AUTH_STATUSES
    assert {408, 429, 502, 503, 504} == RETRYABLE_STATUSES
    assert all(is_retryable_status(status) for status in (408, 429, 500, 502, 503, 504, 599))
    assert not any(is_retryable_status(status) for status in (200, 400, 401, 403, 404, 410))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        (format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True), 30.0),
        # A date in the past means "now", never a negative wait.
        (format_datetime(datetime.fromtimestamp(NOW - 30, UTC), usegmt=True), 0.0),
        ("soon", None),
        ("-5", None),
    ],
)
def test_retry_after_seconds(value: str, seconds: float | None) -> None:
    assert retry_after_seconds({"retry-after": value}, now=NOW) == seconds


def test_retry_after_seconds_without_the_header() -> None:
    assert retry_after_seconds({}) is None


def test_retry_after_is_a_capped_lower_bound() -> None:
    assert honour_retry_after(2.0, None) == 2.0
    assert honour_retry_after(2.0, 10.0) == 10.0
    # Never shortens our own backoff.
    assert honour_retry_after(2.0, 0.5) == 2.0
    assert honour_retry_after(2.0, 10 * RETRY_AFTER_CAP) == RETRY_AFTER_CAP
    assert honour_retry_after(2.0, 10.0, cap=4.0) == 4.0


def test_the_schedule_grows_to_its_cap_within_its_jitter() -> None:
    policy = BackoffPolicy(initial=0.5, factor=2.0, cap=4.0, jitter=0.5)
    highest = [policy.delay(attempt, rand=lambda: 0.0) for attempt in range(6)]
    lowest = [policy.delay(attempt, rand=lambda: 1.0) for attempt in range(6)]
    assert highest == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert lowest == [0.0, 0.25, 0.5, 1.0, 2.0, 2.0]
    assert BackoffPolicy(first=1.5).delay(0) == 1.5


def test_refusals_climb_to_the_refusal_cap_and_other_failures_to_the_cap() -> None:
    policy = BackoffPolicy(initial=0.5, cap=30.0, jitter=0.0, refusal_cap=2.0)
    assert [policy.delay(n, refusal=True) for n in range(7)] == [0.0, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert [policy.delay(n) for n in range(7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    # The refusal cap never raises a lower cap.
    assert BackoffPolicy(initial=0.5, cap=1.0, jitter=0.0).delay(5, refusal=True) == 1.0
    backoff = Backoff(policy)
    assert [backoff.next_delay(refusal=True) for _ in range(5)][-1] == 2.0
    assert backoff.next_delay() == 8.0, "one schedule: a refusal still advances it"


def test_a_running_schedule_advances_and_starts_over() -> None:
    backoff = Backoff(BackoffPolicy(initial=1.0, jitter=0.0))
    assert [backoff.next_delay() for _ in range(4)] == [0.0, 1.0, 2.0, 4.0]
    backoff.reset()
    assert backoff.next_delay() == 0.0
    assert backoff.attempt == 1


def test_no_delay_never_waits() -> None:
    backoff = Backoff(NO_DELAY)
    assert [backoff.next_delay() for _ in range(10)] == [0.0] * 10


class _Busy(Exception):
    def __init__(self, retry_after: float | None) -> None:
        super().__init__("busy")
        self.retry_after = retry_after


def _state(attempt: int, failure: BaseException) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((type(failure), failure, None))
    return state


def test_tenacity_wait_follows_the_policy_and_honours_retry_after() -> None:
    wait = TenacityWait(BackoffPolicy(initial=0.1, jitter=0.0), cap=5.0)
    # tenacity's attempt 1 has failed: the first retry waits the policy's first backoff step.
    assert wait(_state(1, ValueError())) == 0.1
    assert wait(_state(3, ValueError())) == pytest.approx(0.4)
    assert wait(_state(1, _Busy(None))) == 0.1
    assert wait(_state(1, _Busy(2.0))) == 2.0
    assert wait(_state(1, _Busy(60.0))) == 5.0
