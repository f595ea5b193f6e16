"""The dispatcher, end to end: real daemon, real socket, real handlers."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from typing import Any

import pytest

from listener.core import metrics
from listener.core.events import Event
from listener.dispatch.dispatcher import RunnerSettings, _Queue
from listener.dispatch.handler import Context, Handler, handler
from listener.dispatch.loader import LoadedHandler
from listener.testing import FakeSippet, running_daemon, settle


def outcome(name: str, result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "sippet_listener_handler_events_total", {"handler": name, "outcome": result}
    )
    return value or 0.0


class Recorder(Handler):
    """Records (event, call key, start time); optionally slow, failing, held or hanging.

    ``gate`` holds every call until it is set; ``hang`` is a gate that never opens.
    """

    def __init__(
        self,
        name: str,
        *,
        delay: float = 0.0,
        fail: bool = False,
        hang: bool = False,
        gate: asyncio.Event | None = None,
        events: tuple[str, ...] = ("*",),
    ) -> None:
        super().__init__()
        self.name = name
        self.events = events
        self.delay, self.fail = delay, fail
        self.gate = asyncio.Event() if hang else gate
        self.seen: list[tuple[str, str | None, float]] = []
        self.done: list[Event] = []
        self.active = 0
        self.max_active = 0

    async def handle(self, event: Event, ctx: Context) -> None:
        self.seen.append((event.name, event.call_key, time.monotonic()))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay if self.delay > 0 else random.uniform(0, 0.02))
            if self.fail:
                raise RuntimeError(f"{self.name} broke on purpose")
            self.done.append(event)
        finally:
            self.active -= 1


def loaded(item: Handler, **settings: Any) -> LoadedHandler:
    return LoadedHandler(
        item, RunnerSettings(name=item.name, events=tuple(item.events), **settings)
    )


async def test_a_slow_handler_does_not_delay_a_fast_one(fake: FakeSippet) -> None:
    held = asyncio.Event()
    slow, fast = Recorder("slow", gate=held), Recorder("fast")
    async with running_daemon(fake, [loaded(slow, concurrency=1), fast]) as daemon:
        for seq in range(20):
            await fake.broadcast("incoming_call", {"callUuid": f"c-{seq}"})
        await asyncio.wait_for(daemon.dispatcher.wait_received(20), 10)
        await asyncio.wait_for(daemon.dispatcher.runners[1].drain(), 5)
        assert len(fast.done) == 20
        # The slow handler is still stuck on its first event while the fast one finished.
        assert (len(slow.seen), len(slow.done)) == (1, 0)
        held.set()
        await settle(daemon, 20)
    assert len(slow.done) == 20


async def test_a_raising_handler_is_isolated_and_counted(fake: FakeSippet) -> None:
    broken, healthy = Recorder("broken", fail=True), Recorder("healthy")
    before = outcome("broken", "error")
    async with running_daemon(fake, [broken, healthy]) as daemon:
        for seq in range(5):
            await fake.broadcast("call_ended", {"callUuid": f"c-{seq}"})
        await settle(daemon, 5)
    assert len(broken.seen) == len(healthy.seen) == 5
    assert outcome("broken", "error") - before == 5
    assert outcome("healthy", "ok") >= 5


async def test_timeouts_fire_and_the_handler_goes_on(fake: FakeSippet) -> None:
    stuck = Recorder("stuck", hang=True)
    before = outcome("stuck", "timeout")
    async with running_daemon(fake, [loaded(stuck, timeout=0.1)]) as daemon:
        for seq in range(3):
            # Not a lifecycle event: three incoming_call of one call would be handled once.
            await fake.broadcast("call_transcript_delta", {"callUuid": "same-call", "seq": seq})
        await settle(daemon, 3)
    # Each event of the call was attempted in turn, each cut off by the timeout.
    assert len(stuck.seen) == 3
    assert outcome("stuck", "timeout") - before == 3


async def test_per_call_order_holds_while_calls_run_in_parallel(fake: FakeSippet) -> None:
    # Each event takes a random 0-20 ms: a call's event handled alongside its predecessor
    # would often finish first, so the completion order shows whether the lanes held.
    jittery = Recorder("jittery", delay=-1)
    calls = [f"call-{n % 5}" for n in range(150)]
    async with running_daemon(fake, [loaded(jittery, concurrency=4)]) as daemon:
        for seq, call in enumerate(calls):
            await fake.broadcast("call_transcript_delta", {"callUuid": call, "seq": seq})
        await settle(daemon, len(calls))
    finished: dict[str, list[int]] = defaultdict(list)
    for event in jittery.done:
        finished[str(event.call_key)].append(event.payload["seq"])
    assert finished == {
        call: [seq for seq, other in enumerate(calls) if other == call] for call in set(calls)
    }
    assert jittery.max_active > 1, "calls were not handled in parallel"
    assert jittery.max_active <= 4, "the concurrency limit was exceeded"


async def test_a_burst_of_events_of_different_calls_reaches_every_worker(
    fake: FakeSippet,
) -> None:
    # Idle workers are woken one at a time, each one that takes an event waking the next
    # while events remain: a burst must still fill every worker, not only the first.
    gate, full = asyncio.Event(), asyncio.Event()

    class Crowd(Recorder):
        async def handle(self, event: Event, ctx: Context) -> None:
            if self.active + 1 == 4:
                full.set()
            await super().handle(event, ctx)

    crowd = Crowd("crowd", gate=gate)
    async with running_daemon(fake, [loaded(crowd, concurrency=4)]) as daemon:
        for seq in range(12):
            await fake.broadcast("call_transcript_delta", {"callUuid": f"c-{seq}", "seq": seq})
        async with asyncio.timeout(5):
            await full.wait()
        assert crowd.active == 4
        gate.set()
        await settle(daemon, 12)
    assert len(crowd.done) == 12
    assert crowd.max_active == 4


async def test_a_worker_cancelled_once_woken_passes_the_event_on() -> None:
    queue = _Queue(10)
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)  # both wait
    queue.put_nowait((Event("x", {}, "events", 0.0), None))
    first.cancel()  # woken by the put, cancelled before it ran
    async with asyncio.timeout(5):
        event, _ = await second
    assert event.name == "x"
    assert first.cancelled()


async def test_events_of_one_call_arrive_in_order(fake: FakeSippet) -> None:
    seen: dict[str, list[int]] = defaultdict(list)

    @handler(events=["call_*"])
    async def ordered(event: Event, ctx: Context) -> None:
        await asyncio.sleep(random.uniform(0, 0.01))
        seen[str(event.call_key)].append(int(event.payload["seq"]))

    async with running_daemon(fake, [loaded(ordered, concurrency=8)]) as daemon:
        for seq in range(150):
            await fake.broadcast("call_transcript_delta", {"callUuid": f"c-{seq % 5}", "seq": seq})
        await fake.broadcast("incoming_call", {"callUuid": "not-subscribed"})
        await settle(daemon, 151)
    assert sorted(seen) == [f"c-{n}" for n in range(5)]
    for call, seqs in seen.items():
        assert seqs == sorted(seqs), f"{call} out of order: {seqs}"
        assert len(seqs) == 30


async def test_full_queue_waits_by_default_and_heartbeats_keep_flowing(
    fake: FakeSippet,
) -> None:
    slow = Recorder("slow", delay=0.05)
    async with running_daemon(
        fake, [loaded(slow, queue_size=2, concurrency=1)], sippet={"heartbeat_interval": 0.2}
    ) as daemon:
        for seq in range(40):
            await fake.broadcast("incoming_call", {"callUuid": f"c-{seq}"})
        await settle(daemon, 40)
        assert daemon.session.reconnects == 0, "a busy handler made the link look dead"
    assert len(slow.seen) == 40


async def test_full_queue_can_drop_with_a_metric(fake: FakeSippet) -> None:
    stuck = Recorder("dropper", hang=True)
    before = outcome("dropper", "dropped")
    async with running_daemon(
        fake,
        [loaded(stuck, queue_size=2, concurrency=1, on_full="drop", timeout=60)],
        service={"drain_timeout": 0.1},
    ) as daemon:
        for seq in range(10):
            await fake.broadcast("incoming_call", {"callUuid": f"c-{seq}"})
        await asyncio.wait_for(daemon.dispatcher.wait_received(10), 10)
        dropped = outcome("dropper", "dropped") - before
    # At most one in flight, one held by the scheduler and two queued: the rest were dropped,
    # each counted, and what was taken was abandoned at stop (the handler never returns).
    assert dropped >= 10 - 4
    assert daemon.report is not None
    assert daemon.report.abandoned["dropper"] + dropped == 10


async def test_stop_drains_in_flight_work_within_the_grace_period(fake: FakeSippet) -> None:
    slow = Recorder("drainer", delay=0.1)
    async with running_daemon(
        fake, [loaded(slow, concurrency=1)], service={"drain_timeout": 5.0}
    ) as daemon:
        for seq in range(5):
            await fake.broadcast("incoming_call", {"callUuid": f"c-{seq}"})
        await asyncio.wait_for(daemon.dispatcher.wait_received(5), 10)
    assert len(slow.seen) == 5
    assert daemon.report is not None
    assert daemon.report.total == 0


async def test_a_waiter_that_timed_out_does_not_break_the_intake(fake: FakeSippet) -> None:
    # Its future was cancelled by the timeout: the next event must not try to set it. The
    # events are awaited at the handler, not through wait_received, whose next waiter would
    # replace the cancelled one.
    arrived: list[str | None] = []
    each = asyncio.Event()

    @handler(events=["*"])
    async def note(event: Event, ctx: Context) -> None:
        arrived.append(event.call_key)
        each.set()

    async with running_daemon(fake, [note]) as daemon:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(daemon.dispatcher.wait_received(1), 0.05)
        for key in ("c-1", "c-2"):
            each.clear()
            await fake.broadcast("incoming_call", {"callUuid": key})
            await asyncio.wait_for(each.wait(), 10)
        assert daemon.session.reconnects == 0
    assert arrived == ["c-1", "c-2"]


async def test_every_waiter_for_a_count_is_woken(fake: FakeSippet) -> None:
    async with running_daemon(fake, [Recorder("seen")]) as daemon:
        more = asyncio.ensure_future(daemon.dispatcher.wait_received(3))
        fewer = asyncio.ensure_future(daemon.dispatcher.wait_received(1))
        await asyncio.sleep(0)
        for seq in range(3):
            await fake.broadcast("incoming_call", {"callUuid": f"c-{seq}"})
        await asyncio.wait_for(fewer, 10)
        await asyncio.wait_for(more, 10)
        await settle(daemon, 3)


async def test_unknown_events_reach_wildcard_handlers_only(fake: FakeSippet) -> None:
    everything, calls = Recorder("everything"), Recorder("calls", events=("call_*",))
    async with running_daemon(fake, [everything, calls]) as daemon:
        await fake.broadcast("brand_new_thing", {"x": 1})
        await fake.broadcast("call_ended", {"callUuid": "c"})
        await settle(daemon, 2)
    assert [name for name, _, _ in everything.seen] == ["brand_new_thing", "call_ended"]
    assert [name for name, _, _ in calls.seen] == ["call_ended"]


async def test_a_raising_filter_is_isolated_and_counted(fake: FakeSippet) -> None:
    class Picky(Recorder):
        def matches(self, event: Event) -> bool:
            return bool(event.payload["needed"])

    picky, healthy = Picky("picky"), Recorder("steady")
    before = outcome("picky", "error")
    async with running_daemon(fake, [picky, healthy]) as daemon:
        await fake.broadcast("incoming_call", {"callUuid": "c-1"})
        await fake.broadcast("incoming_call", {"callUuid": "c-2", "needed": True})
        await settle(daemon, 2)
        assert daemon.session.reconnects == 0
    assert len(healthy.seen) == 2
    assert len(picky.seen) == 1
    assert outcome("picky", "error") - before == 1


async def test_queues_are_bounded_by_bytes_too(fake: FakeSippet) -> None:
    stuck = Recorder("bytes", hang=True)
    before = outcome("bytes", "dropped")
    blob = "x" * 3000
    async with running_daemon(
        fake,
        [loaded(stuck, queue_bytes=8192, concurrency=1, on_full="drop", timeout=60)],
        service={"drain_timeout": 0.1},
    ) as daemon:
        for seq in range(10):
            await fake.broadcast("call_ai_audit_event", {"callUuid": f"c-{seq}", "blob": blob})
        await asyncio.wait_for(daemon.dispatcher.wait_received(10), 10)
        dropped = outcome("bytes", "dropped") - before
    # 3 KB each against an 8 KB budget: at most two wait (plus one in flight), the rest are
    # dropped and counted; what was taken is abandoned at stop (the handler never returns).
    assert dropped >= 7
    assert daemon.report is not None
    assert daemon.report.abandoned["bytes"] + dropped == 10


@pytest.mark.parametrize(
    ("budget", "admitted"),
    [
        # 3 KB events against 8 KB: one in flight, two queued, the fourth held at the socket.
        pytest.param({"queue_bytes": 8192}, 4, id="8KiB-budget"),
        pytest.param({}, 10, id="no-budget"),
    ],
)
async def test_only_the_byte_budget_holds_the_intake_and_nothing_is_lost(
    fake: FakeSippet, budget: dict[str, int], admitted: int
) -> None:
    held = asyncio.Event()
    slow = Recorder("held-bytes", gate=held)
    blob = "x" * 3000
    async with running_daemon(fake, [loaded(slow, concurrency=1, **budget)]) as daemon:
        for seq in range(10):
            await fake.broadcast("call_ai_audit_event", {"callUuid": f"c-{seq}", "blob": blob})
        await asyncio.wait_for(daemon.dispatcher.wait_received(admitted), 10)
        # The frames are already on the socket: a reader not held back takes them in a blink.
        await asyncio.sleep(0.2)
        assert daemon.dispatcher.received == admitted
        held.set()
        await settle(daemon, 10)
        assert daemon.session.reconnects == 0
    assert [event.call_key for event in slow.done] == [f"c-{seq}" for seq in range(10)]


async def test_an_event_larger_than_the_byte_budget_goes_in_once_nothing_is_pending(
    fake: FakeSippet,
) -> None:
    held = asyncio.Event()
    slow = Recorder("oversized", gate=held)
    async with running_daemon(fake, [loaded(slow, concurrency=1, queue_bytes=4096)]) as daemon:
        await fake.broadcast("call_ai_audit_event", {"callUuid": "c-small"})
        await asyncio.wait_for(daemon.dispatcher.wait_received(1), 10)
        # Larger than the whole budget: it waits until nothing is pending, which the end of
        # the one in flight (taken from the queue long before) must announce.
        await fake.broadcast("call_ai_audit_event", {"callUuid": "c-big", "blob": "x" * 6000})
        await asyncio.wait_for(daemon.dispatcher.wait_received(2), 10)
        held.set()
        await settle(daemon, 2)
    assert [event.call_key for event in slow.done] == ["c-small", "c-big"]
