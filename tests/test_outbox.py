"""The SQLite outbox, on real files: pending rows, dead letters, bounds, a second process."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from listener.webhooks.outbox import Outbox
from listener.webhooks.outbox_connection import OutboxError
from listener.webhooks.outbox_rows import Attempt, DeadLetter, Delivery, NewDelivery, Outcome
from listener.webhooks.outbox_schema import SCHEMA_VERSION

T0 = 1_800_000_000.0
V1_SCHEMA = Path(__file__).parent / "data" / "outbox-v1.sql"
V2_SCHEMA = Path(__file__).parent / "data" / "outbox-v2.sql"


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
    assert {"deliveries", "dead_letters", "destinations", "attempts"} <= tables


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


def test_claimed_rows_are_skipped_until_their_outcome_or_release(
    outbox: Outbox, path: Path
) -> None:
    """Rows claimed (being attempted) are neither returned nor counted as next due, until
    their outcome is committed or they are released; a new connection has no claims."""
    outbox.add([new(1), new(2, due=T0 + 5), new(3, due=T0 + 5)])
    claim = outbox.claim("a", T0, 10)
    assert (ids(claim.rows), claim.next_due) == (["msg_1"], T0 + 5)
    assert ids(outbox.due("a", T0 + 5, 10)) == ["msg_2", "msg_3"]
    assert ids(outbox.claim("a", T0 + 5, 1).rows) == ["msg_2"]
    assert outbox.next_due("a") == T0 + 5
    assert ids(outbox.claim("a", T0 + 5, 10).rows) == ["msg_3"]
    assert outbox.next_due("a") is None
    outbox.release("a", ["msg_2"])
    assert ids(outbox.due("a", T0 + 5, 10)) == ["msg_2"]
    outbox.commit([], [Outcome(attempt(3, T0 + 5), "retry", 1, T0 + 7)])
    assert ids(outbox.due("a", T0 + 7, 10)) == ["msg_2", "msg_3"]
    outbox.commit([], [Outcome(attempt(1, T0 + 5, status=200, error_class=None), "delivered")])
    assert outbox.whereabouts("a", "msg_1") == ("delivered", T0 + 5)
    with Outbox(path) as fresh:
        assert ids(fresh.due("a", T0 + 7, 10)) == ["msg_2", "msg_3"]


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
    assert ids(outbox.claim("a", T0, 10, per_call=True).rows) == ["msg_3", "msg_4"]
    assert outbox.next_due("a", per_call=True) == T0 + 30
    outbox.mark_delivered([success(1, T0)])
    outbox.release("a", ["msg_3", "msg_4"])
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
    outbox.claim("a", T0, 1)
    assert outbox.next_due("a") == T0 + 5
    [row] = outbox.due("a", T0 + 5, 10)
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
    assert outbox.replay(T0 + 100, **filters) == {"dead": len(expected)}
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
    outbox.claim("a", T0, 1)
    moved = outbox.evict("a", T0, max_pending=2)
    outbox.release("a", ["msg_0"])
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
    unbounded = outbox.claim("a", T0, 1)
    assert (ids(unbounded.rows), unbounded.evicted) == (["msg_0"], {})
    claim = outbox.claim("a", T0, 1, max_pending=3)
    assert claim.evicted == {"max_pending": 2}
    assert ids(outbox.dead_letters()) == ["msg_1", "msg_2"]
    assert (ids(claim.rows), claim.next_due) == ([], T0 + 5)
    assert ids(outbox.claim("a", T0 + 5, 1).rows) == ["msg_3"]


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
        assert cli.replay(T0) == {"dead": 1}
        assert ids(daemon.due("a", T0, 10)) == ["msg_1"]


def test_writer_waits_for_another_writers_commit(path: Path) -> None:
    """A write blocked by another connection's transaction fails as OutboxError after timeout."""
    with Outbox(path) as daemon, Outbox(path, busy_timeout=0.05) as cli:
        with daemon.transaction():
            daemon.add([new(1)])
            with pytest.raises(OutboxError, match="locked"):
                cli.enable("a")
        assert cli.enable("a") is False


def attempt(i: int, at: float, destination: str = "a", **fields: Any) -> Attempt:
    """An attempt at ``msg_{i}`` made at ``at``, answered 503 unless ``fields`` say otherwise."""
    values: dict[str, Any] = {
        "latency": 0.01,
        "status": 503,
        "error_class": "not_now",
        "error": "HTTP 503",
        "answer": b"down for maintenance",
        "probe": False,
        "counted": True,
        **fields,
    }
    return Attempt(destination, f"msg_{i}", at, **values)


def success(i: int, at: float, **fields: Any) -> Attempt:
    """A 2xx attempt of ``msg_{i}``."""
    values: dict[str, Any] = {
        "status": 200,
        "error_class": None,
        "error": "",
        "answer": b"",
        "counted": False,
    }
    return attempt(i, at, **(values | fields))


def test_a_version_1_file_is_migrated_and_keeps_its_rows(path: Path) -> None:
    """A file written by version 1 (its schema as released) opens at the current version with
    its pending rows, dead letters and disabled destinations as they were."""
    with sqlite3.connect(path) as raw:
        raw.executescript(V1_SCHEMA.read_text())
        raw.execute(
            "INSERT INTO deliveries (destination, msg_id, event, call_key, body, created_at,"
            " due_at, attempts, last_attempt_at, last_status, last_error)"
            " VALUES ('a', 'msg_1', 'call_started', 'x', '{}', ?, ?, 2, ?, 503, 'HTTP 503')",
            (T0, T0 + 5, T0 + 1),
        )
        raw.execute(
            "INSERT INTO dead_letters (seq, destination, msg_id, event, body, created_at,"
            " attempts, dead_at, reason) VALUES (7, 'a', 'msg_7', 'e', '{}', ?, 8, ?, 'exhausted')",
            (T0, T0),
        )
        raw.execute("INSERT INTO destinations VALUES ('b', ?, 'HTTP 410 Gone')", (T0,))
    raw.close()
    with Outbox(path) as migrated:
        [row] = migrated.due("a", T0 + 5, 10)
        assert (row.msg_id, row.call_key, row.attempts, row.due_at) == ("msg_1", "x", 2, T0 + 5)
        assert ids(migrated.dead_letters()) == ["msg_7"]
        assert migrated.is_disabled("b")
        migrated.record_attempts([attempt(1, T0 + 5)])
        migrated.mark_delivered([success(1, T0 + 5)])
        assert migrated.whereabouts("a", "msg_1") == ("delivered", T0 + 5)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    raw.close()
    with Outbox(path) as reopened:
        assert [(a.msg_id, a.status) for a in reopened.attempts("msg_1")] == [
            ("msg_1", 503),
            ("msg_1", 200),
        ]


def test_attempts_are_recorded_in_order_with_their_answer(outbox: Outbox) -> None:
    """Each attempt keeps its time, status, latency, class, flags and answer."""
    outbox.record_attempts(
        [
            attempt(1, T0 + 2, probe=True, counted=False),
            attempt(1, T0, status=None, error_class="timeout", answer=b""),
            attempt(2, T0 + 1),
            attempt(1, T0 + 3, status=200, error_class=None, error="", answer=b"ok"),
        ]
    )
    timeline = outbox.attempts("msg_1")
    assert [(a.at, a.status, a.error_class, a.probe, a.counted) for a in timeline] == [
        (T0, None, "timeout", False, True),
        (T0 + 2, 503, "not_now", True, False),
        (T0 + 3, 200, None, False, True),
    ]
    assert (timeline[1].answer, timeline[1].latency) == (b"down for maintenance", 0.01)
    assert outbox.attempts("msg_3") == []


def test_delivered_rows_are_kept_where_replay_finds_them(outbox: Outbox) -> None:
    """A delivered row leaves the pending ones for ``delivered``, once, whatever it took."""
    outbox.add([new(1), new(2)])
    outbox.mark_delivered([success(1, T0 + 9)])
    assert ids(outbox.due("a", T0 + 9, 10)) == ["msg_2"]
    assert outbox.whereabouts("a", "msg_1") == ("delivered", T0 + 9)
    assert outbox.whereabouts("a", "msg_2") == ("pending", None)
    assert outbox.whereabouts("a", "msg_3") is None
    assert outbox.pending_count("a") == 1
    assert outbox.replay(T0 + 20, sources=["delivered"]) == {"delivered": 1}
    assert outbox.pending_count("a") == 2
    outbox.mark_delivered([success(1, T0 + 30)])
    assert outbox.whereabouts("a", "msg_1") == ("delivered", T0 + 30)


def test_replay_selects_by_time_range_and_status_and_dry_run_changes_nothing(
    outbox: Outbox,
) -> None:
    """[since, until) on the events' time, dead letters, delivered rows or both."""
    outbox.add([new(i) for i in range(6)])
    outbox.mark_delivered([success(i, T0 + 10) for i in (0, 1, 2)])
    for i in (3, 4, 5):
        outbox.bury("a", f"msg_{i}", now=T0 + 10, reason="exhausted")
    window: dict[str, Any] = {"since": T0 + 1, "until": T0 + 4}
    assert outbox.replay(T0 + 20, sources=["delivered", "dead"], dry_run=True, **window) == {
        "delivered": 2,
        "dead": 1,
    }
    assert outbox.pending_count("a") == 0
    assert outbox.replay(T0 + 20, sources=["delivered"], destination="b", **window) == {
        "delivered": 0
    }
    assert outbox.replay(T0 + 20, sources=["delivered"], **window) == {"delivered": 2}
    assert sorted(ids(outbox.due("a", T0 + 20, 10))) == ["msg_1", "msg_2"]
    assert outbox.replay(T0 + 20, until=T0 + 4) == {"dead": 1}
    assert ids(outbox.dead_letters()) == ["msg_4", "msg_5"]


def test_prune_forgets_old_attempts_and_deliveries_a_bounded_batch_at_a_time(
    outbox: Outbox,
) -> None:
    """Attempts and delivered rows older than the cut-off go, oldest first; dead letters and
    pending rows stay."""
    outbox.add([new(i) for i in range(5)])
    outbox.record_attempts([attempt(i, T0 + i) for i in range(5)])
    outbox.mark_delivered([success(i, T0 + i) for i in range(4)])
    outbox.bury("a", "msg_4", now=T0, reason="exhausted")
    assert outbox.prune(T0 + 3, limit=2) == 4
    assert [outbox.attempts(f"msg_{i}") != [] for i in range(5)] == [False] * 2 + [True] * 3
    assert outbox.prune(T0 + 3) == 2
    assert [outbox.whereabouts("a", f"msg_{i}") for i in range(5)] == [
        None,
        None,
        None,
        ("delivered", T0 + 3),
        ("dead", T0),
    ]
    assert outbox.prune(T0 + 3) == 0
    assert outbox.prune(T0 + 100) == 3


def test_a_version_2_file_is_migrated_with_its_delivered_rows_replayable(path: Path) -> None:
    """A file written by version 2 (its schema as released) opens at the current version: its
    delivered rows (then a table of their own) are delivered rows of ``deliveries``, with
    their time, replayable with the same ids; pending rows and attempts are as they were."""
    with sqlite3.connect(path) as raw:
        raw.executescript(V2_SCHEMA.read_text())
        raw.execute(
            "INSERT INTO deliveries (seq, destination, msg_id, event, call_key, body,"
            " created_at, due_at) VALUES (2, 'a', 'msg_2', 'e', 'x', '{}', ?, ?)",
            (T0 + 2, T0 + 30),
        )
        raw.execute(
            "INSERT INTO delivered (seq, destination, msg_id, event, call_key, body, created_at,"
            " attempts, delivered_at) VALUES (1, 'a', 'msg_1', 'e', 'x', ?, ?, 1, ?)",
            (b'{"i":1}', T0 + 1, T0 + 9),
        )
        raw.execute(
            "INSERT INTO attempts (destination, msg_id, at, latency, status, error_class, error,"
            " answer, probe, counted) VALUES ('a', 'msg_1', ?, 0.01, 200, NULL, '', '', 0, 0)",
            (T0 + 9,),
        )
    raw.close()
    with Outbox(path) as migrated:
        assert migrated.whereabouts("a", "msg_1") == ("delivered", T0 + 9)
        assert [(a.at, a.status) for a in migrated.attempts("msg_1")] == [(T0 + 9, 200)]
        assert migrated.pending_count("a") == 1
        assert ids(migrated.due("a", T0 + 30, 10, per_call=True)) == ["msg_2"]
        assert migrated.replay(T0 + 20, sources=["delivered"]) == {"delivered": 1}
        [row] = migrated.due("a", T0 + 20, 10)
        assert (row.seq, row.msg_id, row.body, row.attempts) == (1, "msg_1", b'{"i":1}', 0)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master")}
    raw.close()
    assert "delivered" not in tables


def test_a_success_is_on_the_timeline_and_stays_there_through_a_replay(outbox: Outbox) -> None:
    """A 2xx is kept on its delivered row (not in ``attempts``) and shown after the failures;
    replaying the row moves it to the attempts' record, so the timeline keeps it."""
    outbox.add([new(1), new(2, "b")])
    failed = attempt(1, T0 + 1)
    outbox.commit([], [Outcome(failed, "retry", 1, T0 + 2)])
    outbox.commit(
        [],
        [
            Outcome(success(1, T0 + 2, answer=b"thanks", probe=True, latency=0.5), "delivered"),
            Outcome(success(2, T0 + 3, destination="b"), "delivered"),
        ],
    )
    (count,) = outbox.conn.execute("SELECT COUNT(*) FROM attempts").fetchone()
    assert count == 1
    expected = [failed, success(1, T0 + 2, answer=b"thanks", probe=True, latency=0.5)]
    assert outbox.attempts("msg_1") == expected
    assert [a.destination for a in outbox.attempts("msg_2")] == ["b"]
    assert outbox.replay(T0 + 5, sources=["delivered"], destination="a") == {"delivered": 1}
    assert outbox.whereabouts("a", "msg_1") == ("pending", None)
    assert outbox.attempts("msg_1") == expected
    outbox.commit([], [Outcome(success(1, T0 + 6), "delivered")])
    assert outbox.attempts("msg_1") == [*expected, success(1, T0 + 6)]
