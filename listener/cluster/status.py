"""What the shared store holds, for ``store status``: read-only, safe while instances run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import psycopg

from listener.cluster.database import StoreError, describe
from listener.cluster.url import StoreUrl

__all__ = ["Lease", "StoreStatus", "read_status"]

_COUNTS: Final = """
SELECT
    (SELECT coalesce(max(version), 0) FROM sippet_schema),
    (SELECT count(*) FROM sippet_events),
    (SELECT count(*) FROM sippet_claims WHERE done_at IS NULL AND lease_until >= now()),
    (SELECT count(*) FROM sippet_claims WHERE done_at IS NULL AND lease_until < now())
"""
_LEASES: Final = """
SELECT name, holder, term, extract(epoch FROM expires_at - now())::float8
FROM sippet_leases ORDER BY name
"""


@dataclass(frozen=True, slots=True)
class Lease:
    """One lease row: who holds it, in which term, for how many more seconds (negative:
    lapsed that long ago, nobody renewed it)."""

    name: str
    holder: str
    term: int
    expires_in: float


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """The schema version, the events recorded, the claims held (``in_flight``) and those
    lapsed unfinished (waiting for the leader's sweep), and the leases."""

    schema: int
    events: int
    in_flight: int
    lapsed: int
    leases: tuple[Lease, ...]


async def read_status(conn: psycopg.AsyncConnection[Any], url: StoreUrl) -> StoreStatus:
    """Read the store's status.

    Raises:
        StoreError: the store is not migrated, or failed.
    """
    try:
        row = await (await conn.execute("SELECT to_regclass('sippet_schema')")).fetchone()
        if row is None or row[0] is None:
            raise StoreError(url.key, f"{url}: no schema yet (run 'store migrate', or start)")
        counts = await (await conn.execute(_COUNTS)).fetchone()
        leases = await (await conn.execute(_LEASES)).fetchall()
    except psycopg.Error as exc:
        raise describe(url, exc) from None
    assert counts is not None
    schema, events, in_flight, lapsed = counts
    return StoreStatus(schema, events, in_flight, lapsed, tuple(Lease(*lease) for lease in leases))
