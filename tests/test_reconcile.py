"""Reconciliation: rebuilding missed transitions from list_calls rows, and the request."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listener.calls.reconcile import (
    CALL_FIELDS,
    Diff,
    Missed,
    diff,
    list_calls_request,
    open_calls_request,
    refresh_request,
)
from listener.calls.state import CallRecord, CallState, StatusMap
from listener.core.ids import EventIds, lifecycle_id

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp()
ORDER = ["incoming_call", "call_answered", "call_ended"]


def row(key: str, status: str, **fields: Any) -> dict[str, Any]:
    """A list_calls row as the RPC API answers it (camelCase)."""
    base = {
        "id": f"id-{key}",
        "callUuid": key,
        "direction": "inbound",
        "fromNumber": "+15550100",
        "toNumber": "+15557654321",
        "status": status,
        "startedAt": "2026-03-01T12:00:00.000Z",
        "answeredAt": None,
        "endedAt": None,
        "durationSeconds": None,
    }
    return {**base, **fields}


def names(result: Diff) -> list[tuple[str, str]]:
    return [(m.payload["callUuid"], m.name) for m in result.missed]


def state_at(**statuses: Any) -> CallState:
    return CallState(CallRecord(key, status, T0) for key, status in statuses.items())


def test_a_call_missed_entirely_is_rebuilt_in_its_own_order() -> None:
    ended = row("c-1", "completed", answeredAt="2026-03-01T12:00:05Z", durationSeconds=40)
    result = diff(CallState(), [ended])
    assert result == Diff(
        tuple(Missed(name, ended, lifecycle_id(name, "c-1")) for name in ORDER), 0, 0
    )
    assert all(m.payload is ended for m in result.missed)


@pytest.mark.parametrize(
    ("fields", "answered"),
    [
        ({"answeredAt": "2026-03-01T12:00:05Z"}, True),
        ({"durationSeconds": 12}, True),
        ({"durationSeconds": 0.5}, True),
        ({"durationSeconds": 0}, False),
        ({"durationSeconds": True}, False),
        ({"answeredAt": ""}, False),
        ({}, False),
    ],
)
def test_an_ended_call_was_answered_when_its_row_says_so(
    fields: dict[str, Any], answered: bool
) -> None:
    result = diff(CallState(), [row("c-1", "no-answer", **fields)])
    expected = ORDER if answered else ["incoming_call", "call_ended"]
    assert [m.name for m in result.missed] == expected


@pytest.mark.parametrize(
    ("known", "status", "missed"),
    [
        ("ringing", "in-progress", ["call_answered"]),
        ("ringing", "busy", ["call_ended"]),
        ("answered", "completed", ["call_ended"]),
        ("ringing", "ringing", []),
        ("answered", "ringing", []),  # a lagging row never moves a call back
        ("ended", "in-progress", []),
        ("ended", "completed", []),
    ],
)
def test_only_transitions_beyond_the_map_are_rebuilt(
    known: str, status: str, missed: list[str]
) -> None:
    result = diff(state_at(c=known), [row("c", status)])
    assert [m.name for m in result.missed] == missed


def test_rows_keep_their_order_and_each_call_its_own() -> None:
    rows = [
        row("a", "completed", durationSeconds=3),
        row("b", "ringing"),
        row("a", "completed", durationSeconds=3),  # the same call again adds nothing
        row("c", "active"),
    ]
    assert names(diff(state_at(c="ringing"), rows)) == [
        ("a", "incoming_call"),
        ("a", "call_answered"),
        ("a", "call_ended"),
        ("b", "incoming_call"),
        ("c", "call_answered"),
    ]


def test_nothing_is_made_up_from_rows_that_cannot_be_read() -> None:
    rows: list[object] = [
        "not a row",
        None,
        {"status": "completed"},
        {"callUuid": "", "status": "completed"},
        {"callUuid": "c-1"},
        {"callUuid": "c-1", "status": 7},
        row("c-2", "transferring"),
        row("c-3", "queued"),
    ]
    result = diff(CallState(), rows)
    assert (result.malformed, result.unknown_status) == (6, 1)
    assert names(result) == [("c-3", "incoming_call")]


def test_the_status_mapping_decides() -> None:
    statuses = StatusMap(answered=frozenset({"bridged"}), ended=frozenset({"hung-up"}))
    rows = [row("a", "bridged"), row("b", "completed")]
    result = diff(CallState(), rows, statuses)
    assert names(result) == [("a", "incoming_call"), ("a", "call_answered")]
    assert result.unknown_status == 1


def test_a_rebuilt_event_has_the_id_the_realtime_one_had() -> None:
    ended = row("c-1", "completed", durationSeconds=9)
    realtime = {"call": {"call_uuid": "c-1", "status": "completed"}, "occurredAt": "now"}
    for missed in diff(CallState(), [ended]).missed:
        assert missed.id == EventIds().assign(missed.name, realtime, T0)


statuses = st.sampled_from(["ringing", "in-progress", "completed", "no-answer", "mystery"])
known = st.none() | st.sampled_from(["ringing", "answered", "ended"])


@given(st.lists(st.tuples(st.sampled_from("abc"), statuses, st.booleans()), max_size=8), known)
def test_merging_what_diff_returns_leaves_nothing_to_rebuild(
    rows: list[tuple[str, str, bool]], status_of_a: str | None
) -> None:
    """Each call's rebuilt events go strictly forward from the map's status, and once they
    are merged (as the daemon merges what it dispatches) the same rows rebuild nothing."""
    state = CallState() if status_of_a is None else state_at(a=status_of_a)
    answer = [row(key, s, durationSeconds=10 if answered else 0) for key, s, answered in rows]
    result = diff(state, answer)
    for key in "abc":
        record = state.get(key)
        ranks = [ORDER.index(m.name) for m in result.missed if m.payload["callUuid"] == key]
        assert ranks == sorted(set(ranks))
        assert all(rank > (record.rank() if record else -1) for rank in ranks)
    for missed in result.missed:
        assert state.merge(missed.name, missed.payload, "reconcile", T0 + 1) is not None
    assert diff(state, answer).missed == ()


def test_the_request_covers_open_calls_and_the_gap_less_the_margin() -> None:
    state = CallState(
        [
            CallRecord("open-b", "answered", T0 - 10),
            CallRecord("open-a", "ringing", T0 - 3600),
            CallRecord("ended", "ended", T0 - 10),
            CallRecord("stale", "ringing", T0 - 90000),  # silent for more than the lookback
        ]
    )
    request = list_calls_request(state, since=T0 - 120, now=T0, margin=60)
    start = "2026-03-01T11:57:00.000Z"
    assert request == {
        "fields": list(CALL_FIELDS),
        "filter": {
            "or": [
                {"callUuid": {"in": ["open-a", "open-b"]}},
                {"startedAt": {"greaterThanOrEqual": start}},
                {"endedAt": {"greaterThanOrEqual": start}},
            ]
        },
        "sort": "startedAt",
    }


def test_the_request_looks_back_no_further_than_lookback_max() -> None:
    request = list_calls_request(CallState(), since=T0 - 7 * 86400, now=T0, lookback_max=3600)
    assert request["filter"] == {
        "or": [
            {"startedAt": {"greaterThanOrEqual": "2026-03-01T11:00:00.000Z"}},
            {"endedAt": {"greaterThanOrEqual": "2026-03-01T11:00:00.000Z"}},
        ]
    }


def test_a_refresh_asks_after_the_calls_open_for_a_while_only() -> None:
    state = CallState(
        [
            CallRecord("long", "answered", T0 - 5, started_at=T0 - 300),
            CallRecord("heard-late", "answered", T0 - 200, answered_at=T0 - 200),
            CallRecord("fresh", "ringing", T0 - 5, started_at=T0 - 5),
            CallRecord("over", "ended", T0 - 500, started_at=T0 - 600),
            CallRecord("stale", "ringing", T0 - 90000, started_at=T0 - 90000),
        ]
    )
    request = refresh_request(state, now=T0, open_for=60, lookback_max=86400)
    assert request == {
        "fields": list(CALL_FIELDS),
        "filter": {"callUuid": {"in": ["heard-late", "long"]}},
        "sort": "startedAt",
    }
    assert refresh_request(state_at(c="ended"), now=T0, open_for=60) is None


def test_the_first_start_asks_for_the_calls_not_ended_within_the_lookback() -> None:
    assert open_calls_request(now=T0, lookback_max=3600) == {
        "fields": list(CALL_FIELDS),
        "filter": {
            "and": [
                {"endedAt": {"isNil": True}},
                {"startedAt": {"greaterThanOrEqual": "2026-03-01T11:00:00.000Z"}},
            ]
        },
        "sort": "startedAt",
    }
