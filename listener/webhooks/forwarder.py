"""Webhook delivery: the forwarder puts the pieces together and runs them.

Theory of operation::

    submit(event) ─► batch in memory ─► writer ─► outbox (SQLite) ◄─ CLI process
                                                    │ due rows  ▲ outcomes
                                                    ▼           │
                                  one worker per destination ─► attempts (http1, max_in_flight)

:meth:`WebhookForwarder.submit` serializes the event once (:mod:`.signing`) and hands one row
per matching destination to the batch writer (:mod:`.writer`), which commits rows and the
outcomes of finished attempts together on the outbox's own thread (:mod:`.store`). A row is
attempted only once it is committed, so a crash loses nothing that was attempted, and
redelivers (with the same ``webhook-id``) what was attempted but not yet recorded as delivered:
delivery is at-least-once, receivers deduplicate on ``webhook-id``. Each destination has its
own worker (:mod:`.worker`), woken by the commits that concern it, or handed the rows a
commit claimed for it (the shared store's outbox does that; the SQLite one does not).
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Concatenate, Final, Literal, ParamSpec, TypeVar

import structlog

from listener.core.errors import ListenerError
from listener.core.events import Event
from listener.core.httputil import USER_AGENT
from listener.webhooks.destination import DEFAULT_RETENTION, Destination
from listener.webhooks.gauges import Gauges
from listener.webhooks.http1 import Http1Pool
from listener.webhooks.outbox_rows import Delivery, DestinationStats, NewDelivery, Outcome, Take
from listener.webhooks.outbox_store import OutboxStore
from listener.webhooks.signing import encode_body, new_message_id
from listener.webhooks.store import Store
from listener.webhooks.worker import Worker
from listener.webhooks.writer import BatchWriter

__all__ = [
    "FOLLOWER_MEASURE_EVERY",
    "PRUNE_EVERY_ROUNDS",
    "DestinationView",
    "ForwarderStateError",
    "WebhookForwarder",
]

_log = structlog.get_logger(__name__)
#: Seconds between a follower's measures of the outbox every instance shares: each scans
#: the pending rows, which the leader does every ``poll_interval`` for the cluster.
FOLLOWER_MEASURE_EVERY: Final = 10.0
#: Housekeeping rounds (``poll_interval`` apart) between the leader's prunes of old records:
#: a prune of the shared outbox is a transaction of four round trips on the thread the
#: commits take turns on, and at every round (0.5 s) it took the leader's thread 9.9 ms a
#: second at 500 events/s, 11.9 ms at the longest (two instances traced), to find nothing
#: older than a retention counted in days.
PRUNE_EVERY_ROUNDS: Final = 20
_P = ParamSpec("_P")
_T = TypeVar("_T")


def _renew_and_prune(outbox: OutboxStore, before: float | None) -> None:
    # The leases of a shared store are kept first: a prune may take a while.
    outbox.renew()
    if before is not None:
        outbox.prune(before)


class ForwarderStateError(ListenerError, RuntimeError):
    """The forwarder was used before :meth:`~WebhookForwarder.start` or after it stopped."""


@dataclass(frozen=True, slots=True)
class _Running:
    """What exists between start and stop."""

    store: Store
    client: Http1Pool
    writer: BatchWriter
    housekeeper: asyncio.Task[None]


@dataclass(frozen=True, slots=True)
class DestinationView:
    """One destination as an observer (the status page) sees it, with no query of its own.

    Attributes:
        stats: the outbox figures as last measured (every ``poll_interval``); None before.
        unhealthy_for: seconds since it became unhealthy; None while healthy.
        success_ratio: the share of 2xx answers over about the last minute; None before any.
        last_error: the latest failed attempt: when it started, and what went wrong.
    """

    name: str
    stats: DestinationStats | None
    unhealthy_for: float | None
    success_ratio: float | None
    last_error: tuple[float, str] | None


class WebhookForwarder:
    """Forwards events to webhook destinations through the durable outbox.

    Lifecycle: :meth:`start`, any number of :meth:`submit` calls, :meth:`stop`. Also an async
    context manager doing the same (stopping with the default grace).

    Args:
        destinations: where to forward; names must be unique.
        outbox_path: the SQLite file (created if missing; its directory must exist). One
            forwarder per file: two would attempt the same deliveries.
        poll_interval: how often an idle worker looks for rows made due by another process
            (the CLI's replay or enable), and how often gauges and outbox bounds are checked;
            old records are pruned every :data:`PRUNE_EVERY_ROUNDS` of it.
        retention: seconds the outbox keeps attempts and delivered deliveries.
        shared_outbox: opens the outbox on its thread instead of ``outbox_path``, for the
            store several instances share (:mod:`.shared_outbox`).
        leads: whether this instance does the shared outbox's singleton work now (the
            store's leader): it alone prunes it, and measures it every ``poll_interval``;
            the others measure it every ``FOLLOWER_MEASURE_EVERY`` seconds, for their own
            status. None: always (an outbox of this instance's own).

    Raises:
        ValueError: two destinations share a name (the configuration refuses that first).
    """

    def __init__(
        self,
        destinations: Sequence[Destination],
        outbox_path: str | os.PathLike[str],
        *,
        poll_interval: float = 0.5,
        retention: float = DEFAULT_RETENTION,
        shared_outbox: Callable[[], OutboxStore] | None = None,
        leads: Callable[[], bool] | None = None,
    ) -> None:
        names = [d.name for d in destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate destination names: {', '.join(duplicates)}")
        self.destinations: tuple[Destination, ...] = tuple(destinations)
        self._path = outbox_path
        self._poll_interval = poll_interval
        self._retention = retention
        self._shared_outbox = shared_outbox
        self._leads = leads
        self._state: Literal["new", "running", "stopping", "stopped"] = "new"
        self._running: _Running | None = None
        self._workers: dict[str, Worker] = {}
        self._gauges = Gauges(names)
        self._committed = asyncio.Event()

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
        opener = self._shared_outbox
        store = await (Store.open(self._path) if opener is None else Store.open_with(opener))
        # Connections are per origin and unbounded in number: each destination's slots
        # (max_in_flight) bound them, and a hung destination cannot starve another.
        client = Http1Pool(user_agent=USER_AGENT)
        # Only the shared store's commit leases rows (the SQLite one has no round trip to
        # save): without it no commit promises rows, which would only shrink the workers'
        # own claims, and the event path skips the count of each commit's destinations.
        writer = BatchWriter(store, self._on_commit, None if opener is None else self._take)
        self._workers = {
            d.name: Worker(
                d, store, client, writer.record, self._announce_commit, self._poll_interval
            )
            for d in self.destinations
        }
        housekeeper = asyncio.create_task(self._housekeep(store), name="webhook-housekeeping")
        self._running = _Running(store, client, writer, housekeeper)
        self._state = "running"
        writer.start()
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
        running = self._running
        if self._state != "running" or running is None:
            raise ForwarderStateError(f"webhook forwarder is {self._state}, not running")
        targets = [d for d in self.destinations if d.accepts(event.name)]
        if not targets:
            return None
        # The event's stable id: its reconciled twin, or a redelivery after a restart, keeps it.
        msg_id = event.id or new_message_id()
        body = encode_body(msg_id, event)
        now = time.time()
        return running.writer.add(
            NewDelivery(
                d.name, msg_id, event.name, event.call_key, body, now, now + d.retry_schedule[0]
            )
            for d in targets
        )

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
        running.housekeeper.cancel()
        await asyncio.gather(running.housekeeper, return_exceptions=True)
        await running.writer.close()
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

    def describe(self) -> str:
        """A few words for the service status: the backlog as last measured, and health."""
        now = time.monotonic()
        unhealthy = {
            name: seconds
            for name, worker in self._workers.items()
            if (seconds := worker.health.unhealthy_for(now)) is not None
        }
        return self._gauges.describe(unhealthy)

    def views(self) -> list[DestinationView]:
        """Every destination's state from memory: cheap enough for each page load."""
        now = time.monotonic()
        stats = {entry.name: entry for entry in self._gauges.stats}
        return [
            DestinationView(
                name,
                stats.get(name),
                worker.health.unhealthy_for(now),
                worker.success_ratio,
                worker.last_error,
            )
            for name, worker in self._workers.items()
        ]

    async def inspect(
        self,
        function: Callable[Concatenate[OutboxStore, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run a read of the outbox on its thread, between the forwarder's own calls.

        Raises:
            ForwarderStateError: the forwarder is not running.
        """
        running = self._running
        if self._state != "running" or running is None:
            raise ForwarderStateError(f"webhook forwarder is {self._state}, not running")
        return await running.store.run(function, *args, **kwargs)

    async def change(
        self,
        function: Callable[Concatenate[OutboxStore, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run a change to the outbox (a replay, a pause, an enable) as :meth:`inspect`
        does, then wake every worker and measure again, so that it shows and acts at once
        rather than at the next ``poll_interval``."""
        result = await self.inspect(function, *args, **kwargs)
        for worker in self._workers.values():
            worker.wake.set()
        if self._running is not None:
            await self._gauges.measure(self._running.store, force=True)
        return result

    async def _housekeep(self, store: Store) -> None:
        """Every ``poll_interval`` until cancelled: keep the outbox's claims
        (:meth:`~.outbox_store.OutboxStore.renew`) and, while this instance leads, measure
        it and, every PRUNE_EVERY_ROUNDS, prune old records (a follower measures it less
        often)."""
        measured = -math.inf
        rounds = 0
        while True:
            leads = self._leads is None or self._leads()
            now = time.monotonic()
            if leads or now - measured >= FOLLOWER_MEASURE_EVERY:
                measured = now
                await self._gauges.measure(store)
            # The first round as leader prunes, then every PRUNE_EVERY_ROUNDS.
            rounds = rounds + 1 if leads else 0
            prunes = leads and rounds % PRUNE_EVERY_ROUNDS == 1
            before = time.time() - self._retention if prunes else None
            try:
                await store.run(functools.partial(_renew_and_prune, before=before))
            except Exception:
                _log.exception("webhook outbox renewal or prune failed")
            await asyncio.sleep(self._poll_interval)

    def _announce_commit(self) -> None:
        """Wake every :meth:`wait_committed` caller."""
        self._committed.set()
        self._committed = asyncio.Event()

    def _take(self, rows: Sequence[NewDelivery]) -> Take:
        """What the next commit may claim of ``rows`` for the workers: as many as each would
        claim now."""
        limits = {}
        for name, count in Counter(row.destination for row in rows).items():
            worker = self._workers[name]
            room = worker.room()
            # Commits are one at a time: this one's promise replaces a failed one's.
            worker.promise(min(room, count))
            if room > 0:
                limits[name] = room
        per_call = frozenset(
            name for name in limits if self._workers[name].destination.ordering == "per_call"
        )
        return Take(time.time(), limits, per_call)

    def _on_commit(
        self, rows: list[NewDelivery], outcomes: list[Outcome], taken: list[Delivery]
    ) -> None:
        """Hand the workers the rows the commit claimed for them, wake those with other new
        rows, and the commit's watchers."""
        new = Counter(row.destination for row in rows)
        for name in new:
            self._workers[name].promise(0)
        handed: dict[str, list[Delivery]] = {}
        for row in taken:
            handed.setdefault(row.destination, []).append(row)
        for name, given in handed.items():
            self._workers[name].take(given)
        for name, count in new.items():
            if count > len(handed.get(name, ())):
                # Some of them are the outbox's to hand out: claimed by the next look.
                worker = self._workers[name]
                worker.wake.set()
                given_ids = {row.msg_id for row in handed.get(name, ())}
                worker.hold_back(
                    row.call_key
                    for row in rows
                    if row.destination == name
                    and row.call_key is not None
                    and row.msg_id not in given_ids
                )
        for outcome in outcomes:
            self._workers[outcome.destination].settle(outcome)
        self._announce_commit()
