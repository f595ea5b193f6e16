"""Small HTTP facts shared by every client in the package."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from importlib import metadata

import tenacity

__all__ = ["USER_AGENT", "VERSION", "WaitRetryAfterOrBackoff", "retry_after_seconds"]


def _version() -> str:
    try:
        return metadata.version("sippet-listener")
    except metadata.PackageNotFoundError:
        return "0+unknown"


VERSION = _version()
USER_AGENT = f"sippet-listener/{VERSION}"


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


class WaitRetryAfterOrBackoff(tenacity.wait.wait_base):
    """tenacity wait: what the failure's ``retry_after`` asks for (capped), else exponential
    backoff with full jitter.

    Args:
        initial: the backoff's first step, in seconds.
        maximum: the longest backoff wait.
        cap: the longest ``Retry-After`` honoured: a server must not park us for minutes.
    """

    def __init__(self, initial: float, maximum: float, cap: float) -> None:
        self._backoff = tenacity.wait_random_exponential(multiplier=initial, max=maximum)
        self._cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, int | float):
            return min(float(retry_after), self._cap)
        return float(self._backoff(retry_state))
