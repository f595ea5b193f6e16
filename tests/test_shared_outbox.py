"""The webhook outbox in the shared PostgreSQL store (a real server): the outbox contract,
run against it and the SQLite file alike, then what only several instances can show."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from listener.cluster.url import StoreUrl
from listener.core.events import Event
from listener.testing.receiver import WebhookReceiver
from listener.webhooks.forwarder import WebhookForwarder
from listener.webhooks.http1 import Http1Pool
from listener.webhooks.outbox import Outbox
from listener.webhooks.outbox_connection import OutboxError
from listener.webhooks.outbox_rows import Attempt, Claim, Delivery, NewDelivery, Outcome, Take
from listener.webhooks.outbox_store import OutboxStore
from listener.webhooks.shared_outbox import SharedOutbox, open_shared
from listener.webhooks.store import Store
from listener.webhooks.worker import Worker
from tests.tcpproxy import FreezableProxy, proxied
from tests.test_delivery import destination
from tests.test_webhook_handler import cli

T0 = 1_800_000_000.0


def new(i: int, *, call: str | None = None, due: float = T0) -> NewDelivery:
    return NewDelivery("a", f"msg_{i}", "call_started", call, b'{"i":%d}' % i, T0 + i, due)


def attempt(msg_id: str, at: float = T0, status: int | None = 200) -> Attempt:
    failed = status is None or status >= 300
    return Attempt(
        "a",
        msg_id,
        at,
        0.01,
        status,
        "rejected" if failed else None,
        f"HTTP {status}" if failed else "",
        b"x" * 1024,
        False,
        failed,
    )


def ids(rows: list[Delivery]) -> list[str]:
    return [row.msg_id for row in rows]


def shared(url: StoreUrl, holder: str, ttl: float = 30.0) -> SharedOutbox:
    return SharedOutbox(url, "hooks", holder=holder, lease_ttl=ttl, renew_every=0.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OutboxStore]:
    """Each store the daemon may deliver from, fresh."""
    if request.param == "sqlite":
        with Outbox(tmp_path / "outbox.sqlite3") as opened:
            yield opened
    else:
        url = request.getfixturevalue("store")
        with shared(url, "h1") as opened:
            yield opened


# The contract, through OutboxStore's methods only.


def test_a_claim_takes_due_rows_in_order_each_once_until_its_outcome_or_release(
    outbox: OutboxStore,
) -> None:
    outbox.commit(
        [new(3, due=T0 + 3), new(1, due=T0 + 1), new(2, due=T0 + 2), new(9, due=T0 + 9)], []
    )
    first = outbox.claim("a", T0 + 5, 2)
    assert ids(first.rows) == ["msg_1", "msg_2"]
    assert first.next_due == T0 + 3
    second = outbox.claim("a", T0 + 5, 10)
    assert ids(second.rows) == ["msg_3"]
    assert second.next_due == T0 + 9
    outbox.release("a", ["msg_2"])
    outbox.commit([], [Outcome(attempt("msg_1"), "delivered")])
    assert ids(outbox.claim("a", T0 + 5, 10).rows) == ["msg_2"]
    assert outbox.pending_count("a") == 3
    assert outbox.whereabouts("a", "msg_1") == ("delivered", T0)
    [success] = outbox.attempts("msg_1")
    assert (success.status, success.answer) == (200, b"x" * 1024)


def test_per_call_order_holds_a_later_row_while_an_earlier_one_is_pending(
    outbox: OutboxStore,
) -> None:
    outbox.commit([new(1, call="c"), new(2, call="c"), new(3, call="d")], [])
    assert ids(outbox.claim("a", T0, 10, per_call=True).rows) == ["msg_1", "msg_3"]
    assert outbox.claim("a", T0, 10, per_call=True).rows == []
    outbox.commit([], [Outcome(attempt("msg_1"), "delivered")])
    assert ids(outbox.claim("a", T0, 10, per_call=True).rows) == ["msg_2"]


def test_the_rows_a_commit_claims_are_claimed_each_once_whatever_the_store(
    outbox: OutboxStore,
) -> None:
    taken = outbox.commit([new(1), new(2)], [], Take(T0, {"a": 1}))
    claimed = outbox.claim("a", T0, 10).rows
    assert sorted(ids(taken) + ids(claimed)) == ["msg_1", "msg_2"]
    assert outbox.claim("a", T0, 10).rows == []


def test_stats_give_each_destination_its_pending_dead_and_disabled_state(
    outbox: OutboxStore,
) -> None:
    outbox.commit([new(1), new(2), replace(new(3), destination="b")], [])
    outbox.claim("a", T0, 10)
    outbox.claim("b", T0, 10)
    outbox.commit(
        [],
        [
            Outcome(attempt("msg_1", status=410), "gone", 0, T0),
            Outcome(replace(attempt("msg_3", status=400), destination="b"), "exhausted", 3, T0),
        ],
    )
    stats = outbox.stats(T0 + 71, ["a", "b", "c"])
    assert [
        (s.name, s.pending, s.oldest_age, s.failing, s.dead, s.disabled_at, s.disabled_reason)
        for s in stats
    ] == [
        ("a", 2, 70.0, 1, 0, T0, "HTTP 410 Gone"),
        ("b", 0, None, 0, 1, None, None),
        ("c", 0, None, 0, 0, None, None),
    ]


def test_failures_reschedule_bury_and_disable_and_replay_brings_rows_back(
    outbox: OutboxStore,
) -> None:
    outbox.commit([new(1), new(2), new(3)], [])
    outbox.claim("a", T0, 10)
    outbox.commit(
        [],
        [
            Outcome(attempt("msg_1", status=500), "retry", 1, T0 + 60),
            Outcome(attempt("msg_2", status=400), "exhausted", 3, T0),
        ],
    )
    assert outbox.claim("a", T0 + 1, 10).rows == []
    assert ids(outbox.claim("a", T0 + 60, 10).rows) == ["msg_1"]
    [letter] = outbox.dead_letters(destination="a")
    assert (letter.msg_id, letter.attempts, letter.last_status, letter.reason) == (
        "msg_2",
        3,
        400,
        "exhausted",
    )
    assert outbox.replay(T0 + 70, dry_run=True) == {"dead": 1}
    assert outbox.replay(T0 + 70) == {"dead": 1}
    assert outbox.dead_letters() == []
    outbox.commit([], [Outcome(attempt("msg_3", status=410), "gone", 0, T0)])
    [stats] = outbox.stats(T0 + 70, ["a"])
    assert (stats.pending, stats.failing, stats.dead, stats.disabled_reason) == (
        3,
        2,
        0,
        "HTTP 410 Gone",
    )
    assert outbox.claim("a", T0 + 70, 10).rows == []
    assert outbox.enable("a")
    assert not outbox.enable("a")
    assert ids(outbox.claim("a", T0 + 70, 10).rows) == ["msg_3", "msg_2"]
    assert [a.status for a in outbox.attempts("msg_1")] == [500]


def test_one_commit_of_new_rows_a_2xx_and_a_failure_records_them_all(
    outbox: OutboxStore,
) -> None:
    outbox.commit([new(1), new(2)], [])
    assert ids(outbox.claim("a", T0, 10).rows) == ["msg_1", "msg_2"]
    outbox.commit(
        [new(3)],
        [
            Outcome(attempt("msg_1"), "delivered"),
            Outcome(attempt("msg_2", status=500), "retry", 1, T0 + 60),
        ],
    )
    assert outbox.whereabouts("a", "msg_1") == ("delivered", T0)
    claim = outbox.claim("a", T0 + 1, 10)
    assert (ids(claim.rows), claim.next_due) == (["msg_3"], T0 + 60)
    assert [a.status for a in outbox.attempts("msg_2")] == [500]


def test_the_bound_moves_the_oldest_rows_not_held_and_prune_forgets_old_records(
    outbox: OutboxStore,
) -> None:
    outbox.commit([new(i) for i in range(5)], [])
    outbox.claim("a", T0, 1)
    claim = outbox.claim("a", T0 + 10, 0, max_pending=2, max_age=7.5)
    # msg_0 is held (and counts); msg_1 and msg_2 are older than 7.5 s; then msg_3 is the
    # oldest over the bound of 2.
    assert claim.evicted == {"max_age": 2, "max_pending": 1}
    assert outbox.pending_count("a") == 2
    assert [d.msg_id for d in outbox.dead_letters()] == ["msg_1", "msg_2", "msg_3"]
    outbox.commit([], [Outcome(attempt("msg_0", at=T0), "delivered")])
    assert outbox.prune(T0 + 1) == 1
    assert outbox.whereabouts("a", "msg_0") is None
    assert outbox.whereabouts("a", "msg_1") == ("dead", T0 + 10)


# Several holders on one shared store.


def test_holders_claiming_at_once_never_get_the_same_row(store: StoreUrl) -> None:
    with shared(store, "seed") as seed:
        seed.commit([new(i) for i in range(600)], [])
    taken: dict[str, list[str]] = {}
    start = threading.Barrier(3)
    # Closed only once all are done: a store closing gives its rows back.
    holders = {holder: shared(store, holder) for holder in ("h1", "h2", "h3")}

    def drain(holder: str) -> None:
        mine = taken.setdefault(holder, [])
        start.wait()
        while rows := holders[holder].claim("a", T0 + 1000, 7).rows:
            mine += ids(rows)

    threads = [threading.Thread(target=drain, args=(h,)) for h in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for outbox in holders.values():
        outbox.close()
    everything = [msg_id for rows in taken.values() for msg_id in rows]
    assert sorted(everything) == sorted(f"msg_{i}" for i in range(600))
    assert sum(1 for rows in taken.values() if rows) >= 2, "they claimed side by side"


def test_a_lapsed_lease_hands_the_row_to_another_holder_and_a_renewed_one_does_not(
    store: StoreUrl,
) -> None:
    with shared(store, "h1", ttl=0.3) as first, shared(store, "h2") as second:
        first.commit([new(1), new(2)], [])
        assert ids(first.claim("a", T0, 1).rows) == ["msg_1"]
        assert ids(second.claim("a", T0, 10).rows) == ["msg_2"]
        for _ in range(4):
            time.sleep(0.15)
            first.renew()
        assert second.claim("a", T0, 10).rows == []
        time.sleep(0.4)
        [row] = second.claim("a", T0, 10).rows
        assert (row.msg_id, row.body) == ("msg_1", b'{"i":1}')
        # The first holder's late failure no longer moves the row; the new holder's 2xx does.
        first.commit([], [Outcome(attempt("msg_1", status=503), "retry", 1, T0 + 99)])
        second.commit([], [Outcome(attempt("msg_1"), "delivered")])
        assert first.whereabouts("a", "msg_1") == ("delivered", T0)
        assert [a.status for a in first.attempts("msg_1")] == [503, 200]


def test_a_commit_leases_its_new_rows_to_its_holder_as_a_claim_would_until_it_lapses(
    store: StoreUrl,
) -> None:
    with shared(store, "h1", ttl=0.3) as first, shared(store, "h2") as second:
        # One row within the limit; one past it and one not due yet stay for any claim.
        taken = first.commit([new(1), new(2), new(3, due=T0 + 5)], [], Take(T0, {"a": 1}))
        assert ids(taken) == ["msg_1"]
        assert ids(second.claim("a", T0 + 5, 10).rows) == ["msg_2", "msg_3"]
        for _ in range(4):
            time.sleep(0.15)
            first.renew()
        assert second.claim("a", T0 + 5, 10).rows == []
        time.sleep(0.4)
        # Lapsed (its holder stopped renewing): the same row, the same webhook-id.
        assert second.claim("a", T0 + 5, 10).rows == taken
        second.commit([], [Outcome(attempt("msg_1"), "delivered")])
        assert first.whereabouts("a", "msg_1") == ("delivered", T0)


def test_a_commit_leases_only_due_rows_and_the_next_due_one_within_its_limit(
    store: StoreUrl,
) -> None:
    with shared(store, "h1") as first:
        taken = first.commit([new(1), new(3, due=T0 + 5), new(2)], [], Take(T0, {"a": 2}))
        assert ids(taken) == ["msg_1", "msg_2"]
        assert ids(first.claim("a", T0 + 5, 10).rows) == ["msg_3"]


def test_a_row_twice_in_a_commit_is_leased_and_handed_over_once(store: StoreUrl) -> None:
    with shared(store, "h1") as first:
        taken = first.commit([new(1), new(1)], [], Take(T0, {"a": 10}))
        assert ids(taken) == ["msg_1"]
        assert first.claim("a", T0, 10).rows == []


async def test_the_rows_a_commit_leased_before_its_answer_was_lost_are_claimed_at_once(
    store: StoreUrl,
) -> None:
    take = Take(T0, {"a": 10})
    async with proxied(store) as (proxy, via):
        first = SharedOutbox(via, "hooks", holder="h1", connect_timeout=1, renew_every=0.0)
        try:
            assert await asyncio.to_thread(first.pending_count, "a") == 0
            # The server commits; its answer never comes back, the connection breaks.
            proxy.losing = True
            with pytest.raises(OutboxError):
                await asyncio.to_thread(first.commit, [new(1), new(2)], [], take)
            proxy.losing = False
            # The writer's retry: its inserts are skipped, so it leases nothing itself...
            assert await asyncio.to_thread(first.commit, [new(1), new(2)], [], take) == []
            # ...and the rows are not left leased to nobody's worker for lease_ttl.
            claimed = await asyncio.to_thread(first.claim, "a", T0, 10)
            assert ids(claimed.rows) == ["msg_1", "msg_2"]
        finally:
            # Off the loop: the proxy moves its bytes there.
            await asyncio.to_thread(first.close)


def test_a_commit_leases_no_row_of_a_disabled_destination_nor_one_behind_its_call(
    store: StoreUrl,
) -> None:
    take = Take(T0, {"a": 10}, frozenset({"a"}))
    with shared(store, "h1") as first, shared(store, "h2") as second:
        taken = first.commit([new(1, call="c"), new(2, call="c"), new(3, call="d")], [], take)
        assert ids(taken) == ["msg_1", "msg_3"]
        # msg_3 of call d is pending: msg_4 waits behind it.
        assert first.commit([new(4, call="d")], [], take) == []
        assert second.claim("a", T0, 10, per_call=True).rows == []
        assert first.disable("a", T0, "paused")
        assert first.commit([new(5)], [], take) == []
        assert first.enable("a")
        assert ids(second.claim("a", T0, 10).rows) == ["msg_2", "msg_4", "msg_5"]


class _ClaimsSeen(SharedOutbox):
    """The shared outbox, noting the rows its claims return."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claimed: list[str] = []

    def claim(self, *args: Any, **kwargs: Any) -> Claim:
        got = super().claim(*args, **kwargs)
        self.claimed.extend(ids(got.rows))
        return got


async def test_fresh_rows_go_out_without_a_claim_leased_by_their_commit_each_once(
    store: StoreUrl, tmp_path: Path
) -> None:
    seen = _ClaimsSeen(store, "hooks", holder="h1", renew_every=0.0)
    async with WebhookReceiver() as receiver:
        # One attempt at a time: the rows behind it wait, leased to this instance.
        receiver.respond_with(200, delay=0.1)
        forwarder = WebhookForwarder(
            [destination(receiver.url, max_in_flight=1)],
            tmp_path / "unused.sqlite3",
            poll_interval=0.02,
            shared_outbox=lambda: seen,
        )
        async with forwarder:
            for i in range(3):
                committed = forwarder.submit(Event("call_started", {}, "events", T0, id=f"e{i}"))
                assert committed is not None
            await receiver.wait_for(3, timeout=10)
            await asyncio.sleep(0.1)
    assert [r.headers["webhook-id"] for r in receiver.requests] == ["e0", "e1", "e2"]
    assert seen.claimed == []


async def test_a_commit_leases_nothing_for_an_unhealthy_destination_its_probe_goes_first(
    store: StoreUrl, tmp_path: Path
) -> None:
    async with WebhookReceiver() as receiver:
        receiver.respond_with(503)
        forwarder = WebhookForwarder(
            # The first probe a second after the failure.
            [destination(receiver.url, max_probe_interval=30.0)],
            tmp_path / "unused.sqlite3",
            poll_interval=0.02,
            shared_outbox=lambda: shared(store, "h1"),
        )
        async with forwarder:
            for i in range(2):
                committed = forwarder.submit(Event("call_started", {}, "events", T0, id=f"e{i}"))
                assert committed is not None
                await asyncio.wait_for(committed, 10)
                async with asyncio.timeout(10):
                    # Judged on the loop after the answer: nothing to wait on but the view.
                    while forwarder.views()[0].unhealthy_for is None:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
            async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
                query = "SELECT holder FROM sippet_deliveries WHERE msg_id = 'e1'"
                assert await (await conn.execute(query)).fetchall() == [(None,)]
            assert len(receiver.requests) == 1
            receiver.respond_with(200)
            await receiver.wait_for(3, timeout=10)
            await asyncio.sleep(0.1)
    assert [r.headers["webhook-id"] for r in receiver.requests] == ["e0", "e0", "e1"]


async def _stream_until(
    forwarder: WebhookForwarder, receiver: WebhookReceiver, wanted: set[str], count: int = 150
) -> int:
    """Submit an event of a call of its own every 30 ms until the ids ``wanted`` have all
    been received, at most ``count``; return how many went in."""
    for i in range(count):
        if wanted <= {r.headers["webhook-id"] for r in receiver.requests}:
            return i
        event = Event.create(
            "call_started", {"callUuid": f"k{i}"}, "events", time.time(), id=f"e{i}"
        )
        assert forwarder.submit(event) is not None
        await asyncio.sleep(0.03)
    return count


async def test_a_dead_holders_rows_are_taken_over_while_fresh_rows_still_flow(
    store: StoreUrl, tmp_path: Path
) -> None:
    # Leased by their commit to an instance that then stops renewing (as if dead).
    with shared(store, "h2", ttl=0.5) as dead:
        now = time.time()
        rows = [
            NewDelivery("hooks", f"x{i}", "call_started", None, b"{}", now, now) for i in range(3)
        ]
        assert len(dead.commit(rows, [], Take(now, {"hooks": 10}))) == 3
        async with WebhookReceiver() as receiver:
            forwarder = WebhookForwarder(
                [destination(receiver.url)],
                tmp_path / "unused.sqlite3",
                poll_interval=0.2,
                shared_outbox=lambda: shared(store, "h1"),
            )
            async with forwarder:
                # Each fresh row is handed over by its commit, and its attempt's end nudges
                # the worker: the claims that take the lapsed rows must still come.
                submitted = await _stream_until(forwarder, receiver, {"x0", "x1", "x2"})
    assert submitted < 150


async def test_each_next_row_of_a_call_goes_once_the_one_before_is_delivered_amid_a_stream(
    store: StoreUrl, tmp_path: Path
) -> None:
    async with WebhookReceiver() as receiver:
        forwarder = WebhookForwarder(
            [destination(receiver.url, ordering="per_call")],
            tmp_path / "unused.sqlite3",
            # No look of its own in the test's time: only the first row's outcome brings c1.
            poll_interval=30.0,
            shared_outbox=lambda: shared(store, "h1"),
        )
        async with forwarder:
            # A call's three events: each row behind the one before it.
            for j in range(3):
                event = Event.create(
                    "call_started", {"callUuid": "C"}, "events", time.time(), id=f"c{j}"
                )
                assert forwarder.submit(event) is not None
            submitted = await _stream_until(forwarder, receiver, {"c0", "c1", "c2"}, count=100)
    assert submitted < 100
    received = [r.headers["webhook-id"] for r in receiver.requests]
    assert received.index("c0") < received.index("c1") < received.index("c2")


async def test_a_commits_promise_and_a_claim_on_its_way_are_counted_against_the_prefetch(
    store: StoreUrl,
) -> None:
    with shared(store, "h0") as other:
        now = time.time()
        other.commit([replace(new(i), destination="hooks", due_at=now) for i in range(10)], [])
    outbox = await Store.open_with(lambda: shared(store, "h1"))
    gate = threading.Event()
    async with WebhookReceiver() as receiver:
        # Attempts whose outcomes are never committed: their rows stay leased here. Slow
        # enough that the test's look at the store comes before the third attempt starts,
        # on a slow machine too.
        receiver.respond_with(200, delay=1.0)
        client = Http1Pool()
        worker = Worker(
            destination(receiver.url, max_in_flight=1),
            outbox,
            client,
            lambda _: None,
            lambda: None,
            poll_interval=30.0,
        )
        try:
            # A commit on its way may lease 5 rows here: the claim takes 3, not 8 (the
            # prefetch, 8 x max_in_flight).
            worker.promise(5)
            worker.start()
            await receiver.wait_for(1, timeout=10)
            async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
                query = "SELECT count(*) FROM sippet_deliveries WHERE holder = 'h1'"
                assert await (await conn.execute(query)).fetchall() == [(3,)]
            worker.promise(0)
            # That claim came back full. The next one, due as the third row starts, waits
            # behind the busy outbox thread: on its way, it leaves a commit no room.
            busy = asyncio.ensure_future(outbox.run(lambda _: gate.wait(30)))
            async with asyncio.timeout(10):
                # Nothing to wait on but the worker's own figure.
                while worker.room() != 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            gate.set()
            await busy
        finally:
            gate.set()
            await worker.stop_claiming()
            for task in worker.attempts:
                task.cancel()
            await asyncio.gather(*worker.attempts, return_exceptions=True)
            await client.aclose()
            await outbox.close()


def test_per_call_order_holds_across_holders(store: StoreUrl) -> None:
    with shared(store, "h1") as first, shared(store, "h2") as second:
        first.commit([new(1, call="c"), new(2, call="c")], [])
        assert ids(first.claim("a", T0, 1, per_call=True).rows) == ["msg_1"]
        assert second.claim("a", T0, 10, per_call=True).rows == []
        first.release("a", ["msg_1"])
        assert ids(second.claim("a", T0, 10, per_call=True).rows) == ["msg_1"]
        assert first.claim("a", T0, 10, per_call=True).rows == []


def test_a_store_closed_gives_its_rows_back_at_once(store: StoreUrl) -> None:
    with shared(store, "h2") as second:
        with shared(store, "h1") as first:
            first.commit([new(1)], [])
            assert ids(first.claim("a", T0, 10).rows) == ["msg_1"]
        assert ids(second.claim("a", T0, 10).rows) == ["msg_1"]


async def test_deliveries_submitted_while_the_store_does_not_answer_go_out_once_it_does(
    store: StoreUrl, tmp_path: Path
) -> None:
    def opener() -> SharedOutbox:
        return SharedOutbox(via, "hooks", holder="h1", connect_timeout=1, quiet=True)

    async with WebhookReceiver() as receiver, proxied(store) as (proxy, via):
        forwarder = WebhookForwarder(
            [destination(receiver.url)],
            tmp_path / "unused.sqlite3",
            poll_interval=0.05,
            shared_outbox=opener,
        )
        with capture_logs() as logs:
            await outage(forwarder, proxy, receiver)
    assert [r.headers["webhook-id"] for r in receiver.requests] == ["e0", "e1"]
    # The outage in the journal: where it starts and ends, and the writer's retries of its
    # batch; no line for each claim, measure or prune the engine made meanwhile.
    events = Counter(entry["event"] for entry in logs if entry["log_level"] != "debug")
    assert events["the shared store does not answer; webhook deliveries wait for it"] == 1
    assert events["the shared store answers again; webhook deliveries resume"] == 1
    assert events["webhook outbox commit failed"] >= 1
    # At most the one call that found the connection broken (41 claims and 39 prunes logged
    # their failure here, when they were not quiet).
    quiet = ("claim failed", "stats failed", "renewal or prune failed")
    assert sum(events[f"webhook outbox {what}"] for what in quiet) <= 1
    assert not (tmp_path / "unused.sqlite3").exists()
    async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
        rows = await (
            await conn.execute("SELECT delivered_at IS NOT NULL, holder FROM sippet_deliveries")
        ).fetchall()
    assert rows == [(True, None), (True, None)]


async def outage(
    forwarder: WebhookForwarder, proxy: FreezableProxy, receiver: WebhookReceiver
) -> None:
    """One event delivered, then one submitted while the store does not answer (for 1.2 s)."""
    async with forwarder:
        first = forwarder.submit(Event("call_started", {"i": 0}, "events", T0, id="e0"))
        assert first is not None
        await asyncio.wait_for(first, 10)
        await receiver.wait_for(1, timeout=10)
        # The store goes away under the open connection, and does not take a new one.
        proxy.refusing = True
        proxy.cut()
        committed = forwarder.submit(Event("call_started", {"i": 1}, "events", T0, id="e1"))
        assert committed is not None
        await asyncio.sleep(1.2)
        assert not committed.done()
        proxy.refusing = False
        await asyncio.wait_for(committed, 10)
        await receiver.wait_for(2, timeout=10)


def test_an_instance_given_a_store_moves_its_files_pending_rows_into_it_once(
    store: StoreUrl, tmp_path: Path
) -> None:
    file = tmp_path / "webhooks-hooks.sqlite3"
    with Outbox(file) as local:
        local.commit([new(1), new(2)], [])
        local.claim("a", T0, 1)
        local.commit([], [Outcome(attempt("msg_1"), "delivered")])
    nobody = StoreUrl("postgresql://sippet:secret@127.0.0.1:1/sippet")
    open_shared(nobody, "hooks", file, holder="h1", connect_timeout=1).close()
    assert file.exists(), "kept for the next start while the store does not answer"
    with open_shared(store, "hooks", file, holder="h1") as outbox:
        [row] = outbox.claim("a", T0, 10).rows
        assert (row.msg_id, row.body, row.due_at) == ("msg_2", b'{"i":2}', T0)
    assert not file.exists()
    assert (tmp_path / "webhooks-hooks.sqlite3.moved-to-store").exists()
    with open_shared(store, "hooks", file, holder="h1") as outbox:
        assert outbox.pending_count("a") == 1


async def test_the_webhooks_commands_work_on_the_shared_outbox(
    store: StoreUrl, tmp_path: Path
) -> None:
    with SharedOutbox(store, "crm", holder="h1") as outbox:
        hooks = [replace(new(i), destination="crm") for i in (1, 2)]
        outbox.commit(hooks, [])
        outbox.claim("crm", T0, 1)
        failed = replace(attempt("msg_1", status=400), destination="crm")
        outbox.commit([], [Outcome(failed, "exhausted", 3, T0)])
    config = tmp_path / "config.toml"
    config.write_text(
        f'[store]\nurl = "{store.conninfo}"\n[service]\nstate_dir = "{tmp_path}"\n'
        '[[handlers]]\nuse = "webhook"\nname = "crm"\nurl = "https://crm.example/"\n'
    )
    code, out = await cli("webhooks", "replay", "--all", "--config", str(config))
    assert (code, out) == (0, "replayed 1 dead letter\n")
    code, out = await cli("webhooks", "status", "--json", "--config", str(config))
    assert code == 0
    [status] = [json.loads(line) for line in out.splitlines()]
    assert (status["destination"], status["pending"], status["dead"]) == ("crm", 2, 0)


async def test_only_the_leader_prunes_the_shared_outbox(store: StoreUrl, tmp_path: Path) -> None:
    leading = False

    async def delivered_rows() -> int:
        async with await psycopg.AsyncConnection.connect(store.conninfo) as conn:
            query = "SELECT count(*) FROM sippet_deliveries WHERE delivered_at IS NOT NULL"
            row = await (await conn.execute(query)).fetchone()
        assert row is not None
        return int(row[0])

    async with WebhookReceiver() as receiver:
        forwarder = WebhookForwarder(
            [destination(receiver.url)],
            tmp_path / "unused.sqlite3",
            poll_interval=0.02,
            # Every delivered row is old enough to go at the next prune.
            retention=0.0,
            shared_outbox=lambda: shared(store, "h1"),
            leads=lambda: leading,
        )
        async with forwarder:
            committed = forwarder.submit(Event("call_started", {"i": 0}, "events", T0, id="e0"))
            assert committed is not None
            await asyncio.wait_for(committed, 10)
            await receiver.wait_for(1, timeout=10)
            async with asyncio.timeout(5):
                # Recorded by the outbox's thread: nothing to wait on but the table.
                while not await delivered_rows():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            # A follower: fifteen housekeeping rounds, no prune (it still measures the outbox,
            # less often, for its own status).
            await asyncio.sleep(0.3)
            assert await delivered_rows() == 1
            assert [view.stats is not None for view in forwarder.views()] == [True]
            leading = True
            async with asyncio.timeout(5):
                while await delivered_rows():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
