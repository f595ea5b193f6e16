"""The SQLite outbox, on real files: pending rows, dead letters, bounds, a second process."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from listener.webhooks.outbox import (
    SCHEMA_VERSION,
    DeadLetter,
    Delivery,
    NewDelivery,
    Outbox,
    OutboxError,
)

T0 = 1_800_000_000.0


def new(i: int, destination: str = "a", *, call: str | None = None, due: float = T0) -> NewDelivery:
    """A delivery whose msg_id and body are derived from ``i``, enqueued at T0 + i."""
    return NewDelivery(
        destination, f"msg_{i}", "call_started", call, f'{{"i":{i}}}'.encode(), T0 + i, due
    )


def ids(rows: Iterable[Delivery | DeadLetter]) -> list[str]:
    return [row.msg_id for row in rows]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


@pytest.fixture
def outbox(path: Path) -> Iterator[Outbox]:
    with Outbox(path) as opened:
        yield opened


def test_new_file_gets_schema_in_wal_mode(path: Path) -> None:
    """Opening creates the schema, switches to WAL and records the schema version."""
    Outbox(path).close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master")}
    raw.close()
    assert {"deliveries", "dead_letters", "destinations"} <= tables


def test_newer_schema_is_refused(path: Path) -> None:
    """A file written by a newer version is not touched."""
    Outbox(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(OutboxError, match="newer"):
        Outbox(path)


def test_unopenable_file_raises_outbox_error(tmp_path: Path) -> None:
    """SQLite errors surface as OutboxError."""
    with pytest.raises(OutboxError, match="outbox"):
        Outbox(tmp_path / "missing-dir" / "outbox.sqlite3")


def test_rows_survive_reopening(path: Path) -> None:
    """What was committed is there after the file is reopened."""
    with Outbox(path) as first:
        first.add([new(1), new(2)])
    with Outbox(path) as second:
        assert ids(second.due("a", T0, 10)) == ["msg_1", "msg_2"]


def test_due_orders_by_due_time_and_honours_limit(outbox: Outbox) -> None:
    """Earliest due first, enqueue order breaking ties, at most ``limit``; not-yet-due skipped."""
    outbox.add([new(1, due=T0 + 5), new(2), new(3), new(4, due=T0 + 60)])
    assert ids(outbox.due("a", T0 + 10, 10)) == ["msg_2", "msg_3", "msg_1"]
    assert ids(outbox.due("a", T0 + 10, 2)) == ["msg_2", "msg_3"]
    assert ids(outbox.due("b", T0 + 10, 10)) == []


def test_due_and_next_due_skip_excluded_rows(outbox: Outbox) -> None:
    """Rows being attempted (excluded) are neither returned nor counted as next due."""
    outbox.add([new(1), new(2, due=T0 + 5)])
    assert ids(outbox.due("a", T0, 10, exclude={"msg_1"})) == []
    assert outbox.next_due("a", exclude={"msg_1"}) == T0 + 5
    assert outbox.next_due("a", exclude={"msg_1", "msg_2"}) is None


def test_duplicate_add_is_ignored(outbox: Outbox) -> None:
    """Re-adding a pending (destination, msg_id) keeps the original row."""
    outbox.add([new(1, due=T0 + 5)])
    outbox.add([new(1, due=T0)])
    assert outbox.next_due("a") == T0 + 5


def test_per_call_ordering_holds_back_later_deliveries_of_a_call(outbox: Outbox) -> None:
    """With per_call, a call's later delivery waits while an earlier one is pending."""
    outbox.add([new(1, call="x", due=T0 + 30), new(2, call="x"), new(3, call="y"), new(4)])
    assert ids(outbox.due("a", T0, 10, per_call=True)) == ["msg_3", "msg_4"]
    assert ids(outbox.due("a", T0, 10)) == ["msg_2", "msg_3", "msg_4"]
    assert outbox.next_due("a", exclude={"msg_3", "msg_4"}, per_call=True) == T0 + 30
    outbox.mark_delivered("a", ["msg_1"])
    assert ids(outbox.due("a", T0, 10, per_call=True)) == ["msg_2", "msg_3", "msg_4"]


def test_disabled_destination_has_nothing_due(outbox: Outbox) -> None:
    """Disabling keeps rows pending but hides them until enabled again."""
    outbox.add([new(1)])
    assert outbox.disable("a", T0, "HTTP 410 Gone") is True
    assert outbox.disable("a", T0 + 1, "again") is False
    assert outbox.is_disabled("a")
    assert outbox.due("a", T0, 10) == []
    assert outbox.next_due("a") is None
    [stats] = outbox.stats(T0 + 10)
    assert (stats.disabled, stats.disabled_at, stats.disabled_reason) == (
        True,
        T0,
        "HTTP 410 Gone",
    )
    assert stats.pending == 1
    assert outbox.enable("a") is True
    assert outbox.enable("a") is False
    assert ids(outbox.due("a", T0, 10)) == ["msg_1"]


def test_reschedule_records_the_failure(outbox: Outbox) -> None:
    """A failed attempt moves the due time and shows up as failing."""
    outbox.add([new(1), new(2)])
    outbox.reschedule(
        "a", "msg_1", due_at=T0 + 5, attempts=1, attempted_at=T0, status=500, error="HTTP 500"
    )
    [row] = outbox.due("a", T0 + 5, 10, exclude={"msg_2"})
    assert (row.msg_id, row.attempts, row.due_at) == ("msg_1", 1, T0 + 5)
    [stats] = outbox.stats(T0 + 10)
    assert (stats.pending, stats.failing, stats.oldest_age) == (2, 1, 9.0)


def test_bury_and_list_dead_letters(outbox: Outbox) -> None:
    """A buried delivery leaves the pending rows with its last status, error and body."""
    outbox.add([new(1, call="x"), new(2)])
    assert outbox.bury(
        "a", "msg_1", now=T0 + 9, reason="exhausted", attempts=3, status=503, error="HTTP 503"
    )
    assert not outbox.bury("a", "msg_1", now=T0 + 9, reason="exhausted")
    assert ids(outbox.due("a", T0 + 9, 10)) == ["msg_2"]
    [dead] = outbox.dead_letters()
    assert (dead.msg_id, dead.call_key, dead.body, dead.attempts) == ("msg_1", "x", b'{"i":1}', 3)
    assert (dead.last_status, dead.last_error, dead.dead_at, dead.reason) == (
        503,
        "HTTP 503",
        T0 + 9,
        "exhausted",
    )
    assert outbox.stats(T0 + 9)[0].dead == 1


def test_bury_keeps_recorded_failure_when_none_given(outbox: Outbox) -> None:
    """Without a new attempt to report, the last recorded status and error are kept."""
    outbox.add([new(1)])
    outbox.reschedule(
        "a", "msg_1", due_at=T0, attempts=2, attempted_at=T0, status=502, error="HTTP 502"
    )
    outbox.bury("a", "msg_1", now=T0, reason="max_age")
    [dead] = outbox.dead_letters()
    assert (dead.attempts, dead.last_status, dead.last_error) == (2, 502, "HTTP 502")


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, ["msg_1", "msg_2", "msg_3"]),
        ({"msg_ids": ["msg_2"]}, ["msg_2"]),
        ({"since": T0 + 2}, ["msg_2", "msg_3"]),
        ({"destination": "b"}, ["msg_3"]),
        ({"destination": "a", "since": T0 + 2}, ["msg_2"]),
    ],
)
def test_replay_moves_selected_dead_letters_back(
    outbox: Outbox, filters: dict[str, Any], expected: list[str]
) -> None:
    """Replay selects by id, enqueue time and destination, and keeps the message ids."""
    outbox.add([new(1), new(2), new(3, "b")])
    for destination, msg_id in (("a", "msg_1"), ("a", "msg_2"), ("b", "msg_3")):
        outbox.bury(destination, msg_id, now=T0 + 5, reason="exhausted", attempts=3)
    assert ids(outbox.dead_letters(**filters)) == expected
    assert outbox.replay(T0 + 100, **filters) == len(expected)
    pending = [*outbox.due("a", T0 + 100, 10), *outbox.due("b", T0 + 100, 10)]
    assert sorted(ids(pending)) == expected
    assert all(row.attempts == 0 and row.due_at == T0 + 100 for row in pending)
    assert len(outbox.dead_letters()) == 3 - len(expected)


def test_replayed_delivery_keeps_its_place_for_per_call_ordering(outbox: Outbox) -> None:
    """A replayed delivery is earlier than later ones of its call, so it goes first."""
    outbox.add([new(1, call="x")])
    outbox.bury("a", "msg_1", now=T0, reason="exhausted")
    outbox.add([new(2, call="x")])
    outbox.replay(T0)
    assert ids(outbox.due("a", T0, 10, per_call=True)) == ["msg_1"]


def test_dead_letters_limit(outbox: Outbox) -> None:
    """``limit`` returns the oldest first."""
    outbox.add([new(i) for i in range(5)])
    for i in range(5):
        outbox.bury("a", f"msg_{i}", now=T0, reason="exhausted")
    assert ids(outbox.dead_letters(limit=2)) == ["msg_0", "msg_1"]


def test_evict_max_pending_moves_the_oldest_but_not_those_in_flight(outbox: Outbox) -> None:
    """Beyond max_pending the oldest go to dead letters; rows being attempted stay."""
    outbox.add([new(i) for i in range(6)])
    moved = outbox.evict("a", T0, max_pending=2, exclude={"msg_0"})
    assert moved == {"max_pending": 4}
    assert sorted(ids(outbox.due("a", T0, 10))) == ["msg_0", "msg_5"]
    assert ids(outbox.dead_letters()) == ["msg_1", "msg_2", "msg_3", "msg_4"]
    assert {d.reason for d in outbox.dead_letters()} == {"max_pending"}
    assert outbox.evict("a", T0, max_pending=2) == {}


def test_evict_max_age(outbox: Outbox) -> None:
    """Deliveries enqueued longer than max_age ago go to dead letters."""
    outbox.add([new(i) for i in range(4)])
    assert outbox.evict("a", T0 + 12, max_age=10.5) == {"max_age": 2}
    assert ids(outbox.dead_letters()) == ["msg_0", "msg_1"]
    assert outbox.stats(T0 + 12)[0].pending == 2


def test_claim_enforces_the_bound_then_returns_due_rows_and_the_next_due(outbox: Outbox) -> None:
    """One call per claim: the bound first (sparing rows in flight), then what to attempt."""
    outbox.add([new(0), new(1), new(2), new(3, due=T0 + 5), new(4, due=T0 + 9)])
    unbounded = outbox.claim("a", T0, 1, exclude={"msg_1"})
    assert (ids(unbounded.rows), unbounded.evicted) == (["msg_0"], {})
    claim = outbox.claim("a", T0, 1, exclude={"msg_1"}, max_pending=4)
    assert claim.evicted == {"max_pending": 1}
    assert ids(outbox.dead_letters()) == ["msg_0"]
    assert ids(claim.rows) == ["msg_2"]
    assert claim.next_due == T0 + 5


def test_stats_lists_named_and_stored_destinations(outbox: Outbox) -> None:
    """Stats cover configured names without rows and stored names not configured."""
    outbox.add([new(1, "stored")])
    names = [s.name for s in outbox.stats(T0, ["configured"])]
    assert names == ["configured", "stored"]
    configured = outbox.stats(T0, ["configured"])[0]
    assert (configured.pending, configured.oldest_age, configured.dead) == (0, None, 0)


def test_transaction_commits_all_or_nothing(outbox: Outbox) -> None:
    """An exception inside a transaction rolls every write back."""

    def add_then_fail() -> None:
        with outbox.transaction():
            outbox.add([new(1)])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        add_then_fail()
    assert outbox.due("a", T0 + 10, 10) == []


def test_a_second_process_reads_and_writes_while_the_first_is_open(path: Path) -> None:
    """The CLI's connection sees the daemon's commits and its replay is seen back."""
    with Outbox(path) as daemon, Outbox(path, busy_timeout=1.0) as cli:
        daemon.add([new(1)])
        daemon.bury("a", "msg_1", now=T0, reason="exhausted")
        assert cli.stats(T0)[0].dead == 1
        assert cli.replay(T0) == 1
        assert ids(daemon.due("a", T0, 10)) == ["msg_1"]


def test_writer_waits_for_another_writers_commit(path: Path) -> None:
    """A write blocked by another connection's transaction fails as OutboxError after timeout."""
    with Outbox(path) as daemon, Outbox(path, busy_timeout=0.05) as cli:
        with daemon.transaction():
            daemon.add([new(1)])
            with pytest.raises(OutboxError, match="locked"):
                cli.enable("a")
        assert cli.enable("a") is False
