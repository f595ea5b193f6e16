"""Webhook delivery: Standard Webhooks signing and the per-destination delivery engine.

Theory of operation::

    submit(event) ─► batch in memory ─► writer ─► outbox (SQLite) ◄─ CLI process
                                                    │ due rows  ▲ outcomes
                                                    ▼           │
                                  one worker per destination ─► attempts (http1, max_in_flight)

:meth:`WebhookForwarder.submit` serializes the event once, appends one row per matching
destination to an in-memory batch and returns. A writer task commits the batch and the outcomes
of finished attempts together, in one transaction, on the outbox's own thread; while it commits,
the next batch fills up, so transactions grow with load instead of being paid per event.
A row is attempted only once it is committed, so a crash loses nothing that was attempted, and
redelivers (with the same ``webhook-id``) what was attempted but not yet recorded as delivered:
delivery is at-least-once, receivers deduplicate on ``webhook-id``.

Each destination has its own worker, which asks the outbox for due rows whenever an attempt
slot is free and something may have changed (a commit, a finished attempt, a scheduled retry
falling due, or every ``poll_interval`` for changes made by the CLI), and runs up to
``max_in_flight`` attempts at once. A slow or dead destination only ever occupies its own slots.
The worker also enforces its destination's outbox bound, at most every ``poll_interval``, in the
same call as a claim: so it knows exactly which rows are in flight and must stay.

Answers, per the Standard Webhooks spec: 2xx is success and anything else a failure (redirects
are not followed); 410 Gone disables the destination until the CLI enables it, keeping its
deliveries pending; 429, 502, 503 and 504 may carry ``Retry-After``, which then sets the next
attempt's time (capped at the schedule's longest step). Timeouts and connection errors are
retried on the schedule; when it is used up the delivery becomes a dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from types import MappingProxyType, TracebackType
from typing import Concatenate, Literal, NoReturn, ParamSpec, TypeVar

import httpx
import structlog
from standardwebhooks.webhooks import Webhook

from listener.core.errors import ConfigError, ListenerError
from listener.core.events import Event
from listener.core.httputil import USER_AGENT
from listener.core.metrics import (
    DEAD_LETTERS,
    OUTBOX_OLDEST_AGE,
    OUTBOX_PENDING,
    WEBHOOK_DELIVERIES,
)
from listener.core.retry import retry_after_seconds
from listener.webhooks.http1 import Http1Error, Http1Pool
from listener.webhooks.outbox import Delivery, DestinationStats, NewDelivery, Outbox

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_RETRY_SCHEDULE",
    "DEFAULT_TIMEOUT",
    "Destination",
    "ForwarderStateError",
    "WebhookForwarder",
    "encode_body",
    "new_message_id",
    "sign_headers",
]

_log = structlog.get_logger(__name__)
_T = TypeVar("_T")
_P = ParamSpec("_P")

# Svix's schedule, the one the Standard Webhooks spec's example follows: about 27.5 hours.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
# The spec recommends "somewhere between 15 and 30s".
DEFAULT_TIMEOUT = 15.0
DEFAULT_MAX_IN_FLIGHT = 8

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "webhook-id", "webhook-timestamp", "webhook-signature"}
)
# Standard Webhooks: "429/502/504 ⇒ throttle"; 503 carries Retry-After by RFC 9110.
_THROTTLE_STATUSES = frozenset({429, 502, 503, 504})
# A receiver's answer body is never used; read this much so the connection can be reused.
_MAX_ANSWER_BYTES = 64 * 1024
_WRITE_RETRY_DELAY = 0.5


class ForwarderStateError(ListenerError, RuntimeError):
    """The forwarder was used before :meth:`~WebhookForwarder.start` or after it stopped."""


@dataclass(frozen=True, slots=True)
class Destination:
    """Where and how to forward events. Validated on construction.

    Attributes:
        name: unique id used by the outbox, the CLI and metrics (letters, digits, ``_.-``).
            Deliveries are stored under it, so renaming a destination strands its pending ones.
        url: the http(s) URL to POST to.
        secrets: one or more Standard Webhooks secrets (``whsec_`` + base64). Every one signs
            each request, so that during a rotation the receiver accepts either.
        events: event-name globs (:func:`fnmatch.fnmatchcase`); ``*`` forwards everything.
        headers: extra request headers (they may override ``user-agent``, not the signed or
            content headers).
        timeout: seconds one attempt may take in all, from connecting to the last byte read.
        retry_schedule: delay before each attempt, in seconds: the first entry is the delay of
            the first attempt after enqueueing, and its length is the number of attempts.
        ordering: ``per_call`` holds back a call's delivery while an earlier delivery of the
            same call to this destination is pending (even if it is waiting for a retry hours
            away); ``none`` attempts everything as soon as it is due.
        max_in_flight: attempts running at once for this destination.
        max_pending: the outbox bound: beyond this many pending deliveries the oldest become
            dead letters (with a warning). Checked at most every ``poll_interval``, when the
            worker has a free slot, so it can be exceeded for a while. None for no bound.
        max_age: pending deliveries older than this many seconds become dead letters. None for
            no bound.

    Raises:
        ConfigError: a field is invalid; ``key`` is ``webhooks.<name>.<field>``.
    """

    name: str
    url: str = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)
    events: tuple[str, ...] = ("*",)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    ordering: Literal["none", "per_call"] = "none"
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_pending: int | None = None
    max_age: float | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError("webhooks", f"invalid destination name {self.name!r}")
        self._check_url()
        self._check_secrets()
        self._check_headers()
        self._check_numbers()
        if not self.events:
            self._fail("events", "must list at least one glob (use '*' for all)")
        if self.ordering not in ("none", "per_call"):
            self._fail("ordering", f"must be 'none' or 'per_call', not {self.ordering!r}")
        # Frozen means frozen: the caller's dict must not change the headers later.
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))

    def accepts(self, event_name: str) -> bool:
        """Return whether events named ``event_name`` are forwarded here."""
        return any(fnmatchcase(event_name, glob) for glob in self.events)

    def _fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(f"webhooks.{self.name}.{key}", problem)

    def _check_url(self) -> None:
        try:
            url = httpx.URL(self.url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigError(f"webhooks.{self.name}.url", f"invalid URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            self._fail("url", "must be an absolute http:// or https:// URL")

    def _check_secrets(self) -> None:
        if isinstance(self.secrets, str) or not self.secrets:
            self._fail("secrets", "must be a list of one or more whsec_ secrets")
        for secret in self.secrets:
            try:
                Webhook(secret)
            except Exception as exc:  # the library raises assorted types
                # Never echo the secret itself.
                del exc
                raise ConfigError(
                    f"webhooks.{self.name}.secrets",
                    "not a valid Standard Webhooks secret: expected whsec_ followed by "
                    "base64 (24 to 64 random bytes)",
                ) from None

    def _check_headers(self) -> None:
        for name, value in self.headers.items():
            if name.lower() in _RESERVED_HEADERS:
                self._fail("headers", f"{name!r} is set by the forwarder")
            if not isinstance(value, str):
                self._fail("headers", f"value of {name!r} must be a string")

    def _check_numbers(self) -> None:
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            self._fail("timeout", "must be a positive number of seconds")
        if not self.retry_schedule or not all(
            math.isfinite(d) and d >= 0 for d in self.retry_schedule
        ):
            self._fail("retry_schedule", "must be a non-empty list of seconds >= 0")
        if self.max_in_flight < 1:
            self._fail("max_in_flight", "must be at least 1")
        if self.max_pending is not None and self.max_pending < 1:
            self._fail("max_pending", "must be at least 1")
        if self.max_age is not None and not self.max_age > 0:
            self._fail("max_age", "must be a positive number of seconds")


def new_message_id() -> str:
    """Return a fresh Standard Webhooks message id (``msg_`` + 32 hex digits)."""
    return f"msg_{uuid.uuid4().hex}"


def encode_body(msg_id: str, event: Event) -> bytes:
    """Return the request body for ``event``: the bytes that every attempt sends and signs.

    ``{"id", "type", "occurred_at", "topic", "data"}``: ``id`` equals the ``webhook-id``
    header, ``occurred_at`` is RFC 3339 UTC, ``data`` is the payload as received. ASCII-only
    JSON, so that any string the channel delivered (even a lone surrogate) encodes.

    Raises:
        TypeError: the payload holds something JSON cannot represent.
    """
    occurred = datetime.fromtimestamp(event.received_at, UTC).isoformat(timespec="milliseconds")
    envelope = {
        "id": msg_id,
        "type": event.name,
        "occurred_at": occurred.replace("+00:00", "Z"),
        "topic": event.topic,
        "data": event.payload,
    }
    return json.dumps(envelope, separators=(",", ":")).encode("ascii")


@functools.lru_cache(maxsize=64)
def _signer(secret: str) -> Webhook:
    # Decoding the secret took 6 % of the loop per attempt; secrets change only on reload.
    return Webhook(secret)


def sign_headers(
    secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Return the Standard Webhooks headers for one attempt.

    ``webhook-signature`` holds one ``v1,<base64 HMAC-SHA256>`` per secret, space-separated,
    each over ``{msg_id}.{timestamp}.{body}``. The result is secret material: never log it.

    Args:
        secrets: ``whsec_`` secrets, already validated (see :class:`Destination`).
        msg_id: the message id, the same on every attempt.
        timestamp: the attempt time, whole seconds since the epoch.
        body: the exact bytes sent.
    """
    when = datetime.fromtimestamp(timestamp, UTC)
    text = body.decode()
    signatures = " ".join(_signer(secret).sign(msg_id, when, text) for secret in secrets)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }


@dataclass(frozen=True, slots=True)
class _Answer:
    """What one attempt got: an HTTP status, or no answer and an error."""

    status: int | None
    error: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class _Outcome:
    """The result of one attempt, to be committed to the outbox."""

    destination: str
    msg_id: str
    kind: Literal["delivered", "retry", "gone", "exhausted"]
    at: float
    attempts: int = 0
    due_at: float = 0.0
    status: int | None = None
    error: str = ""

    def apply(self, outbox: Outbox) -> None:
        """Record this failed attempt's outcome (inside the caller's transaction); delivered
        outcomes are recorded together by :func:`_commit`."""
        if self.kind == "exhausted":
            outbox.bury(
                self.destination,
                self.msg_id,
                now=self.at,
                reason="exhausted",
                attempts=self.attempts,
                status=self.status,
                error=self.error,
            )
            return
        if self.kind == "gone":
            outbox.disable(self.destination, self.at, "HTTP 410 Gone")
        outbox.reschedule(
            self.destination,
            self.msg_id,
            due_at=self.due_at,
            attempts=self.attempts,
            attempted_at=self.at,
            status=self.status,
            error=self.error,
        )


def _commit(outbox: Outbox, rows: list[NewDelivery], outcomes: list[_Outcome]) -> None:
    """Insert new rows and record outcomes in one transaction."""
    with outbox.transaction():
        outbox.add(rows)
        delivered: dict[str, list[str]] = {}
        for outcome in outcomes:
            if outcome.kind == "delivered":
                delivered.setdefault(outcome.destination, []).append(outcome.msg_id)
            else:
                outcome.apply(outbox)
        # One statement per destination: per-row deletes were a quarter of the outbox's time.
        for destination, msg_ids in delivered.items():
            outbox.mark_delivered(destination, msg_ids)


class _Store:
    """The outbox and the one thread that owns its connection, so SQLite never blocks the loop."""

    def __init__(self, executor: ThreadPoolExecutor, outbox: Outbox) -> None:
        self._executor = executor
        self._outbox = outbox

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> _Store:
        """Open (or create) the outbox on a new thread."""
        executor = ThreadPoolExecutor(1, thread_name_prefix="sippet-outbox")
        try:
            outbox = await asyncio.get_running_loop().run_in_executor(executor, Outbox, path)
        except BaseException:
            executor.shutdown()
            raise
        return cls(executor, outbox)

    async def run(
        self, function: Callable[Concatenate[Outbox, _P], _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Return ``function(outbox, *args, **kwargs)``, run on the outbox thread."""
        call = functools.partial(function, self._outbox, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        """Close the outbox and end its thread."""
        await self.run(Outbox.close)
        self._executor.shutdown()


@dataclass(frozen=True, slots=True)
class _Running:
    """What exists between start and stop."""

    store: _Store
    client: Http1Pool
    writer: asyncio.Task[None]
    measurer: asyncio.Task[None]


class WebhookForwarder:
    """Forwards events to webhook destinations through the durable outbox.

    Lifecycle: :meth:`start`, any number of :meth:`submit` calls, :meth:`stop`. Also an async
    context manager doing the same (stopping with the default grace).

    Args:
        destinations: where to forward; names must be unique.
        outbox_path: the SQLite file (created if missing; its directory must exist). One
            forwarder per file: two would attempt the same deliveries.
        poll_interval: how often an idle worker looks for rows made due by another process
            (the CLI's replay or enable), and how often gauges and outbox bounds are checked.

    Raises:
        ConfigError: two destinations share a name.
    """

    def __init__(
        self,
        destinations: Sequence[Destination],
        outbox_path: str | os.PathLike[str],
        *,
        poll_interval: float = 0.5,
    ) -> None:
        names = [d.name for d in destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError("webhooks", f"duplicate destination names: {', '.join(duplicates)}")
        self.destinations: tuple[Destination, ...] = tuple(destinations)
        self._path = outbox_path
        self._poll_interval = poll_interval
        self._state: Literal["new", "running", "stopping", "stopped"] = "new"
        self._running: _Running | None = None
        self._workers: dict[str, _Worker] = {}
        self._rows: list[NewDelivery] = []
        self._outcomes: list[_Outcome] = []
        self._dirty = asyncio.Event()
        self._committed = asyncio.Event()
        self._stats: list[DestinationStats] = []
        # Completed when the rows submitted since the last commit are committed.
        self._batch_committed: asyncio.Future[None] | None = None
        self._closing = False

    async def __aenter__(self) -> WebhookForwarder:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the outbox and start delivering, including what a previous run left pending.

        Raises:
            OutboxError: the outbox file cannot be opened.
            ForwarderStateError: already started.
        """
        if self._state != "new":
            raise ForwarderStateError(f"webhook forwarder cannot start: it is {self._state}")
        store = await _Store.open(self._path)
        # Connections are per origin and unbounded in number: each destination's slots
        # (max_in_flight) bound them, and a hung destination cannot starve another.
        client = Http1Pool(user_agent=USER_AGENT)
        self._workers = {
            d.name: _Worker(
                d, store, client, self._record, self._announce_commit, self._poll_interval
            )
            for d in self.destinations
        }
        self._running = _Running(
            store,
            client,
            asyncio.create_task(self._write_loop(store), name="webhook-writer"),
            asyncio.create_task(self._measure_loop(store), name="webhook-gauges"),
        )
        self._state = "running"
        for worker in self._workers.values():
            worker.start()
        _log.info("webhook forwarder started", destinations=list(self._workers))

    def submit(self, event: Event) -> asyncio.Future[None] | None:
        """Queue ``event`` for every destination whose globs match its name; never blocks.

        It is committed to the outbox within milliseconds and attempted only after that.

        Returns:
            A future that completes once the event is committed (durable), or None when no
            destination takes it. A failed commit is retried; the future waits for it.

        Raises:
            ForwarderStateError: the forwarder is not running.
            TypeError: the payload holds something JSON cannot represent.
        """
        if self._state != "running":
            raise ForwarderStateError(f"webhook forwarder is {self._state}, not running")
        targets = [d for d in self.destinations if d.accepts(event.name)]
        if not targets:
            return None
        msg_id = new_message_id()
        body = encode_body(msg_id, event)
        now = time.time()
        self._rows.extend(
            NewDelivery(
                d.name, msg_id, event.name, event.call_key, body, now, now + d.retry_schedule[0]
            )
            for d in targets
        )
        self._dirty.set()
        if self._batch_committed is None:
            self._batch_committed = asyncio.get_running_loop().create_future()
        return self._batch_committed

    async def stop(self, grace: float = 5.0) -> None:
        """Stop delivering. Calling it again, or before :meth:`start`, does nothing.

        No new attempts start; running ones get ``grace`` seconds to finish and are then
        cancelled (they stay pending and are retried by the next run). Everything submitted
        and every outcome is committed before the outbox is closed.
        """
        running = self._running
        if self._state != "running" or running is None:
            return
        self._state = "stopping"
        for worker in self._workers.values():
            await worker.stop_claiming()
        attempts = {task for worker in self._workers.values() for task in worker.attempts}
        if attempts:
            _, late = await asyncio.wait(attempts, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        running.measurer.cancel()
        await asyncio.gather(running.measurer, return_exceptions=True)
        self._closing = True
        self._dirty.set()
        await running.writer
        await running.client.aclose()
        await running.store.close()
        self._state = "stopped"
        self._announce_commit()
        _log.info("webhook forwarder stopped")

    async def wait_committed(self) -> None:
        """Return once the forwarder next commits to the outbox, or stops.

        A commit is a batch of submitted events and attempt outcomes, or an enforcement of an
        outbox bound that moved deliveries.
        Code that watches the outbox from another connection (tests, benchmarks) re-reads it
        after each commit instead of polling.
        """
        if self._state != "stopped":
            await self._committed.wait()

    def _announce_commit(self) -> None:
        """Wake every :meth:`wait_committed` caller."""
        self._committed.set()
        self._committed = asyncio.Event()

    def _record(self, outcome: _Outcome) -> None:
        """Queue an attempt's outcome for the next commit."""
        self._outcomes.append(outcome)
        self._dirty.set()

    async def _write_loop(self, store: _Store) -> None:
        """Commit batches until stopping, then commit what is left and return."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not await self._flush(store):
                if self._closing:
                    return
                await asyncio.sleep(_WRITE_RETRY_DELAY)
                self._dirty.set()
            elif self._closing and not (self._rows or self._outcomes):
                return

    async def _flush(self, store: _Store) -> bool:
        """Commit the current batch; on failure keep it for the next try and return False."""
        rows, self._rows = self._rows, []
        outcomes, self._outcomes = self._outcomes, []
        batch, self._batch_committed = self._batch_committed, None
        if not (rows or outcomes):
            return True
        try:
            await store.run(_commit, rows, outcomes)
        except Exception:
            self._rows[:0], self._outcomes[:0] = rows, outcomes
            if batch is not None:
                # Rows submitted meanwhile join the retried batch: its future settles theirs.
                newer = self._batch_committed
                if newer is not None:
                    batch.add_done_callback(lambda _: newer.done() or newer.set_result(None))
                self._batch_committed = batch
            # When closing there is no next try: submitted rows are lost, and attempts whose
            # outcome is lost will simply be made again by the next run.
            _log.exception(
                "webhook outbox commit failed",
                deliveries=len(rows),
                outcomes=len(outcomes),
                lost=self._closing,
            )
            return False
        if batch is not None and not batch.done():
            batch.set_result(None)
        for name in {row.destination for row in rows}:
            self._workers[name].wake.set()
        for outcome in outcomes:
            self._workers[outcome.destination].settle(outcome.msg_id)
        self._announce_commit()
        return True

    async def _measure_loop(self, store: _Store) -> None:
        """Refresh the outbox gauges every ``poll_interval``."""
        first = True
        while True:
            try:
                stats = await store.run(Outbox.stats, time.time(), list(self._workers))
            except Exception:
                _log.exception("webhook outbox stats failed")
            else:
                self._publish(stats, warn_unknown=first)
                first = False
            await asyncio.sleep(self._poll_interval)

    def describe(self) -> str:
        """A few words for the service status: the backlog as last measured."""
        parts = []
        for entry in self._stats:
            state = "disabled, " if entry.disabled else ""
            parts.append(f"{entry.name} {state}{entry.pending} pending, {entry.dead} dead")
        return "; ".join(parts) or "outbox not measured yet"

    def _publish(self, stats: list[DestinationStats], *, warn_unknown: bool) -> None:
        """Set the gauges; on the first round, warn about rows nobody will deliver."""
        self._stats = [entry for entry in stats if entry.name in self._workers]
        for entry in stats:
            if entry.name in self._workers:
                OUTBOX_PENDING.labels(entry.name).set(entry.pending)
                OUTBOX_OLDEST_AGE.labels(entry.name).set(entry.oldest_age or 0.0)
                DEAD_LETTERS.labels(entry.name).set(entry.dead)
            elif warn_unknown and entry.pending:
                _log.warning(
                    "webhook outbox holds deliveries for an unconfigured destination",
                    destination=entry.name,
                    pending=entry.pending,
                )


class _Worker:
    """Delivers one destination's rows, at most ``max_in_flight`` at a time.

    ``held`` holds the ids of rows claimed by this run whose outcome is not committed yet:
    the outbox is told to skip them, since nothing in the file marks them as taken.
    """

    def __init__(
        self,
        destination: Destination,
        store: _Store,
        client: Http1Pool,
        record: Callable[[_Outcome], None],
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
            rows, next_due, evicted = await self._store.run(
                _claim_due, self.destination, free, frozenset(self.held), enforce
            )
        except Exception:
            self._log.exception("webhook outbox claim failed")
            return self._poll_interval
        if enforce:
            self._next_bound_check = time.monotonic() + self._poll_interval
        if evicted:
            self._report_evicted(evicted)
        for row in rows:
            self.held.add(row.msg_id)
            task = asyncio.create_task(self._attempt(row))
            self.attempts.add(task)
            task.add_done_callback(self._attempt_done)
        if len(rows) == free:
            return None
        if next_due is None:
            return self._poll_interval
        return min(self._poll_interval, max(0.0, next_due - time.time()))

    def _report_evicted(self, evicted: dict[str, int]) -> None:
        """Say loudly that the bound pushed deliveries out."""
        self._announce_commit()
        for reason, count in evicted.items():
            WEBHOOK_DELIVERIES.labels(self.destination.name, "evicted").inc(count)
            self._log.warning(
                "webhook outbox bound reached: oldest deliveries moved to dead letters",
                reason=reason,
                count=count,
            )

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
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **destination.headers,
            **sign_headers(destination.secrets, row.msg_id, int(time.time()), row.body),
        }
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

    def _judge(self, row: Delivery, answer: _Answer, now: float) -> _Outcome:
        """Decide what happens to ``row`` after ``answer``; count and log it."""
        name = self.destination.name
        if answer.ok:
            WEBHOOK_DELIVERIES.labels(name, "delivered").inc()
            if self._failing:
                self._failing = False
                self._log.info("webhook destination recovered", msg_id=row.msg_id)
            return _Outcome(name, row.msg_id, "delivered", now)
        if answer.status == 410:
            return self._gone(row, now)
        if not self._failing:
            # One line per change of health, not one per attempt: a backlog of thousands
            # failing against a dead receiver must not flood the journal. Attempts log at DEBUG.
            self._failing = True
            self._log.warning(
                "webhook destination failing: deliveries will be retried",
                msg_id=row.msg_id,
                status=answer.status,
                error=answer.error,
            )
        attempts = row.attempts + 1
        schedule = self.destination.retry_schedule
        if attempts >= len(schedule):
            WEBHOOK_DELIVERIES.labels(name, "exhausted").inc()
            self._log.warning(
                "webhook delivery gave up: moved to dead letters",
                msg_id=row.msg_id,
                attempts=attempts,
                status=answer.status,
                error=answer.error,
            )
            return _Outcome(
                name,
                row.msg_id,
                "exhausted",
                now,
                attempts,
                status=answer.status,
                error=answer.error,
            )
        delay = schedule[attempts]
        if answer.status in _THROTTLE_STATUSES and answer.retry_after is not None:
            # Honour the receiver, but a hostile or broken value must not park the row for ever.
            delay = min(answer.retry_after, max(schedule))
            WEBHOOK_DELIVERIES.labels(name, "throttled").inc()
        else:
            WEBHOOK_DELIVERIES.labels(name, "failed").inc()
        self._log.debug(
            "webhook delivery failed: will retry",
            msg_id=row.msg_id,
            attempt=attempts,
            status=answer.status,
            error=answer.error,
            retry_in=round(delay, 3),
        )
        return _Outcome(
            name, row.msg_id, "retry", now, attempts, now + delay, answer.status, answer.error
        )

    def _gone(self, row: Delivery, now: float) -> _Outcome:
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
        return _Outcome(name, row.msg_id, "gone", now, row.attempts, now, 410, "HTTP 410 Gone")


def _claim_due(
    outbox: Outbox, destination: Destination, limit: int, held: frozenset[str], enforce: bool
) -> tuple[list[Delivery], float | None, dict[str, int]]:
    """Return due rows, when the next one falls due, and what the bound moved to the dead
    letters (see :meth:`Outbox.evict`; only checked when ``enforce``)."""
    name = destination.name
    now = time.time()
    evicted: dict[str, int] = {}
    if enforce:
        max_pending, max_age = destination.max_pending, destination.max_age
        evicted = outbox.evict(name, now, max_pending=max_pending, max_age=max_age, exclude=held)
    per_call = destination.ordering == "per_call"
    rows = outbox.due(name, now, limit, exclude=held, per_call=per_call)
    exclude = held | {row.msg_id for row in rows}
    return rows, outbox.next_due(name, exclude=exclude, per_call=per_call), evicted
