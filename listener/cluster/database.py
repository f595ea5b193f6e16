"""Connections to the shared store, and what its failures mean.

Every connection runs in autocommit with server-side prepared statements off
(``prepare_threshold=None``): behind PgBouncer in transaction mode (before 1.21) a statement
prepared on one server connection is unknown on the next. Transactions are explicit
(``conn.transaction()``), and the only locks taken are transaction-scoped, for the same reason.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Iterator
from types import TracebackType
from typing import Any, Final, TypeVar

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from listener.cluster.url import StoreUrl
from listener.core.errors import ListenerError

__all__ = [
    "PRUNE_BATCH",
    "Abandoned",
    "StoreError",
    "StoreRefused",
    "StoreUnreachable",
    "bounded",
    "conflict_attempts",
    "connect",
    "connection_options",
    "describe",
    "make_pool",
    "probe",
]

APPLICATION_NAME: Final = "sippet-listener"
#: Rows per DELETE of a prune: each batch holds its row locks briefly, whatever the backlog.
PRUNE_BATCH: Final = 5000
_log = structlog.get_logger(__name__)
_T = TypeVar("_T")
# What the server aborts to break a deadlock or a serialization conflict: the statement (or
# transaction) did nothing and may simply run again; it says nothing about the store being
# unreachable.
_CONFLICTS: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
_CONFLICT_RETRIES: Final = 3
# What libpq reports after FATAL: when the server refuses the URL itself.
_REFUSALS: Final = (
    "authentication failed",
    "does not exist",
    "pg_hba.conf",
    "permission denied",
)


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
        # A server gone silent (network cut, host down) fails the connection within a few
        # seconds instead of the kernel's retransmissions (about 15 minutes).
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": round(max(connect_timeout, 1.0) * 2000),
    }


class ConflictAttempt:
    """One try of :func:`conflict_attempts`: a context manager that swallows a conflict,
    unless it is the last try."""

    def __init__(self, *, last: bool) -> None:
        self._last = last
        self.conflicted = False

    def __enter__(self) -> ConflictAttempt:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if self._last or not isinstance(exc, _CONFLICTS):
            return False
        _log.debug("a statement conflicted with another; running it again", error=str(exc))
        self.conflicted = True
        return True


def conflict_attempts(retries: int = _CONFLICT_RETRIES) -> Iterator[ConflictAttempt]:
    """The tries of work the server may abort to break a deadlock or a serialization
    conflict (sync or async alike): the next try runs it again, and the last one's conflict
    is raised, as is any other error at once::

        for attempt in conflict_attempts():
            with attempt:
                rows = run()
    """
    for left in range(retries, -1, -1):
        attempt = ConflictAttempt(last=left == 0)
        yield attempt
        if not attempt.conflicted:
            return


class Abandoned:
    """The queries :func:`bounded` gave up on, still running; :meth:`close` ends them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()

    def keep(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()

    async def close(self) -> None:
        """Cancel them all; a second cancellation makes psycopg close the connection at once
        instead of waiting for the server to confirm the first."""
        tasks = list(self._tasks)
        for _ in range(2):
            for task in tasks:
                task.cancel()
            await asyncio.sleep(0)
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


async def bounded(query: Awaitable[_T], timeout: float, abandoned: Abandoned) -> _T:
    """Await ``query`` for at most ``timeout`` seconds.

    Cancelling a psycopg query makes it send a cancel request to the server and wait for it
    (up to 10 s), which is no deadline when the server is out of reach. On expiry the query
    is left in ``abandoned`` to finish or fail on its own (a pooled connection comes back
    then) and TimeoutError is raised at once.
    """
    task = asyncio.ensure_future(query)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        abandoned.keep(task)
        raise TimeoutError(f"no answer from the store within {timeout:g} s")
    return task.result()


def describe(url: StoreUrl, exc: BaseException) -> StoreError:
    """Turn a driver error into a :class:`StoreError` whose message names ``url``'s key.

    Refused means what only a change of configuration can fix (the server said who or what
    it does not know); a server starting up, shutting down or full is only unreachable.
    """
    text = url.scrub(" ".join(str(exc).split()) or type(exc).__name__)
    refused = "FATAL:" in text and any(reason in text for reason in _REFUSALS)
    return (StoreRefused if refused else StoreUnreachable)(url.key, f"{url}: {text}")


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


def make_pool(
    url: StoreUrl, *, size: int = 4, connect_timeout: float = 5.0
) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """A pool of up to ``size`` connections, not yet open."""
    checked = _IdleCheck()
    return AsyncConnectionPool(
        url.conninfo,
        min_size=1,
        max_size=size,
        kwargs=connection_options(connect_timeout),
        # A connection the server or the network dropped is replaced, not handed out.
        check=checked.check,
        reset=checked.returned,
        # How long a caller waits for a free connection before its request fails.
        timeout=connect_timeout,
        name="sippet-store",
        open=False,
    )


# Seconds a connection may have been back in the pool and still be handed out unchecked.
_CHECK_IDLE: Final = 1.0


class _IdleCheck:
    """The pool's check before it hands a connection out: a round trip to the server, made
    only for a connection that sat in the pool for more than :data:`_CHECK_IDLE`.

    A connection used a moment ago was working a moment ago; checking it anyway cost every
    claim a round trip: two instances at 500 events/s, traced, a claim's wait for its
    connection went from p50 0.83 to 0.015 ms (of the 3.2 ms a claim took), end to end from
    p50 11.2 / p99 35.7 to 8.7 / 21.5 ms. One the server dropped within that moment fails
    its statement instead, which the caller treats as the store not answering (a claim is
    spooled, not lost); psycopg marks it broken and the pool replaces it.
    """

    def __init__(self) -> None:
        self._returned: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )

    async def returned(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._returned[conn] = time.monotonic()

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if time.monotonic() - self._returned.get(conn, float("-inf")) > _CHECK_IDLE:
            await AsyncConnectionPool.check_connection(conn)
