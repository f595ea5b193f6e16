"""The dispatcher: events in from the socket, out to every handler that wants them.

Each handler gets its own :class:`HandlerRunner`: a bounded queue, ``concurrency`` worker
tasks, a timeout, and *lanes* that keep one call's events in arrival order while different
calls run in parallel: a worker that takes an event of a call another worker is busy with
leaves it in that call's lane, and the busy worker handles it next.

A handler that raises or hangs is logged and counted; it never delays another handler, and
the socket only waits for a handler when that handler's queue is full and its policy is
``wait`` (the default: lose nothing, slow the intake instead).

Before any handler sees an event, :meth:`Dispatcher.submit` asks the
:class:`~listener.calls.tracker.CallTracker` whether its id was handed on before (a duplicate
goes no further: counted, never handled) and merges it into the call map; each handler then
gets the call's record as of this event with it, as ``ctx.call``.

:meth:`Dispatcher.submit` is on the socket's hot path: it returns None when every interested
handler took the event at once, or an awaitable for the caller to wait on when a full queue
must first make room.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fnmatch
import functools
import gc
import sys
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeAlias, runtime_checkable

import structlog

from listener.calls.state import CallRecord
from listener.calls.tracker import CallTracker
from listener.core import metrics
from listener.core.errors import ListenerError
from listener.core.events import Event
from listener.dispatch.handler import Context, Handler, OnFull

__all__ = [
    "OBSERVED_BYTES",
    "Claims",
    "DispatchReport",
    "Dispatcher",
    "Handled",
    "HandlerRunner",
    "RunnerSettings",
]

_log = structlog.get_logger(__name__)
# Net allocations of tracked objects between young collections (Python's default is 700).
_YOUNG_THRESHOLD = 7000
# No waiter: a count never reached.
_NEVER = sys.maxsize
# A runner with claims asks an event's claim as it queues it while at most this many times
# its concurrency are pending: a longer wait is a backlog, whose claims go as workers take
# them (each asked claim is a task and an entry until then).
_ASK_AHEAD = 2
# An event and its call as of this event, as they wait for a handler.
_Item: TypeAlias = tuple[Event, CallRecord | None]
#: What an observer hears of each handled event: the event, the handler's name, the outcome
#: (``ok``, ``error``, ``timeout``), seconds taken, and the failure in a few words if any (not
#: the exception: its traceback would keep the handler's frames alive). The event rather than
#: its id: reading ``event.id`` here made every lifecycle id on the hot path again (+2.8 µs
#: per event, ``python -m bench.calldrain --observed``); the page reads ids when it is drawn.
Handled: TypeAlias = tuple[Event, str, str, float, str | None]
#: An observer keeps the events it sees for a while: one from a bigger frame is kept without
#: its payload, so that a few multi-megabyte AI audit events cannot pile up there.
OBSERVED_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """How one handler is fed. Its defaults are the dispatcher's, the only place they are
    written: a handler's declared policy and its ``[[handlers]]`` table override them.

    Attributes:
        name: the handler's name in logs and metrics.
        events: event-name globs it subscribes to (``*`` for all).
        timeout: seconds one ``handle`` call may take before it is cancelled.
        concurrency: how many events it handles at once (one per call at most).
        queue_size: events that may wait for it before ``on_full`` applies.
        queue_bytes: bytes of events (as received) that may wait for it before ``on_full``
            applies: a few multi-megabyte AI audit events must not exhaust memory. One event
            larger than this is still taken when nothing else waits.
        on_full: ``wait`` makes the intake wait for room (nothing lost); ``drop`` drops the
            event with a warning and a metric.
    """

    name: str
    events: Sequence[str] = ("*",)
    timeout: float = 30.0
    concurrency: int = 8
    queue_size: int = 10_000
    queue_bytes: int = 64 * 1024 * 1024
    on_full: OnFull = "wait"


class Claims(Protocol):
    """Once per event across instances: asked before each ``handle()`` when several
    instances share a store (``listener.cluster.claims``); a single instance has none."""

    async def claim(
        self, event: Event, handler: str, lease: float, *, in_order: bool = False
    ) -> bool | None:
        """Whether this instance is the one to run ``handler`` on ``event`` (for at least
        ``lease`` seconds); None when it keeps the event to hand it to the handler again
        later (it cannot tell yet, or, ``in_order``, an earlier event of the handler is
        kept); raises :class:`~listener.core.errors.ListenerError` when it
        can do neither."""
        ...

    def done(self, event: Event, handler: str) -> None:
        """``handler`` is done with ``event`` here: no other instance need run it again."""
        ...

    @property
    def fresh_for(self) -> float:
        """Seconds after it was asked that a won claim still covers its handler's whole
        timeout (its lease outlasts the timeout by more than this)."""
        ...

    async def renew(self, event: Event, handler: str, lease: float) -> bool:
        """Extend this instance's claim of ``handler`` on ``event`` to ``lease`` seconds (its
        timeout) plus the grace; False when its lease passed or another instance took it
        over. Raises :class:`~listener.core.errors.ListenerError` when the store does not
        answer."""
        ...

    async def give_back(self, ids: list[str], handler: str) -> None:
        """Let this instance's claims of ``handler`` on the events of ``ids``, abandoned
        before their handler started, lapse now. Raises :class:`~listener.core.errors.ListenerError`
        when the store does not answer."""
        ...


@runtime_checkable
class Staged(Protocol):
    """A handler whose ``handle()`` is an ordered step and then a wait (the ``webhook``
    handler: queue the rows for the outbox's next commit, then wait for that commit). With
    claims, the dispatcher calls :meth:`stage_event` in the call's order as soon as the claim
    is won, and lets the call's next event go on while ``handle()`` waits, in a task of its
    own; ``handle()`` then finishes what was staged rather than starting again. Its claim is
    marked done, and its ``on_error`` told, once that wait ends: the call's next event may
    have been staged by then."""

    def stage_event(self, event: Event) -> bool:
        """Take the ordered step for ``event`` now; False if there is none (or it was
        taken already), and ``handle()`` does all of it."""
        ...


@dataclass(frozen=True, slots=True)
class DispatchReport:
    """What a stop left undone: events queued or in flight when the grace period ran out."""

    abandoned: dict[str, int]

    @property
    def total(self) -> int:
        """All abandoned events, over every handler."""
        return sum(self.abandoned.values())


class _Queue:
    """A bounded FIFO for one runner's workers: ``asyncio.Queue`` less its task accounting
    (``join``/``task_done``, which nothing here uses). Its put and get took 1.5 µs per event
    together, these 0.3: items go straight to a deque, and the waiting futures are made only
    when a side has to wait. The putters' waiting follows ``asyncio.Queue``'s, cancellation
    included.

    Waiting workers are woken one at a time, as a chain: a put wakes one only when none is
    already woken and on its way, and a worker that takes an item and leaves others behind
    wakes the next. ``asyncio.Queue`` wakes one per put, so a burst of 8 or more woke all
    8 workers, and with handlers that do not suspend the first drained the burst while the
    other 7 woke to an empty queue, each a task step and a new future. Handlers that do
    suspend still get every worker: each one taken wakes the next while items remain. In
    one process, frames submitted in batches of 4 (then a loop turn) with a no-op handler:
    11.5 -> 8.6 µs CPU an event; batches of 16: 8.8 -> 7.7; of 1, as before (one wake each).
    """

    __slots__ = ("_getters", "_items", "_maxsize", "_putters", "_woken")

    def __init__(self, maxsize: int) -> None:
        # As asyncio.Queue: 0 or less is no bound.
        self._maxsize = maxsize if maxsize > 0 else sys.maxsize
        self._items: deque[_Item] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        # Getters woken that have not resumed yet.
        self._woken = 0

    def qsize(self) -> int:
        return len(self._items)

    def newest(self) -> Event | None:
        """The event queued last, if any."""
        return self._items[-1][0] if self._items else None

    def put_nowait(self, item: _Item) -> None:
        """Queue ``item``; raise :class:`asyncio.QueueFull` when there is no room."""
        if len(self._items) >= self._maxsize:
            raise asyncio.QueueFull
        self._items.append(item)
        if self._getters and not self._woken and _wake_next(self._getters):
            self._woken += 1

    def get_nowait(self) -> _Item:
        """Take the oldest item; raise :class:`asyncio.QueueEmpty` when there is none."""
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.popleft()
        if self._putters:
            _wake_next(self._putters)
        if items and self._getters and not self._woken and _wake_next(self._getters):
            self._woken += 1
        return item

    async def put(self, item: _Item) -> None:
        """Queue ``item`` once there is room."""
        while len(self._items) >= self._maxsize:
            await self._wait_for_room()
        self.put_nowait(item)

    async def get(self) -> _Item:
        """Take the oldest item once there is one."""
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._getters.remove(waiter)
                if not waiter.cancelled():
                    # Woken, then cancelled: pass the wake-up on, or it is lost.
                    self._woken -= 1
                    if self._items and _wake_next(self._getters):
                        self._woken += 1
                raise
            self._woken -= 1
        return self.get_nowait()

    async def _wait_for_room(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._putters.append(waiter)
        try:
            await waiter
        except BaseException:
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._putters.remove(waiter)
            # Woken, then cancelled: pass the wake-up on, or it is lost.
            if len(self._items) < self._maxsize and not waiter.cancelled():
                _wake_next(self._putters)
            raise


def _wake_next(waiters: deque[asyncio.Future[None]]) -> bool:
    """Wake the first waiter still waiting; return whether there was one."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return True
    return False


class HandlerRunner:
    """Feeds one handler: queue, lanes, concurrency, timeout, isolation, metrics.

    With ``claims`` (a cluster), each event with an id is claimed before it is handled, and
    skipped when another instance claimed it first.
    """

    def __init__(
        self,
        handler: Handler,
        settings: RunnerSettings,
        context: Context,
        claims: Claims | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.context = context
        self._claims = claims
        self._queue = _Queue(settings.queue_size)
        # A call with an event in flight is a key here; its lane, holding its next events
        # in order, is made when the first of them comes (None until then): most events
        # find their call idle, and a deque per event was a GC-tracked allocation each
        # (with the read loop's one clock read per batch: 167,500 -> 160,200 instructions
        # an event, ``bench.instructions``).
        self._lanes: dict[str, deque[_Item] | None] = {}
        self._laned = 0
        self._busy = 0
        # Bytes of the events queued or waiting in a lane (not those being handled).
        self._queued_bytes = 0
        self._byte_room = asyncio.Event()
        self._byte_waiters = 0
        self._room = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        # drain() calls waiting for _idle: only they need it set.
        self._drainers = 0
        self.stopped = False
        self._duration = metrics.HANDLER_DURATION.labels(handler=settings.name)
        self._outcomes = {
            outcome: metrics.HANDLER_OUTCOMES.labels(handler=settings.name, outcome=outcome)
            for outcome in (
                "ok",
                "error",
                "timeout",
                "dropped",
                *(("elsewhere",) if claims else ()),
            )
        }
        # Most handlers keep Handler's matches (always True): not calling it saved 0.1 µs
        # per event and handler.
        self._filters = type(handler).matches is not Handler.matches or "matches" in getattr(
            handler, "__dict__", ()
        )
        self._globs = tuple(settings.events)
        self._match_all = "*" in self._globs
        # Set by an observer (the status page): one O(1) append per handled event.
        self.handled: deque[Handled] | None = None
        # The claims asked as their events were queued, by event id (one event of an id
        # waits here at a time, see below) until a worker takes it up, with the loop's time
        # of asking.
        self._asked: dict[str, tuple[asyncio.Future[bool | None], float]] = {}
        # The events queued and not yet at their claim, by call and by id: a call's later
        # event is claimed at intake only when none of its earlier ones waits here, so that
        # when one goes to the spool (the store not answering) the later ones follow it
        # there, never overtake it; and a copy of an event that waits here already (the
        # leader's sweep handing out a claim that lapsed while it waited) is not queued
        # again, or both would run.
        self._waiting_calls: dict[str, int] = {}
        self._waiting_ids: set[str] = set()
        # One event at a time: the order its events start in shows (see Claims.claim).
        self._in_order = settings.concurrency == 1
        if claims is not None:
            # Bound here, so that a runner without claims keeps offer()'s path as it was.
            self.offer = self._offer_and_claim  # type: ignore[method-assign]
        # With claims, a handler that stages its events (see Staged): the rest of each
        # staged event's handling runs in a task of its own, at most ``concurrency`` at once.
        self._stage = (
            handler.stage_event if claims is not None and isinstance(handler, Staged) else None
        )
        self._finishing: set[asyncio.Task[None]] = set()

    def subscribes(self, name: str) -> bool:
        """Whether the handler's globs cover the event name."""
        return self._match_all or any(fnmatch.fnmatchcase(name, glob) for glob in self._globs)

    @property
    def pending(self) -> int:
        """Events queued, waiting in a lane, or being handled."""
        return self._queue.qsize() + self._laned + self._busy

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return bool(self._workers)

    def start(self) -> None:
        """Start the workers."""
        name = self.settings.name
        self._workers = [
            asyncio.create_task(self._work(), name=f"handler-{name}-{index}")
            for index in range(self.settings.concurrency)
        ]
        # Read when scraped, so the hot path never touches the gauge.
        metrics.HANDLER_QUEUE_DEPTH.labels(handler=name).set_function(
            lambda: 0 if self.stopped else self._queue.qsize() + self._laned
        )

    def offer(self, event: Event, call: CallRecord | None = None) -> Awaitable[None] | None:
        """Queue ``event`` (``call``: its call as of this event); return an awaitable if the
        caller must wait for room."""
        try:
            if self._filters and not self.handler.matches(event):
                return None
        except Exception as exc:
            # A broken filter is the handler's failure, not the socket's.
            self._outcomes["error"].value += 1
            self._report(
                "error", "handler filter failed", event, error=f"{type(exc).__name__}: {exc}"
            )
            return None
        # No ``self._idle.clear()`` here: drain() clears it before each wait (a method
        # call per event: submit 20,800 -> 20,300 instructions, callgrind).
        over_budget = self._queued_bytes + event.size > self.settings.queue_bytes
        if not over_budget or not self.pending:
            try:
                self._queue.put_nowait((event, call))
            except asyncio.QueueFull:
                pass
            else:
                self._queued_bytes += event.size
                return None
        if self.settings.on_full == "drop":
            self._outcomes["dropped"].value += 1
            self._report("warning", "handler queue full, event dropped", event)
            return None
        return self._admit(event, call)

    def _offer_and_claim(
        self, event: Event, call: CallRecord | None = None
    ) -> Awaitable[None] | None:
        """:meth:`offer`, and the event's claim asked at once when it was queued with little
        ahead of it: the claim's round trip then runs while the event waits for a worker or
        behind its call's earlier events, instead of inside its call's turn. The bench's
        calls have three events 2 ms apart, and each held its call's lane through its claim
        (2.2 ms p50 of round trip, two instances traced at 500/s) as well as its commit, so
        a call's third event waited for two claims and two commits. With the staged commits
        below, an event's wait before its claim went from p50 1.8-14.6 / p99 22-115 ms to
        0.2-0.5 / 2.3-8.8, and after it (the call's lane) 0.5-1.9 / 4.7-15.7; bench.ha
        quick, one instance on PostgreSQL p99 43.5-76.6 -> 22.3-37.8 ms, three pairs (see
        bench/README.md, "Claims asked at intake, staged commits")."""
        event_id = event.id
        if event_id and event_id in self._waiting_ids:
            return None
        wait = HandlerRunner.offer(self, event, call)
        queued = wait is not None or self._queue.newest() is event
        if not event_id or not queued:
            return wait
        key = event.call_key
        if (
            wait is None
            and self.pending <= _ASK_AHEAD * self.settings.concurrency
            and key not in self._lanes
            and key not in self._waiting_calls
        ):
            assert self._claims is not None
            claim = self._claims.claim(
                event, self.settings.name, self.settings.timeout, in_order=self._in_order
            )
            self._asked[event_id] = (
                asyncio.ensure_future(claim),
                asyncio.get_running_loop().time(),
            )
        self._waiting_ids.add(event_id)
        if key is not None:
            self._waiting_calls[key] = self._waiting_calls.get(key, 0) + 1
        return wait

    async def _admit(self, event: Event, call: CallRecord | None) -> None:
        """Queue ``event`` once there is room, by bytes and by count."""
        while self.pending and self._queued_bytes + event.size > self.settings.queue_bytes:
            self._byte_room.clear()
            self._byte_waiters += 1
            try:
                await self._byte_room.wait()
            finally:
                self._byte_waiters -= 1
        await self._queue.put((event, call))
        self._queued_bytes += event.size

    def _release(self, size: int) -> None:
        """An event left the queue or a lane to be handled: its bytes no longer wait."""
        self._queued_bytes -= size
        # Only when the intake waits for bytes: the Event's set() was a call per event.
        if self._byte_waiters:
            self._byte_room.set()

    async def drain(self) -> None:
        """Wait until nothing is queued or in flight."""
        while self.pending:
            self._idle.clear()
            self._drainers += 1
            try:
                await self._idle.wait()
            finally:
                self._drainers -= 1

    async def stop(self) -> int:
        """Cancel everything still pending; return how many events were abandoned."""
        abandoned = self.pending
        self.stopped = True
        for worker in (*self._workers, *self._finishing):
            worker.cancel()
        if self._workers:
            await asyncio.wait(self._workers)
        if self._finishing:
            await asyncio.wait(self._finishing)
        await self._give_back_asked()
        return abandoned

    async def _give_back_asked(self) -> None:
        """The claims asked for queued events a stop abandons: those won lapse now (the
        other instances had been told no, and hand them out again once the leader's sweep
        finds them lapsed), and so do those still undecided after a second, which are
        cancelled (one may have been won: giving back touches only this instance's)."""
        asked = {claim: event_id for event_id, (claim, _) in self._asked.items()}
        self._asked.clear()
        self._waiting_calls.clear()
        self._waiting_ids.clear()
        if not asked:
            return
        done, waiting = await asyncio.wait(asked, timeout=1.0)
        for claim in waiting:
            claim.cancel()
        # Won, or perhaps won: the undecided too.
        maybe_won = [asked[claim] for claim in waiting] + [
            asked[claim]
            for claim in done
            if not claim.cancelled() and not claim.exception() and claim.result()
        ]
        if maybe_won and self._claims is not None:
            try:
                await self._claims.give_back(maybe_won, self.settings.name)
            except ListenerError as exc:
                _log.warning("claims of abandoned events left to lapse", handler=self.settings.name,
                             events=len(maybe_won), error=str(exc))  # fmt: skip

    async def _work(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        deadline = _Deadline(task)
        try:
            await self._work_with(deadline)
        finally:
            deadline.close()

    async def _work_with(self, deadline: _Deadline) -> None:
        queue, lanes = self._queue, self._lanes
        while True:
            while self._laned >= self.settings.queue_size:
                # Lanes count against the bound too, or one busy call could grow them forever.
                self._room.clear()
                await self._room.wait()
            # An await on a queue holding items never suspends, but builds a coroutine:
            # taking it directly saved 0.2 µs per event of a drain.
            item = queue.get_nowait() if queue.qsize() else await queue.get()
            key = item[0].call_key
            if key is not None:
                if key in lanes:
                    lane = lanes[key]
                    if lane is None:
                        lane = lanes[key] = deque()
                    lane.append(item)
                    self._laned += 1
                    continue
                lanes[key] = None
            self._release(item[0].size)
            self._busy += 1
            lane = None
            try:
                await self._invoke(*item, deadline)
                if key is not None:
                    while lane := lanes[key]:
                        item = lane.popleft()
                        self._laned -= 1
                        self._release(item[0].size)
                        self._room.set()
                        await self._invoke(*item, deadline)
            finally:
                if key is not None:
                    lane = lanes.pop(key, None)
                    if lane:
                        # Cancelled mid-lane: those events are abandoned, and counted so.
                        self._laned -= len(lane)
                        self._release(sum(waiting.size for waiting, _ in lane))
                self._busy -= 1
                # ``pending``'s sum, short-circuited (the last busy worker is rarely the
                # last event): the workers' 18,200 -> 17,400 instructions an event. And only
                # when someone waits for it: a lone event always ends with nothing pending,
                # and the Event's set() was two calls each (a lone event, no call store: 155,400 ->
                # 152,700 instructions, bench.instructions --rate 200 --events 2000 --no-store,
                # one run, whose noise is a few thousand).
                if self._drainers or self._byte_waiters:
                    self._tell_if_nothing_pending()

    def _tell_if_nothing_pending(self) -> None:
        """A pending event (a worker's or a staged one) just ended, and a drain or the
        intake waits: tell them if it was the last."""
        if self._busy or self._laned or self._queue.qsize():
            return
        self._idle.set()
        # An event larger than queue_bytes waits for nothing pending at all, which no event
        # leaving the queue announces.
        if self._byte_waiters:
            self._byte_room.set()

    async def _invoke(
        self, event: Event, call: CallRecord | None, deadline: _Deadline, claimed: bool = False
    ) -> None:
        # Claims first: ``event.id`` makes a lifecycle event's lazy id, and reading it for
        # every event without a cluster made every id on the hot path again (py-spy, live
        # flood: 9 % of the loop's samples in ``_read_id``; ``python -m bench.instructions``,
        # a drain of 3,000 with the store's batch: 205,000 -> 179,000 instructions an event).
        claims = self._claims
        if claims is not None and not event.id:
            claims = None
        if claims is not None and not claimed:
            # ``claimed``: a staged event's second pass (_finish), won and staged already.
            if not await self._claim(claims, event):
                return
            if (
                self._stage is not None
                and len(self._finishing) < self.settings.concurrency
                and self._staged(event)
            ):
                self._finish_later(event, call)
                return
        started = time.perf_counter()
        context = self.context.for_event(event, call)
        deadline.arm(self.settings.timeout)
        failure: Exception | None = None
        try:
            await self.handler.handle(event, context)
        except asyncio.CancelledError:
            if not deadline.disarm():
                raise
            outcome = "timeout"
        except Exception as exc:
            # A handler may turn the cancellation into another error: still its timeout.
            outcome = "timeout" if deadline.disarm() else "error"
            failure = exc
        else:
            outcome = "timeout" if deadline.disarm() else "ok"
        took = time.perf_counter() - started
        self._duration.observe(took)
        self._outcomes[outcome].value += 1
        if outcome == "timeout":
            self._report("warning", "handler timed out", event, timeout=self.settings.timeout)
            failure = TimeoutError(f"handler timed out after {self.settings.timeout}s")
        elif failure is not None:
            self._report(
                "error",
                "handler failed",
                event,
                error=f"{type(failure).__name__}: {failure}",
                exc_info=failure,
            )
        if claims is not None:
            claims.done(event, self.settings.name)
        if self.handled is not None:
            error = None if failure is None else f"{type(failure).__name__}: {failure}"
            observed = event if event.size <= OBSERVED_BYTES else _unloaded(event)
            self.handled.append((observed, self.settings.name, outcome, took, error))
        if failure is not None:
            await self._tell_error_hook(event, failure, context)

    def _staged(self, event: Event) -> bool:
        assert self._stage is not None
        try:
            return self._stage(event)
        except Exception:
            # handle() meets the same failure, and reports it as the handler's.
            return False

    def _finish_later(self, event: Event, call: CallRecord | None) -> None:
        """The rest of a staged event's handling, in a task of its own: its ``handle()``
        (the wait for the outbox's commit), the outcome, the claim's done mark. The worker
        goes on with its call's next event meanwhile, whose commit then joins this one's
        instead of starting after it: with the claims asked at intake, a call's events held
        its lane through each commit (the writer's hop, the commit, the hop back: 4 ms p50),
        and the lane's wait was 0.83 / 24.2 ms p50 / p99 of 10.4 / 46.4 end to end, two
        instances traced at 500/s; with this, 0.5-1.9 / 4.7-15.7 ms (the figures together are
        at _offer_and_claim)."""
        self._busy += 1
        task = asyncio.create_task(self._finish(event, call))
        self._finishing.add(task)

    async def _finish(self, event: Event, call: CallRecord | None) -> None:
        task = asyncio.current_task()
        assert task is not None
        deadline = _Deadline(task)
        try:
            await self._invoke(event, call, deadline, claimed=True)
        finally:
            deadline.close()
            self._finishing.discard(task)
            self._busy -= 1
            if self._drainers or self._byte_waiters:
                self._tell_if_nothing_pending()

    async def _claim(self, claims: Claims, event: Event) -> bool:
        asked = self._asked.pop(event.id, None) if self._asked else None
        if event.id in self._waiting_ids:
            # At its claim: no longer waiting.
            self._waiting_ids.discard(event.id)
            if (key := event.call_key) is not None:
                if (left := self._waiting_calls[key] - 1) > 0:
                    self._waiting_calls[key] = left
                else:
                    del self._waiting_calls[key]
        try:
            if asked is None:
                won = await claims.claim(
                    event, self.settings.name, self.settings.timeout, in_order=self._in_order
                )
            else:
                won = await asked[0]
                if won and asyncio.get_running_loop().time() - asked[1] > claims.fresh_for:
                    # Asked long ago (a hung handler ahead of it): its lease might pass
                    # while this handler runs.
                    won = await claims.renew(event, self.settings.name, self.settings.timeout)
        except ListenerError as exc:
            # Neither claimed nor kept for later: better twice (another instance may run it
            # too) than never.
            self._report(
                "error", "cannot claim the event; handling it anyway", event, error=str(exc)
            )
            return True
        if won:
            return True
        # None: kept, and handed back later (the claims say when the store stops and
        # starts answering).
        if won is not None:
            self._outcomes["elsewhere"].value += 1
        return False

    async def _tell_error_hook(self, event: Event, error: Exception, context: Context) -> None:
        # Failures only, so asyncio.timeout's timer per call (see _Deadline) costs nothing
        # here; a hook that alerts over the network gets the handler's timeout.
        try:
            async with asyncio.timeout(self.settings.timeout):
                await self.handler.on_error(event, error, context)
        except Exception as exc:
            self._report(
                "error",
                "handler error hook failed",
                event,
                error=f"{type(exc).__name__}: {exc}",
                exc_info=exc,
            )

    def _report(self, level: str, message: str, event: Event, **fields: Any) -> None:
        getattr(_log, level)(
            message,
            handler=self.settings.name,
            event_name=event.name,
            call_key=event.call_key,
            **fields,
        )


class _Deadline:
    """One worker's handler deadline, kept by a single lazily re-armed timer.

    ``asyncio.timeout()`` arms and cancels a timer for every call, which took 15 % of the
    event loop under a flood. Here the timer is armed once; when it fires before the current
    deadline it is re-armed for it, so between events only a float changes.
    """

    __slots__ = ("_loop", "_task", "_timer", "deadline", "expired")

    def __init__(self, task: asyncio.Task[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = task
        self._timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None
        self.expired = False

    def arm(self, seconds: float) -> None:
        """Start the clock for one handler call."""
        self.deadline = self._loop.time() + seconds
        if self._timer is None:
            self._timer = self._loop.call_at(self.deadline, self._check)

    def disarm(self) -> bool:
        """Stop the clock; return whether it ran out (its cancellation is then withdrawn)."""
        self.deadline = None
        if not self.expired:
            return False
        self.expired = False
        self._task.uncancel()
        return True

    def close(self) -> None:
        """Drop the timer (the worker is ending)."""
        if self._timer is not None:
            self._timer.cancel()

    def _check(self) -> None:
        self._timer = None
        deadline = self.deadline
        if deadline is None:
            return
        if self._loop.time() >= deadline:
            self.expired = True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at(deadline, self._check)


@functools.cache
def _settle_heap() -> None:
    """Set the cyclic GC up for the hot path, once per process.

    Every event leaves tracked objects behind while its call is open (the call's record in
    the map, the event while it is queued), so young collections promote and full ones come
    round, and a full collection walks the whole heap loaded at start (modules, pydantic
    models, config: ~50,000 objects that will never be garbage). So what is alive now is
    collected once and frozen out of every later collection (``gc.freeze``), and young
    collections run every 7,000 net allocations instead of 700, so that most of an event's
    objects are gone before one runs. In-process drains of 10,000 events with call state
    (``python -m bench.calldrain``, same run): Python's settings 68 collections, 1.15 µs of
    GC per event; these, 6 and 0.23 µs (0.38 and 0.17 without call state). Unreachable
    cycles still go, a little later: at most 7,000 objects' worth waits.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_YOUNG_THRESHOLD, older, oldest)


def _count(waiter: tuple[int, asyncio.Future[None]]) -> int:
    return waiter[0]


def _unloaded(event: Event) -> Event:
    """``event`` with its payload replaced by its size, for observers."""
    return replace(event, payload={"payload_bytes": event.size})


class Dispatcher:
    """Routes every new event to the runners that subscribe to it.

    Args:
        runners: one per handler, in config order.
        tracker: the call map and the ids handed on (a fresh, empty one by default).
    """

    def __init__(
        self, runners: Sequence[HandlerRunner], tracker: CallTracker | None = None
    ) -> None:
        self.runners = list(runners)
        self.tracker = tracker or CallTracker()
        # The call store's batches wait while handlers have a backlog (see Persister).
        self.tracker.backlog = self._backlog
        # Event names are few: remember, per name, its counter and the runners that want it.
        self._routes: dict[str, tuple[Any, list[HandlerRunner]]] = {}
        self.received = 0
        # Waiters of wait_received: (count, future), the smallest count first; the next
        # count at which one is due is a plain int, so the hot path compares two integers.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._next_due = _NEVER

        # Set by an observer (the status page): each event handed on, one O(1) append.
        self.seen: deque[Event] | None = None

    def _backlog(self) -> int:
        return sum(runner.pending for runner in self.runners)

    def start(self) -> None:
        """Start every runner (and, the first time in a process, settle the heap)."""
        _settle_heap()
        for runner in self.runners:
            runner.start()

    def replace(self, runners: Sequence[HandlerRunner]) -> list[HandlerRunner]:
        """Route from now on to ``runners`` (starting the new ones); return the runners that
        are no longer routed to, still holding their queued events: drain, then stop them."""
        kept = {id(runner) for runner in runners}
        removed = [runner for runner in self.runners if id(runner) not in kept]
        for runner in runners:
            if not runner.started:
                runner.start()
        self.runners = list(runners)
        self._routes.clear()
        return removed

    def submit(self, event: Event) -> Awaitable[Any] | None:
        """Offer ``event`` to every subscribed handler, unless its id was handed on before.

        Every event counts as received, duplicates too.

        Returns:
            None if every handler took it at once (or it was a duplicate); otherwise an
            awaitable that completes when the full queues have taken it.
        """
        route = self._routes.get(event.name)
        if route is None:
            route = self._routes[event.name] = (
                metrics.EVENTS_RECEIVED.labels(event=event.name),
                [runner for runner in self.runners if runner.subscribes(event.name)],
            )
        received, routes = route
        received.value += 1
        self.received += 1
        if self.received >= self._next_due:
            self._wake_waiters()
        tracker = self.tracker
        if not tracker.admit(event):
            metrics.EVENTS_DUPLICATE.labels(event=event.name).value += 1
            return None
        call = tracker.merge(event)
        if self.seen is not None:
            self.seen.append(event if event.size <= OBSERVED_BYTES else _unloaded(event))
        waits: list[Awaitable[None]] | None = None
        for runner in routes:
            wait = runner.offer(event, call)
            if wait is not None:
                waits = [*(waits or []), wait]
        if waits is None:
            return None
        return asyncio.gather(*waits)

    async def wait_received(self, count: int) -> None:
        """Wait until ``count`` events have been submitted since start (tests, harnesses)."""
        if self.received >= count:
            return
        future = asyncio.get_running_loop().create_future()
        bisect.insort(self._waiters, (count, future), key=_count)
        self._next_due = self._waiters[0][0]
        await future

    def _wake_waiters(self) -> None:
        """Resolve the waiters whose count is reached; one that gave up (a timeout cancelled
        its future) is simply dropped."""
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.received:
            _, future = waiters.pop(0)
            if not future.done():
                future.set_result(None)
        self._next_due = waiters[0][0] if waiters else _NEVER

    async def drain(self) -> None:
        """Wait until every handler has nothing queued or in flight."""
        await asyncio.gather(*(runner.drain() for runner in self.runners))

    async def stop(self, grace: float) -> DispatchReport:
        """Let queued and in-flight events finish for up to ``grace`` seconds, then cancel.

        Returns:
            How many events each handler had to abandon.
        """
        pending = [asyncio.ensure_future(runner.drain()) for runner in self.runners]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for waiter in pending:
            waiter.cancel()
        abandoned = {}
        for runner in self.runners:
            count = await runner.stop()
            if count:
                abandoned[runner.settings.name] = count
        report = DispatchReport(abandoned)
        if report.total:
            _log.warning("handlers stopped with events unhandled", abandoned=abandoned, grace=grace)
        return report
