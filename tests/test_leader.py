"""The leader lease, against the real server: one leader, failover within two lease periods,
and a leader cut off from the store steps down before its lease could have passed."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Sequence

from listener.cluster.database import connect
from listener.cluster.leader import Elector, LeaseSettings
from listener.cluster.url import StoreUrl
from listener.service.status_view import view
from listener.testing import FakeSippet, running_daemon
from tests.tcpproxy import proxied

TTL = 1.0
LEASE = LeaseSettings(ttl=TTL, renew_every=0.25, margin=0.2, connect_timeout=2)

CHILD = """
import asyncio, sys
from listener.cluster.leader import Elector, LeaseSettings
from listener.cluster.url import StoreUrl
from listener.core.logs import configure_logging

async def main():
    configure_logging("warning", "json")
    lease = LeaseSettings(ttl=float(sys.argv[2]), renew_every=float(sys.argv[3]))
    elector = Elector(StoreUrl(sys.argv[1]), lease, holder="child")
    task = asyncio.create_task(elector.run())
    await elector.leading.wait()
    print("leading", elector.term, flush=True)
    await task

asyncio.run(main())
"""


class Watch:
    """Samples the electors every few milliseconds: two leading at once fails the test."""

    def __init__(self, electors: Sequence[Elector]) -> None:
        self.electors = electors
        self.most = 0
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def stop(self, elector: Elector) -> None:
        self.tasks[elector.holder].cancel()

    async def run(self) -> None:
        while True:
            self.most = max(self.most, sum(elector.is_leader for elector in self.electors))
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(*electors: Elector) -> AsyncIterator[Watch]:
    watch = Watch(electors)
    watch.tasks = {elector.holder: asyncio.create_task(elector.run()) for elector in electors}
    tasks = [*watch.tasks.values(), asyncio.create_task(watch.run())]
    try:
        yield watch
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def lease_row(url: StoreUrl) -> tuple[str, int, bool]:
    """(holder, term, whether the lease is still valid on the database's clock)."""
    async with await connect(url) as conn:
        row = await (
            await conn.execute("SELECT holder, term, expires_at > now() FROM sippet_leases")
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


async def lease_expiry(url: StoreUrl) -> tuple[tuple[str, int], float]:
    """((holder, term), when the lease expires: wall clock, the database's)."""
    async with await connect(url) as conn:
        row = await (
            await conn.execute(
                "SELECT holder, term, extract(epoch FROM expires_at) FROM sippet_leases"
            )
        ).fetchone()
    assert row is not None
    return (row[0], row[1]), float(row[2])


async def leader_of(electors: Sequence[Elector], timeout: float) -> Elector:
    waits = {asyncio.ensure_future(elector.leading.wait()): elector for elector in electors}
    done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()
    assert done, f"no leader within {timeout} s"
    return waits[done.pop()]


async def test_one_leader_among_three_and_a_resigning_one_is_replaced_at_once(
    store: StoreUrl,
) -> None:
    electors = [Elector(store, LEASE, holder=f"i{n}") for n in range(3)]
    async with running(*electors) as watch:
        leader = await leader_of(electors, 2 * TTL)
        # Several renewals and take-over tries later, still that one alone.
        await asyncio.sleep(TTL)
        assert [e for e in electors if e.is_leader] == [leader]
        assert await lease_row(store) == (leader.holder, leader.term, True)
        # A leader that stops resigns: the next one need not wait for its lease to pass.
        stopped = time.monotonic()
        watch.stop(leader)
        others = [e for e in electors if e is not leader]
        successor = await leader_of(others, 2 * TTL)
        assert time.monotonic() - stopped < TTL / 2
        assert successor.term == 2
    assert watch.most == 1


async def test_a_killed_leader_is_replaced_within_two_lease_periods(store: StoreUrl) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        store.conninfo,
        str(TTL),
        "0.25",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(10):
            line = await child.stdout.readline()
        assert line == b"leading 1\n"
        survivor = Elector(store, LEASE, holder="survivor")
        async with running(survivor):
            await asyncio.sleep(0.5)
            assert not survivor.is_leader
            child.kill()
            killed = time.monotonic()
            async with asyncio.timeout(2 * TTL + 0.5):
                await survivor.leading.wait()
            took = time.monotonic() - killed
            assert survivor.term == 2
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()
    assert took < 2 * TTL


async def test_a_leader_cut_off_from_the_store_steps_down_before_its_lease_passes(
    store: StoreUrl,
) -> None:
    async with proxied(store) as (proxy, via_proxy):
        cut_off = Elector(via_proxy, LEASE, holder="cut-off")
        other = Elector(store, LEASE, holder="other")
        work: list[str] = []
        stopped = asyncio.Event()
        stopped_at: list[float] = []

        async def singleton() -> None:
            work.append("started")
            try:
                await asyncio.Event().wait()
            finally:
                work.append("stopped")
                stopped_at.append(time.time())
                stopped.set()

        async with running(cut_off) as first:
            leading = asyncio.create_task(cut_off.while_leader(singleton))
            async with asyncio.timeout(2 * TTL):
                await cut_off.leading.wait()
            async with running(other) as second:
                await asyncio.sleep(0.3)
                assert not other.is_leader
                proxy.freeze()
                frozen = time.monotonic()
                async with asyncio.timeout(TTL):
                    await cut_off.following.wait()
                async with asyncio.timeout(0.1):
                    await stopped.wait()
                # Its singleton work stopped while the database still held the lease for it
                # (one host, one clock: read after the fact, not raced on a busy machine).
                assert work == ["started", "stopped"]
                lease, expires = await lease_expiry(store)
                assert lease == ("cut-off", 1)
                assert stopped_at[0] < expires
                async with asyncio.timeout(2 * TTL):
                    await other.leading.wait()
                assert time.monotonic() - frozen < 2 * TTL
                assert (other.term, cut_off.is_leader) == (2, False)
                proxy.thaw()
                # Back in touch, it finds the lease taken and stays a follower.
                await asyncio.sleep(3 * LEASE.renew_every)
                assert (cut_off.is_leader, other.is_leader) == (False, True)
            leading.cancel()
        assert work == ["started", "stopped"]
        assert max(first.most, second.most) == 1


async def test_two_daemons_on_one_store_say_who_leads_in_their_status_line_and_page(
    fake: FakeSippet, store: StoreUrl
) -> None:
    async with (
        running_daemon(fake, [], store=store.conninfo) as one,
        running_daemon(fake, [], store=store.conninfo) as two,
    ):
        electors = [daemon.store.elector for daemon in (one, two) if daemon.store is not None]
        leader = await leader_of(electors, 2)
        term = leader.term
        lines = sorted(daemon.status_line().split("; ")[2] for daemon in (one, two))
        pages = {
            daemon.store.elector.holder if daemon.store else "": dict(
                (row[0], row[1])
                for row in view(daemon.board.snapshot(), admin=False)["tables"]["link"]
            )
            for daemon in (one, two)
        }
    assert lines == ["follower", f"leader (term {term})"]
    assert len(pages) == 2
    for holder, rows in pages.items():
        role = f"leader (term {term})" if holder == leader.holder else "follower"
        assert rows["Instance"] == f"{holder}: {role}"
        assert rows["Shared store"] == {"t": "answering", "c": "ok"}


async def test_a_renewal_answered_after_its_local_deadline_does_not_lead(store: StoreUrl) -> None:
    # Each reading of this clock is a lease later than the one before: every answer arrives
    # after the lease it renewed could have passed, as seen from here.
    readings = iter(range(0, 10**6, int(TTL)))

    def late_clock() -> float:
        return float(next(readings))

    slow = Elector(store, LEASE, holder="slow", clock=late_clock)
    async with running(slow) as watch:
        await asyncio.sleep(4 * LEASE.renew_every)
        holder, _, valid = await lease_row(store)
    # The database granted it the lease each time; it never acted on one.
    assert (holder, valid) == ("slow", True)
    assert watch.most == 0
