"""The shared store's schema, in versioned migrations applied in order.

``sippet_schema`` holds one row per version applied. :func:`migrate` runs in one transaction
under a transaction-scoped advisory lock (never a session lock: behind PgBouncer in
transaction mode a session lock stays with a server connection that other clients then
borrow), so instances starting together take turns and the later ones find nothing to do.
A migration is never edited once released: a change is a new one appended.

Tables carry a ``sippet_`` prefix: the store may share a database with other applications.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, LiteralString

import psycopg

from listener.cluster.database import StoreError, describe
from listener.cluster.url import StoreUrl

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migrated", "migrate"]

MIGRATIONS: Final[tuple[tuple[LiteralString, ...], ...]] = (
    # 1: the leader lease, the events heard (once each, with what it takes to hand one to
    # a handler again) and the per-handler claims, each under a lease until done.
    (
        """CREATE TABLE sippet_leases (
            name       text PRIMARY KEY,
            holder     text NOT NULL,
            term       bigint NOT NULL,
            expires_at timestamptz NOT NULL
        )""",
        """CREATE TABLE sippet_events (
            id          text PRIMARY KEY,
            name        text NOT NULL,
            topic       text NOT NULL,
            payload     json NOT NULL,
            received_at double precision NOT NULL,
            origin      text NOT NULL,
            size        integer NOT NULL,
            first_by    text NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now()
        )""",
        """CREATE TABLE sippet_claims (
            event_id   text NOT NULL REFERENCES sippet_events (id) ON DELETE CASCADE,
            handler    text NOT NULL,
            holder     text NOT NULL,
            claimed_at timestamptz NOT NULL DEFAULT now(),
            lease_until timestamptz NOT NULL,
            done_at    timestamptz,
            PRIMARY KEY (event_id, handler)
        )""",
        # For pruning by age.
        "CREATE INDEX sippet_events_recorded_at ON sippet_events (recorded_at)",
        # For the leader's sweep of claims whose holder died mid-handle.
        "CREATE INDEX sippet_claims_pending ON sippet_claims (lease_until) WHERE done_at IS NULL",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
# pg_advisory_xact_lock's key for migrations: any constant other applications are unlikely
# to pick ("sippet" in ASCII).
_LOCK: Final = 0x736970706574


@dataclass(frozen=True, slots=True)
class Migrated:
    """What :func:`migrate` did: the version the store is at, and the versions it applied."""

    version: int
    applied: tuple[int, ...]


async def migrate(conn: psycopg.AsyncConnection[Any], url: StoreUrl) -> Migrated:
    """Apply every pending migration, in one transaction.

    Args:
        conn: a connection in autocommit (see :mod:`listener.cluster.database`).
        url: the store's URL, for error messages.

    Raises:
        StoreError: the store's schema is newer than this version knows, or the database
            failed.
    """
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS sippet_schema (
                    version    integer PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )"""
            )
            row = await (
                await conn.execute("SELECT coalesce(max(version), 0) FROM sippet_schema")
            ).fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    url.key,
                    f"{url}: schema version {current} is newer than this sippet-listener "
                    f"knows ({SCHEMA_VERSION}): upgrade sippet-listener",
                )
            applied = tuple(range(current + 1, SCHEMA_VERSION + 1))
            for version in applied:
                for statement in MIGRATIONS[version - 1]:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO sippet_schema (version) VALUES (%s)", (version,))
    except psycopg.Error as exc:
        raise describe(url, exc) from None
    return Migrated(max(current, SCHEMA_VERSION), applied)
