"""Cluster-wide once-only handling: the first instance to claim (event, handler) runs it.

Every instance hears every event (each holds its own socket), and every instance's
dispatcher asks :meth:`Claims.claim` before a handler's ``handle()``. The first to ask
records the event (its stable id, once: ``ON CONFLICT DO NOTHING``) and takes the claim for
that handler; the others are told no and skip it. Two instances asking at once are ordered by
the primary keys: the second insert waits for the first's commit, then does nothing.

One statement per claim, in autocommit, no session state: PgBouncer in transaction mode is
fine.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg_pool import AsyncConnectionPool

from listener.cluster.database import Abandoned, bounded, describe
from listener.cluster.url import StoreUrl
from listener.core.events import Event

__all__ = ["Claims"]

# The event's row first (once), then the claim: both in one statement, one round trip.
# The claim's foreign key sees the event inserted by the same statement.
_CLAIM: Final = """
WITH recorded AS (
    INSERT INTO sippet_events (id, name, call_key, first_by)
    VALUES (%(id)s, %(name)s, %(call_key)s, %(holder)s)
    ON CONFLICT (id) DO NOTHING
)
INSERT INTO sippet_claims (event_id, handler, holder)
VALUES (%(id)s, %(handler)s, %(holder)s)
ON CONFLICT (event_id, handler) DO NOTHING
RETURNING 1
"""


class Claims:
    """The claims of one instance, through its pool.

    Args:
        pool: connections to the migrated store.
        url: the store's URL (for error messages).
        holder: this instance's name, written with each event and claim it takes.
        timeout: seconds a claim may take (a connection from the pool and the round trip).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
        url: StoreUrl,
        holder: str,
        timeout: float = 5.0,
    ) -> None:
        self._timeout = timeout
        self.abandoned = Abandoned()
        self._pool = pool
        self._url = url
        self._holder = holder

    async def claim(self, event: Event, handler: str) -> bool:
        """Whether this instance is the one to run ``handler`` on ``event``.

        Raises:
            StoreError: the store did not answer; the caller decides (the dispatcher runs
                the handler: better twice than never).
        """
        params = {
            "id": event.id,
            "name": event.name,
            "call_key": event.call_key,
            "holder": self._holder,
            "handler": handler,
        }
        try:
            row = await bounded(self._insert(params), self._timeout, self.abandoned)
        except (psycopg.Error, TimeoutError) as exc:
            raise describe(self._url, exc) from None
        return row is not None

    async def _insert(self, params: dict[str, Any]) -> tuple[Any, ...] | None:
        async with self._pool.connection() as conn:
            return await (await conn.execute(_CLAIM, params)).fetchone()
