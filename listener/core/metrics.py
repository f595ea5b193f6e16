"""Prometheus metrics, one registry for the whole process.

Names follow https://prometheus.io/docs/practices/naming: a ``sippet_listener_`` prefix, base
units, ``_total`` on counters. Labels are low-cardinality by construction: event names come from
the server but are few; call keys and ids are never labels.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "CALL_STORE_FAILURES",
    "DEAD_LETTERS",
    "EVENTS_DUPLICATE",
    "EVENTS_RECEIVED",
    "FRAMES_MALFORMED",
    "GAPS",
    "GAP_SECONDS",
    "HANDLER_DURATION",
    "HANDLER_OUTCOMES",
    "HANDLER_QUEUE_DEPTH",
    "HEARTBEAT_RTT",
    "OUTBOX_OLDEST_AGE",
    "OUTBOX_PENDING",
    "RECONCILED",
    "RECONCILE_FAILURES",
    "RECONNECTS",
    "REGISTRY",
    "ROTATIONS",
    "RPC_CALLS",
    "SOCKET_STATE",
    "TOKEN_MINTS",
    "WEBHOOK_DELIVERIES",
    "WEBHOOK_HEALTHY",
    "WEBHOOK_PROBES",
    "WEBHOOK_SUCCESS_RATIO",
    "Cell",
    "HistogramCell",
    "HotCounter",
    "HotHistogram",
]

REGISTRY = CollectorRegistry(auto_describe=True)
_P = "sippet_listener_"


class Cell:
    """One labelled counter value; ``cell.value += 1`` is all an increment costs."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class HotCounter(Collector):
    """A counter for the per-event hot path, read when scraped.

    prometheus_client's Counter takes a lock per increment; at tens of thousands of events a
    second that showed in profiles. Increments happen on the event loop only, and scrapes are
    served on the same loop, so a plain integer is safe.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._cells: dict[tuple[str, ...], Cell] = {}
        registry.register(self)

    def labels(self, **values: str) -> Cell:
        """The value for these label values (created at 0 on first use)."""
        key = tuple(values[name] for name in self._labelnames)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = Cell()
        return cell

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, cell in self._cells.items():
            family.add_metric(list(key), cell.value)
        yield family


class HistogramCell:
    """One labelled histogram: bucket counts and a sum, updated without a lock."""

    __slots__ = ("_bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.total += value


class HotHistogram(Collector):
    """A histogram for the per-event hot path (see :class:`HotCounter` for why)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._bounds = buckets
        self._cells: dict[tuple[str, ...], HistogramCell] = {}
        registry.register(self)

    def labels(self, **values: str) -> HistogramCell:
        """The histogram for these label values."""
        key = tuple(values[name] for name in self._labelnames)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = HistogramCell(self._bounds)
        return cell

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, cell in self._cells.items():
            cumulative, buckets = 0, []
            bounds = [str(float(bound)) for bound in self._bounds] + ["+Inf"]
            for bound, count in zip(bounds, cell.counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(key), buckets, cell.total)
        yield family


EVENTS_RECEIVED = HotCounter(
    f"{_P}events_received_total", "Events received on the channel.", ["event"], registry=REGISTRY
)
EVENTS_DUPLICATE = HotCounter(
    f"{_P}events_duplicate_total",
    "Events not handed to handlers: their id was handed on before.",
    ["event"],
    registry=REGISTRY,
)
GAPS = Counter(
    f"{_P}gaps_total",
    "Times no socket was joined and healthy, by cause (link, restart, first_start).",
    ["cause"],
    registry=REGISTRY,
)
GAP_SECONDS = Counter(
    f"{_P}gap_seconds_total",
    "Seconds no socket was joined and healthy, by cause.",
    ["cause"],
    registry=REGISTRY,
)
RECONCILE_FAILURES = Counter(
    f"{_P}reconcile_failures_total",
    "list_calls passes that left something to retry, by reason.",
    ["reason"],
    registry=REGISTRY,
)
RECONCILED = Counter(
    f"{_P}reconciled_events_total",
    "Transitions the channel missed, rebuilt from list_calls, by event.",
    ["event"],
    registry=REGISTRY,
)
CALL_STORE_FAILURES = Counter(
    f"{_P}call_store_failures_total",
    "Writes of the call store that failed (they are retried with the next batch).",
    registry=REGISTRY,
)
FRAMES_MALFORMED = Counter(
    f"{_P}frames_malformed_total",
    "Frames dropped because they could not be read.",
    registry=REGISTRY,
)
SOCKET_STATE = Gauge(
    f"{_P}socket_joined", "1 while the events channel is joined, else 0.", registry=REGISTRY
)
RECONNECTS = Counter(
    f"{_P}reconnects_total",
    "Realtime link failures that led to a reconnect.",
    ["reason"],
    registry=REGISTRY,
)
ROTATIONS = Counter(
    f"{_P}token_rotations_total",
    "Make-before-break token rotations completed.",
    registry=REGISTRY,
)
TOKEN_MINTS = Counter(
    f"{_P}token_mints_total", "Session token mint attempts.", ["outcome"], registry=REGISTRY
)
HEARTBEAT_RTT = Histogram(
    f"{_P}heartbeat_rtt_seconds",
    "Phoenix heartbeat round-trip time.",
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
HANDLER_OUTCOMES = HotCounter(
    f"{_P}handler_events_total",
    "Events handled, by handler and outcome.",
    ["handler", "outcome"],
    registry=REGISTRY,
)
HANDLER_DURATION = HotHistogram(
    f"{_P}handler_duration_seconds",
    "Time a handler spent on one event.",
    ["handler"],
    buckets=(
        0.0001,
        0.0005,
        0.001,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
        30.0,
    ),
    registry=REGISTRY,
)
HANDLER_QUEUE_DEPTH = Gauge(
    f"{_P}handler_queue_depth", "Events waiting for a handler.", ["handler"], registry=REGISTRY
)
SPOOLED_EVENTS = Gauge(
    f"{_P}spooled_events",
    "Events waiting in the local spool for the shared store to answer their claims.",
    registry=REGISTRY,
)
RPC_CALLS = Counter(
    f"{_P}rpc_calls_total",
    "Sippet RPC calls, by action and outcome.",
    ["action", "outcome"],
    registry=REGISTRY,
)
WEBHOOK_DELIVERIES = Counter(
    f"{_P}webhook_deliveries_total",
    "Webhook delivery attempts, by destination and outcome.",
    ["destination", "outcome"],
    registry=REGISTRY,
)
OUTBOX_PENDING = Gauge(
    f"{_P}outbox_pending",
    "Webhook deliveries waiting in the outbox.",
    ["destination"],
    registry=REGISTRY,
)
OUTBOX_OLDEST_AGE = Gauge(
    f"{_P}outbox_oldest_age_seconds",
    "Age of the oldest pending webhook delivery.",
    ["destination"],
    registry=REGISTRY,
)
DEAD_LETTERS = Gauge(
    f"{_P}webhook_dead_letters",
    "Webhook deliveries in the dead-letter table.",
    ["destination"],
    registry=REGISTRY,
)
WEBHOOK_HEALTHY = Gauge(
    f"{_P}webhook_destination_healthy",
    "1 while a webhook destination takes deliveries, 0 while it is unhealthy and probed.",
    ["destination"],
    registry=REGISTRY,
)
WEBHOOK_PROBES = Counter(
    f"{_P}webhook_probes_total",
    "Probes sent to unhealthy webhook destinations.",
    ["destination"],
    registry=REGISTRY,
)
WEBHOOK_SUCCESS_RATIO = Gauge(
    f"{_P}webhook_success_ratio",
    "Share of a webhook destination's attempts answered 2xx, over about the last minute.",
    ["destination"],
    registry=REGISTRY,
)
