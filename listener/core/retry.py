"""The one retry policy: which statuses are worth retrying, how long to wait, when to start over.

Every client of the daemon (token minting, the session supervisor, RPC, webhook delivery) asks
this module, so a rule changes in one place:

- :data:`AUTH_STATUSES` are refusals of our credentials: never retried blindly.
- :data:`RETRYABLE_STATUSES` are the server saying "not now" (408, 429, 502, 503, 504): retried
  after a wait. :func:`is_retryable_status` also counts any other 5xx, for requests worth
  another try after a server error (a token mint); where a 500 is an answer that resending
  would repeat (an RPC action), only the set is retried.
- :func:`retry_after_seconds` reads a ``Retry-After`` header (both RFC 9110 forms), wherever a
  retryable answer carries one, and :func:`honour_retry_after` applies it as a **lower
  bound** on the wait, capped (at :data:`RETRY_AFTER_CAP` unless the caller says less): a
  server may slow us down, never park us for hours, and never hurry us past our own backoff.
- :class:`Backoff` is the pure schedule (no sleeping here: the caller sleeps, so tests inject
  :data:`NO_DELAY` and wait on events instead of the clock).
- :class:`TenacityWait` adapts a :class:`BackoffPolicy` to tenacity for request-level retries.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import tenacity

__all__ = [
    "AUTH_STATUSES",
    "NO_DELAY",
    "RETRYABLE_STATUSES",
    "RETRY_AFTER_CAP",
    "Backoff",
    "BackoffPolicy",
    "TenacityWait",
    "honour_retry_after",
    "is_retryable_status",
    "retry_after_seconds",
]

AUTH_STATUSES = frozenset({401, 403})
# 408 Request Timeout: the server gave up waiting for the request, a timeout like ours.
RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})
# The longest Retry-After honoured anywhere in the daemon (an hour, as Svix and Stripe cap it).
RETRY_AFTER_CAP = 3600.0


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status means "try again later" rather than "this request is wrong"."""
    return status in RETRYABLE_STATUSES or status >= 500


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Return how long a ``Retry-After`` header asks to wait, or None if absent or unreadable.

    Accepts both forms of RFC 9110 10.2.3: delay-seconds and an HTTP-date.
    """
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def honour_retry_after(
    delay: float, retry_after: float | None, cap: float = RETRY_AFTER_CAP
) -> float:
    """The wait before the next attempt: our own ``delay``, or longer if the server asked.

    ``Retry-After`` is a lower bound, capped at ``cap``; it never shortens our own backoff.
    """
    if retry_after is None:
        return delay
    return max(delay, min(retry_after, cap))


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """The shape of a backoff schedule. Durations are in seconds.

    The first delay is ``first``: 0 means one failure after a healthy period is retried at
    once, which keeps a routine server restart short. The n-th delay after it is
    ``min(cap, initial * factor**(n-1))`` scaled by a random factor in ``[1 - jitter, 1]``:
    jitter spreads a fleet's retries apart, and the floor keeps every delay a known fraction
    of the nominal one, so a refusal storm stays paced.

    A *refusal* (the server answered, and said no or not now: a refused upgrade or key, a
    failed mint) is capped at ``refusal_cap`` instead: such a window ends when the server
    says yes again, and the next attempt should not be far behind (issue #10 asks for a join
    within 3 s of a refusal window's end; under a 4 s delay it came up to 3.9 s late). 2 s
    keeps a 403 storm at 7 to 14 attempts in 12 s. Links that fail in any other way (a
    server that accepts and then drops every socket) still climb to ``cap``.
    """

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.5
    first: float = 0.0
    refusal_cap: float = 2.0

    def delay(
        self, attempt: int, rand: Callable[[], float] = random.random, *, refusal: bool = False
    ) -> float:
        """The delay before retry number ``attempt`` (0 is the first retry), after a refusal
        if ``refusal`` (see the class)."""
        if attempt == 0:
            return self.first
        cap = min(self.cap, self.refusal_cap) if refusal else self.cap
        nominal = min(cap, self.initial * self.factor ** (attempt - 1))
        return nominal * (1.0 - self.jitter * rand())


# For tests: every retry at once, so they wait on events instead of the clock.
NO_DELAY = BackoffPolicy(initial=0.0, cap=0.0, jitter=0.0)


@dataclass(slots=True)
class Backoff:
    """A running schedule of :class:`BackoffPolicy`: advanced by each failure, reset by the
    caller once what it retries has proved healthy again."""

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    attempt: int = 0

    def next_delay(self, *, refusal: bool = False) -> float:
        """Return the delay before the next attempt (after a refusal if ``refusal``) and
        advance the schedule."""
        delay = self.policy.delay(self.attempt, refusal=refusal)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the shortest delay."""
        self.attempt = 0


class TenacityWait(tenacity.wait.wait_base):
    """tenacity ``wait=``: the policy's backoff, raised to the failure's ``retry_after``
    attribute when it has one (see :func:`honour_retry_after`)."""

    def __init__(self, policy: BackoffPolicy, cap: float = RETRY_AFTER_CAP) -> None:
        self._policy = policy
        self._cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        # tenacity counts attempts from 1; the first retry follows attempt 1.
        delay = self._policy.delay(retry_state.attempt_number)
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float):
            return honour_retry_after(delay, float(retry_after), self._cap)
        return delay
