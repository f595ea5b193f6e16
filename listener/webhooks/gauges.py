"""The outbox as measured every ``poll_interval`` (less often when a measure is costly):
Prometheus gauges and the status line."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Final

import structlog

from listener.core.metrics import DEAD_LETTERS, OUTBOX_OLDEST_AGE, OUTBOX_PENDING
from listener.webhooks.outbox_rows import DestinationStats
from listener.webhooks.outbox_store import OutboxStore
from listener.webhooks.store import Store

__all__ = ["Gauges"]

# Seconds between two measures at most, however costly they are.
_LONGEST_GAP: Final = 10.0

_log = structlog.get_logger(__name__)


class Gauges:
    """Measures the configured destinations' backlog in the outbox.

    Args:
        names: the configured destinations.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._names = list(names)
        self._stats: list[DestinationStats] = []
        self._measured = False
        self._next = 0.0

    async def measure(self, store: Store, *, force: bool = False) -> None:
        """Measure, unless the last measure was too recent for its cost (or ``force``); a
        failure is logged and the last figures stay."""
        if not force and time.monotonic() < self._next:
            return
        now = time.time()

        def measured(outbox: OutboxStore) -> tuple[list[DestinationStats], float]:
            started = time.perf_counter()
            return outbox.stats(now, self._names), time.perf_counter() - started

        try:
            stats, took = await store.run(measured)
        except Exception:
            _log.exception("webhook outbox stats failed")
            return
        # A measure counts the pending rows, on the outbox's thread: 63 ms for 200,000 of
        # them in SQLite, so every poll_interval (0.5 s) an eighth of the thread's time
        # taken from the commits during a receiver's outage, and more as its backlog grows.
        # Measures take a twentieth of that time at most, and come every 10 s at least.
        self._next = time.monotonic() + min(19 * took, _LONGEST_GAP)
        self._publish(stats, warn_unknown=not self._measured)
        self._measured = True

    @property
    def stats(self) -> list[DestinationStats]:
        """The configured destinations as last measured (empty before the first round)."""
        return list(self._stats)

    def describe(self, unhealthy: Mapping[str, float]) -> str:
        """A few words for the service status: the backlog as last measured, and how long
        each ``unhealthy`` destination has been so."""
        parts = []
        for entry in self._stats:
            state = "disabled, " if entry.disabled else ""
            if entry.name in unhealthy:
                state += f"unhealthy for {unhealthy[entry.name]:.0f} s, "
            parts.append(f"{entry.name} {state}{entry.pending} pending, {entry.dead} dead")
        return "; ".join(parts) or "outbox not measured yet"

    def _publish(self, stats: list[DestinationStats], *, warn_unknown: bool) -> None:
        """Set the gauges; on the first round, warn about rows nobody will deliver."""
        self._stats = [entry for entry in stats if entry.name in self._names]
        for entry in stats:
            if entry.name in self._names:
                OUTBOX_PENDING.labels(entry.name).set(entry.pending)
                OUTBOX_OLDEST_AGE.labels(entry.name).set(entry.oldest_age or 0.0)
                DEAD_LETTERS.labels(entry.name).set(entry.dead)
            elif warn_unknown and entry.pending:
                _log.warning(
                    "webhook outbox holds deliveries for an unconfigured destination",
                    destination=entry.name,
                    pending=entry.pending,
                )
