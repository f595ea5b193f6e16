"""The call map and the gap record in the PostgreSQL store every instance shares.

Each instance keeps its own SQLite call store (:class:`~listener.calls.store.CallStore`), as
an instance on its own does: events, lookups and reads back never wait for the network, and
that file is the durable record of what the instance knows. :class:`SharedCallStore` writes
every batch there first; the leader also writes it into the shared tables (``sippet_calls``,
``sippet_handled_calls``, ``sippet_moments``, schema version 4), with the moment until which
it missed nothing if it reconciles its gaps (``[calls] reconcile``; without, it cannot vouch
for a gap of its own, so it writes none). Every instance hears every event, so one writer is
enough, and the others add neither load nor row locks to the store the claims use (two
instances writing the same calls at 1,000 events/s contended for the same rows every batch).
Rows merge all the same: a call keeps the furthest status written (with the origins of that
one), the latest last event and every field one writer knew; the moment never goes back.

What is shared is whole up to the moment written with it: an instance that starts writing
(it became leader, or the store answers again after a batch it did not take) first writes,
in the same transaction as its batch, the calls of its own file that moved since a minute
before the shared moment (and the open ones), which holds what a leader that died or a store
that was down left unwritten. So nothing is lost while the store does not answer: the map
goes on locally, it is tried once per ``timeout`` seconds (not on every batch), and the next
batch it takes catches up from the file, across restarts too. The ids handed on that are not
lifecycle events stay local: the claims (``listener.cluster.claims``) make those once-only.

An instance that starts reads the open calls and those of the last minute before it loads its
map (into its own file, so that they can be let go of and read back). Only the leader keeps a
connection between batches.

:class:`ClusterCalls` is what the reconciler asks: whether this instance leads, how far the
cluster has covered, and the calls that moved since a moment (those the leader rebuilt from
``list_calls`` after a gap they all shared), so that one instance lists calls for all; those
are read on a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, LiteralString

import orjson
import psycopg
import structlog

from listener.calls.persister import RESIDENT_FOR
from listener.calls.reconcile import MARGIN
from listener.calls.state import STATUSES, CallRecord, adopted
from listener.calls.store import CallStore, record_row, row_record
from listener.cluster.database import (
    PRUNE_BATCH,
    conflict_attempts,
    connection_options,
    describe,
)
from listener.cluster.store import SharedStore
from listener.cluster.url import StoreUrl

__all__ = ["ClusterCalls", "SharedCallStore"]

_log = structlog.get_logger(__name__)
_NOT_TAKEN: Final = "the shared store does not take the call map; keeping it locally until it does"

_COLUMNS: Final = (
    "call_key, status, last_event_at, from_number, to_number, started_at, answered_at,"
    " ended_at, origins"
)
# A status's rank (CallRecord.rank()), in SQL.
_RANK: Final = (
    "(CASE {}.status "
    + " ".join(f"WHEN '{status}' THEN {rank}" for rank, status in enumerate(STATUSES))
    + " ELSE -1 END)"
)
_AHEAD: Final = f"{_RANK.format('excluded')} > {_RANK.format('c')}"
_FILLS: Final = ("from_number", "to_number", "started_at", "answered_at", "ended_at")
# A batch of calls in one statement, in key order (two writers, a leader and the one it
# follows, lock the rows they share in one order: no deadlock cycle). The rows go as one JSON
# array of record_row()'s tuples: nine arrays to unnest cost psycopg 16 µs of CPU per call to
# adapt, the JSON (orjson) 1.2 µs, and 38 instead of 64 µs of wall time per call (batches of
# 1,000 into a local server). A row that adds nothing is not rewritten: an update that
# changes nothing still writes a new row version.
_UPSERT: Final = (
    f"INSERT INTO sippet_calls AS c ({_COLUMNS})"  # noqa: S608 (the module's own constants)
    " SELECT r->>0, r->>1, (r->>2)::float8, r->>3, r->>4, (r->>5)::float8, (r->>6)::float8,"
    " (r->>7)::float8, r->>8 FROM json_array_elements(%(rows)s::json) AS r ORDER BY 1"
    " ON CONFLICT (call_key) DO UPDATE SET"
    f" status = CASE WHEN {_AHEAD} THEN excluded.status ELSE c.status END,"
    f" origins = CASE WHEN {_AHEAD} THEN excluded.origins ELSE c.origins END,"
    " last_event_at = greatest(c.last_event_at, excluded.last_event_at),"
    + ",".join(f" {name} = coalesce(c.{name}, excluded.{name})" for name in _FILLS)
    + f" WHERE {_AHEAD} OR excluded.last_event_at > c.last_event_at"
    + "".join(f" OR (c.{name} IS NULL AND excluded.{name} IS NOT NULL)" for name in _FILLS)
)
_HANDLED: Final = """
INSERT INTO sippet_handled_calls (call_key, name, handled_at)
SELECT h->>0, h->>1, %(now)s FROM json_array_elements(%(pairs)s::json) AS h ORDER BY 1, 2
ON CONFLICT DO NOTHING
"""
_COVERED: Final = """
INSERT INTO sippet_moments AS m (name, at) VALUES ('covered_until', %(at)s)
ON CONFLICT (name) DO UPDATE SET at = excluded.at WHERE m.at < excluded.at
"""
_READ_COVERED: Final = "SELECT at FROM sippet_moments WHERE name = 'covered_until'"
_CALLS_SINCE: Final = (
    f"SELECT {_COLUMNS} FROM sippet_calls"  # noqa: S608 (the module's own constants)
    " WHERE status != 'ended' OR last_event_at >= %(since)s"
)
_HANDLED_OF: Final = (
    "SELECT call_key, name FROM sippet_handled_calls WHERE call_key = ANY(%(keys)s::text[])"
)
_PRUNES: Final[tuple[LiteralString, ...]] = (
    "DELETE FROM sippet_calls WHERE call_key IN (SELECT call_key FROM sippet_calls"
    " WHERE last_event_at < %(before)s LIMIT %(batch)s)",
    "DELETE FROM sippet_handled_calls WHERE (call_key, name) IN (SELECT call_key, name"
    " FROM sippet_handled_calls WHERE handled_at < %(before)s LIMIT %(batch)s)",
)
# The furthest back a catch-up writes from (open calls older than that stay each
# instance's own), and the calls per statement of a batch: ~38 µs each on a local server.
_CATCH_UP_AT_MOST: Final = 3600.0
_UPSERT_BATCH: Final = 5000


def _rows(calls: Iterable[CallRecord]) -> str:
    return orjson.dumps([record_row(record) for record in calls]).decode()


def _records(rows: Iterable[Sequence[Any]]) -> list[CallRecord]:
    """The calls of the shared map's rows; one that cannot be read (another program's, or a
    newer version's) is logged and skipped: it costs that call, not the read."""
    records = []
    for row in rows:
        try:
            records.append(row_record(row))
        except (TypeError, ValueError) as exc:
            _log.warning(
                "a call in the shared map cannot be read; skipped",
                call_key=str(row[0]),
                error=str(exc),
            )
    return records


@contextlib.contextmanager
def _bounded(conn: psycopg.Connection[Any], timeout: float) -> Iterator[None]:
    """A transaction whose statements each end within ``timeout``: none may hold a worker
    thread (the persister's runs one job at a time) behind a lock or a backlog."""
    with conn.transaction():
        # Transaction-scoped (PgBouncer in transaction mode keeps no session setting).
        conn.execute(
            "SELECT set_config('statement_timeout', %s, true)", (f"{round(timeout * 1000)}ms",)
        )
        yield


def _connect(url: StoreUrl, timeout: float) -> psycopg.Connection[Any]:
    return psycopg.Connection.connect(url.conninfo, **connection_options(timeout))


class SharedCallStore:
    """The call store of an instance of a cluster (see the module docstring and
    :class:`~listener.calls.backend.CallBackend`), from one thread at a time.

    Opening it opens the local file at ``path`` and, if the shared store answers, takes into
    it the calls the cluster knows (the open ones and those of the last minute) and the
    moment it covered.

    Args:
        path: the instance's own SQLite file (``calls.sqlite3``).
        url: the shared store.
        timeout: seconds to connect and for a batch; between tries while it does not answer.
        leads: whether this instance leads now: only the leader writes the shared tables.
        covers: whether this instance's reconciler covers its gaps (``[calls] reconcile``):
            only then does the leader write the moment until which the cluster missed
            nothing (an instance that does not reconcile a gap of its own cannot vouch for
            it), otherwise its calls alone.
        answering: whether the shared store answered a moment ago (else it is first tried
            ``timeout`` seconds from now).
        clock: wall-clock seconds (what "the last minute" at open is counted from).

    Raises:
        StoreError: the local file cannot be opened or written.
    """

    def __init__(
        self,
        path: Path,
        *,
        url: StoreUrl,
        timeout: float,
        leads: Callable[[], bool],
        covers: bool,
        answering: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._leads = leads
        self._covers = covers
        self._conn: psycopg.Connection[Any] | None = None
        self._retry_at = 0.0 if answering else time.monotonic() + timeout
        # Whether this outage of the store was logged: once, not at each batch's retry.
        self._warned = not answering
        # Whether every batch since this instance's catch-up reached the store, and whether
        # the latest one it tried did not (not merely untried: a store that did not answer
        # at open is not said to refuse the map before the instance leads and tries).
        self._in_step = False
        self._refused = False
        # The moment until which the cluster missed nothing, as read at open.
        self._covered: float | None = None
        self.local = CallStore(path)
        try:
            self._take_cluster(clock())
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        """The local SQLite file (reads back go there)."""
        return self.local.path

    def _take_cluster(self, now: float) -> None:
        if not self._may_try():
            return
        since = now - RESIDENT_FOR
        try:
            conn = self._connection()
            with _bounded(conn, self._timeout):
                records = _records(conn.execute(_CALLS_SINCE, {"since": since}).fetchall())
                keys = [record.call_key for record in records]
                pairs = [(key, name) for key, name in conn.execute(_HANDLED_OF, {"keys": keys})]
                covered = conn.execute(_READ_COVERED).fetchone()
        except psycopg.Error as exc:
            self._failed(exc, "the shared call map could not be read; going on from the local file")
            return
        finally:
            self._idle()
        self._covered = None if covered is None else float(covered[0])
        known = {record.call_key: record for record in self.local.calls(since)}
        # A call that ended here longer ago than that stays ended: the shared map may still
        # have it open (its leader missed the end), and a late record never reopens a call.
        ended = set(self.local.ended_keys()).difference(known)
        taken = [
            record
            for found in records
            if found.call_key not in ended
            and (record := adopted(known.get(found.call_key), found)) is not None
        ]
        self.local.save(now, calls=taken, handled_calls=pairs)
        _log.info(
            "call map read from the shared store",
            calls=len(records),
            new_here=len(taken),
            covered_until=self._covered,
        )

    def save(
        self,
        now: float,
        *,
        calls: Iterable[CallRecord] = (),
        handled: Iterable[str] = (),
        handled_calls: Iterable[tuple[str, str]] = (),
        seen_until: float | None = None,
    ) -> None:
        """Write the batch locally; on the leader, share it (see the module docstring).
        Only the local write can fail."""
        calls, handled_calls = list(calls), list(handled_calls)
        self.local.save(
            now, calls=calls, handled=handled, handled_calls=handled_calls, seen_until=seen_until
        )
        if not self._leads() or not self._may_try():
            self._in_step = False
            self._idle()
            return
        if not self._covers:
            seen_until = None
        try:
            for attempt in conflict_attempts():
                with attempt:
                    self._write(now, calls, handled_calls, seen_until)
        except psycopg.Error as exc:
            self._failed(exc, _NOT_TAKEN)
            self._in_step = False
            self._refused = True
            return
        self._in_step = True
        self._refused = False
        if self._warned:
            self._warned = False
            _log.info("the shared store takes the call map again")

    @property
    def not_sharing(self) -> bool:
        """Whether this instance leads and the store did not take the latest batch it tried:
        the call map goes on in the local file until it does (what ``/readyz`` and
        ``STATUS=`` say)."""
        return self._refused and self._leads()

    def _may_try(self) -> bool:
        return self._conn is not None or time.monotonic() >= self._retry_at

    def _idle(self) -> None:
        """Close the connection of an instance that does not lead: only the leader writes,
        and a connection held for nothing counts against the server's limit."""
        if not self._leads():
            self._close_connection()

    def _write(
        self,
        now: float,
        calls: list[CallRecord],
        handled_calls: list[tuple[str, str]],
        seen_until: float | None,
    ) -> None:
        """Share a batch in one transaction, after what this instance's file holds that the
        store may lack when this instance was not in step (see the module docstring)."""
        conn = self._connection()
        with _bounded(conn, self._timeout):
            if not self._in_step:
                row = conn.execute(_READ_COVERED).fetchone()
                # Never the whole file (a day of calls by default: one upsert of 130,000
                # of them outlasts the statement timeout, and was retried for ever).
                floor = now - _CATCH_UP_AT_MOST
                # MARGIN: also the batches of the last writer not in the store yet (up to
                # two intervals).
                since = floor if row is None else max(float(row[0]) - MARGIN, floor)
                records = {record.call_key: record for record in self.local.calls(since)}
                records.update((record.call_key, record) for record in calls)
                calls = list(records.values())
                handled_calls = sorted({*self.local.handled_calls(since), *handled_calls})
                _log.info("sharing the call map from this instance", calls=len(calls))
            # In statements of a bounded size, each within the statement timeout.
            for start in range(0, len(calls), _UPSERT_BATCH):
                conn.execute(_UPSERT, {"rows": _rows(calls[start : start + _UPSERT_BATCH])})
            if handled_calls:
                pairs = orjson.dumps(handled_calls).decode()
                conn.execute(_HANDLED, {"now": now, "pairs": pairs})
            if seen_until is not None:
                conn.execute(_COVERED, {"at": seen_until})

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = _connect(self._url, self._timeout)
        return self._conn

    def _failed(self, exc: psycopg.Error, message: str) -> None:
        """The store did not answer (``message`` says what it means here): close the
        connection, try again after ``timeout``."""
        if not self._warned:
            self._warned = True
            _log.warning(
                message, error=self._url.scrub(" ".join(str(exc).split()) or type(exc).__name__)
            )
        self._close_connection()
        self._retry_at = time.monotonic() + self._timeout

    def _close_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def calls(self, since: float | None = None) -> list[CallRecord]:
        """See :meth:`CallStore.calls <listener.calls.store.CallStore.calls>` (local)."""
        return self.local.calls(since)

    def handled_ids(self) -> set[str]:
        """See :meth:`CallStore.handled_ids <listener.calls.store.CallStore.handled_ids>`."""
        return self.local.handled_ids()

    def handled_calls(self, since: float | None = None) -> list[tuple[str, str]]:
        """See :meth:`CallStore.handled_calls
        <listener.calls.store.CallStore.handled_calls>` (local)."""
        return self.local.handled_calls(since)

    def ended_keys(self) -> list[str]:
        """See :meth:`CallStore.ended_keys <listener.calls.store.CallStore.ended_keys>`."""
        return self.local.ended_keys()

    def last_seen(self) -> float | None:
        """The later of this instance's last moment seen and the cluster's: from then on is a
        gap for this instance too."""
        moments = [at for at in (self.local.last_seen(), self._covered) if at is not None]
        return max(moments, default=None)

    def prune(self, before: float) -> int:
        """Prune the local file; on the leader, the shared tables too (a failure there is
        logged: the next prune does it)."""
        forgotten = self.local.prune(before)
        if self._leads() and self._may_try():
            try:
                conn = self._connection()
                for statement in _PRUNES:
                    params = {"before": before, "batch": PRUNE_BATCH}
                    while True:
                        with _bounded(conn, self._timeout):
                            if conn.execute(statement, params).rowcount < PRUNE_BATCH:
                                break
            except psycopg.Error as exc:
                self._failed(exc, _NOT_TAKEN)
        return forgotten

    def close(self) -> None:
        """Close the files and the connection (blocking I/O: from the worker thread)."""
        self._close_connection()
        self.local.close()


class ClusterCalls:
    """What the reconciler of an instance of a cluster asks the shared store (see the
    module docstring). Both reads raise :class:`~listener.cluster.database.StoreError` when
    the store does not answer."""

    def __init__(self, store: SharedStore) -> None:
        self._store = store

    def leads(self) -> bool:
        """Whether this instance leads now."""
        return self._store.elector.is_leader

    async def covered(self) -> float | None:
        """The moment until which the cluster missed nothing (None: no instance wrote one)."""
        rows = await self._store.read(_READ_COVERED, {})
        return float(rows[0][0]) if rows else None

    async def calls_since(self, since: float) -> tuple[list[CallRecord], list[tuple[str, str]]]:
        """The open calls and those whose last event came at ``since`` or later, with the
        lifecycle events handed on of them (call key, event name).

        Read and made into records on a worker thread, on a connection of its own, closed
        after: every open call of the cluster, each refresh, is no work for the event loop
        (nor a pooled connection the claims wait for), and a follower holds no connection
        between its refreshes."""
        try:
            return await asyncio.to_thread(self._calls_since, since)
        except psycopg.Error as exc:
            raise describe(self._store.url, exc) from None

    def _calls_since(self, since: float) -> tuple[list[CallRecord], list[tuple[str, str]]]:
        timeout = self._store.connect_timeout
        with _connect(self._store.url, timeout) as conn, _bounded(conn, timeout):
            records = _records(conn.execute(_CALLS_SINCE, {"since": since}).fetchall())
            keys = [record.call_key for record in records]
            pairs = conn.execute(_HANDLED_OF, {"keys": keys}).fetchall() if keys else []
        return records, [(str(key), str(name)) for key, name in pairs]
