"""A token bucket: a destination's ``rate_limit``, in attempts started per second."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """Tokens accrue at ``rate`` a second up to ``rate / 20`` (at least 1); each start takes one.

    The bucket holds 50 ms of the rate: a claim at a high rate fetches several rows at once
    instead of one round trip to the outbox per attempt, and any one-second window still sees
    at most 5 % more than the rate. It starts full.

    Args:
        rate: tokens per second.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._capacity = max(1.0, rate / 20)
        self._clock = clock
        self._tokens = self._capacity
        self._at = clock()

    def available(self) -> int:
        """Whole tokens there now."""
        self._refill()
        return int(self._tokens)

    def take(self, count: int) -> None:
        """Spend ``count`` tokens (at most :meth:`available`)."""
        self._refill()
        self._tokens -= count

    def wait(self) -> float:
        """Seconds until the next whole token."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self._rate)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._rate)
        self._at = now
