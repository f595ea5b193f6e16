"""The webhook outbox in the shared PostgreSQL store: every instance delivers from it.

:class:`SharedOutbox` is an :class:`~listener.webhooks.outbox_store.OutboxStore` over the
tables of the store's migration 2 (:mod:`listener.cluster.schema`): the SQLite outbox's rows,
keyed by ``outbox`` as well (the webhook handler's name, which names its file there). It
keeps one synchronous psycopg connection on the outbox's thread (:mod:`.store`), so the
delivery engine above it is the SQLite outbox's, unchanged. Its statements are in
:mod:`.shared_outbox_sql`.

Claims. A claim takes due rows with ``FOR UPDATE SKIP LOCKED`` (instances claiming at once
get disjoint rows, and none waits for another) and leases them in the same statement: a
holder (this instance) and ``lease_until`` on the database's clock, so that no host's clock
matters. No claim returns a leased row and the outbox bound leaves it alone; its outcome or a
release ends the lease. :meth:`SharedOutbox.renew` extends the leases of every row this
instance holds (claimed ahead, being attempted, or with its outcome waiting for the next
commit), every ``renew_every`` seconds. An instance that dies stops renewing; once its leases
pass, its rows are due for any instance, under the same ``msg_id`` (the ``webhook-id``).
A failure's outcome moves its row only while this instance still holds it (one taken over
meanwhile is the new holder's to schedule); a 2xx marks it delivered whoever holds it.
Per-call ordering looks at every pending row of the call, held anywhere. A commit leases its
own new rows the same way, as it inserts them (those its worker has room for, due, of an
enabled destination, in per-call order), and returns them to be attempted here: a fresh row
then needs no claim after its commit. If a commit's answer is lost (the connection broke
after the server committed it), the rows it may have leased are not held here: the next
commit (its retry, whose inserts are then skipped) gives them back first, for a claim.

An instance given a store keeps no delivery in its SQLite file: :func:`open_shared` moves the
rows still pending there (from a run without a store) into the shared outbox, same ids, and
renames the file, once.

The connection is in autocommit with explicit transactions, no server-side prepared
statement and no lock beyond a transaction (``listener.cluster.database``: PgBouncer in
transaction mode). While the store does not answer, a connection is tried at most every
:data:`_RETRY_EVERY` seconds (a call in between does not wait ``connect_timeout``), and the
outage is logged when it starts and when it ends. A commit fails then with
:class:`OutboxError` (the writer keeps its batch and retries, logging each retry, at most
one per 5 s); the engine's outbox (``quiet``) answers the calls made every ``poll_interval``
quietly: no row to claim, no lease to renew, nothing pruned, the figures last measured.
Otherwise each of them logs a traceback every ``poll_interval`` for each destination (a
1.2 s outage at a ``poll_interval`` of 0.05 s: 41 claims and 39 prunes failed, each logged).
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Final, LiteralString, ParamSpec, TypeVar

import psycopg
import structlog

from listener.cluster.database import connection_options, describe
from listener.cluster.url import StoreUrl
from listener.webhooks import shared_outbox_sql as sql
from listener.webhooks.outbox import Outbox
from listener.webhooks.outbox_connection import OutboxError
from listener.webhooks.outbox_rows import (
    Attempt,
    Claim,
    DeadLetter,
    Delivery,
    DestinationStats,
    NewDelivery,
    Outcome,
    Take,
)
from listener.webhooks.outbox_store import DEAD_ONLY, ReplaySource

__all__ = ["SharedOutbox", "open_shared"]

_log = structlog.get_logger(__name__)
_P = ParamSpec("_P")
_R = TypeVar("_R")
# Seconds between two tries to connect while the store does not answer.
_RETRY_EVERY: Final = 1.0
# The file's pending rows as deliveries to insert (the columns of every schema version).
_FILE_PENDING: Final = (
    "SELECT destination, msg_id, event, call_key, body, created_at, due_at FROM deliveries"
    " WHERE delivered_at IS NULL ORDER BY seq"
)
_MOVED_SUFFIX: Final = ".moved-to-store"


class _Unreachable(OutboxError):
    """No connection: the store does not answer (or did not, less than a retry ago)."""


def _maps_errors(
    method: Callable[Concatenate[SharedOutbox, _P], _R],
) -> Callable[Concatenate[SharedOutbox, _P], _R]:
    """Turn a driver error into :class:`OutboxError` (password scrubbed), and drop a
    connection the error broke so that the next call makes a new one."""

    @functools.wraps(method)
    def wrapper(self: SharedOutbox, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except psycopg.Error as exc:
            self._drop_if_broken()
            raise OutboxError(
                f"outbox {method.__name__} failed: {describe(self.url, exc)}"
            ) from None

    return wrapper


class SharedOutbox:
    """The outbox of the webhook handler ``outbox`` in the store at ``url``.

    Nothing connects until the first call, so that a store not answering at start delays
    deliveries, not the daemon. Use it from one thread at a time.

    Args:
        url: the store.
        outbox: the webhook handler's name.
        holder: this instance's name on the rows it leases.
        lease_ttl: seconds a lease lasts unless renewed.
        renew_every: seconds between two renewals (:meth:`renew` does nothing sooner).
        connect_timeout: seconds to connect.
        quiet: the delivery engine's: while the store does not answer, its periodic calls
            answer quietly (see the module's docstring); otherwise (the CLI) every call fails.
    """

    def __init__(
        self,
        url: StoreUrl,
        outbox: str,
        *,
        holder: str,
        lease_ttl: float = 15.0,
        renew_every: float = 5.0,
        connect_timeout: float = 5.0,
        quiet: bool = False,
    ) -> None:
        self.url = url
        self.outbox = outbox
        self.holder = holder
        self._ttl = lease_ttl
        self._renew_every = renew_every
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._retry_at = 0.0
        self._down = False
        self._quiet = quiet
        self._last_stats: list[DestinationStats] = []
        # The rows this instance holds, by destination: msg_id -> seq.
        self._held: dict[str, dict[str, int]] = {}
        # The rows a commit that failed may have leased here, (destination, msg_id): if the
        # server committed it and only its answer was lost, nobody here holds them, and the
        # retry (its inserts skipped) would not hand them over; released by the next commit.
        self._unsure: set[tuple[str, str]] = set()
        self._renewed = time.monotonic()

    def __enter__(self) -> SharedOutbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # The connection.

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        now = time.monotonic()
        if now < self._retry_at:
            raise _Unreachable(f"outbox: the store at {self.url} does not answer")
        try:
            conn = psycopg.connect(self.url.conninfo, **connection_options(self._connect_timeout))
        except psycopg.Error as exc:
            self._retry_at = now + _RETRY_EVERY
            problem = describe(self.url, exc)
            if self._quiet and not self._down:
                self._down = True
                _log.warning(
                    "the shared store does not answer; webhook deliveries wait for it",
                    outbox=self.outbox,
                    error=str(problem),
                )
            raise _Unreachable(f"outbox: {problem}") from None
        if self._down:
            self._down = False
            _log.info(
                "the shared store answers again; webhook deliveries resume", outbox=self.outbox
            )
        self._conn = conn
        return conn

    def _connection_or_none(self) -> psycopg.Connection[Any] | None:
        """The connection; None while the store does not answer, if this outbox answers the
        engine's periodic calls quietly then."""
        try:
            return self._connection()
        except _Unreachable:
            if self._quiet:
                return None
            raise

    def _drop_if_broken(self) -> None:
        if self._conn is not None and self._conn.broken:
            self._conn.close()
            self._conn = None

    def _params(self, destination: str | None = None, **values: object) -> dict[str, object]:
        return {"outbox": self.outbox, "destination": destination, "holder": self.holder, **values}

    def _one(self, query: LiteralString, params: dict[str, object]) -> Any:
        row = self._connection().execute(query, params).fetchone()
        return None if row is None else row[0]

    # The delivery engine.

    @_maps_errors
    def commit(
        self, rows: Sequence[NewDelivery], outcomes: Sequence[Outcome], take: Take | None = None
    ) -> list[Delivery]:
        """Insert new rows and record attempts' outcomes, in one transaction; the rows the
        outcomes concern are no longer held once it is committed. With ``take``, the new
        rows it allows are leased to this instance as they are inserted, and returned
        (held, as claimed ones: see :data:`sql.COMMIT_LEASING`)."""
        conn = self._connection()
        if self._unsure:
            self._release_unsure(conn)
        failed = [o for o in outcomes if o.kind != "delivered"]
        delivered = [o for o in outcomes if o.kind == "delivered"]
        failures: list[tuple[LiteralString, list[dict[str, object]]]] = [
            (sql.ATTEMPT, [self._params(o.destination, **_attempt(o.attempt)) for o in failed]),
            (
                sql.DISABLE,
                [
                    self._params(o.destination, at=o.attempt.at, reason="HTTP 410 Gone")
                    for o in failed
                    if o.kind == "gone"
                ],
            ),
            (
                sql.RESCHEDULE,
                [
                    self._params(o.destination, **_attempt(o.attempt), **_next(o))
                    for o in failed
                    if o.kind != "exhausted"
                ],
            ),
            (
                sql.BURY,
                [
                    self._params(o.destination, **_attempt(o.attempt), **_next(o))
                    for o in failed
                    if o.kind == "exhausted"
                ],
            ),
        ]
        # The new rows and the 2xx in one statement (sql.COMMIT), atomic by itself: a batch
        # without failures, nearly all of them, is one round trip instead of four (BEGIN,
        # the inserts, the marks, COMMIT). Traced at 500 events/s, one instance: a commit's
        # p50 went from 2.06 to 0.72 ms; with the claim's single statement (sql.CLAIM), that
        # instance's end to end from p50 20.8 / p99 56.7 to 12.3 / 32.6 ms and two
        # instances' from 38.5 / 143.6 to 20.7 / 56.3 ms (bench.ha quick, two runs 5 minutes
        # apart on a quiet machine; bench/README.md).
        #
        # A fresh row leased to this instance by its commit (``take``) needs no claim of the
        # worker's after it. Traced at 500 events/s, one instance, four pairs side by side:
        # a row's way from its commit to its attempt went from p50 2.1-5.4 / p99 5.3-26.7 ms
        # to 0.23-0.45 / 1.1-3.2 ms, and the worker's claims from 509-1,346 per 2,000 events
        # to 7-8. bench.ha quick, 13 pairs on a loaded machine: medians one instance p50 /
        # p99 23.2 / 89.1 -> 15.6 / 76.0 ms, two instances 36.7 / 204.3 -> 34.6 / 127.2 ms
        # (bench/README.md).
        news: tuple[LiteralString, dict[str, object]] | None = None
        takes = _takes(rows, take)
        leasing = any(takes)
        if leasing:
            ordered = [take is not None and r.destination in take.per_call for r in rows]
            params = {**self._params(ttl=self._ttl), **_commit_params(rows, delivered)}
            params.update(take=takes, per_call=ordered)
            per_call = any(t and o for t, o in zip(takes, ordered, strict=True))
            news = (sql.COMMIT_LEASING[per_call], params)
        elif rows or delivered:
            news = (sql.COMMIT, {**self._params(), **_commit_params(rows, delivered)})
        try:
            with (
                conn.transaction() if failed else contextlib.nullcontext(),
                conn.cursor() as cursor,
            ):
                if news is not None:
                    cursor.execute(*news)
                leased = cursor.fetchall() if leasing else []
                for statement, values in failures:
                    if values:
                        cursor.executemany(statement, values)
        except Exception:
            self._unsure.update(
                (row.destination, row.msg_id) for row, t in zip(rows, takes, strict=True) if t
            )
            raise
        for outcome in outcomes:
            self._held.get(outcome.destination, {}).pop(outcome.msg_id, None)
        return self._taken(rows, leased)

    def _release_unsure(self, conn: psycopg.Connection[Any]) -> None:
        """Give back the rows a failed commit may have leased here (none of them is held:
        the retry of that commit, which this one is, leases afresh only what it inserts)."""
        pairs = [pair for pair in self._unsure if pair[1] not in self._held.get(pair[0], {})]
        if pairs:
            conn.execute(
                sql.RELEASE_UNSURE,
                self._params(destinations=[d for d, _ in pairs], msg_ids=[m for _, m in pairs]),
            )
        self._unsure.clear()

    def _taken(
        self, rows: Sequence[NewDelivery], leased: list[tuple[int, str, str]]
    ) -> list[Delivery]:
        """The new rows the commit leased here, as claimed rows (now held)."""
        if not leased:
            return []
        seqs = {(destination, msg_id): seq for seq, destination, msg_id in leased}
        taken = []
        for row in rows:
            # pop: a row twice in the batch was inserted (and leased) once.
            seq = seqs.pop((row.destination, row.msg_id), None)
            if seq is not None:
                self._held.setdefault(row.destination, {})[row.msg_id] = seq
                taken.append(
                    Delivery(
                        seq,
                        row.destination,
                        row.msg_id,
                        row.event,
                        row.call_key,
                        row.body,
                        row.created_at,
                        row.due_at,
                        0,
                    )
                )
        return taken

    @_maps_errors
    def claim(
        self,
        destination: str,
        now: float,
        limit: int,
        *,
        per_call: bool = False,
        max_pending: int | None = None,
        max_age: float | None = None,
    ) -> Claim:
        """Enforce the bound if given, then lease up to ``limit`` due rows, earliest due
        first (see :class:`~listener.webhooks.outbox_store.OutboxStore`)."""
        conn = self._connection_or_none()
        if conn is None:
            return Claim([], None, {})
        bounded = max_pending is not None or max_age is not None
        # The bound and the claim in one transaction, as before; the claim alone (every
        # other call: the bound is enforced every poll_interval) is a single statement.
        with conn.transaction() if bounded else contextlib.nullcontext():
            evicted = self._evict(destination, now, max_pending, max_age)
            if limit <= 0:
                return Claim([], None, evicted)
            params = self._params(destination, now=now, limit=limit, ttl=self._ttl)
            found = conn.execute(sql.CLAIM[per_call], params).fetchall()
        # The statement's last row is the next due time of what it left (sql.CLAIM).
        next_due = next(row[-1] for row in found if row[0] is None)
        taken = (Delivery(*row[:-1]) for row in found if row[0] is not None)
        rows = sorted(taken, key=lambda d: (d.due_at, d.seq))
        held = self._held.setdefault(destination, {})
        for row in rows:
            held[row.msg_id] = row.seq
        return Claim(rows, None if next_due is None else float(next_due), evicted)

    def _evict(
        self, destination: str, now: float, max_pending: int | None, max_age: float | None
    ) -> dict[str, int]:
        """The outbox bound, inside the claim's transaction: the oldest rows nobody holds
        move to the dead letters, by reason."""
        moved: dict[str, int] = {}
        conn = self._connection()
        if max_age is not None:
            params = self._params(destination, now=now, cutoff=now - max_age, limit=None)
            count = conn.execute(sql.EVICT, {**params, "reason": "max_age"}).rowcount
            if count:
                moved["max_age"] = count
        if max_pending is not None:
            excess = int(self._one(sql.PENDING, self._params(destination))) - max_pending
            if excess > 0:
                params = self._params(destination, now=now, cutoff=float("inf"), limit=excess)
                count = conn.execute(sql.EVICT, {**params, "reason": "max_pending"}).rowcount
                if count:
                    moved["max_pending"] = count
        return moved

    def release(self, destination: str, msg_ids: Iterable[str]) -> None:
        """Give back held rows unattempted: they are due as they were, for any instance."""
        held = self._held.get(destination, {})
        seqs = [seq for msg_id in msg_ids if (seq := held.pop(msg_id, None)) is not None]
        if seqs:
            self._release(seqs)

    @_maps_errors
    def _release(self, seqs: list[int]) -> None:
        conn = self._connection_or_none()
        if conn is None:
            # Their leases pass on their own.
            return
        conn.execute(sql.RELEASE, self._params(seqs=seqs))

    @_maps_errors
    def renew(self) -> None:
        """Extend the leases of the rows held, if ``renew_every`` has passed since the last
        renewal; one that passed and went to another instance is left to it (logged: its
        delivery may be attempted twice, under one ``webhook-id``)."""
        now = time.monotonic()
        if now - self._renewed < self._renew_every:
            return
        seqs = [seq for held in self._held.values() for seq in held.values()]
        if seqs:
            conn = self._connection_or_none()
            if conn is None:
                return
            params = self._params(seqs=seqs, ttl=self._ttl)
            renewed = conn.execute(sql.RENEW, params).rowcount
            if renewed < len(seqs):
                _log.warning(
                    "webhook deliveries held here were taken over after their lease passed",
                    outbox=self.outbox,
                    held=len(seqs),
                    renewed=renewed,
                )
        self._renewed = now

    @_maps_errors
    def pending_count(self, destination: str) -> int:
        """How many deliveries to ``destination`` are pending, held ones included."""
        return int(self._one(sql.PENDING, self._params(destination)))

    @_maps_errors
    def prune(self, before: float, limit: int = 10_000) -> int:
        """Forget attempts and delivered rows older than ``before``, at most ``limit`` of
        each; return how many went."""
        conn = self._connection_or_none()
        if conn is None:
            return 0
        params = self._params(before=before, limit=limit)
        with conn.transaction():
            return sum(conn.execute(statement, params).rowcount for statement in sql.PRUNE)

    def close(self) -> None:
        """Give back the rows still held (due at once for another instance, instead of
        after their lease), then close the connection."""
        seqs = [seq for held in self._held.values() for seq in held.values()]
        self._held.clear()
        try:
            if seqs:
                self._release(seqs)
            # And those the last commit may have leased before its answer was lost.
            conn = self._connection_or_none() if self._unsure else None
            if conn is not None:
                self._release_unsure(conn)
        except (OutboxError, psycopg.Error) as exc:
            _log.warning("webhook deliveries held here wait for their lease", error=str(exc))
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # Inspection and repair.

    @_maps_errors
    def stats(self, now: float, destinations: Iterable[str] = ()) -> list[DestinationStats]:
        """Every destination named here or stored in this outbox, by name (as last measured
        while the store does not answer)."""
        conn = self._connection_or_none()
        if conn is None:
            return list(self._last_stats)
        pending: dict[str, tuple[int, float | None, int]] = {}
        dead: dict[str, int] = {}
        disabled: dict[str, tuple[float | None, str | None]] = {}
        for kind, name, count, at, failing, reason in conn.execute(sql.STATS, self._params()):
            if kind == "p":
                pending[name] = (count, at, failing)
            elif kind == "d":
                dead[name] = int(count)
            else:
                disabled[name] = (at, reason)
        result = []
        for name in sorted({*destinations, *pending, *dead, *disabled}):
            count, oldest, failing = pending.get(name, (0, None, 0))
            disabled_at, reason = disabled.get(name, (None, None))
            age = None if oldest is None else max(0.0, now - oldest)
            result.append(
                DestinationStats(
                    name, int(count), age, int(failing), dead.get(name, 0), disabled_at, reason
                )
            )
        self._last_stats = result
        return result

    @_maps_errors
    def dead_letters(
        self,
        *,
        destination: str | None = None,
        since: float | None = None,
        msg_ids: Collection[str] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Dead letters in enqueue order, filtered (as the SQLite outbox's)."""
        params = self._filter(destination, since, None, msg_ids, limit=limit)
        return [DeadLetter(*row) for row in self._connection().execute(sql.DEAD_LETTERS, params)]

    @_maps_errors
    def replay(
        self,
        now: float,
        *,
        sources: Collection[ReplaySource] = DEAD_ONLY,
        destination: str | None = None,
        since: float | None = None,
        until: float | None = None,
        msg_ids: Collection[str] | None = None,
        dry_run: bool = False,
    ) -> dict[ReplaySource, int]:
        """Make dead or delivered deliveries pending again, same ids and places; counts by
        source (with ``dry_run``: would be)."""
        conn = self._connection()
        params = self._filter(destination, since, until, msg_ids, now=now)
        if dry_run:
            return {s: int(self._one(sql.COUNT_REPLAYABLE[s], params)) for s in sources}
        moved: dict[ReplaySource, int] = {}
        with conn.transaction():
            for source in sources:
                first, then = sql.REPLAY[source]
                count = conn.execute(first, params).rowcount
                later = conn.execute(then, params).rowcount
                moved[source] = count if source == "dead" else later
        return moved

    def _filter(
        self,
        destination: str | None,
        since: float | None,
        until: float | None,
        msg_ids: Collection[str] | None,
        **values: object,
    ) -> dict[str, object]:
        return self._params(
            destination,
            since=since,
            until=until,
            msg_ids=None if msg_ids is None else list(msg_ids),
            **values,
        )

    @_maps_errors
    def attempts(self, msg_id: str) -> list[Attempt]:
        """A message's attempts to any destination of this outbox, in time order."""
        rows = self._connection().execute(sql.SELECT_ATTEMPTS, self._params(msg_id=msg_id))
        return [Attempt(*row) for row in rows]

    @_maps_errors
    def whereabouts(self, destination: str, msg_id: str) -> tuple[str, float | None] | None:
        """``pending``, ``dead`` or ``delivered`` (with when), or None if not stored."""
        params = self._params(destination, msg_id=msg_id)
        row = self._connection().execute(sql.WHEREABOUTS, params).fetchone()
        return None if row is None else (str(row[0]), row[1])

    @_maps_errors
    def disable(self, destination: str, now: float, reason: str) -> bool:
        """Disable a destination for every instance; False if it already was."""
        params = self._params(destination, at=now, reason=reason)
        return self._connection().execute(sql.DISABLE, params).rowcount > 0

    @_maps_errors
    def enable(self, destination: str) -> bool:
        """Enable a destination for every instance; False if it was not disabled."""
        return self._connection().execute(sql.ENABLE, self._params(destination)).rowcount > 0


def open_shared(
    url: StoreUrl, outbox: str, file: Path, *, holder: str, **settings: float
) -> SharedOutbox:
    """The shared outbox ``outbox`` (see :class:`SharedOutbox` for ``settings``), with what
    the handler's SQLite ``file`` still has pending moved into it.

    The file's pending rows (a run without a store left them: a receiver down, say) keep
    their ids and due times and start their retry schedules over; once they are committed
    the file is renamed (``*.moved-to-store``: its dead letters and records stay readable
    there). If the store does not answer, the file stays for the next start, and is said so.
    """
    shared = SharedOutbox(url, outbox, holder=holder, quiet=True, **settings)
    if not file.exists():
        return shared
    try:
        with Outbox(file) as local:
            pending = [NewDelivery(*row) for row in local.conn.execute(_FILE_PENDING)]
        shared.commit(pending, [])
    except (OutboxError, sqlite3.Error) as exc:
        _log.warning(
            "webhook deliveries pending in the outbox file are not moved into the store yet;"
            " the next start tries again",
            file=str(file),
            error=str(exc),
        )
        return shared
    file.rename(file.with_name(file.name + _MOVED_SUFFIX))
    _log.info("webhook outbox file moved into the store", file=str(file), pending=len(pending))
    return shared


def _commit_params(rows: Sequence[NewDelivery], delivered: Sequence[Outcome]) -> dict[str, object]:
    """The parameters of :data:`sql.COMMIT` but the outbox's own and the leases': the rows
    and the 2xx, one array a column."""
    attempts = [o.attempt for o in delivered]
    return {
        "destination": [r.destination for r in rows],
        "msg_id": [r.msg_id for r in rows],
        "event": [r.event for r in rows],
        "call_key": [r.call_key for r in rows],
        "body": [r.body for r in rows],
        "created_at": [r.created_at for r in rows],
        "due_at": [r.due_at for r in rows],
        "delivered_destination": [o.destination for o in delivered],
        "delivered_msg_id": [o.msg_id for o in delivered],
        "at": [a.at for a in attempts],
        "status": [a.status for a in attempts],
        "latency": [a.latency for a in attempts],
        "answer": [a.answer for a in attempts],
        "probe": [a.probe for a in attempts],
    }


def _takes(rows: Sequence[NewDelivery], take: Take | None) -> list[bool]:
    """Whether each new row may be leased by its commit: due, within its destination's
    limit, and (ordered per call) the first of its call in the batch; the statement checks
    the rest (the destination enabled, no row of the call pending)."""
    if take is None:
        return [False] * len(rows)
    room = dict(take.limits)
    calls: set[tuple[str, str]] = set()
    result = []
    for row in rows:
        ok = row.due_at <= take.now and room.get(row.destination, 0) > 0
        if row.destination in take.per_call and row.call_key is not None:
            call = (row.destination, row.call_key)
            ok = ok and call not in calls
            calls.add(call)
        if ok:
            room[row.destination] -= 1
        result.append(ok)
    return result


def _attempt(attempt: Attempt) -> dict[str, object]:
    return {
        "msg_id": attempt.msg_id,
        "at": attempt.at,
        "latency": attempt.latency,
        "status": attempt.status,
        "error_class": attempt.error_class,
        "error": attempt.error,
        "answer": attempt.answer,
        "probe": attempt.probe,
        "counted": attempt.counted,
    }


def _next(outcome: Outcome) -> dict[str, object]:
    return {"attempts": outcome.attempts, "due_at": outcome.due_at}
