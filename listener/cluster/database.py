"""Connections to the shared store, and what its failures mean.

Every connection runs in autocommit with server-side prepared statements off
(``prepare_threshold=None``): behind PgBouncer in transaction mode (before 1.21) a statement
prepared on one server connection is unknown on the next. Transactions are explicit
(``conn.transaction()``), and the only locks taken are transaction-scoped, for the same reason.
"""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg_pool import AsyncConnectionPool

from listener.cluster.url import StoreUrl
from listener.core.errors import ListenerError

__all__ = [
    "StoreError",
    "StoreRefused",
    "StoreUnreachable",
    "connect",
    "connection_options",
    "describe",
    "open_pool",
    "probe",
]

APPLICATION_NAME: Final = "sippet-listener"


class StoreError(ListenerError):
    """The shared store failed (the message says how, never with the password).

    ``key`` is the config key of the URL (``store.url``), ``problem`` the rest.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class StoreRefused(StoreError):
    """The server answered and refused: wrong password, unknown user or database."""


class StoreUnreachable(StoreError):
    """No server answered in time at the URL's address."""


def connection_options(connect_timeout: float) -> dict[str, Any]:
    """Keyword arguments for every connection to the store."""
    return {
        "autocommit": True,
        "prepare_threshold": None,
        "connect_timeout": max(1, round(connect_timeout)),
        "application_name": APPLICATION_NAME,
    }


def describe(url: StoreUrl, exc: BaseException) -> StoreError:
    """Turn a driver error into a :class:`StoreError` whose message names ``url``'s key.

    libpq prefixes what the server said with ``FATAL:``; without it nobody answered.
    """
    text = url.scrub(" ".join(str(exc).split()))
    kind = StoreRefused if "FATAL:" in text else StoreUnreachable
    return kind(url.key, f"{url}: {text}")


async def connect(url: StoreUrl, connect_timeout: float = 5.0) -> psycopg.AsyncConnection[Any]:
    """One connection, outside any pool.

    Raises:
        StoreError: it could not be made.
    """
    try:
        return await psycopg.AsyncConnection.connect(
            url.conninfo, **connection_options(connect_timeout)
        )
    except psycopg.Error as exc:
        raise describe(url, exc) from None


async def probe(url: StoreUrl, connect_timeout: float = 5.0) -> str:
    """Connect once and return the server's version (``check-config``).

    Raises:
        StoreRefused: the server refused the URL's credentials or database.
        StoreUnreachable: nobody answered.
    """
    conn = await connect(url, connect_timeout)
    async with conn:
        row = await (await conn.execute("SHOW server_version")).fetchone()
    return str(row[0]) if row else "unknown"


async def open_pool(
    url: StoreUrl, *, size: int = 4, connect_timeout: float = 5.0
) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """Open a pool of up to ``size`` connections, the first one made before returning.

    Raises:
        StoreError: no connection could be made within ``connect_timeout``.
    """
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        url.conninfo,
        min_size=1,
        max_size=size,
        kwargs=connection_options(connect_timeout),
        # A connection the server or the network dropped is replaced, not handed out.
        check=AsyncConnectionPool.check_connection,
        name="sippet-store",
        open=False,
    )
    try:
        await pool.open(wait=True, timeout=connect_timeout)
    except Exception as exc:
        await pool.close()
        # The pool's timeout hides the driver's reason: ask for it once.
        try:
            await probe(url, connect_timeout)
        except StoreError as reason:
            raise reason from None
        raise describe(url, exc) from None
    return pool
