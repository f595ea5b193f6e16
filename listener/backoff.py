"""Reconnect delays as a pure, injectable policy (no sleeping here: the caller sleeps)."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with jitter, reset by the caller after a healthy period.

    The first delay is 0: one failure after a healthy period is retried at once, which is what
    keeps a routine server restart short. The n-th delay after it is
    ``min(cap, initial * factor**(n-1))`` scaled by a random factor in ``[1 - jitter, 1]``:
    jitter spreads a fleet's reconnects apart, and the floor keeps every delay a known fraction
    of the nominal one, so a refusal storm is paced.
    """

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5
    attempt: int = 0

    def next_delay(self) -> float:
        """Return the delay before the next attempt and advance the schedule."""
        attempt = self.attempt
        self.attempt += 1
        if attempt == 0:
            return 0.0
        nominal = min(self.cap, self.initial * self.factor ** (attempt - 1))
        return nominal * (1.0 - self.jitter * random.random())

    def reset(self) -> None:
        """Start again from the shortest delay."""
        self.attempt = 0
