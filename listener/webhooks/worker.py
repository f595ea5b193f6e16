"""One destination's worker: claims its due rows, attempts them, judges the answers.

The worker asks the outbox for due rows whenever an attempt slot is free and something may
have changed (a commit, a finished attempt, a scheduled retry falling due, or every
``poll_interval`` for changes made by the CLI), and runs up to ``max_in_flight`` attempts at
once, no faster than ``rate_limit``. A slow or dead destination only ever occupies its own
slots. It also enforces its destination's outbox bound (``max_pending``, ``max_age``), at most
every ``poll_interval``, in the same call as a claim: so it knows exactly which rows are in
flight and must stay.

Every attempt's answer falls in one class (recorded with the attempt):

============  ================================================  ==============================
class         what                                              then
============  ================================================  ==============================
(none)        2xx                                               delivered
not_now       429, 5xx                                          the destination is unhealthy
timeout       no answer within ``timeout``, or 408              the destination is unhealthy
connection    refused, reset, closed before answering           the destination is unhealthy
protocol      the answer is not HTTP/1.1                        the destination is unhealthy
rejected      any other status (3xx: redirects are not          this delivery failed: retried
              followed; 4xx but 408, 410 and 429)               on its schedule, then dead
gone          410                                               the destination is disabled
                                                                until the CLI enables it
internal      our own bug (the attempt crashed)                 as ``rejected``
============  ================================================  ==============================

While unhealthy (:mod:`.health`) a destination gets one probe at a time, the oldest due
delivery, at backoff intervals with ``Retry-After`` as a lower bound; the first answer that is
not "not now" ends the outage and the backlog flows at once. A "not now" failure leaves its
delivery due, behind the rows due before it, so that probes go round the backlog and nothing
waits for a retry of its own once the destination is back.

Only a delivery's own failures use up its retry schedule: a ``rejected`` (or ``internal``)
one, retried after the schedule's next delay, and the one "not now" failure that ends a
healthy period, so that a body which alone crashes the receiver still comes to an end while
the others flow. Past ``max_age`` any pending delivery becomes a dead letter.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import structlog

from listener.core.logs import logs_each_delivery
from listener.core.metrics import (
    WEBHOOK_DELIVERIES,
    WEBHOOK_HEALTHY,
    WEBHOOK_PROBES,
    WEBHOOK_SUCCESS_RATIO,
)
from listener.core.retry import is_retryable_status, retry_after_seconds
from listener.webhooks.destination import Destination
from listener.webhooks.health import Health, Outage, SuccessRatio, probe_policy
from listener.webhooks.http1 import Http1Error, Http1Pool
from listener.webhooks.outbox_rows import Attempt, Claim, Delivery, Outcome
from listener.webhooks.outbox_store import OutboxStore
from listener.webhooks.ratelimit import TokenBucket
from listener.webhooks.signing import request_headers
from listener.webhooks.store import Store

__all__ = ["ErrorClass", "Worker"]

_log = structlog.get_logger(__name__)
# A receiver's answer is read this far, so that the connection can be reused; its first KiB is
# kept on the attempt's record.
_MAX_ANSWER_BYTES = 64 * 1024
_KEPT_ANSWER_BYTES = 1024

ErrorClass = Literal["not_now", "timeout", "connection", "protocol", "rejected", "gone", "internal"]
# The destination's trouble, not the delivery's.
_NOT_NOW: frozenset[ErrorClass] = frozenset({"not_now", "timeout", "connection", "protocol"})
# Rows claimed ahead, in multiples of max_in_flight (see Worker._wanted).
_PREFETCH = 8


@dataclass(frozen=True, slots=True)
class _Answer:
    """What one attempt got: a status, or no answer and an error; and how it classes."""

    status: int | None
    error: str
    error_class: ErrorClass | None
    latency: float
    retry_after: float | None = None
    body: bytes = b""


def _classify(status: int) -> ErrorClass | None:
    if 200 <= status < 300:
        return None
    if status == 410:
        return "gone"
    if status == 408:
        # The receiver timed out waiting for our request: its trouble, as our own timeout.
        return "timeout"
    return "not_now" if is_retryable_status(status) else "rejected"


class _Wake(asyncio.Event):
    """The claim loop's wake-up: ``set()`` says the outbox may have changed (what anyone
    outside the worker calls), ``nudge()`` only that a slot freed or an outcome settled."""

    def __init__(self) -> None:
        super().__init__()
        self.changes = 0

    def set(self) -> None:
        self.changes += 1
        super().set()

    def nudge(self) -> None:
        super().set()


class Worker:
    """Delivers one destination's rows, at most ``max_in_flight`` at a time.

    It claims due rows ahead of its free slots (up to :data:`_PREFETCH` times
    ``max_in_flight``) and keeps them, claimed, in ``ready``; a slot that frees takes the
    next one without a trip to the outbox, and it claims again when fewer than
    ``max_in_flight`` are left. A commit may claim fresh rows for it too (up to
    :meth:`room`, handed over by :meth:`take`): they join ``ready`` as claimed ones. Claimed
    rows are given back when the destination turns unhealthy or gone, so that probes and the
    bound see the whole backlog.

    Args:
        destination: what to deliver to.
        store: the outbox's thread.
        client: the HTTP client, shared by every worker.
        record: queues an attempt's outcome for the next commit.
        announce_commit: wakes whoever waits for the next commit (the bound's evictions
            are one).
        poll_interval: see :class:`~listener.webhooks.forwarder.WebhookForwarder`.
    """

    def __init__(
        self,
        destination: Destination,
        store: Store,
        client: Http1Pool,
        record: Callable[[Outcome], None],
        announce_commit: Callable[[], None],
        poll_interval: float,
    ) -> None:
        self.destination = destination
        self._store = store
        self._client = client
        self._record = record
        self._announce_commit = announce_commit
        self._poll_interval = poll_interval
        self._bounded = destination.max_pending is not None or destination.max_age is not None
        self._next_bound_check = 0.0
        self._ready: deque[Delivery] = deque()
        # Whether the outbox may hold due rows not claimed yet: false after a claim that got
        # fewer than it asked for, until the outbox changes (``wake.set()``: new rows, a
        # retry, a change by the CLI or the status page) or a wait runs out.
        self._more = True
        self._changes = 0
        self._next_due: float | None = None
        self.attempts: set[asyncio.Task[None]] = set()
        self.wake = _Wake()
        self._log = _log.bind(destination=destination.name)
        self.health = Health(probe_policy(destination.max_probe_interval))
        self._ratio = SuccessRatio()
        # The latest failed attempt: when it started, and what went wrong (the status page).
        self.last_error: tuple[float, str] | None = None
        self._log_each_delivery = logs_each_delivery()
        # The children every attempt updates, looked up once: labels() and then inc()/set()
        # took 2.6 and 3.2 µs, the children alone 1.3 and 0.6 µs (timeit).
        self._delivered = WEBHOOK_DELIVERIES.labels(destination.name, "delivered")
        self._success_ratio = WEBHOOK_SUCCESS_RATIO.labels(destination.name)
        self._bucket = (
            None if destination.rate_limit is None else TokenBucket(destination.rate_limit)
        )
        # The id of a row answered with 410 whose outcome (disabling us) is not committed yet:
        # until it is, the outbox does not know, so claiming pauses.
        self._gone_msg_id: str | None = None
        self._claim_task: asyncio.Task[None] | None = None
        # Per-call ordering: the call of each row claimed here until its outcome settles, and
        # the calls of fresh rows a commit held back behind one of them, claimed once it is
        # delivered (set(): a nudge would leave them until the next poll_interval).
        self._per_call = destination.ordering == "per_call"
        self._call_of: dict[str, str] = {}
        self._held_back: set[str] = set()
        # Rows on their way here, counted against the prefetch so that a claim and a commit
        # together lease no more than it: what the commit on its way may lease (promise()),
        # and what the claim on its way asked for, while the last claim found a backlog (it
        # came back full). Counting every claim on its way left the commits no room under
        # steady traffic (a claim every poll_interval): fresh rows went out by claims again.
        self._claiming = 0
        self._full = False
        self._promised = 0
        # Set by stop_claiming: a finished attempt's task goes on with no other row.
        self._stopping = False
        # Slots' tasks whose attempt ran out of time and was cancelled for it (_send).
        self._expired: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start claiming and attempting."""
        WEBHOOK_HEALTHY.labels(self.destination.name).set(1)
        self._claim_task = asyncio.create_task(
            self._claim_loop(), name=f"webhook-{self.destination.name}"
        )

    async def stop_claiming(self) -> None:
        """Stop starting attempts; running ones go on (rows still ready stay pending)."""
        self._stopping = True
        if self._claim_task is not None:
            self._claim_task.cancel()
            await asyncio.gather(self._claim_task, return_exceptions=True)

    @property
    def success_ratio(self) -> float | None:
        """The share of attempts answered 2xx over about the last minute; None before any."""
        return self._ratio.value

    def room(self) -> int:
        """How many fresh rows the next commit may claim for this worker
        (:meth:`~listener.webhooks.outbox_store.OutboxStore.commit`): as many as a claim of
        its own would take now (none while unhealthy: probes take the oldest due rows, one at
        a time; none while gone or stopping)."""
        if self._stopping or self._gone_msg_id is not None or not self.health.healthy:
            return 0
        return max(0, self._headroom() - self._claiming)

    def _headroom(self) -> int:
        """How many rows ready falls short of the prefetch (see :meth:`_wanted`)."""
        return _PREFETCH * self.destination.max_in_flight - len(self._ready)

    def promise(self, count: int) -> None:
        """The commit on its way may lease up to ``count`` rows for this worker (0: it is
        done); its own claims take that many fewer meanwhile."""
        self._promised = count

    def take(self, rows: list[Delivery]) -> None:
        """Rows a commit claimed for this worker: ready, as claimed ones, and started at once
        if allowed (the destination may have turned unhealthy or gone meanwhile: the claim
        loop then gives them back, as it does claimed rows)."""
        self._add_ready(rows)
        if not (self._stopping or self._must_release()):
            self._start_ready()
        self.wake.nudge()

    def hold_back(self, calls: Iterable[str]) -> None:
        """Calls of fresh rows a commit did not hand over: those behind a row of theirs
        claimed here are claimed once it is delivered."""
        if self._per_call and self._call_of:
            mine = set(self._call_of.values())
            self._held_back.update(c for c in calls if c in mine)

    def _add_ready(self, rows: list[Delivery]) -> None:
        if self._per_call:
            for row in rows:
                if row.call_key is not None:
                    self._call_of[row.msg_id] = row.call_key
        self._ready.extend(rows)

    def settle(self, outcome: Outcome) -> None:
        """Take note of an attempt's committed outcome: the outbox now tells its row's state."""
        if outcome.msg_id == self._gone_msg_id:
            self._gone_msg_id = None
        call = self._call_of.pop(outcome.msg_id, None) if self._call_of else None
        if outcome.kind == "delivered" and call in self._held_back:
            # The next row of its call is due now, and once that one (claimed here) is
            # delivered, the one after it: the call stays held back until the re-arm finds no
            # row of it here (at the cost of one claim more at the end of each chain).
            self.wake.set()
        elif outcome.kind == "delivered":
            self.wake.nudge()
        else:
            # A retry may be due at once.
            self.wake.set()

    async def _claim_loop(self) -> None:
        """Claim due rows whenever a slot is free and something may have changed."""
        # ``_more`` comes back every poll_interval on this fixed clock, which wake-ups do not
        # push back: under steady traffic nudges (attempts ending, rows handed over by
        # commits) keep coming, and rows no commit hands over (a dead instance's whose lease
        # passed, given back, replayed by the CLI) would wait for the stream to stop.
        rearm = time.monotonic() + self._poll_interval
        while True:
            # Cleared before looking, so that a wake-up during the look is not lost.
            self.wake.clear()
            timeout = await self._claim()
            # No timeout context when it is not needed: asyncio.timeout on every wake-up was
            # 1.5 % of the loop thread's samples draining a flood (endtoend_profile).
            if timeout is None:
                await self.wake.wait()
            elif timeout <= 0.0:
                self._more = True
                await asyncio.sleep(0)
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await self.wake.wait()
                except TimeoutError:
                    self._more = True
            if self.wake.changes != self._changes:
                self._changes = self.wake.changes
                self._more = True
            now = time.monotonic()
            if now >= rearm:
                self._more = True
                rearm = now + self._poll_interval
                # Keys whose first row is no longer ours: their rows come with this look.
                self._held_back.intersection_update(self._call_of.values())

    def _allowance(self) -> tuple[int, float | None]:
        """How many attempts may start now, and when to look again if it is fewer than the
        free slots (None: when an attempt ends)."""
        free = self.destination.max_in_flight - len(self.attempts)
        limit, wait = self.health.allowance(free, time.monotonic())
        if self._bucket is not None and limit > 0:
            tokens = self._bucket.available()
            if tokens < limit:
                limit = tokens
                wait = self._bucket.wait() if tokens == 0 else None
        return limit, wait

    async def _claim(self) -> float | None:
        """Start the attempts allowed now, claiming due rows as needed; return how long to
        sleep at most (None: until woken, a running attempt's end will wake us)."""
        if self._must_release():
            await self._release_ready()
        if self._gone_msg_id is not None:
            return None
        self._start_ready()
        enforce = self._bounded and time.monotonic() >= self._next_bound_check
        want = self._wanted()
        if want == 0 and not enforce:
            if self._promised and self._more:
                # Only the commit on its way stands in the way: its end wakes us (rows handed
                # over, or a wake-up for those it left); _sleep() could say 0 s here and the
                # loop would spin until then, on the GIL the commit's thread needs, and
                # through a failed commit's backoff.
                return self._poll_interval
            return self._sleep()
        ahead = self.health.healthy
        self._claiming = want if self._full else 0
        try:
            claim = await self._store.run(
                lambda outbox: self._claim_on_store(outbox, want, enforce)
            )
        except Exception:
            self._log.exception("webhook outbox claim failed")
            return self._poll_interval
        finally:
            self._claiming = 0
        if enforce:
            self._next_bound_check = time.monotonic() + self._poll_interval
        if claim.evicted:
            # Only a wake-up for watchers, already counted and logged: if a stop cancels us
            # before this line, the stop wakes them itself.
            self._announce_commit()
        if want > 0:
            # A change while we claimed is seen at the next look (wake.changes).
            self._more = self._full = len(claim.rows) == want
            self._next_due = claim.next_due
        self._add_ready(claim.rows)
        if ahead and self._must_release():
            # The destination turned unhealthy or gone while we claimed ahead.
            await self._release_ready()
        self._start_ready()
        return 0.0 if self._more and self._wanted() else self._sleep()

    def _wanted(self) -> int:
        """How many rows to claim now."""
        if not self.health.healthy:
            # One probe at a time, and only the oldest due row: nothing is claimed ahead.
            limit, _ = self._allowance()
            return 0 if self._ready else limit
        if not self._more or len(self._ready) >= self.destination.max_in_flight:
            return 0
        # Claimed ahead of the free slots: a claim (a hop to the outbox thread and two
        # queries) brought 4 rows on average draining 5,000 with only the free slots
        # claimed; claiming 8 x max_in_flight took the drain from 3,509 to 4,353/s and
        # 268 to 218 µs CPU a delivery in the stand-in measured side by side
        # (bench/README.md, "prefetch").
        return max(0, self._headroom() - self._promised)

    def _sleep(self) -> float | None:
        """How long to wait after starting what was allowed."""
        limit, wait = self._allowance()
        if limit == 0 or self._ready:
            # Waiting for slots, a token or the next probe; looking at least every
            # poll_interval while it is not for slots, so that the outbox bound is enforced.
            return None if wait is None else min(wait, self._poll_interval)
        if self._next_due is None:
            return self._poll_interval
        return min(self._poll_interval, max(0.0, self._next_due - time.time()))

    def _start_ready(self) -> None:
        """Start attempts on ready rows, as many as allowed now."""
        limit, _ = self._allowance()
        count = min(limit, len(self._ready))
        if count == 0:
            return
        if self._bucket is not None:
            self._bucket.take(count)
        probe = not self.health.healthy
        for _ in range(count):
            row = self._ready.popleft()
            if probe:
                self.health.probe_started()
                WEBHOOK_PROBES.labels(self.destination.name).inc()
            task = asyncio.create_task(self._attempts_from(row, probe))
            self.attempts.add(task)
            task.add_done_callback(self._attempt_done)

    async def _attempts_from(self, row: Delivery, probe: bool) -> None:
        """Attempt ``row``, then go on with the next ready row while one may start at once.

        A slot's task lives on from row to row: a task per attempt and the claim loop's turn
        to start the next (create_task, the done callback, a wake-up, the claim loop's own
        asyncio.timeout) were 4-5 % of the loop thread's samples draining a flood, about
        15 µs a delivery; with this and the timer of :meth:`_send`, the worker's part went
        from 49 to 29 µs a delivery (``python -m bench.endtoend_profile``).
        """
        task = asyncio.current_task()
        assert task is not None
        while True:
            await self._attempt(row, probe, task)
            following = self._next_ready()
            if following is None:
                return
            row, probe = following, False

    def _next_ready(self) -> Delivery | None:
        """The ready row a slot that just freed may attempt now, without the claim loop: only
        while healthy (probes are the claim loop's), not gone, not stopping, and with a
        token of the rate limit; None otherwise."""
        if (
            self._stopping
            or not self._ready
            or not self.health.healthy
            or self._gone_msg_id is not None
        ):
            return None
        if self._bucket is not None:
            if self._bucket.available() == 0:
                return None
            self._bucket.take(1)
        row = self._ready.popleft()
        if self._more and len(self._ready) < self.destination.max_in_flight:
            # Running low: time to claim ahead again.
            self.wake.nudge()
        return row

    def _must_release(self) -> bool:
        """Whether the rows claimed ahead must go back: while the destination is unhealthy
        the probes take the oldest due rows one at a time, and while it is gone none."""
        return bool(self._ready) and (self._gone_msg_id is not None or not self.health.healthy)

    async def _release_ready(self) -> None:
        """Give the claimed rows not started back to the outbox."""
        msg_ids = [row.msg_id for row in self._ready]
        self._ready.clear()
        for msg_id in msg_ids:
            self._call_of.pop(msg_id, None)
        name = self.destination.name
        try:
            await self._store.run(lambda outbox: outbox.release(name, msg_ids))
        except Exception:
            self._log.exception("webhook outbox release failed")

    def _claim_on_store(self, outbox: OutboxStore, limit: int, enforce: bool) -> Claim:
        """The claim, run on the outbox thread. Evictions are reported here, right after
        their commit: a stop cancelling the awaiting task must not make them silent."""
        destination = self.destination
        claim = outbox.claim(
            destination.name,
            time.time(),
            limit,
            per_call=destination.ordering == "per_call",
            max_pending=destination.max_pending if enforce else None,
            max_age=destination.max_age if enforce else None,
        )
        for reason, count in claim.evicted.items():
            WEBHOOK_DELIVERIES.labels(destination.name, "evicted").inc(count)
            self._log.warning(
                "webhook outbox bound reached: oldest deliveries moved to dead letters",
                reason=reason,
                count=count,
            )
        return claim

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self.attempts.discard(task)
        self.wake.nudge()

    async def _attempt(self, row: Delivery, probe: bool, task: asyncio.Task[None]) -> None:
        """Attempt one delivery in ``task`` (the slot's own) and queue its outcome."""
        started = time.time()
        try:
            answer = await self._send(row, task)
        except Exception as exc:
            # A bug here must not strand the row: it is retried on the schedule like any failure.
            self._log.exception("webhook attempt crashed", msg_id=row.msg_id)
            answer = _Answer(
                None, f"internal error: {type(exc).__name__}", "internal", time.time() - started
            )
        outcome, outage = self._judge(row, answer, started, probe)
        if probe:
            self.health.probe_ended()
        self._record(outcome)
        if outage is not None:
            await self._report_recovery(outage)

    async def _send(self, row: Delivery, task: asyncio.Task[None]) -> _Answer:
        """POST the row's body from ``task``; return the status, or the reason there was
        none."""
        destination = self.destination
        headers = request_headers(destination, row.msg_id, row.body)
        began = time.perf_counter()
        # Bounds the whole attempt, so that a receiver trickling bytes cannot hold a slot for
        # ever: one timer that cancels the task, as asyncio.timeout does without its context
        # manager's bookkeeping (which was 36 % of the worker's samples draining a flood,
        # about 10 µs a delivery; the timer alone, 2 µs).
        loop = task.get_loop()
        expiry = loop.call_at(loop.time() + destination.timeout, self._expire, task)
        try:
            reply = await self._client.post(
                destination.url,
                row.body,
                headers,
                max_answer=_MAX_ANSWER_BYTES,
                keep=_KEPT_ANSWER_BYTES,
            )
        except asyncio.CancelledError:
            # Ours, unless someone else (a stop) cancelled the task too.
            if task not in self._expired:
                raise
            self._expired.discard(task)
            if task.uncancel() > 0:
                raise
            return self._timed_out(began)
        except TimeoutError:
            return self._timed_out(began)
        except Http1Error as exc:
            kind: ErrorClass = "internal" if exc.kind == "request" else exc.kind
            return _Answer(None, str(exc), kind, time.perf_counter() - began)
        finally:
            expiry.cancel()
        latency = time.perf_counter() - began
        error = "" if 200 <= reply.status < 300 else f"HTTP {reply.status}"
        return _Answer(
            reply.status,
            error,
            _classify(reply.status),
            latency,
            retry_after_seconds(reply.headers),
            reply.body,
        )

    def _expire(self, task: asyncio.Task[None]) -> None:
        """An attempt's time is up: cancel it (its ``_send`` tells this from a stop)."""
        self._expired.add(task)
        task.cancel()

    def _timed_out(self, began: float) -> _Answer:
        """The answer of an attempt that ran out of time, begun at ``began``."""
        timeout = self.destination.timeout
        latency = time.perf_counter() - began
        return _Answer(None, f"timed out after {timeout:g} s", "timeout", latency)

    def _judge(
        self, row: Delivery, answer: _Answer, started: float, probe: bool
    ) -> tuple[Outcome, Outage | None]:
        """Decide what happens to ``row`` after ``answer`` to the attempt made at ``started``;
        count and log it. Returns the outcome, and the outage it ended if any."""
        name = self.destination.name
        error_class = answer.error_class
        clock = time.monotonic()
        self._success_ratio.set(self._ratio.observe(error_class is None, clock))
        not_now = error_class in _NOT_NOW
        outage = None if not_now or error_class == "internal" else self.health.answered(clock)
        counted = error_class in ("rejected", "internal")
        if not_now and self.health.failed(clock, answer.retry_after, probe=probe):
            counted = True
            WEBHOOK_HEALTHY.labels(name).set(0)
            # One line per change of health, not one per attempt: a backlog of thousands
            # failing against a dead receiver must not flood the journal.
            self._log.warning(
                "webhook destination unhealthy: deliveries paused, probing it",
                msg_id=row.msg_id,
                status=answer.status,
                error=answer.error,
                retry_after=answer.retry_after,
            )
        attempt = Attempt(
            name,
            row.msg_id,
            started,
            answer.latency,
            answer.status,
            error_class,
            answer.error,
            answer.body,
            probe,
            counted,
        )
        if error_class is None:
            self._delivered.inc()
            if self._log_each_delivery:
                self._log.info(
                    "webhook delivered",
                    status=answer.status,
                    latency_ms=round(answer.latency * 1000, 1),
                    event_name=row.event,
                    call_key=row.call_key,
                )
            return Outcome(attempt, "delivered"), outage
        self.last_error = (started, answer.error)
        if error_class == "gone":
            return self._gone(attempt, row.attempts), outage
        throttled = not_now and answer.retry_after is not None
        return self._failed(attempt, row, throttled), outage

    def _failed(self, attempt: Attempt, row: Delivery, throttled: bool) -> Outcome:
        """Reschedule or bury a failed delivery."""
        name = self.destination.name
        WEBHOOK_DELIVERIES.labels(name, "throttled" if throttled else "failed").inc()
        facts = {"msg_id": row.msg_id, "status": attempt.status, "error": attempt.error}
        if not attempt.counted:
            self._log.debug("webhook delivery failed during an outage: not counted", **facts)
            return Outcome(attempt, "retry", row.attempts, attempt.at)
        attempts = row.attempts + 1
        schedule = self.destination.retry_schedule
        if attempts >= len(schedule):
            WEBHOOK_DELIVERIES.labels(name, "exhausted").inc()
            self._log.warning(
                "webhook delivery gave up: moved to dead letters", attempts=attempts, **facts
            )
            return Outcome(attempt, "exhausted", attempts, attempt.at)
        # The destination's health paces "not now" failures; the schedule, a delivery's own.
        delay = 0.0 if attempt.error_class in _NOT_NOW else schedule[attempts]
        self._log.debug(
            "webhook delivery failed: will retry",
            attempts=attempts,
            retry_in=round(delay, 3),
            **facts,
        )
        return Outcome(attempt, "retry", attempts, attempt.at + delay)

    def _gone(self, attempt: Attempt, attempts: int) -> Outcome:
        """Handle 410 Gone: disable the destination and keep the row, due once re-enabled."""
        self._gone_msg_id = attempt.msg_id
        WEBHOOK_DELIVERIES.labels(self.destination.name, "gone").inc()
        self._log.error(
            "webhook destination answered 410 Gone: disabled until re-enabled with the CLI;"
            " its deliveries stay pending",
            msg_id=attempt.msg_id,
        )
        # The attempt is not counted: a 410 says nothing about this delivery, and after
        # re-enabling it should get its full schedule.
        return Outcome(attempt, "gone", attempts, attempt.at)

    async def _report_recovery(self, outage: Outage) -> None:
        """Log the end of an outage with the backlog it left."""
        WEBHOOK_HEALTHY.labels(self.destination.name).set(1)
        try:
            name = self.destination.name
            backlog: int | None = await self._store.run(lambda outbox: outbox.pending_count(name))
        except Exception:
            # The line still matters without its figure; the outbox's failures are logged
            # by the commits that meet them.
            backlog = None
        self._log.info(
            "webhook destination recovered: delivering its backlog",
            outage_seconds=round(outage.seconds, 3),
            probes=outage.probes,
            backlog=backlog,
        )
