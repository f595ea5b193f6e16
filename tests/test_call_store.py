"""The call store, against a real SQLite file: round trips, reopening, pruning, errors."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from listener.calls import store as store_module
from listener.calls.state import CallRecord, CallState, Origin
from listener.calls.store import SCHEMA_VERSION, CallReader, CallStore, StoreError
from listener.core.ids import LIFECYCLE_EVENTS

# The calls table as every version before 3 wrote it, and a call in it: written out, not
# taken from the module (whose steps may change), so old files' tests stay old files'.
_CALLS_TABLE = """CREATE TABLE calls (
    call_key TEXT PRIMARY KEY, status TEXT NOT NULL, last_event_at REAL NOT NULL,
    from_number TEXT, to_number TEXT, started_at REAL, answered_at REAL,
    ended_at REAL, origins TEXT NOT NULL
) WITHOUT ROWID;"""
_RINGING = """INSERT INTO calls VALUES
    ('c-1', 'ringing', 10.0, '+1', NULL, 9.0, NULL, NULL, '{"ringing": "realtime"}');"""


def old_file(path: Path, rest: str) -> None:
    """Write a file as a version before 3 did: its calls table with c-1 ringing, then
    ``rest``."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript("\n".join((_CALLS_TABLE, _RINGING, rest)))
    finally:
        conn.close()


def test_a_new_store_is_empty(tmp_path: Path) -> None:
    with CallStore(tmp_path / "calls.db") as store:
        assert (store.calls(), store.handled_ids(), store.last_seen()) == ([], set(), None)


def test_what_is_saved_is_there_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    state = CallState()
    state.merge("incoming_call", {"callUuid": "c-1", "fromNumber": "+1"}, "realtime", 10.0)
    state.merge("call_ended", {"callUuid": "c-1", "endedAt": "x"}, "reconcile", 12.0)
    state.merge("call_answered", {"call": {"call_uuid": "c-2"}}, "realtime", 11.0)
    with CallStore(path) as store:
        store.save(12.0, calls=state.changed(), handled=["evt_a", "evt_b"], seen_until=12.0)
    with CallStore(path) as store:
        restored = CallState(store.calls())
        assert store.handled_ids() == {"evt_a", "evt_b"}
        assert store.last_seen() == 12.0
    for key in ("c-1", "c-2"):
        assert restored.get(key) == state.get(key)
    record = restored.get("c-1")
    assert record is not None
    assert record.origins == {"ringing": "realtime", "ended": "reconcile"}


def test_saving_again_replaces_a_call_and_keeps_a_handled_id_once(tmp_path: Path) -> None:
    with CallStore(tmp_path / "calls.db") as store:
        store.save(1.0, calls=[CallRecord("c", "ringing", 1.0)], handled=["evt_a"])
        store.save(
            2.0,
            calls=[CallRecord("c", "answered", 2.0, origins={"answered": "realtime"})],
            handled=["evt_a", "evt_b"],
        )
        store.save(3.0, seen_until=2.5)  # nothing new, nothing missed until 2.5
        store.save(4.0)  # nothing said of what was missed: the last moment seen stays
        assert store.calls() == [CallRecord("c", "answered", 2.0, origins={"answered": "realtime"})]
        assert store.handled_ids() == {"evt_a", "evt_b"}
        assert store.last_seen() == 2.5
        # The first save's time stays with evt_a: pruning at 1.5 forgets it, not evt_b.
        store.prune(before=1.5)
        assert store.handled_ids() == {"evt_b"}


def test_prune_forgets_calls_and_ids_older_than_the_cut_off(tmp_path: Path) -> None:
    with CallStore(tmp_path / "calls.db") as store:
        store.save(
            5.0,
            calls=[CallRecord("old", "ended", 1.0), CallRecord("new", "ended", 9.0)],
            handled=["evt_old"],
        )
        store.save(9.0, handled=["evt_new"])
        assert store.prune(before=6.0) == 1
        assert [r.call_key for r in store.calls()] == ["new"]
        assert store.handled_ids() == {"evt_new"}


def test_the_file_is_in_wal_mode_and_readable_while_open(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    with CallStore(path) as store:
        store.save(1.0, handled=["evt_a"])
        other = sqlite3.connect(path)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert other.execute("SELECT id FROM handled").fetchall() == [("evt_a",)]
        finally:
            other.close()


def test_a_failed_batch_writes_nothing(tmp_path: Path) -> None:
    with CallStore(tmp_path / "calls.db") as store:

        def records() -> Iterator[CallRecord]:
            yield CallRecord("c", "ringing", 1.0)
            raise RuntimeError("the caller failed half-way")

        with pytest.raises(RuntimeError):
            store.save(1.0, calls=records(), handled=["evt_a"], seen_until=1.0)
        assert store.calls() == []
        assert (store.handled_ids(), store.last_seen()) == (set(), None)
        store.save(2.0, handled=["evt_b"])  # and the store still works
        assert store.handled_ids() == {"evt_b"}


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(
        StoreError, match=f"call store schema version {SCHEMA_VERSION + 1} is newer"
    ):
        CallStore(path)


def test_an_unopenable_file_and_a_held_lock_are_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="call store open failed"):
        CallStore(tmp_path / "no-such-dir" / "calls.db")
    path = tmp_path / "calls.db"
    with CallStore(path, busy_timeout=0.05) as store:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreError, match="call store save failed"):
                store.save(1.0)
        finally:
            holder.execute("ROLLBACK")
            holder.close()


def test_a_first_store_loses_its_time_indexes_and_keeps_its_rows(tmp_path: Path) -> None:
    """Files written before the indexes went: same schema version, same rows, no index."""
    path = tmp_path / "calls.db"
    old_file(
        path,
        """
        CREATE INDEX calls_last_event ON calls (last_event_at);
        CREATE TABLE handled (id TEXT PRIMARY KEY, handled_at REAL NOT NULL) WITHOUT ROWID;
        CREATE INDEX handled_at ON handled (handled_at);
        CREATE TABLE moments (name TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
        INSERT INTO handled VALUES ('evt_a', 10.0);
        PRAGMA user_version = 1;
        """,
    )
    with CallStore(path) as store:
        assert [record.call_key for record in store.calls()] == ["c-1"]
        assert store.handled_ids() == {"evt_a"}
        indexes = store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        assert [name for (name,) in indexes if not name.startswith("sqlite_")] == []
        assert store.prune(11.0) == 1
        assert store.handled_ids() == set()


def test_lifecycle_events_handed_on_are_kept_on_the_call_s_row_across_batches(
    tmp_path: Path,
) -> None:
    """A call written again keeps the events handed on before; an event whose call the
    batch does not write gets a row of its own; both read back, and prune with their rows."""
    path = tmp_path / "calls.db"
    state = CallState()
    with CallStore(path) as store:
        state.merge("incoming_call", {"callUuid": "c-1"}, "realtime", 10.0)
        store.save(10.0, calls=state.changed(), handled_calls=[("c-1", "incoming_call")])
        state.merge("call_ended", {"callUuid": "c-1"}, "realtime", 11.0)
        store.save(11.0, calls=state.changed(), handled_calls=[("c-1", "call_ended")])
        store.save(12.0, handled_calls=[("c-1", "call_transcript_completed")])
    with CallStore(path) as store:
        assert sorted(store.handled_calls()) == [
            ("c-1", "call_ended"),
            ("c-1", "call_transcript_completed"),
            ("c-1", "incoming_call"),
        ]
        assert store.handled_calls(since=11.5) == [], "an ended call older than since"
        assert store.conn.execute("SELECT count(*) FROM handled_calls").fetchone() == (1,)
        reader = CallReader(path)
        assert reader.handled_names("c-1") == {
            "incoming_call",
            "call_ended",
            "call_transcript_completed",
        }
        reader.close()
        store.prune(13.0)
        assert store.handled_calls() == []


def test_a_version_2_file_keeps_its_handled_rows_and_is_read_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    # The file as version 2 made it, a call and an event handed on.
    old_file(
        path,
        """
        CREATE TABLE handled (id TEXT PRIMARY KEY, handled_at REAL NOT NULL) WITHOUT ROWID;
        CREATE TABLE moments (name TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
        CREATE TABLE handled_calls (
            call_key TEXT NOT NULL, name TEXT NOT NULL, handled_at REAL NOT NULL,
            PRIMARY KEY (call_key, name)
        ) WITHOUT ROWID;
        INSERT INTO handled_calls VALUES ('c-1', 'incoming_call', 10.0);
        PRAGMA user_version = 2;
        """,
    )
    # What `sippet-listener calls` reads with: the file stays version 2 (a running older
    # daemon could not start again on a migrated one).
    reader = CallReader(path)
    try:
        records = reader.calls()
        assert reader.conn.execute("PRAGMA user_version").fetchone() == (2,)
    finally:
        reader.close()
    state = CallState(records)
    state.merge("call_answered", {"callUuid": "c-1"}, "realtime", 11.0)
    with CallStore(path) as store:
        store.save(11.0, calls=state.changed(), handled_calls=[("c-1", "call_answered")])
        assert store.conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        # The new event a bit of the call's row, the old one still its own row: both read.
        assert store.conn.execute("SELECT count(*) FROM handled_calls").fetchone() == (1,)
        assert sorted(store.handled_calls()) == [("c-1", "call_answered"), ("c-1", "incoming_call")]
        assert sorted(store.handled_calls(since=10.5)) == [
            ("c-1", "call_answered"),
            ("c-1", "incoming_call"),
        ]


def test_every_lifecycle_event_has_a_bit_of_its_own() -> None:
    # One without a bit would still be kept (a row of its own), only at the old cost.
    bits = store_module._BITS
    assert set(bits) == LIFECYCLE_EVENTS
    assert sorted(bits.values()) == [1 << n for n in range(len(bits))]


def test_each_call_s_origins_are_written_as_its_own_whatever_mapping_holds_them(
    tmp_path: Path,
) -> None:
    """The origins' JSON is looked up by the identity of the shared mapping: plain dicts of
    a caller's, made and dropped one after another with alternating contents, are each
    written as what they hold."""
    origins: list[Origin] = ["realtime", "reconcile"] * 3
    with CallStore(tmp_path / "calls.db") as store:
        for index, origin in enumerate(origins):
            store.save(
                1.0,
                calls=[CallRecord(f"c-{index}", "ringing", 1.0, origins={"ringing": origin})],
            )
        assert [(r.call_key, dict(r.origins)) for r in store.calls()] == [
            (f"c-{index}", {"ringing": origin}) for index, origin in enumerate(origins)
        ]
