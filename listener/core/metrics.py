"""Prometheus metrics, one registry for the whole process.

Names follow https://prometheus.io/docs/practices/naming: a ``sippet_listener_`` prefix, base
units, ``_total`` on counters. Labels are low-cardinality by construction: event names come from
the server but are few; call keys and ids are never labels.

The values live here, in plain attributes; ``prometheus_client`` renders them, and is
imported only when something reads them (``/metrics``, the status page, a test): at rest,
``run`` without ``metrics_listen`` never loads it (1.1-1.6 MiB of idle RSS and 14 ms of
import, ``python -m bench.imports``). Its ``generate_latest`` takes :data:`REGISTRY` as its
own registries, and the families collected are its own, so the exposition is its own.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client.core import Metric

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
    "Counter",
    "Gauge",
    "Histogram",
    "HistogramCell",
    "HotCounter",
    "HotHistogram",
    "Registry",
]

_P = "sippet_listener_"
# Increments off the event loop (the call store's and the outbox's threads) take it;
# the hot path's ``cell.value += 1`` runs on the loop only and does not.
_LOCK = threading.Lock()


class _Collector(Protocol):
    def collect(self) -> Iterator[Metric]: ...


class _Registering(Protocol):
    def register(self, collector: Any) -> None: ...


class Registry:
    """The collectors of the process, in the shape ``prometheus_client`` reads a registry:
    ``generate_latest(REGISTRY)`` renders it."""

    def __init__(self) -> None:
        self._collectors: list[_Collector] = []

    def register(self, collector: _Collector) -> None:
        """Collect ``collector`` from now on."""
        self._collectors.append(collector)

    def collect(self) -> Iterator[Metric]:
        """Every family, as ``prometheus_client`` metric families."""
        for collector in self._collectors:
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value, or None (as ``prometheus_client``'s registry answers)."""
        wanted = labels or {}
        for family in self.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == wanted:
                    return float(sample.value)
        return None


class Cell:
    """One labelled counter value; ``cell.value += 1`` is all an increment costs."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (from any thread)."""
        with _LOCK:
            self.value += amount


class _GaugeCell(Cell):
    """One gauge value: set, or read from a function when collected."""

    __slots__ = ("function",)

    def __init__(self) -> None:
        super().__init__()
        self.function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        """Set the value."""
        self.value = value

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value from ``function`` whenever the gauge is collected."""
        self.function = function

    def read(self) -> float:
        return self.value if self.function is None else self.function()


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


class _Family:
    """A metric's name, help and label names, and its children by label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str] | tuple[str, ...] = (),
        *,
        registry: _Registering,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._cells: dict[tuple[str, ...], Any] = {}
        registry.register(self)
        if not self._labelnames:
            # Exposed as 0 from the start, as prometheus_client does with unlabelled metrics.
            self._only()

    def _child(self, values: tuple[str, ...], named: dict[str, str]) -> Any:
        key = tuple(named[name] for name in self._labelnames) if named else values
        if len(key) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {key}")
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = self._new()
        return cell

    def _new(self) -> Any:
        raise NotImplementedError

    def _only(self) -> Any:
        # An unlabelled metric is its one child.
        return self._child((), {})

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class HotCounter(_Family):
    """A counter. Its children are :class:`Cell`; on the per-event hot path, hold the child
    and ``cell.value += 1`` (prometheus_client's Counter took a lock per increment; at tens
    of thousands of events a second that showed in profiles)."""

    def labels(self, *values: str, **named: str) -> Cell:
        """The value for these label values (created at 0 on first use)."""
        cell: Cell = self._child(values, named)
        return cell

    def _new(self) -> Cell:
        return Cell()

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` to an unlabelled counter."""
        self._only().inc(amount)

    @property
    def value(self) -> float:
        """An unlabelled counter's value."""
        return float(self._only().value)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, cell in self._cells.items():
            family.add_metric(list(key), cell.value)
        yield family


class Gauge(_Family):
    """A gauge; ``set_function`` children are read when collected (nothing on the hot path)."""

    def labels(self, *values: str, **named: str) -> _GaugeCell:
        """The gauge for these label values."""
        cell: _GaugeCell = self._child(values, named)
        return cell

    def _new(self) -> _GaugeCell:
        return _GaugeCell()

    def set(self, value: float) -> None:
        """Set an unlabelled gauge."""
        self._only().set(value)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (negative to take away) to an unlabelled gauge."""
        self._only().inc(amount)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, cell in list(self._cells.items()):
            family.add_metric(list(key), cell.read())
        yield family


class HotHistogram(_Family):
    """A histogram; its children are :class:`HistogramCell` (see :class:`HotCounter`)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str] | tuple[str, ...] = (),
        buckets: tuple[float, ...] = (),
        *,
        registry: _Registering,
    ) -> None:
        self._bounds = buckets
        super().__init__(name, documentation, labelnames, registry=registry)

    def labels(self, *values: str, **named: str) -> HistogramCell:
        """The histogram for these label values."""
        cell: HistogramCell = self._child(values, named)
        return cell

    def _new(self) -> HistogramCell:
        return HistogramCell(self._bounds)

    def observe(self, value: float) -> None:
        """Record one observation of an unlabelled histogram."""
        self._only().observe(value)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        bounds = [str(float(bound)) for bound in self._bounds] + ["+Inf"]
        for key, cell in self._cells.items():
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, cell.counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(key), buckets, cell.total)
        yield family


# The cold metrics are the same classes: one implementation, read the same way.
Counter = HotCounter
Histogram = HotHistogram

REGISTRY = Registry()


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
