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
takes the lapsed one over (and counts the takeover). An instance restarted on the same
state dir does not wait for that: it gives back what its previous start left claimed
(:meth:`release`), and the leader's next sweep hands it out. Marks are written as handlers
end (those of one turn of the loop, and those taken while the previous write was out, in one
statement); one the store has not taken within ``_KEEP_AFTER`` is kept on disk until it
does, so that a kill while the store is away forgets none. A kill between a handler's end
and its mark's arrival in the store is what remains: the handler may run once more (at least
once, never never).

A claim the store does not answer (within ``timeout``) goes into the local :class:`Spool`
and the handler waits: neither run (another instance may run it too) nor dropped. From then
on claims go straight to the spool without asking the store, and so does whatever comes for
a handler with entries spooled (it goes behind them: each handler sees its events in the
order they were received). For a handler that runs one event at a time, claims are decided
in the order they were asked: one answered while an earlier claim of its handler is still
out waits for that one, and goes into the spool behind it if it was spooled, won or not
(won, it stays this instance's). :meth:`drain` hands the entries back to their handlers,
oldest first, a batch at a time, once the store answers again (retrying every
``timeout``): each is then claimed as its handler's queue takes it, a claim this instance
holds already is leased anew, and it leaves the spool once its claim was answered, won or
lost, unless a claim before it in the round was not (then it waits for the next round).

Single statements in autocommit, no session state: PgBouncer in transaction mode is fine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final, LiteralString

import orjson
import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from listener.cluster.database import (
    Abandoned,
    StoreError,
    bounded,
    conflict_attempts,
    describe,
)
from listener.cluster.spool import Mark, Spool, Spooled, SpoolError
from listener.cluster.url import StoreUrl
from listener.core.events import Event

__all__ = ["ClaimRefused", "Claims", "Redeliver"]

# Hands an event to the named handler again (on this instance).
Redeliver = Callable[[Event, str], Awaitable[None]]

_log = structlog.get_logger(__name__)

# A batch of claims in one statement: the events' rows first (once each), then the claims,
# or the takeover of lapsed ones. The claims' foreign key sees the events this statement
# inserts. Both inserts go in key order, in every instance: two batches that share keys wait
# for each other in one order, never in a cycle. Events and claims go as two JSON arrays
# (orjson), not ten arrays to unnest: 10,000 claims (two handlers an event, batches of 100)
# took 33-36 µs of this process's CPU each, psycopg adapting the arrays, and 15 µs now; the
# batches' wall time went from 0.81 to 0.4 s (local server, an ad-hoc run of the two).
_CLAIMING: Final = """
WITH asked AS (
    SELECT * FROM json_to_recordset(%(claims)s::json)
        AS asked (id text, handler text, lease float8, mine bool)
),
recorded AS (
    INSERT INTO sippet_events
        (id, name, topic, payload, received_at, origin, size, first_by)
    SELECT id, name, topic, payload, received_at, origin, size, %(holder)s
    FROM json_to_recordset(%(events)s::json) AS heard (
        id text, name text, topic text, payload json, received_at float8, origin text,
        size int
    )
    ORDER BY id
    ON CONFLICT (id) DO NOTHING
),
taken AS (
    INSERT INTO sippet_claims AS claim (event_id, handler, holder, lease_until)
    SELECT id, handler, %(holder)s, now() + make_interval(secs => lease)
    FROM asked ORDER BY id, handler
    ON CONFLICT (event_id, handler) DO UPDATE
    SET holder = excluded.holder, lease_until = excluded.lease_until, claimed_at = now(),
        takeovers = claim.takeovers + 1
    WHERE claim.done_at IS NULL AND claim.lease_until < now()
    RETURNING event_id, handler
)"""
_CLAIM: Final = _CLAIMING + "\nSELECT event_id, handler FROM taken\n"
# A spooled claim (``mine``) may have been taken already, by this instance: the statement
# that did not answer in time may have reached the store and committed all the same (a
# partition, or a connection found as the store came back), or its answer came while an
# earlier claim of its handler was not answered, and it went into the spool behind that
# one. Such a claim, unfinished and still leased, is this instance's to run, under a lease
# renewed from now: what it had left may not cover the handler after its time in the
# spool. One whose lease passed is the takeover's (``taken``), never both: each reads the
# table as it was before this statement. Locked in key order, as the inserts and the marks.
_RECLAIM: Final = (
    _CLAIMING  # noqa: S608 (two constants, nothing interpolated)
    + """,
renewing AS (
    SELECT c.event_id, c.handler, a.lease
    FROM sippet_claims c JOIN asked a ON (a.id, a.handler) = (c.event_id, c.handler)
    WHERE a.mine AND c.holder = %(holder)s AND c.done_at IS NULL AND c.lease_until >= now()
    ORDER BY c.event_id, c.handler
    FOR UPDATE OF c
),
renewed AS (
    UPDATE sippet_claims c SET lease_until = now() + make_interval(secs => r.lease)
    FROM renewing r WHERE (c.event_id, c.handler) = (r.event_id, r.handler)
    RETURNING c.event_id, c.handler
)
SELECT event_id, handler FROM taken
UNION ALL
SELECT event_id, handler FROM renewed
"""
)
# The marks lock their rows in key order, as the claims' inserts do: marked in whatever order
# the plan chose, they deadlocked with another instance's claim of the same events (3 runs in
# 5 of two instances on 20,000 events; in key order, none in 5).
_DONE: Final = """
WITH marked AS (
    SELECT c.event_id, c.handler FROM sippet_claims c
    JOIN unnest(%(ids)s::text[], %(handlers)s::text[]) AS m (event_id, handler)
        USING (event_id, handler)
    ORDER BY c.event_id, c.handler
    FOR UPDATE OF c
)
UPDATE sippet_claims c SET done_at = now()
FROM marked WHERE (c.event_id, c.handler) = (marked.event_id, marked.handler)
"""
# A claim asked a while before its handler starts (see ``fresh_for``), extended to cover it;
# not once its lease has passed: the leader's sweep may have handed that event to this
# instance again already, whose copy's claim then took it over under the same holder.
_RENEW: Final = """
UPDATE sippet_claims SET lease_until = now() + make_interval(secs => %(lease)s)
WHERE event_id = %(id)s AND handler = %(handler)s AND holder = %(holder)s AND done_at IS NULL
AND lease_until > now()
"""
# Claims won for queued events that a stop abandons: they lapse now, so that the other
# instances' sweep hands them out at once instead of a lease later.
_GIVE_BACK: Final = """
UPDATE sippet_claims SET lease_until = now()
WHERE event_id = ANY(%(ids)s::text[]) AND handler = %(handler)s AND holder = %(holder)s
AND done_at IS NULL
"""
# The unfinished claims of an instance that was killed: they lapse now.
_RELEASE: Final = """
UPDATE sippet_claims SET lease_until = now()
WHERE holder = ANY(%(previous)s::text[]) AND done_at IS NULL AND lease_until > now()
"""
_EXPIRED: Final = """
SELECT e.name, e.payload, e.topic, e.received_at, e.size, e.id, e.origin, c.handler
FROM sippet_claims c JOIN sippet_events e ON e.id = c.event_id
WHERE c.done_at IS NULL AND c.lease_until < now()
ORDER BY c.lease_until
LIMIT %(limit)s
"""
# An event, its handler, the lease asked for, whether it comes from the spool, and where the
# answer goes.
_Asked = tuple[Event, str, float, bool, "asyncio.Future[bool]"]
# What the store answers to a claim it will never take (the others mean it did not answer).
_REFUSALS: Final = (
    psycopg.DataError,
    psycopg.IntegrityError,
    psycopg.NotSupportedError,
    psycopg.ProgrammingError,
)
# Seconds between retries of the done marks the store did not take (and of those kept on
# disk); the others go out at once.
_FLUSH_EVERY: Final = 0.1
# Spooled entries handed back at a time: what the drain holds in memory.
_DRAIN_BATCH: Final = 500
# Seconds a done mark waits for the store before it is kept on disk as well: the store
# answers within a few ms when it is well (so the disk is spared), and a kill after this
# forgets nothing.
_KEEP_AFTER: Final = 0.25
# Done marks kept on disk sent to the store at a time (a long outage leaves many).
_MARKS_BATCH: Final = 5000


class ClaimRefused(StoreError):
    """The store answered a claim with an error about the claim itself (its data, the
    schema), not about reaching the store."""


def _batch_params(batch: list[_Asked], holder: str) -> dict[str, Any]:
    # An event is asked for once per handler: it goes once.
    events: dict[str, dict[str, Any]] = {}
    claims = []
    for event, handler, lease, mine, _ in batch:
        if event.id not in events:
            events[event.id] = {
                "id": event.id,
                "name": event.name,
                "topic": event.topic,
                "payload": event.payload,
                "received_at": event.received_at,
                "origin": event.origin,
                "size": event.size,
            }
        claims.append({"id": event.id, "handler": handler, "lease": lease, "mine": mine})
    return {
        "events": orjson.dumps(list(events.values())).decode(),
        "claims": orjson.dumps(claims).decode(),
        "holder": holder,
    }


async def _after(before: asyncio.Future[None] | None) -> None:
    """Wait until the claim asked before this one (if any) is decided."""
    if before is not None and not before.done():
        # Shielded: a claim cancelled here must not cancel the one before it.
        await asyncio.shield(before)


class Claims:
    """The claims of one instance, through its pool, with its spool for when the store does
    not answer.

    Args:
        pool: connections to the migrated store.
        url: the store's URL (for error messages).
        holder: this instance's name, written with each event and claim it takes.
        spool: where the claims the store does not answer wait.
        timeout: seconds a claim may take (a connection from the pool and the round trip),
            and between attempts at the spooled ones while the store does not answer.
        grace: seconds a claim's lease outlasts the handler's timeout.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        url: StoreUrl,
        holder: str,
        spool: Spool,
        timeout: float = 5.0,
        grace: float = 15.0,
    ) -> None:
        self._pool = pool
        self._url = url
        self._holder = holder
        self.spool = spool
        self._timeout = timeout
        self._grace = grace
        self.abandoned = Abandoned()
        self._done: list[Mark] = []
        # The write of the marks taken just now, if one is due; one write at a time.
        self._marking: asyncio.Future[None] | None = None
        self._flushing = asyncio.Lock()
        # Marks on their way to disk (_keep_late).
        self._keeping: set[asyncio.Future[None]] = set()
        # Whether the store failed to answer the latest claim, and from when (loop time) the
        # spooled ones are tried again.
        self._down = False
        self._retry_at = 0.0
        # Whether the spooled claims handed back may go to the store: from each round of
        # drain() until one of them (or any claim) is not answered. The ones after it then
        # stay in the spool, so that none overtakes it.
        self._trying = False
        # Claims asked and not yet sent; the statements in flight; whether a send is due.
        self._asked: list[_Asked] = []
        self._sending: set[asyncio.Future[None]] = set()
        self._scheduled = False
        # The spooled entries handed back by drain() and not yet answered; set on each answer.
        self._released: dict[tuple[str, str], Spooled] = {}
        self._settled = asyncio.Event()
        # The latest claim asked for each handler, set once it is decided.
        self._deciding: dict[str, asyncio.Future[None]] = {}

    @property
    def down(self) -> bool:
        """Whether the store failed to answer the latest claim tried."""
        return self._down

    def answering(self) -> None:
        """The store answered (a claim, or something else: a migration): send claims to it
        again."""
        if self._down:
            _log.info("the store answers claims again", spooled=self.spool.events)
        self._down = False

    def not_answering(self) -> None:
        """The store did not answer (a claim, or the migration at start): spool claims
        without asking it, and try the spooled ones again in ``timeout`` seconds."""
        self._down = True
        self._trying = False
        self._retry_at = asyncio.get_running_loop().time() + self._timeout

    async def claim(
        self, event: Event, handler: str, lease: float, *, in_order: bool = False
    ) -> bool | None:
        """Whether this instance is the one to run ``handler`` on ``event``, for the next
        ``lease`` seconds (its timeout) plus the grace; None when the claim went into the
        spool, or stayed there (the store did not answer it, or one asked before it for
        ``handler``): :meth:`drain` hands it back to ``handler``.

        Raises:
            ClaimRefused: the store refused the claim itself (it will not be asked again).
            SpoolError: the store did not answer and the spool failed too.

        Either way the caller decides (the dispatcher runs the handler: better twice than
        never).

        With ``in_order`` (a handler that runs one event at a time, for which order shows),
        claims are decided in the order asked: one answered before an earlier claim of its
        handler (on another connection) waits for that one's fate, so that neither the spool
        nor the handler sees them swapped. Its worker waits for the earlier one anyway, so
        this costs it nothing; a handler running many at once would wait for the slowest of
        them (a claim held up by another instance's lock on its row), and its events start
        out of order whatever the claims do.
        """
        if not in_order:
            return await self._claim(event, handler, lease, None)
        before = self._deciding.get(handler)
        decided: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._deciding[handler] = decided
        try:
            return await self._claim(event, handler, lease, before)
        finally:
            decided.set_result(None)
            if self._deciding.get(handler) is decided:
                del self._deciding[handler]

    async def _claim(
        self, event: Event, handler: str, lease: float, before: asyncio.Future[None] | None
    ) -> bool | None:
        released = self._released.get((event.id, handler)) if self._released else None
        if released is None:
            if self._down or self.spool.holds(handler):
                await self._spool_after(before, event, handler, lease)
                return None
        elif not self._trying:
            self._settle(released, answered=False)
            return None
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._asked.append((event, handler, lease + self._grace, released is not None, answer))
        self._send_soon()
        try:
            won = await answer
        except ClaimRefused:
            if released is not None:
                self._settle(released, answered=True)
            # Run at once by the dispatcher: not before the claims asked ahead of it.
            await _after(before)
            raise
        except StoreError:
            if released is None:
                await self._spool_after(before, event, handler, lease)
            else:
                self._settle(released, answered=False)
            return None
        await _after(before)
        if released is not None:
            if won and not self._trying:
                # A claim not answered since this round began (this handler's or another's)
                # keeps the rest of the round in the spool: this one too, won or not, so
                # that it does not overtake an earlier one of its handler. Won, it is this
                # instance's still, and the next round's reclaim renews it (_RECLAIM).
                self._settle(released, answered=False)
                return None
            self._settle(released, answered=True)
        elif won and self.spool.holds(handler):
            # The same for one asked before an earlier claim of its handler was spooled.
            await self.spool.add(event, handler, lease)
            return None
        return won

    async def _spool_after(
        self, before: asyncio.Future[None] | None, event: Event, handler: str, lease: float
    ) -> None:
        """Spool ``handler``'s turn at ``event`` once the claim asked before it is decided;
        at once if cancelled meanwhile (a stop): a claim the store did not take is kept
        either way."""
        try:
            await _after(before)
        finally:
            await self.spool.add(event, handler, lease)

    @property
    def fresh_for(self) -> float:
        """Seconds after it was asked that a won claim still covers its handler's whole
        timeout: half the grace its lease has beyond the timeout."""
        return self._grace / 2

    async def renew(self, event: Event, handler: str, lease: float) -> bool:
        """Extend this instance's unfinished claim of ``handler`` on ``event`` to ``lease``
        seconds plus the grace from now; False when its lease has passed (the leader's sweep
        hands the event out again, to whichever instance) or another instance took it over.
        True at once while the store does not answer: the claim was won, and the handler
        runs (better twice than never).

        Raises:
            StoreError: the store failed or did not answer.
        """
        if self._down:
            return True
        params = {
            "id": event.id,
            "handler": handler,
            "holder": self._holder,
            "lease": lease + self._grace,
        }
        try:
            changed = await bounded(self._execute(_RENEW, params), self._timeout, self.abandoned)
        except (psycopg.Error, TimeoutError) as exc:
            raise describe(self._url, exc) from None
        return changed == 1

    async def give_back(self, ids: list[str], handler: str) -> None:
        """Let this instance's unfinished claims of ``handler`` on the events of ``ids`` lapse
        now (they were abandoned before their handler started).

        Raises:
            StoreError: the store failed or did not answer (they lapse a lease later).
        """
        if self._down:
            # Not asked of a store known not to answer: a stop would wait its timeout.
            return
        params = {"ids": ids, "handler": handler, "holder": self._holder}
        try:
            await bounded(self._execute(_GIVE_BACK, params), self._timeout, self.abandoned)
        except (psycopg.Error, TimeoutError) as exc:
            raise describe(self._url, exc) from None

    def _settle(self, entry: Spooled, *, answered: bool) -> None:
        """A spooled entry handed back is done with: out of the spool if ``answered``,
        else left there for the next attempt."""
        if self._released.pop((entry.event.id, entry.handler), None) is None:
            return
        if answered:
            self.spool.remove(entry)
        self._settled.set()

    async def drain(self, redeliver: Redeliver) -> None:
        """Hand the spooled entries to ``redeliver``, oldest first, ``_DRAIN_BATCH`` at a
        time, each batch once the previous one was answered, until cancelled. While the store
        does not answer, a batch is tried every ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            await self.spool.wait()
            if self._down and (delay := self._retry_at - loop.time()) > 0:
                await asyncio.sleep(delay)
            batch = await self.spool.oldest(_DRAIN_BATCH)
            if not batch:
                # Asked for and not written: the write failed, or is still going.
                await asyncio.sleep(self._timeout)
                continue
            self._released = {(entry.event.id, entry.handler): entry for entry in batch}
            self._trying = True
            for entry in batch:
                await redeliver(entry.event, entry.handler)
            # A worker takes its next event within twice the handler's timeout (its handle()
            # then its on_error hook), and claims it first.
            await self._until_settled(2 * max(entry.lease for entry in batch) + self._timeout)
            if not self.spool.entries:
                _log.info("the spooled claims are all answered")

    async def _until_settled(self, stall: float) -> None:
        """Wait until every entry handed back was answered, or none was for ``stall``
        seconds: their handler did not take them (``on_full = "drop"`` with a full queue, a
        filter that changed its mind). They leave the spool, dropped as that handler drops
        what it does not take, rather than holding up everything behind them."""
        while self._released:
            self._settled.clear()
            try:
                async with asyncio.timeout(stall):
                    await self._settled.wait()
            except TimeoutError:
                _log.warning(
                    "spooled claims handed back were not taken by their handler; dropped",
                    entries=len(self._released),
                    handlers=sorted({entry.handler for entry in self._released.values()}),
                )
                for entry in list(self._released.values()):
                    self._settle(entry, answered=True)

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
        unique = list(first.values())
        try:
            params = _batch_params(unique, self._holder)
        except (TypeError, orjson.JSONEncodeError) as exc:
            # A payload JSON cannot carry (an integer past 64 bits): no attempt would fare
            # better, and an answer never set would hold up its handler's later claims.
            refused = ClaimRefused(self._url.key, f"cannot send the claims: {exc}")
            _log.error("claims refused before sending", error=str(refused), claims=len(batch))
            for *_, answer in batch:
                answer.set_exception(refused)
            return
        query = _RECLAIM if any(mine for _, _, _, mine, _ in unique) else _CLAIM
        try:
            rows = await self._fetch_retrying_conflicts(query, params)
        except (psycopg.Error, TimeoutError) as exc:
            error: StoreError = describe(self._url, exc)
            if isinstance(exc, _REFUSALS):
                # The store answered, and no later attempt would fare better.
                _log.error("the store refused claims", error=str(error), claims=len(batch))
                error = ClaimRefused(error.key, error.problem)
            else:
                if not self._down:
                    _log.warning(
                        "the store stopped answering claims; spooling them", error=str(error)
                    )
                self.not_answering()
            for *_, answer in batch:
                if not answer.done():
                    answer.set_exception(error)
            return
        self.answering()
        won = {(event_id, handler) for event_id, handler in rows}
        for key, asked in first.items():
            answer = asked[4]
            if not answer.done():
                answer.set_result(key in won)
        for asked in batch:
            if not asked[4].done():
                asked[4].set_result(False)

    def done(self, event: Event, handler: str) -> None:
        """``handler`` is done with ``event`` here (whatever its outcome): written soon. A
        spooled entry handed back for a handler this instance does not have leaves the
        spool this way."""
        if not self._done and self._flushing.locked():
            # Behind a write that is out (and may hang): these marks are on disk if still
            # here in _KEEP_AFTER. With no write out, the next one keeps them itself.
            asyncio.get_running_loop().call_later(_KEEP_AFTER, self._keep_late, self._done)
        self._done.append((event.id, handler))
        if self._released and (entry := self._released.get((event.id, handler))):
            self._settle(entry, answered=True)
        if self._marking is None and not self._down:
            self._marking = asyncio.ensure_future(self._mark_soon())

    async def _mark_soon(self) -> None:
        """Write the marks taken in this turn of the loop (and those taken while the previous
        write was out) in one statement: a kill between a handler's end and its mark is what
        may run it twice, and a mark sent at once shrinks that window from ~50 ms on average
        (a write every 0.1 s) to the store's round trip."""
        written = False
        try:
            await asyncio.sleep(0)
            # Not answered: the retries (and their warnings) are run()'s.
            with contextlib.suppress(StoreError):
                await self.flush()
                written = True
        finally:
            self._marking = None
        if written and self._done and not self._down:
            # Taken while that write was out: they go now, not at run()'s next turn.
            self._marking = asyncio.ensure_future(self._mark_soon())

    def _keep_late(self, waiting: list[Mark]) -> None:
        """Marks still waiting for a write (behind one the store is slow to answer, or
        while it is away) go to disk, and from there to the next write."""
        if waiting is self._done and waiting:
            self._done = []
            keeping = asyncio.ensure_future(self._keep_back(waiting))
            self._keeping.add(keeping)
            keeping.add_done_callback(self._keeping.discard)

    async def _keep_back(self, marks: list[Mark]) -> None:
        self._done[:0] = await self._keep(marks)

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
        """Write the done marks the store did not take at once, and those kept on disk, ten
        times a second, until cancelled."""
        while True:
            await asyncio.sleep(_FLUSH_EVERY)
            try:
                await self.flush()
            except StoreError as exc:
                _log.warning("cannot mark claims done; they are kept for later", error=str(exc))

    async def flush(self) -> None:
        """Write the done marks taken so far, and those kept on disk.

        A mark the store has not taken within ``_KEEP_AFTER`` (at once while it does not
        answer claims) is kept on disk too, until the store has it: a kill meanwhile, or a
        stop, does not forget it.

        Raises:
            StoreError: they could not be written; they are kept for the next flush.
        """
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        fresh, self._done = self._done, []
        try:
            if fresh and self._down:
                fresh = await self._keep(fresh)
            kept = await self._kept()
            if not fresh and not kept:
                return
            marks = fresh + kept
            params = {"ids": [m[0] for m in marks], "handlers": [m[1] for m in marks]}
            write = asyncio.ensure_future(
                bounded(self._execute(_DONE, params), self._timeout, self.abandoned)
            )
            try:
                if fresh:
                    await asyncio.wait((write,), timeout=_KEEP_AFTER)
                    if not write.done():
                        kept += fresh
                        fresh = await self._keep(fresh)
                await write
            except (psycopg.Error, TimeoutError) as exc:
                fresh = await self._keep(fresh)
                raise describe(self._url, exc) from None
            finally:
                write.cancel()
            fresh = []
            if kept:
                try:
                    await self.spool.drop(kept)
                except SpoolError as exc:
                    _log.warning("cannot forget done marks the store has", error=str(exc))
        finally:
            # Whatever is neither in the store nor on disk (a failure, a cancellation) is
            # written next time.
            self._done[:0] = fresh

    async def release(self, previous: list[str]) -> int:
        """Give back the claims ``previous`` (this instance's names at its earlier starts,
        killed before they ended them) left unfinished, once the marks kept on disk are in
        the store: they lapse now, not a lease later, and the leader's next sweep hands
        them out again. Return how many were given back.

        Raises:
            StoreError: the store failed or did not answer (call again).
        """
        while self.spool.marks:
            before = self.spool.marks
            await self.flush()
            if self.spool.marks >= before:
                # The file cannot forget them: they are in the store all the same.
                break
        try:
            return await bounded(
                self._execute(_RELEASE, {"previous": previous}), self._timeout, self.abandoned
            )
        except (psycopg.Error, TimeoutError) as exc:
            raise describe(self._url, exc) from None

    async def _keep(self, marks: list[Mark]) -> list[Mark]:
        """Keep ``marks`` on disk; return those it could not (they stay in memory)."""
        if not marks:
            return marks
        try:
            await self.spool.keep(marks)
        except SpoolError as exc:
            _log.error("cannot keep done marks on disk", error=str(exc), marks=len(marks))
            return marks
        return []

    async def _kept(self) -> list[Mark]:
        if not self.spool.marks:
            return []
        try:
            return await self.spool.kept(_MARKS_BATCH)
        except SpoolError as exc:
            _log.warning("cannot read the done marks kept on disk", error=str(exc))
            return []

    async def close(self) -> None:
        """Let the claims in flight end, write the last marks (if the store answers), then
        end the queries given up on."""
        if self._sending:
            await asyncio.wait(self._sending, timeout=self._timeout)
        if self._marking is not None:
            self._marking.cancel()
        if self._keeping:
            await asyncio.wait(self._keeping)
        with contextlib.suppress(StoreError):
            await self.flush()
        await self.abandoned.close()

    async def _fetch_retrying_conflicts(
        self, query: LiteralString, params: dict[str, Any]
    ) -> list[Any]:
        for attempt in conflict_attempts():
            with attempt:
                return await bounded(self._fetch(query, params), self._timeout, self.abandoned)
        raise AssertionError("the last try returns or raises")

    async def _fetch(self, query: LiteralString, params: dict[str, Any]) -> list[Any]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(query, params)
            return await cursor.fetchall()

    async def _execute(self, query: LiteralString, params: dict[str, Any]) -> int:
        """Run ``query``; return the rows it changed."""
        async with self._pool.connection() as conn:
            return (await conn.execute(query, params)).rowcount
