"""A destination's health: whether its deliveries flow, or wait for one probe to get through.

A receiver that is down answers every delivery the same way, so trying each one on its own
schedule only burns their attempts (a 15 s outage once dead-lettered 80 % of what arrived in
it). Instead, the first "not now" failure (see :mod:`.worker`) makes the destination
*unhealthy*: nothing is sent but one probe at a time, at backoff intervals that a
``Retry-After`` can lengthen (:func:`~listener.core.retry.honour_retry_after`). The first
answer that is not "not now" makes it healthy again, and the backlog flows at once.

Pure state, no clock: every method takes ``now`` (monotonic seconds), so tests drive it.
"""

from __future__ import annotations

from dataclasses import dataclass

from listener.core.retry import Backoff, BackoffPolicy, honour_retry_after

__all__ = ["Health", "Outage", "SuccessRatio", "probe_policy"]


def probe_policy(max_interval: float) -> BackoffPolicy:
    """Probe backoff: from 1 s (or ``max_interval`` if shorter), doubling up to
    ``max_interval``, jittered so that destinations sharing a receiver spread apart."""
    first = min(1.0, max_interval)
    return BackoffPolicy(initial=first, cap=max_interval, first=first)


@dataclass(frozen=True, slots=True)
class Outage:
    """An outage that ended: how long it lasted and how many probes it took."""

    seconds: float
    probes: int


class Health:
    """Healthy, or unhealthy and probing.

    Args:
        policy: the delays between probes.
    """

    def __init__(self, policy: BackoffPolicy) -> None:
        self._backoff = Backoff(policy)
        self.healthy = True
        self.probing = False
        self._since = 0.0
        self._next_probe = 0.0
        self._probes = 0

    def allowance(self, free: int, now: float) -> tuple[int, float | None]:
        """How many attempts may start now, with ``free`` slots; and, if none, how long until
        one may (None: when a running attempt ends)."""
        if self.healthy:
            return free, None
        if self.probing or free == 0:
            return 0, None
        if now < self._next_probe:
            return 0, self._next_probe - now
        return 1, None

    def probe_started(self) -> None:
        """The one attempt :meth:`allowance` allowed while unhealthy has started."""
        self.probing = True
        self._probes += 1

    def probe_ended(self) -> None:
        """That probe's outcome is judged (it failed, succeeded or crashed)."""
        self.probing = False

    def failed(self, now: float, retry_after: float | None, *, probe: bool) -> bool:
        """Record a "not now" failure; return whether it made the destination unhealthy.

        The failure that ends a healthy period, and each failed probe, set the next probe on
        the backoff (``retry_after`` a lower bound). Other attempts that were already running
        only lengthen the wait if their ``Retry-After`` asks for more.
        """
        tripped = self.healthy
        if tripped:
            self.healthy = False
            self._since = now
            self._probes = 0
        if tripped or probe:
            self._next_probe = now + honour_retry_after(self._backoff.next_delay(), retry_after)
        elif retry_after is not None:
            self._next_probe = max(self._next_probe, now + honour_retry_after(0.0, retry_after))
        return tripped

    def answered(self, now: float) -> Outage | None:
        """Record an answer that is not "not now": the destination is up. Return the outage
        this ends, if it was unhealthy."""
        if self.healthy:
            return None
        self.healthy = True
        self._backoff.reset()
        return Outage(now - self._since, self._probes)

    def unhealthy_for(self, now: float) -> float | None:
        """Seconds since the destination became unhealthy; None while healthy."""
        return None if self.healthy else now - self._since


class SuccessRatio:
    """The share of attempts answered with a 2xx, each weighed by its age: an attempt counts
    half as much after ``half_life`` seconds, so the ratio follows about the last minute."""

    def __init__(self, half_life: float = 60.0) -> None:
        self._half_life = half_life
        self._ok = 0.0
        self._all = 0.0
        self._at: float | None = None

    def observe(self, ok: bool, now: float) -> float:
        """Count one attempt made at ``now``; return the ratio."""
        if self._at is not None:
            decay = 0.5 ** (max(0.0, now - self._at) / self._half_life)
            self._ok *= decay
            self._all *= decay
        self._at = now
        self._ok += ok
        self._all += 1.0
        return self._ok / self._all

    @property
    def value(self) -> float | None:
        """The ratio as of the last attempt; None before any."""
        return self._ok / self._all if self._all else None
