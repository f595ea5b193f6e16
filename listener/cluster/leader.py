"""One leader among the instances, for the work only one of them should do.

Reconciliation passes, pruning and cluster gauges need doing once, not once per instance.
The instances elect a leader through one row of ``sippet_leases``: whoever holds it, with a
``term`` and an ``expires_at`` on the database's clock, leads. The leader renews it every
``renew_every`` seconds; another instance takes it over once it has expired (at most one
``ttl`` after the leader's last renewal, plus one ``renew_every`` before the next attempt:
within two lease periods). Each new holder starts a new term.

An instance that cannot renew stops leading *before* its lease could have passed: it counts
the lease from the moment it *sent* the renewal (on its own monotonic clock; the database
stamped it later) and steps down ``margin`` of a ``ttl`` earlier still, for clock-rate skew
and for its singleton work to stop. The database's clock alone decides expiry; the two clocks
are never compared.

Only row locks of single statements: no session state, so it works behind PgBouncer in
transaction mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, LiteralString

import psycopg
import structlog

from listener.cluster.database import Abandoned, StoreError, bounded, connect
from listener.cluster.url import StoreUrl

__all__ = ["Elector", "LeaseSettings", "holder_id"]

_log = structlog.get_logger(__name__)

# Insert the lease, or take it over once expired, or renew it while ours. A new holder, or
# ours after it had lapsed, is a new term. No row returned: someone else holds it.
_CLAIM: Final = """
INSERT INTO sippet_leases AS lease (name, holder, term, expires_at)
VALUES (%(name)s, %(holder)s, 1, now() + make_interval(secs => %(ttl)s))
ON CONFLICT (name) DO UPDATE
SET holder = excluded.holder,
    expires_at = excluded.expires_at,
    term = CASE WHEN lease.holder = excluded.holder AND lease.expires_at > now()
                THEN lease.term ELSE lease.term + 1 END
WHERE lease.holder = excluded.holder OR lease.expires_at <= now()
RETURNING term
"""
# Terms start at 1.
_HELD_BY_ANOTHER: Final = 0
_RESIGN: Final = (
    "UPDATE sippet_leases SET expires_at = now()"
    " WHERE name = %(name)s AND holder = %(holder)s RETURNING term"
)


def holder_id() -> str:
    """This process's name in the lease row: host, pid and a random part (pids repeat)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """How the lease is held.

    Attributes:
        name: the lease's row (one per kind of singleton work; one for all today).
        ttl: seconds a renewal holds the lease for.
        renew_every: seconds between renewals (and between tries to take it over).
        margin: the share of ``ttl`` by which a leader that could not renew steps down early.
        connect_timeout: seconds to connect to the store.
    """

    name: str = "leader"
    ttl: float = 15.0
    renew_every: float = 5.0
    margin: float = 0.2
    connect_timeout: float = 5.0


class Elector:
    """Takes part in the election until cancelled; says whether this instance leads.

    Args:
        url: the shared store (migrated).
        settings: the lease's timing.
        holder: this instance's name in the lease row (:func:`holder_id` by default).
        clock: the local monotonic clock, in seconds.
    """

    def __init__(
        self,
        url: StoreUrl,
        settings: LeaseSettings | None = None,
        *,
        holder: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.settings = settings or LeaseSettings()
        self.holder = holder or holder_id()
        self._clock = clock
        self.term: int | None = None
        self.leading = asyncio.Event()
        self.following = asyncio.Event()
        self.following.set()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        # Tries given up on (bounded) are told apart from the current one by their number.
        self._attempt = 0
        self._abandoned = Abandoned()
        self._expiry: asyncio.TimerHandle | None = None
        # The singleton work running under while_leader().
        self._work: set[asyncio.Future[None]] = set()

    @property
    def is_leader(self) -> bool:
        """Whether this instance leads now."""
        return self.leading.is_set()

    async def run(self) -> None:
        """Try for the lease every ``renew_every`` seconds, for ever; resign when cancelled."""
        settings = self.settings
        try:
            while True:
                sent = self._clock()
                term = await self._claim()
                if term == _HELD_BY_ANOTHER:
                    self._step_down("another instance holds the lease")
                elif term is not None:
                    self._lead(term, sent + settings.ttl * (1 - settings.margin))
                await asyncio.sleep(max(0.0, sent + settings.renew_every - self._clock()))
        finally:
            self._step_down("stopping")
            await self._resign()
            await self._abandoned.close()

    async def while_leader(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work()`` whenever this instance leads; it is cancelled the moment this
        instance steps down (in the same step, not after a wake-up).

        Returns (or raises) when ``work()`` does so while leading.
        """
        while True:
            await self.leading.wait()
            task = asyncio.ensure_future(work())
            self._work.add(task)
            try:
                await asyncio.wait({task})
            finally:
                self._work.discard(task)
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if not task.cancelled():
                return task.result()

    async def _claim(self) -> int | None:
        """One try: the term we hold after it, :data:`_HELD_BY_ANOTHER`, or None (no answer:
        the lease may or may not still be ours)."""
        params = {"name": self.settings.name, "holder": self.holder, "ttl": self.settings.ttl}
        try:
            row = await self._bounded(_CLAIM, params, self.settings.renew_every)
        except (StoreError, psycopg.Error, TimeoutError) as exc:
            _log.warning(
                "cannot reach the store for the leader lease",
                leading=self.is_leader,
                error=self.url.scrub(str(exc) or type(exc).__name__),
            )
            if isinstance(exc, TimeoutError):
                # Still running: it closes its connection when it ends.
                self._conn = None
            else:
                await self._drop_connection()
            return None
        return _HELD_BY_ANOTHER if row is None else int(row[0])

    async def _bounded(
        self, query: LiteralString, params: dict[str, Any], timeout: float
    ) -> tuple[Any, ...] | None:
        self._attempt += 1
        return await bounded(self._execute(query, params, self._attempt), timeout, self._abandoned)

    async def _execute(
        self, query: LiteralString, params: dict[str, Any], attempt: int
    ) -> tuple[Any, ...] | None:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await connect(self.url, self.settings.connect_timeout)
            if attempt == self._attempt:
                self._conn = conn
        try:
            return await (await conn.execute(query, params)).fetchone()
        finally:
            if attempt != self._attempt:
                # Given up on: its connection is in an unknown state, and ours to close.
                with contextlib.suppress(psycopg.Error):
                    await conn.close()

    def _lead(self, term: int, deadline: float) -> None:
        left = deadline - self._clock()
        if left <= 0:
            # Answered so late that the lease may be about to pass: not worth starting work.
            self._step_down("lease renewed too late")
            return
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(left, self._step_down, "lease not renewed in time")
        if self.term != term or not self.is_leader:
            self.term = term
            self.following.clear()
            self.leading.set()
            _log.info("leading", lease=self.settings.name, term=term, holder=self.holder)

    def _step_down(self, reason: str) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for task in self._work:
            task.cancel()
        if self.is_leader:
            _log.warning(
                "no longer leading", lease=self.settings.name, term=self.term, reason=reason
            )
            self.leading.clear()
            self.following.set()
        self.term = None

    async def _resign(self) -> None:
        """Let the lease lapse now, so that another instance need not wait out its ttl."""
        if self._conn is not None and not self._conn.closed:
            params = {"name": self.settings.name, "holder": self.holder}
            try:
                await self._bounded(_RESIGN, params, min(1.0, self.settings.renew_every))
            except TimeoutError:
                self._conn = None
            except (StoreError, psycopg.Error):
                pass
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()
