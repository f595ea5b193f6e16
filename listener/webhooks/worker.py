"""One destination's worker: claims its due rows, attempts them, judges the answers.

The worker asks the outbox for due rows whenever an attempt slot is free and something may
have changed (a commit, a finished attempt, a scheduled retry falling due, or every
``poll_interval`` for changes made by the CLI), and runs up to ``max_in_flight`` attempts at
once. A slow or dead destination only ever occupies its own slots. It also enforces its
destination's outbox bound, at most every ``poll_interval``, in the same call as a claim: so it
knows exactly which rows are in flight and must stay.

Answers, per the Standard Webhooks spec: 2xx is success and anything else a failure (redirects
are not followed); 410 Gone disables the destination until the CLI enables it, keeping its
deliveries pending. A failure is retried on the destination's schedule; a ``Retry-After`` on a
"not now" status (:data:`~listener.core.retry.RETRYABLE_STATUSES`) can only lengthen that
delay, up to the daemon's one cap (:func:`~listener.core.retry.honour_retry_after`). Timeouts
and connection errors are failures like any other; when the schedule is used up the delivery
becomes a dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from listener.core.metrics import WEBHOOK_DELIVERIES
from listener.core.retry import RETRYABLE_STATUSES, honour_retry_after, retry_after_seconds
from listener.webhooks.destination import Destination
from listener.webhooks.http1 import Http1Error, Http1Pool
from listener.webhooks.outbox import Claim, Delivery, Outbox
from listener.webhooks.signing import request_headers
from listener.webhooks.store import Store
from listener.webhooks.writer import Outcome

__all__ = ["Worker"]

_log = structlog.get_logger(__name__)
# A receiver's answer body is never used; read this much so the connection can be reused.
_MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Answer:
    """What one attempt got: an HTTP status, or no answer and an error."""

    status: int | None
    error: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Worker:
    """Delivers one destination's rows, at most ``max_in_flight`` at a time.

    ``held`` holds the ids of rows claimed by this run whose outcome is not committed yet:
    the outbox is told to skip them, since nothing in the file marks them as taken.

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
        self.held: set[str] = set()
        self.attempts: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        self._log = _log.bind(destination=destination.name)
        self._failing = False
        # The id of a row answered with 410 whose outcome (disabling us) is not committed yet:
        # until it is, the outbox does not know, so claiming pauses.
        self._gone_msg_id: str | None = None
        self._claim_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start claiming and attempting."""
        self._claim_task = asyncio.create_task(
            self._claim_loop(), name=f"webhook-{self.destination.name}"
        )

    async def stop_claiming(self) -> None:
        """Stop starting attempts; running ones go on."""
        if self._claim_task is not None:
            self._claim_task.cancel()
            await asyncio.gather(self._claim_task, return_exceptions=True)

    def settle(self, msg_id: str) -> None:
        """Forget a row whose outcome is committed: the outbox now tells its state."""
        self.held.discard(msg_id)
        if msg_id == self._gone_msg_id:
            self._gone_msg_id = None
        self.wake.set()

    async def _claim_loop(self) -> None:
        """Claim due rows whenever a slot is free and something may have changed."""
        while True:
            # Cleared before looking, so that a wake-up during the look is not lost.
            self.wake.clear()
            free = self.destination.max_in_flight - len(self.attempts)
            paused = self._gone_msg_id is not None
            timeout = await self._claim(free) if free > 0 and not paused else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.wake.wait()

    async def _claim(self, free: int) -> float | None:
        """Start attempts on up to ``free`` due rows; return how long to sleep at most.

        None means "until woken": every slot is busy, and a finished attempt will wake us.
        """
        enforce = self._bounded and time.monotonic() >= self._next_bound_check
        try:
            claim = await self._store.run(self._claim_on_store, free, frozenset(self.held), enforce)
        except Exception:
            self._log.exception("webhook outbox claim failed")
            return self._poll_interval
        if enforce:
            self._next_bound_check = time.monotonic() + self._poll_interval
        if claim.evicted:
            # Only a wake-up for watchers, already counted and logged: if a stop cancels us
            # before this line, the stop wakes them itself.
            self._announce_commit()
        for row in claim.rows:
            self.held.add(row.msg_id)
            task = asyncio.create_task(self._attempt(row))
            self.attempts.add(task)
            task.add_done_callback(self._attempt_done)
        if len(claim.rows) == free:
            return None
        if claim.next_due is None:
            return self._poll_interval
        return min(self._poll_interval, max(0.0, claim.next_due - time.time()))

    def _claim_on_store(
        self, outbox: Outbox, free: int, held: frozenset[str], enforce: bool
    ) -> Claim:
        """The claim, run on the outbox thread. Evictions are reported here, right after
        their commit: a stop cancelling the awaiting task must not make them silent."""
        destination = self.destination
        claim = outbox.claim(
            destination.name,
            time.time(),
            free,
            exclude=held,
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
        self.wake.set()

    async def _attempt(self, row: Delivery) -> None:
        """Attempt one delivery and queue its outcome."""
        try:
            answer = await self._send(row)
        except Exception as exc:
            # A bug here must not strand the row: it is retried on the schedule like any failure.
            self._log.exception("webhook attempt crashed", msg_id=row.msg_id)
            answer = _Answer(None, f"internal error: {type(exc).__name__}")
        self._record(self._judge(row, answer, time.time()))

    async def _send(self, row: Delivery) -> _Answer:
        """POST the row's body; return the status, or the reason there was none."""
        destination = self.destination
        headers = request_headers(destination, row.msg_id, row.body)
        try:
            # Bounds the whole attempt, so that a receiver trickling bytes cannot hold a slot
            # for ever.
            async with asyncio.timeout(destination.timeout):
                reply = await self._client.post(
                    destination.url, row.body, headers, max_answer=_MAX_ANSWER_BYTES
                )
        except TimeoutError:
            return _Answer(None, f"timed out after {destination.timeout:g} s")
        except Http1Error as exc:
            return _Answer(None, str(exc))
        retry_after = retry_after_seconds(reply.headers)
        return _Answer(reply.status, f"HTTP {reply.status}", retry_after)

    def _judge(self, row: Delivery, answer: _Answer, now: float) -> Outcome:
        """Decide what happens to ``row`` after ``answer``; count and log it."""
        name = self.destination.name
        if answer.ok:
            WEBHOOK_DELIVERIES.labels(name, "delivered").inc()
            if self._failing:
                self._failing = False
                self._log.info("webhook destination recovered", msg_id=row.msg_id)
            return Outcome(name, row.msg_id, "delivered", now)
        if answer.status == 410:
            return self._gone(row, now)
        facts = {"msg_id": row.msg_id, "status": answer.status, "error": answer.error}
        if not self._failing:
            # One line per change of health, not one per attempt: a backlog of thousands
            # failing against a dead receiver must not flood the journal. Attempts log at DEBUG.
            self._failing = True
            self._log.warning("webhook destination failing: deliveries will be retried", **facts)
        attempts = row.attempts + 1
        schedule = self.destination.retry_schedule
        kind: Literal["retry", "exhausted"]
        if attempts >= len(schedule):
            kind, due_at = "exhausted", now
            WEBHOOK_DELIVERIES.labels(name, kind).inc()
            self._log.warning(
                "webhook delivery gave up: moved to dead letters", attempts=attempts, **facts
            )
        else:
            delay = schedule[attempts]
            throttled = answer.status in RETRYABLE_STATUSES and answer.retry_after is not None
            if throttled:
                delay = honour_retry_after(delay, answer.retry_after)
            kind, due_at = "retry", now + delay
            WEBHOOK_DELIVERIES.labels(name, "throttled" if throttled else "failed").inc()
            self._log.debug(
                "webhook delivery failed: will retry",
                attempts=attempts,
                retry_in=round(delay, 3),
                **facts,
            )
        return Outcome(name, row.msg_id, kind, now, attempts, due_at, answer.status, answer.error)

    def _gone(self, row: Delivery, now: float) -> Outcome:
        """Handle 410 Gone: disable the destination and keep the row, due once re-enabled."""
        name = self.destination.name
        self._gone_msg_id = row.msg_id
        WEBHOOK_DELIVERIES.labels(name, "gone").inc()
        self._log.error(
            "webhook destination answered 410 Gone: disabled until re-enabled with the CLI;"
            " its deliveries stay pending",
            msg_id=row.msg_id,
        )
        # The attempt is not counted: a 410 says nothing about this delivery, and after
        # re-enabling it should get its full schedule.
        return Outcome(name, row.msg_id, "gone", now, row.attempts, now, 410, "HTTP 410 Gone")
