"""One instance's part of the shared store: its pool, its claims (with their local spool for
when the store does not answer) and its vote for a leader.

:meth:`SharedStore.open` connects and applies pending migrations (so a fresh database, or an
upgrade, needs no manual step; ``store migrate`` does the same by hand). :meth:`SharedStore.run`
takes part in the election, writes the claims' done marks, hands the spooled claims back to
their handlers once the store answers and, while this instance leads,
hands the events whose claims lapsed unfinished to their handlers again and prunes what is
old enough to go.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, LiteralString

import psycopg
import structlog

from listener.cluster.claims import Claims, Redeliver
from listener.cluster.database import (
    PRUNE_BATCH,
    Abandoned,
    StoreError,
    StoreRefused,
    StoreUnreachable,
    bounded,
    connect,
    describe,
    make_pool,
)
from listener.cluster.leader import Elector, LeaseSettings, holder_id
from listener.cluster.schema import Migrated, migrate
from listener.cluster.spool import Spool, SpoolError
from listener.cluster.url import StoreUrl
from listener.core.retry import Backoff, BackoffPolicy

__all__ = ["Redeliver", "SharedStore"]

_log = structlog.get_logger(__name__)
_PRUNE = """
DELETE FROM sippet_events WHERE id IN (
    SELECT id FROM sippet_events
    WHERE recorded_at < now() - make_interval(secs => %(retain)s)
    LIMIT %(batch)s
)
"""


class SharedStore:
    """The store as one instance uses it.

    Args:
        url: the store's URL.
        spool: the file of the claims the store does not answer (opened by :meth:`open`).
        pool_size: connections at most (claims; the elector has one of its own).
        connect_timeout: seconds to connect, and for a claim.
        lease: the leader lease's timing.
        holder: this instance's name in the store (:func:`holder_id` by default).
    """

    def __init__(
        self,
        url: StoreUrl,
        spool: Path,
        *,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        lease: LeaseSettings | None = None,
        holder: str | None = None,
    ) -> None:
        self.url = url
        self.holder = holder or holder_id()
        self.connect_timeout = connect_timeout
        self.pool = make_pool(url, size=pool_size, connect_timeout=connect_timeout)
        self.elector = Elector(url, lease, holder=self.holder)
        # A claim outlives its handler's timeout by a leader lease: the sweep that takes it
        # over runs on a leader, which may itself be failing over meanwhile.
        self.claims = Claims(
            self.pool,
            url,
            self.holder,
            Spool(spool),
            timeout=connect_timeout,
            grace=self.elector.settings.ttl,
        )
        self._abandoned = Abandoned()
        # Set once the schema is known to be this version's: the lease and the sweeps wait.
        self.ready = asyncio.Event()

    async def open(self) -> Migrated | None:
        """Open the spool and the pool, and migrate; None when the store does not answer:
        the instance then runs without it (its claims go into the spool from the first),
        and :meth:`run` keeps trying until it answers.

        Raises:
            StoreError: the store refused the URL, or has a newer schema.
            SpoolError: the spool cannot be opened.
        """
        await self.claims.spool.open(self.holder)
        await self.pool.open(wait=False)
        try:
            return await self._migrate()
        except StoreUnreachable as exc:
            _log.warning(
                "the shared store does not answer; spooling claims until it does", error=str(exc)
            )
            self.claims.not_answering()
            return None
        except BaseException:
            await self.pool.close()
            await self.claims.spool.close()
            raise

    async def _migrate(self) -> Migrated:
        # On a connection of its own: the pool's timeouts would hide why it failed.
        async with await connect(self.url, self.connect_timeout) as conn:
            migrated = await bounded(
                migrate(conn, self.url), self.connect_timeout * 6, self._abandoned
            )
        self.ready.set()
        self.claims.answering()
        return migrated

    async def close(self) -> None:
        """Write the last done marks, end the queries given up on, close the pool and the
        spool."""
        await self.claims.close()
        await self._abandoned.close()
        await self.pool.close()
        await self.claims.spool.close()

    async def run(self, retain: float, redeliver: Redeliver, prune_every: float = 3600.0) -> None:
        """Vote for a leader, write done marks and, once the store is migrated, hand the
        spooled claims back to ``redeliver`` when it answers, for ever. While leading: every lease
        renewal, hand the events whose claims lapsed to ``redeliver``; every ``prune_every``
        seconds, forget the events (and their claims) recorded more than ``retain`` ago."""

        async def sweep_forever() -> None:
            # A new leader (the first, or the next one after an outage of the store) leaves
            # every live instance a lease period to write the done marks it could not while
            # the store was away (they are retried ten times a second): a claim that lapsed
            # meanwhile was most likely done, and handing it out at once ran it twice.
            await asyncio.sleep(self.elector.settings.ttl)
            while True:
                try:
                    lapsed = await self.claims.expired()
                except StoreError as exc:
                    _log.warning("cannot look for lapsed claims", error=str(exc))
                    lapsed = []
                for event, handler in lapsed:
                    _log.warning(
                        "claim lapsed unfinished; handling the event again",
                        handler=handler,
                        event_id=event.id,
                        event_name=event.name,
                    )
                    await redeliver(event, handler)
                await asyncio.sleep(self.elector.settings.renew_every)

        async def prune_forever() -> None:
            while True:
                try:
                    removed = await self.prune(retain)
                except StoreError as exc:
                    _log.warning("cannot prune the shared store", error=str(exc))
                else:
                    _log.info("shared store pruned", events=removed)
                await asyncio.sleep(prune_every)

        async with asyncio.TaskGroup() as group:
            group.create_task(self.claims.run())
            await self._until_migrated()
            group.create_task(self._release_previous())
            group.create_task(self.claims.drain(redeliver))
            group.create_task(self.elector.run())
            group.create_task(self.elector.while_leader(sweep_forever))
            group.create_task(self.elector.while_leader(prune_forever))

    async def _release_previous(self) -> None:
        """Give back what this instance's earlier starts left claimed and unfinished (they
        were killed): the cluster runs it again within a sweep, not a claim's lease later."""
        previous = self.claims.spool.previous_holders
        if not previous:
            return
        while True:
            try:
                released = await self.claims.release(previous)
                await self.claims.spool.forget_holders(previous)
            except (StoreError, SpoolError) as exc:
                _log.warning("cannot give back the previous start's claims yet", error=str(exc))
                await asyncio.sleep(self.connect_timeout)
                continue
            if released:
                _log.warning(
                    "the previous start left claims unfinished; given back to the cluster",
                    claims=released,
                    previous=previous,
                )
            return

    async def _until_migrated(self) -> None:
        # The project's one retry schedule, from 1 s, no longer apart than the spooled claims'
        # retries (they wait for this).
        backoff = Backoff(
            BackoffPolicy(initial=1.0, first=1.0, cap=max(self.connect_timeout, 1.0), jitter=0.0)
        )
        while not self.ready.is_set():
            try:
                migrated = await self._migrate()
            except (StoreUnreachable, StoreRefused) as exc:
                # Refused now, after it opened: a password rotated under us, say. Keep trying.
                _log.warning("the shared store still does not answer", error=str(exc))
                await asyncio.sleep(backoff.next_delay())
            else:
                _log.info("the shared store answers again", schema=migrated.version)

    async def prune(self, retain: float) -> int:
        """Forget the events recorded more than ``retain`` seconds ago (by the database's
        clock), and their claims; return how many events went.

        Raises:
            StoreError: the store failed or did not answer.
        """
        removed = 0
        params = {"retain": retain, "batch": PRUNE_BATCH}
        while True:
            try:
                count = await bounded(
                    self._delete(params), self.connect_timeout * 6, self._abandoned
                )
            except (psycopg.Error, TimeoutError) as exc:
                raise describe(self.url, exc) from None
            removed += count
            if count < PRUNE_BATCH:
                return removed

    async def read(self, query: LiteralString, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of one read, through the pool, within the store's timeout.

        Raises:
            StoreError: the store failed or did not answer.
        """

        async def run() -> list[tuple[Any, ...]]:
            async with self.pool.connection() as conn:
                return await (await conn.execute(query, params)).fetchall()

        try:
            return await bounded(run(), self.connect_timeout * 2, self._abandoned)
        except (psycopg.Error, TimeoutError) as exc:
            raise describe(self.url, exc) from None

    async def _delete(self, params: dict[str, float]) -> int:
        async with self.pool.connection() as conn:
            return (await conn.execute(_PRUNE, params)).rowcount
