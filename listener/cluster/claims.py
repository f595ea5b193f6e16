"""Cluster-wide once-only handling: the first instance to claim (event, handler) runs it.

Every instance hears every event (each holds its own socket), and every instance's
dispatcher asks :meth:`Claims.claim` before a handler's ``handle()``. The first to ask
records the event (its stable id, once: ``ON CONFLICT DO NOTHING``, with what it takes to
hand it to a handler again) and takes the claim for that handler; the others are told no and
skip it. Two instances asking at once are ordered by the primary keys: the second insert
waits for the first's commit, then does nothing.

A claim is held under a lease (the handler's timeout plus ``grace``) until :meth:`done` marks
it; an instance that dies mid-handle leaves it unmarked, and once the lease has passed the
leader finds it (:meth:`expired`) and hands the event to that handler again: its claim then
takes the lapsed one over. Marks are written in batches, a few times a second: a mark lost
to a crash only means the handler may run once more after the lease (at least once, never
never).

Single statements in autocommit, no session state: PgBouncer in transaction mode is fine.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final, LiteralString

import orjson
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from listener.cluster.database import Abandoned, StoreError, bounded, describe
from listener.cluster.url import StoreUrl
from listener.core.events import Event

__all__ = ["Claims"]

_log = structlog.get_logger(__name__)

# A batch of claims in one statement: the events' rows first (once each), then the claims,
# or the takeover of lapsed ones. The claims' foreign key sees the events this statement
# inserts. Both inserts go in key order, in every instance: two batches that share keys wait
# for each other in one order, never in a cycle.
_CLAIM: Final = """
WITH asked AS (
    SELECT * FROM unnest(
        %(ids)s::text[], %(names)s::text[], %(topics)s::text[], %(payloads)s::text[],
        %(received)s::float8[], %(origins)s::text[], %(sizes)s::int[], %(handlers)s::text[],
        %(leases)s::float8[]
    ) AS asked (id, name, topic, payload, received_at, origin, size, handler, lease)
),
recorded AS (
    INSERT INTO sippet_events
        (id, name, topic, payload, received_at, origin, size, first_by)
    SELECT DISTINCT ON (id)
        id, name, topic, payload::json, received_at, origin, size, %(holder)s
    FROM asked ORDER BY id
    ON CONFLICT (id) DO NOTHING
)
INSERT INTO sippet_claims AS claim (event_id, handler, holder, lease_until)
SELECT id, handler, %(holder)s, now() + make_interval(secs => lease)
FROM asked ORDER BY id, handler
ON CONFLICT (event_id, handler) DO UPDATE
SET holder = excluded.holder, lease_until = excluded.lease_until, claimed_at = now()
WHERE claim.done_at IS NULL AND claim.lease_until < now()
RETURNING event_id, handler
"""
_DONE: Final = """
UPDATE sippet_claims SET done_at = now()
WHERE (event_id, handler) IN (SELECT * FROM unnest(%(ids)s::text[], %(handlers)s::text[]))
"""
_EXPIRED: Final = """
SELECT e.name, e.payload, e.topic, e.received_at, e.size, e.id, e.origin, c.handler
FROM sippet_claims c JOIN sippet_events e ON e.id = c.event_id
WHERE c.done_at IS NULL AND c.lease_until < now()
ORDER BY c.lease_until
LIMIT %(limit)s
"""
# An event, its handler, the lease asked for and where the answer goes.
_Asked = tuple[Event, str, float, "asyncio.Future[bool]"]
# Seconds between writes of the done marks.
_FLUSH_EVERY: Final = 0.1


def _batch_params(batch: list[_Asked], holder: str) -> dict[str, Any]:
    events = [asked[0] for asked in batch]
    return {
        "ids": [event.id for event in events],
        "names": [event.name for event in events],
        "topics": [event.topic for event in events],
        "payloads": [orjson.dumps(event.payload).decode() for event in events],
        "received": [event.received_at for event in events],
        "origins": [event.origin for event in events],
        "sizes": [event.size for event in events],
        "handlers": [asked[1] for asked in batch],
        "leases": [asked[2] for asked in batch],
        "holder": holder,
    }


class Claims:
    """The claims of one instance, through its pool.

    Args:
        pool: connections to the migrated store.
        url: the store's URL (for error messages).
        holder: this instance's name, written with each event and claim it takes.
        timeout: seconds a claim may take (a connection from the pool and the round trip).
        grace: seconds a claim's lease outlasts the handler's timeout.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        url: StoreUrl,
        holder: str,
        timeout: float = 5.0,
        grace: float = 15.0,
    ) -> None:
        self._pool = pool
        self._url = url
        self._holder = holder
        self._timeout = timeout
        self._grace = grace
        self.abandoned = Abandoned()
        self._done: list[tuple[str, str]] = []
        # Until when (loop time) claims fail at once: the store just failed to answer one.
        self._down_until = 0.0
        # Claims asked and not yet sent; the statements in flight; whether a send is due.
        self._asked: list[_Asked] = []
        self._sending: set[asyncio.Future[None]] = set()
        self._scheduled = False

    @property
    def down(self) -> bool:
        """Whether the store failed to answer the latest claim tried."""
        return self._down_until > 0.0

    def answering(self) -> None:
        """The store answered (a claim, or something else: a migration): try claims again at
        once."""
        if self.down:
            _log.info("the store answers claims again")
        self._down_until = 0.0

    async def claim(self, event: Event, handler: str, lease: float) -> bool:
        """Whether this instance is the one to run ``handler`` on ``event``, for the next
        ``lease`` seconds (its timeout) plus the grace.

        After a claim the store did not answer, the next ones fail at once for ``timeout``
        seconds, then one is tried again: while the store is down every event costs one
        wait per ``timeout``, not one each.

        Raises:
            StoreError: the store did not answer; the caller decides (the dispatcher runs
                the handler: better twice than never).
        """
        loop = asyncio.get_running_loop()
        if self._down_until > loop.time():
            raise StoreError(self._url.key, f"{self._url}: not answering; retried shortly")
        answer: asyncio.Future[bool] = loop.create_future()
        self._asked.append((event, handler, lease + self._grace, answer))
        self._send_soon()
        return await answer

    def _send_soon(self) -> None:
        """Send what was asked in one statement, from the next turn of the loop (so that the
        workers woken in this one join it), while fewer than the pool's connections are busy;
        under load, claims wait and go out together."""
        # One statement per claim did 1,700 claims/s from one instance (8 workers, pool 4,
        # loopback, busy 2-core machine); batched, 5,100; two instances on the same events,
        # 940 -> 1,700-4,400 events/s (an ad-hoc run of both side by side, not in bench/).
        if self._asked and len(self._sending) < self._pool.max_size and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send_now)

    def _send_now(self) -> None:
        self._scheduled = False
        batch, self._asked = self._asked, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Future[None]) -> None:
        self._sending.discard(task)
        self._send_soon()

    async def _send(self, batch: list[_Asked]) -> None:
        # One claim per (event, handler) in a statement: a second would make the takeover
        # update the same row twice (an error); it is ours already, so it is told no.
        first: dict[tuple[str, str], _Asked] = {}
        for asked in batch:
            first.setdefault((asked[0].id, asked[1]), asked)
        params = _batch_params(list(first.values()), self._holder)
        loop = asyncio.get_running_loop()
        try:
            rows = await bounded(self._fetch(_CLAIM, params), self._timeout, self.abandoned)
        except (psycopg.Error, TimeoutError) as exc:
            if not self.down:
                _log.warning("the store stopped answering claims", error=self._url.scrub(str(exc)))
            self._down_until = loop.time() + self._timeout
            error = describe(self._url, exc)
            for *_, answer in batch:
                if not answer.done():
                    answer.set_exception(error)
            return
        self.answering()
        won = {(event_id, handler) for event_id, handler in rows}
        for key, asked in first.items():
            answer = asked[3]
            if not answer.done():
                answer.set_result(key in won)
        for asked in batch:
            if not asked[3].done():
                asked[3].set_result(False)

    def done(self, event: Event, handler: str) -> None:
        """``handler`` is done with ``event`` here (whatever its outcome): written soon."""
        self._done.append((event.id, handler))

    async def expired(self, limit: int = 500) -> list[tuple[Event, str]]:
        """The events whose claim lapsed unfinished (its holder died mid-handle), with the
        handler each is owed to, the oldest first.

        Raises:
            StoreError: the store failed or did not answer.
        """
        try:
            rows = await bounded(
                self._fetch(_EXPIRED, {"limit": limit}), self._timeout, self.abandoned
            )
        except (psycopg.Error, TimeoutError) as exc:
            raise describe(self._url, exc) from None
        return [
            (
                Event.create(name, payload, topic, received_at, size, id=id_, origin=origin),
                handler,
            )
            for name, payload, topic, received_at, size, id_, origin, handler in rows
        ]

    async def run(self) -> None:
        """Write the done marks a few times a second, until cancelled."""
        while True:
            await asyncio.sleep(_FLUSH_EVERY)
            try:
                await self.flush()
            except StoreError as exc:
                _log.warning("cannot mark claims done; they are kept for later", error=str(exc))

    async def flush(self) -> None:
        """Write the done marks taken so far.

        Raises:
            StoreError: they could not be written; they are kept for the next flush.
        """
        if not self._done:
            return
        marks, self._done = self._done, []
        params = {"ids": [m[0] for m in marks], "handlers": [m[1] for m in marks]}
        try:
            await bounded(self._execute(_DONE, params), self._timeout, self.abandoned)
        except (psycopg.Error, TimeoutError) as exc:
            self._done[:0] = marks
            raise describe(self._url, exc) from None

    async def close(self) -> None:
        """Let the claims in flight end, write the last marks (if the store answers), then
        end the queries given up on."""
        if self._sending:
            await asyncio.wait(self._sending, timeout=self._timeout)
        with contextlib.suppress(StoreError):
            await self.flush()
        await self.abandoned.close()

    async def _fetch(self, query: LiteralString, params: dict[str, Any]) -> list[Any]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(query, params)
            return await cursor.fetchall()

    async def _execute(self, query: LiteralString, params: dict[str, Any]) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(query, params)
