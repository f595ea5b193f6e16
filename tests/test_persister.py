"""The persister: the call map and handled ids reach the store in batches, failed ones later."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from listener.calls.persister import Persister
from listener.calls.store import CallStore
from listener.calls.tracker import CallTracker
from listener.core import metrics
from listener.core.events import Event
from listener.core.ids import lifecycle_id


def hand_on(tracker: CallTracker, name: str, key: str, at: float) -> str:
    """Take an event through the tracker as the dispatcher does; return its id."""
    event = Event.create(name, {"callUuid": key}, "events", at, id=lifecycle_id(name, key))
    assert tracker.admit(event)
    tracker.merge(event)
    return event.id


def failed_writes() -> float:
    value = metrics.REGISTRY.get_sample_value("sippet_listener_call_store_failures_total")
    return value or 0.0


async def test_a_batch_that_failed_is_written_with_the_next_one(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    tracker = CallTracker()
    store = CallStore(path, busy_timeout=0.05)
    persister = Persister(store, tracker, lambda now: now - 5, retain=3600, clock=lambda: 100.0)
    first = hand_on(tracker, "incoming_call", "c-1", 90.0)
    before = failed_writes()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        await persister.flush()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert failed_writes() == before + 1
    second = hand_on(tracker, "call_ended", "c-1", 95.0)
    await persister.close()
    with CallStore(path) as reopened:
        assert [(r.call_key, r.status) for r in reopened.calls()] == [("c-1", "ended")]
        # The rule's ids are kept by call and name: the store makes no hash of them.
        assert sorted(reopened.handled_calls()) == [("c-1", "call_ended"), ("c-1", "incoming_call")]
        assert {lifecycle_id(name, key) for key, name in reopened.handled_calls()} == {
            first,
            second,
        }
        assert reopened.last_seen() == 95.0


async def test_nothing_missed_is_recorded_only_once_there_is_history(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    persister = Persister(CallStore(path), CallTracker(), lambda now: None, retain=3600)
    await persister.close()
    with CallStore(path) as reopened:
        assert reopened.last_seen() is None


async def test_prune_forgets_old_calls_in_memory_and_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    tracker = CallTracker()
    clock = [1000.0]
    persister = Persister(
        CallStore(path), tracker, lambda now: now, retain=100, clock=lambda: clock[0]
    )
    hand_on(tracker, "call_ended", "old", 850.0)
    hand_on(tracker, "incoming_call", "new", 950.0)
    await persister.flush()
    await persister.prune()
    assert (tracker.get("old"), tracker.get("new") is not None) == (None, True)
    await persister.close()
    with CallStore(path) as reopened:
        assert [record.call_key for record in reopened.calls()] == ["new"]


async def test_without_a_store_the_changes_are_let_go() -> None:
    tracker = CallTracker()
    persister = Persister(None, tracker, lambda now: now, retain=3600)
    hand_on(tracker, "incoming_call", "c-1", 1.0)
    await persister.close()
    assert (tracker.state.changed(), tracker.unsaved()) == ([], ([], []))


async def until_stored(path: Path, expected: list[tuple[str, str]]) -> float:
    """Seconds until the store at ``path`` holds ``expected`` (call key, status) pairs."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    stored: list[tuple[str, str]] = []
    for _ in range(500):  # polls the file: a store has no event to wait on
        with CallStore(path) as peek:
            stored = [(record.call_key, record.status) for record in peek.calls()]
        if stored == expected:
            return loop.time() - began
        await asyncio.sleep(0.01)
    raise AssertionError(f"not stored within 5 s: {stored} instead of {expected}")


async def test_a_batch_due_in_a_burst_waits_for_a_lull_but_not_past_another_interval(
    tmp_path: Path,
) -> None:
    path = tmp_path / "calls.sqlite3"
    tracker = CallTracker()
    now = [100.0]
    every = 0.4
    # As a backlog's batch: large enough to wait for a lull (one call is, with this setting).
    persister = Persister(
        CallStore(path),
        tracker,
        lambda at: at,
        retain=3600,
        every=every,
        clock=lambda: now[0],
        small_batch=1,
    )
    hand_on(tracker, "incoming_call", "c-1", 100.0)  # heard just now, by the clock above
    running = asyncio.create_task(persister.run())
    try:
        # Due after one interval; the intake looks busy all along, so it waits one more.
        # Not before the busy interval is over, nor past the one after it (a loaded
        # machine's scheduling delay stays well inside that interval).
        assert 2 * every <= await until_stored(path, [("c-1", "ringing")]) < 3 * every
        # In a lull the next batch goes when due.
        now[0] = 200.0
        hand_on(tracker, "call_ended", "c-1", 150.0)
        assert await until_stored(path, [("c-1", "ended")]) < 1.5 * every
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await persister.close()


async def test_a_small_batch_due_while_events_keep_coming_is_written_when_due(
    tmp_path: Path,
) -> None:
    path = tmp_path / "calls.sqlite3"
    tracker = CallTracker()
    every = 0.4
    now = [100.0]
    persister = Persister(
        CallStore(path), tracker, lambda at: at, retain=3600, every=every, clock=lambda: now[0]
    )
    running = asyncio.create_task(persister.run())
    try:
        for second in range(2):
            # A steady stream's few calls, the last one heard just now: no lull to wait for.
            now[0] += 1.0
            hand_on(tracker, ("incoming_call", "call_ended")[second], "c-1", now[0])
            status = ("ringing", "ended")[second]
            # Within one interval plus slack, not after the extra one a lull would cost.
            assert await until_stored(path, [("c-1", status)]) < 1.75 * every
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await persister.close()


async def test_a_batch_waits_while_handlers_have_a_backlog(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    tracker = CallTracker()
    hand_on(tracker, "incoming_call", "c-1", 100.0)  # long ago, by the clock below
    waiting = [3]
    tracker.backlog = lambda: waiting[0]
    # Long enough that a loaded machine's scheduling delays (0.1 s seen) stay well inside
    # the half interval of slack below.
    every = 0.5
    persister = Persister(
        CallStore(path), tracker, lambda at: at, retain=3600, every=every, clock=lambda: 500.0
    )
    loop = asyncio.get_running_loop()
    began = loop.time()
    running = asyncio.create_task(persister.run())
    try:
        await asyncio.sleep(every * 1.5)
        with CallStore(path) as peek:
            assert peek.calls() == [], "written while handlers were busy"
        waiting[0] = 0
        for _ in range(500):
            with CallStore(path) as peek:
                if peek.calls():
                    break
            await asyncio.sleep(0.01)
        assert loop.time() - began < every * 2.5
        with CallStore(path) as peek:
            assert [record.call_key for record in peek.calls()] == ["c-1"]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await persister.close()


def letting_go(tmp_path: Path, resident_ended: int) -> tuple[CallTracker, Persister]:
    """A tracker whose persister, at 1000 s, lets go of the saved calls ended before 940 s
    and of all but the ``resident_ended`` newest ended ones."""
    tracker = CallTracker()
    persister = Persister(
        CallStore(tmp_path / "calls.sqlite3"),
        tracker,
        lambda now: now,
        retain=3600,
        clock=lambda: 1000.0,
        resident_for=60,
        resident_ended=resident_ended,
    )
    return tracker, persister


async def test_ended_calls_leave_memory_once_saved_and_still_answer(tmp_path: Path) -> None:
    """Memory keeps the open calls and the recent ended ones; the others are read back from
    the store: by a lookup, and by a late event, which neither reopens the call nor is
    handed on a second time."""
    tracker, persister = letting_go(tmp_path, resident_ended=2)
    for index in range(5):  # ended 100 s ago, beyond resident_for
        hand_on(tracker, "incoming_call", f"old-{index}", 900.0 + index)
        hand_on(tracker, "call_ended", f"old-{index}", 900.0 + index)
    for index in range(3):  # ended just now: the two newest stay
        hand_on(tracker, "call_ended", f"new-{index}", 990.0 + index)
    hand_on(tracker, "incoming_call", "open", 901.0)
    await persister.flush()
    assert sorted(record.call_key for record in tracker.state.all_calls()) == [
        "new-1",
        "new-2",
        "open",
    ]
    old = tracker.get("old-3")
    assert old is not None
    assert (old.status, old.started_at) == ("ended", 903.0)
    assert tracker.get("never-heard") is None
    late = Event.create("incoming_call", {"callUuid": "old-3"}, "events", 1001.0, id="")
    repeat = Event.create(
        "call_ended",
        {"callUuid": "old-1"},
        "events",
        1001.0,
        id=lifecycle_id("call_ended", "old-1"),
    )
    assert not tracker.admit(repeat)
    merged = tracker.merge(late)
    assert merged is not None
    assert merged.status == "ended"
    assert [(r.call_key, r.status) for r in tracker.open_calls()] == [("open", "ringing")]
    await persister.close()


async def test_a_call_let_go_of_and_adopted_from_the_cluster_keeps_what_was_handed_on(
    tmp_path: Path,
) -> None:
    """Another instance's record of a call this one let go of (the follower's refresh)
    brings it back with its lifecycle events handed on: a repeat is not handed on again."""
    tracker, persister = letting_go(tmp_path, resident_ended=0)
    hand_on(tracker, "incoming_call", "c1", 900.0)
    hand_on(tracker, "call_ended", "c1", 901.0)
    await persister.flush()
    assert tracker.state.all_calls() == []
    stored = tracker.get("c1")
    assert stored is not None
    # The other instance heard the callee, and its clock stamped the end a little later.
    theirs = replace(stored, to_number="+200", last_event_at=901.2)
    assert tracker.adopt([theirs], ()) == 1
    adopted = tracker.get("c1")
    assert adopted is not None
    assert (adopted.status, adopted.to_number) == ("ended", "+200")
    repeat = Event.create(
        "call_ended", {"callUuid": "c1"}, "events", 1001.0, id=lifecycle_id("call_ended", "c1")
    )
    assert not tracker.admit(repeat)
    await persister.close()


async def test_memory_stays_flat_under_a_long_stream_of_short_calls(tmp_path: Path) -> None:
    """3,000 short calls, a batch every 100: the map and the handled ids hold no more than
    the open calls and the ended ones memory may keep."""
    tracker = CallTracker()
    clock = [0.0]
    persister = Persister(
        CallStore(tmp_path / "calls.sqlite3"),
        tracker,
        lambda now: now,
        retain=86400,
        clock=lambda: clock[0],
        resident_ended=50,
    )
    held = []
    for index in range(3000):
        clock[0] = float(index)
        for name in ("incoming_call", "call_answered", "call_ended"):
            hand_on(tracker, name, f"c-{index}", clock[0])
        if index % 100 == 99:
            await persister.flush()
            held.append(len(tracker.state) + sum(map(len, tracker._handled.values())))
    assert set(held) == {50 * 4}  # 50 ended calls, each with its three handled ids
    assert tracker.get("c-7") is not None
    await persister.close()


async def test_what_was_handled_is_still_handled_after_a_restart(tmp_path: Path) -> None:
    """Lifecycle events kept by call, and ids that are not the rule's, both outlive the
    process; the restarted tracker holds only the recent calls in memory, reads the others
    back when asked, and hands none of them on again."""
    path = tmp_path / "calls.sqlite3"
    tracker = CallTracker()
    persister = Persister(CallStore(path), tracker, lambda now: now, retain=3600)
    hand_on(tracker, "incoming_call", "c-1", 1.0)
    odd = Event.create("call_ended", {"callUuid": "c-1"}, "events", 2.0, id="evt_given")
    assert tracker.admit(odd)
    tracker.merge(odd)
    hand_on(tracker, "incoming_call", "c-open", 2.0)
    await persister.close()
    restarted = CallTracker()
    store, _ = await Persister.open(path, restarted)
    persister = Persister(store, restarted, lambda now: now, retain=3600)
    assert [record.call_key for record in restarted.state.all_calls()] == ["c-open"]
    ended = restarted.get("c-1")
    assert ended is not None
    assert ended.status == "ended"
    again = Event.create(
        "incoming_call", {"callUuid": "c-1"}, "events", 3.0, id=lifecycle_id("incoming_call", "c-1")
    )
    assert not restarted.admit(again)
    assert not restarted.admit(
        Event.create("call_ended", {"callUuid": "c-1"}, "events", 3.0, id="evt_given")
    )
    assert not restarted.admit(
        Event.create(
            "incoming_call",
            {"callUuid": "c-open"},
            "events",
            3.0,
            id=lifecycle_id("incoming_call", "c-open"),
        )
    ), "a call held in memory came back with what was handled of it"
    late = restarted.merge(again)
    assert late is not None
    assert late.status == "ended", "a late event never reopens a call read back"
    await persister.close()


async def test_a_call_changed_many_times_in_one_batch_is_one_row_of_its_latest_state(
    tmp_path: Path,
) -> None:
    """One row per changed call per batch, its lifecycle events handed on as bits of it: the
    restarted tracker finds the latest state and hands none of the three on again."""
    path = tmp_path / "calls.sqlite3"
    tracker = CallTracker()
    persister = Persister(CallStore(path), tracker, lambda now: now, retain=3600)
    for at, name in enumerate(("incoming_call", "call_answered", "call_ended"), start=1):
        hand_on(tracker, name, "c-1", float(at))
    await persister.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT call_key, status, handled FROM calls").fetchall() == [
            ("c-1", "ended", 7)
        ]
        assert conn.execute("SELECT count(*) FROM handled_calls").fetchone() == (0,)
    conn.close()
    restarted = CallTracker()
    store, _ = await Persister.open(path, restarted)
    persister = Persister(store, restarted, lambda now: now, retain=3600)
    record = restarted.get("c-1")
    assert record is not None
    assert (record.status, record.last_event_at) == ("ended", 3.0)
    for name in ("incoming_call", "call_answered", "call_ended"):
        event = Event.create(name, {"callUuid": "c-1"}, "events", 4.0, id=lifecycle_id(name, "c-1"))
        assert not restarted.admit(event), name
    await persister.close()


@pytest.mark.parametrize(
    "heard",
    [
        # Handed on, its record as it was: the store lacks the event (pinned).
        Event.create(
            "call_transcript_completed", {"callUuid": "c-2"}, "events", 2.0,
            id=lifecycle_id("call_transcript_completed", "c-2"),
        ),
        # No id to hand on, its record changed: the store lacks the callee.
        Event.create(
            "transcript_delta", {"callUuid": "c-2", "toNumber": "+200"}, "events", 3.0, id=""
        ),
    ],
    ids=["an event handed on", "its record changed"],
)  # fmt: skip
async def test_a_call_heard_again_after_it_was_chosen_to_leave_memory_stays(
    tmp_path: Path, heard: Event
) -> None:
    """Calls leave memory in slices after a batch, events served between them: one that an
    event handed on of it, or changed, since it was chosen stays until it is saved again."""
    tracker = CallTracker()
    store = CallStore(tmp_path / "calls.sqlite3")
    persister = Persister(store, tracker, lambda n: n, retain=3600, resident_for=1e12)
    for key in ("c-1", "c-2"):
        hand_on(tracker, "incoming_call", key, 1.0)
        hand_on(tracker, "call_ended", key, 2.0)
    await persister.flush()  # both saved, both kept in memory (resident_for)
    chosen = tracker.evictable(1000.0, 1000)
    assert sorted(chosen) == ["c-1", "c-2"]
    before = tracker.get("c-2")
    assert tracker.admit(heard)
    tracker.merge(heard)
    # Each case by one of the two reasons alone.
    assert (tracker.get("c-2") is before) == bool(heard.id)
    assert tracker.evict(chosen) == 1
    assert [record.call_key for record in tracker.state.all_calls()] == ["c-2"]
    await persister.close()


async def test_after_a_batch_calls_leave_memory_a_slice_at_a_time_events_served_between(
    tmp_path: Path,
) -> None:
    heard_between: list[str] = []
    slices: list[int] = []

    class Watched(CallTracker):
        def evict(self, keys: Sequence[str]) -> int:
            gone = super().evict(keys)
            slices.append(gone)
            if not heard_between:
                # What the loop serves between two slices: an event of a call chosen for a
                # later one.
                heard_between.append(hand_on(self, "call_transcript_completed", "c-599", 3.0))
            return gone

    tracker = Watched()
    persister = Persister(
        CallStore(tmp_path / "calls.sqlite3"), tracker, lambda n: n, retain=3600,
        clock=lambda: 1000.0, resident_for=60, resident_ended=0,
    )  # fmt: skip
    calls = 600  # three slices
    for index in range(calls):
        hand_on(tracker, "incoming_call", f"c-{index}", 1.0)
        hand_on(tracker, "call_ended", f"c-{index}", 2.0)
    await persister.flush()
    assert heard_between
    assert slices == [256, 256, 87]
    # Every call chosen left memory but the one heard between slices.
    assert [record.call_key for record in tracker.state.all_calls()] == ["c-599"]
    await persister.flush()
    assert tracker.state.all_calls() == []
    repeat = Event.create(
        "call_transcript_completed", {"callUuid": "c-599"}, "events", 4.0, id=heard_between[0]
    )
    assert not tracker.admit(repeat)
    await persister.close()


def resident_keys(tracker: CallTracker) -> list[str]:
    return sorted(record.call_key for record in tracker.state.all_calls())


async def test_ended_calls_beyond_the_newest_leave_the_one_silent_longest_first(
    tmp_path: Path,
) -> None:
    """Memory keeps the ``resident_ended`` calls heard of last; one heard again after it
    ended (a late transcript) counts from then."""
    tracker = CallTracker()
    persister = Persister(
        CallStore(tmp_path / "calls.sqlite3"), tracker, lambda n: n, retain=3600,
        clock=lambda: 100.0, resident_for=1e12, resident_ended=2,
    )  # fmt: skip
    for at, key in ((3.0, "c-3"), (1.0, "c-1"), (2.0, "c-2")):
        hand_on(tracker, "call_ended", key, at)
    await persister.flush()
    assert resident_keys(tracker) == ["c-2", "c-3"]
    hand_on(tracker, "call_transcript_completed", "c-2", 4.0)
    hand_on(tracker, "call_ended", "c-4", 5.0)
    await persister.flush()
    assert resident_keys(tracker) == ["c-2", "c-4"]
    await persister.close()


async def test_a_call_read_back_by_a_repeat_of_its_event_leaves_memory_again(
    tmp_path: Path,
) -> None:
    tracker = CallTracker()
    persister = Persister(
        CallStore(tmp_path / "calls.sqlite3"), tracker, lambda n: n, retain=3600,
        clock=lambda: 100.0, resident_for=60, resident_ended=0,
    )  # fmt: skip
    first = hand_on(tracker, "call_ended", "c-1", 1.0)
    await persister.flush()
    assert resident_keys(tracker) == []
    repeat = Event.create("call_ended", {"callUuid": "c-1"}, "events", 2.0, id=first)
    assert not tracker.admit(repeat)  # read back to answer, a duplicate
    assert resident_keys(tracker) == ["c-1"]
    await persister.flush()
    assert resident_keys(tracker) == []
    await persister.close()


async def test_calls_pruned_from_memory_are_not_chosen_to_leave_it_again(tmp_path: Path) -> None:
    """Pruning (after ``retain``) comes before leaving memory (after ``resident_for``) here,
    and the next batch still chooses among the calls in memory."""
    tracker = CallTracker()
    persister = Persister(
        CallStore(tmp_path / "calls.sqlite3"), tracker, lambda n: n, retain=50,
        clock=lambda: 100.0, resident_for=80, resident_ended=10,
    )  # fmt: skip
    hand_on(tracker, "call_ended", "c-old", 30.0)
    await persister.flush()
    assert resident_keys(tracker) == ["c-old"]
    await persister.prune()
    assert resident_keys(tracker) == []
    hand_on(tracker, "call_ended", "c-new", 95.0)
    await persister.flush()
    assert resident_keys(tracker) == ["c-new"]
    await persister.close()
