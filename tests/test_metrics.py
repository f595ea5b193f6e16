"""The lock-free hot-path metrics expose exactly what prometheus_client's would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from listener.core.metrics import HotCounter, HotHistogram


def test_hot_counter_and_histogram_exposition() -> None:
    registry = CollectorRegistry()
    counter = HotCounter("demo_events_total", "Events.", ["event"], registry=registry)
    histogram = HotHistogram(
        "demo_seconds", "Durations.", ["handler"], (0.1, 1.0), registry=registry
    )
    counter.labels(event="incoming_call").value += 3
    cell = histogram.labels(handler="log")
    for value in (0.05, 0.1, 0.5, 7.0):
        cell.observe(value)
    text = generate_latest(registry).decode()
    assert 'demo_events_total{event="incoming_call"} 3.0' in text
    assert 'demo_seconds_bucket{handler="log",le="0.1"} 2.0' in text
    assert 'demo_seconds_bucket{handler="log",le="1.0"} 3.0' in text
    assert 'demo_seconds_bucket{handler="log",le="+Inf"} 4.0' in text
    assert 'demo_seconds_count{handler="log"} 4.0' in text
    assert 'demo_seconds_sum{handler="log"} 7.65' in text
    assert registry.get_sample_value("demo_events_total", {"event": "incoming_call"}) == 3
