"""The durable webhook outbox: pending deliveries, dead letters and disabled destinations.

Pure storage over one SQLite file: no HTTP, no asyncio, no clock (every method that needs the
time takes ``now``, seconds since the epoch). The delivery engine (:mod:`.forwarder`)
drives it from a single thread of its own (:mod:`.store`), through the methods named by
:class:`~listener.webhooks.outbox_store.OutboxStore`; the CLI opens the same file from
another process while the daemon runs (:mod:`.outbox_connection` says how they share it).
The file's schema and the longer queries are in :mod:`.outbox_schema`, the rows that go in
and come out in :mod:`.outbox_rows`.

Theory of operation. A delivery is one event for one destination. It is inserted before its
first attempt and marked delivered, in place, once a 2xx answer arrives; until then it is
*pending*. A failed attempt reschedules it; when its retry schedule is exhausted, or the
outbox bound for its destination is exceeded, it moves to ``dead_letters``.
:meth:`Outbox.replay` makes dead or delivered ones pending again. Its ``msg_id`` (the
Standard Webhooks ``webhook-id``) never changes along the way, and it is in exactly one of
the two tables. Every failed attempt is recorded in ``attempts``, and a delivered row keeps
its 2xx (time, status, latency, answer): :meth:`Outbox.attempts` gives both as one timeline.
Attempts and delivered rows are kept for a retention period (:meth:`Outbox.prune`), dead
letters until replayed.

Claims. :meth:`Outbox.claim` hands out due rows and remembers them, in memory, until their
outcome is committed (:meth:`Outbox.commit`) or they are given back (:meth:`Outbox.release`):
no other claim returns them meanwhile, and the outbox bound leaves them alone. One process
delivers from a file, so nothing in the file marks a row as taken: after a crash (or a kill
-9 mid-delivery) the memory is gone and every pending row is simply due again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Sequence

from listener.webhooks.outbox_connection import OutboxConnection, maps_sqlite_errors
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
from listener.webhooks.outbox_schema import (
    BURY,
    COUNT_REPLAYABLE,
    DELIVER,
    INSERT_ATTEMPTS,
    PRUNE,
    REPLAY,
    SELECT_ATTEMPTS,
    SELECT_CANDIDATES,
    SELECT_DEAD,
    SELECT_ROWS,
    filter_params,
)
from listener.webhooks.outbox_store import DEAD_ONLY, ReplaySource

__all__ = ["Outbox", "ReplaySource"]


class Outbox(OutboxConnection):
    """The outbox stored in one SQLite file, created on first open.

    How to open it, share it between threads, group calls in transactions and what it raises:
    see :class:`~listener.webhooks.outbox_connection.OutboxConnection`.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        # Claimed rows, by destination: msg_id -> seq (see the module's docstring).
        self._claims: dict[str, dict[str, int]] = {}
        super().__init__(path, busy_timeout=busy_timeout)

    # Pending deliveries.

    @maps_sqlite_errors
    def add(self, deliveries: Iterable[NewDelivery]) -> None:
        """Insert deliveries; one whose (destination, msg_id) is already stored is skipped."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO deliveries"
            " (destination, msg_id, event, call_key, body, created_at, due_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                (d.destination, d.msg_id, d.event, d.call_key, d.body, d.created_at, d.due_at)
                for d in deliveries
            ),
        )

    @maps_sqlite_errors
    def due(
        self, destination: str, now: float, limit: int, *, per_call: bool = False
    ) -> list[Delivery]:
        """Return up to ``limit`` unclaimed deliveries due at ``now``, earliest due first,
        without claiming them.

        Nothing is returned while the destination is disabled. With ``per_call``, a row is
        skipped while an earlier delivery of the same call to this destination is pending.
        """
        return self._look(destination, now, limit, per_call)[0]

    @maps_sqlite_errors
    def next_due(self, destination: str, *, per_call: bool = False) -> float | None:
        """Return when the next unclaimed eligible delivery falls due (see :meth:`due`), or
        None; None also while the destination is disabled."""
        return self._look(destination, float("-inf"), 0, per_call)[1]

    @maps_sqlite_errors
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
        """Enforce the outbox bound if one is given (see :meth:`evict`), then claim up to
        ``limit`` due deliveries (see :meth:`due`) and say when the next one after them falls
        due."""
        evicted: dict[str, int] = {}
        if max_pending is not None or max_age is not None:
            evicted = self.evict(destination, now, max_pending=max_pending, max_age=max_age)
        rows, next_due = self._look(destination, now, limit, per_call)
        claims = self._claims.setdefault(destination, {})
        for row in rows:
            claims[row.msg_id] = row.seq
        return Claim(rows, next_due, evicted)

    def release(self, destination: str, msg_ids: Iterable[str]) -> None:
        """Give back claimed rows that will not be attempted now: they are due as they were."""
        claims = self._claims.get(destination, {})
        for msg_id in msg_ids:
            claims.pop(msg_id, None)

    def renew(self) -> None:
        """Nothing to keep: claims here live in memory, for as long as the process."""

    def _look(
        self, destination: str, now: float, limit: int, per_call: bool
    ) -> tuple[list[Delivery], float | None]:
        """The unclaimed eligible rows due at ``now`` (up to ``limit``), and the due time of
        the first one after them."""
        if self.is_disabled(destination):
            return [], None
        claimed = set(self._claims.get(destination, {}).values())
        # In due order from the index alone, enough to see limit + 1 unclaimed ones past
        # the claimed: cheaper than handing the claimed ids to SQLite (json_each, per
        # claim, over a list that prefetching makes 8 times longer).
        candidates = self.conn.execute(
            SELECT_CANDIDATES[per_call],
            {"destination": destination, "limit": limit + len(claimed) + 1},
        ).fetchall()
        taken: list[int] = []
        next_due = None
        for seq, due_at in candidates:
            if seq in claimed:
                continue
            if len(taken) < limit and due_at <= now:
                taken.append(seq)
            else:
                next_due = float(due_at)
                break
        if not taken:
            return [], next_due
        rows = self.conn.execute(SELECT_ROWS, (json.dumps(taken),))
        return [Delivery(*row) for row in rows], next_due

    @maps_sqlite_errors
    def commit(
        self, rows: Sequence[NewDelivery], outcomes: Sequence[Outcome], take: Take | None = None
    ) -> list[Delivery]:
        """Insert new rows and record attempts' outcomes, in one transaction; the rows the
        outcomes concern are no longer claimed once it is committed.

        It claims none of the new rows (``take`` is not used): a claim here is a query on
        the same thread and connection, with no round trip to the server to save.
        """
        with self.transaction():
            self.add(rows)
            self.record_attempts(o.attempt for o in outcomes if o.kind != "delivered")
            self.mark_delivered(o.attempt for o in outcomes if o.kind == "delivered")
            for outcome in outcomes:
                if outcome.kind != "delivered":
                    self._apply(outcome)
        for outcome in outcomes:
            self._claims.get(outcome.destination, {}).pop(outcome.msg_id, None)
        return []

    def _apply(self, outcome: Outcome) -> None:
        """Record a failed attempt's outcome (inside the caller's transaction)."""
        attempt = outcome.attempt
        if outcome.kind == "exhausted":
            self.bury(
                attempt.destination,
                attempt.msg_id,
                now=attempt.at,
                reason="exhausted",
                attempts=outcome.attempts,
                status=attempt.status,
                error=attempt.error,
            )
            return
        if outcome.kind == "gone":
            self.disable(attempt.destination, attempt.at, "HTTP 410 Gone")
        self.reschedule(
            attempt.destination,
            attempt.msg_id,
            due_at=outcome.due_at,
            attempts=outcome.attempts,
            attempted_at=attempt.at,
            status=attempt.status,
            error=attempt.error,
        )

    @maps_sqlite_errors
    def mark_delivered(self, successes: Iterable[Attempt]) -> None:
        """Mark the deliveries of attempts answered with a 2xx delivered, each attempt's facts
        kept on its row (see :meth:`attempts`); a row not pending is left alone."""
        self.conn.executemany(
            DELIVER,
            (
                {
                    "destination": a.destination,
                    "msg_id": a.msg_id,
                    "at": a.at,
                    "status": a.status,
                    "latency": a.latency,
                    "answer": a.answer,
                    "probe": int(a.probe),
                }
                for a in successes
            ),
        )

    @maps_sqlite_errors
    def pending_count(self, destination: str) -> int:
        """Return how many deliveries to ``destination`` are pending."""
        (count,) = self.conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE destination = ? AND delivered_at IS NULL",
            (destination,),
        ).fetchone()
        return int(count)

    # Attempts and what was delivered.

    @maps_sqlite_errors
    def record_attempts(self, attempts: Iterable[Attempt]) -> None:
        """Add failed attempts to the record (a 2xx goes on its row: :meth:`mark_delivered`)."""
        self.conn.executemany(
            INSERT_ATTEMPTS,
            (
                (
                    a.destination,
                    a.msg_id,
                    a.at,
                    a.latency,
                    a.status,
                    a.error_class,
                    a.error,
                    a.answer,
                    int(a.probe),
                    int(a.counted),
                )
                for a in attempts
            ),
        )

    @maps_sqlite_errors
    def attempts(self, msg_id: str) -> list[Attempt]:
        """Return the recorded attempts of message ``msg_id``, to any destination, in order:
        its failures and, once delivered, the 2xx that delivered it."""
        rows = self.conn.execute(SELECT_ATTEMPTS, {"msg_id": msg_id})
        return [Attempt(*row[:8], *(bool(flag) for flag in row[8:10])) for row in rows]

    @maps_sqlite_errors
    def whereabouts(self, destination: str, msg_id: str) -> tuple[str, float | None] | None:
        """Return where a delivery is: ``pending`` (with None), ``dead`` (with when it died) or
        ``delivered`` (with when); None if the outbox does not have it (any more)."""
        row = self.conn.execute(
            "SELECT IIF(delivered_at IS NULL, 'pending', 'delivered'), delivered_at"
            " FROM deliveries WHERE destination = :d AND msg_id = :m"
            " UNION ALL SELECT 'dead', dead_at FROM dead_letters"
            " WHERE destination = :d AND msg_id = :m",
            {"d": destination, "m": msg_id},
        ).fetchone()
        return None if row is None else (str(row[0]), row[1])

    @maps_sqlite_errors
    def prune(self, before: float, limit: int = 10_000) -> int:
        """Forget attempts and delivered rows written before ``before``, the oldest first and
        at most about ``limit`` of each; return how many rows went."""
        removed = 0
        with self.transaction():
            for statement in PRUNE:
                cursor = self.conn.execute(statement, {"before": before, "limit": limit})
                removed += cursor.rowcount
        return removed

    @maps_sqlite_errors
    def reschedule(
        self,
        destination: str,
        msg_id: str,
        *,
        due_at: float,
        attempts: int,
        attempted_at: float,
        status: int | None,
        error: str,
    ) -> None:
        """Record a failed attempt and when to try next; a row no longer pending is ignored."""
        self.conn.execute(
            "UPDATE deliveries SET due_at = ?, attempts = ?, last_attempt_at = ?,"
            " last_status = ?, last_error = ?"
            " WHERE destination = ? AND msg_id = ? AND delivered_at IS NULL",
            (due_at, attempts, attempted_at, status, error, destination, msg_id),
        )

    @maps_sqlite_errors
    def bury(
        self,
        destination: str,
        msg_id: str,
        *,
        now: float,
        reason: str,
        attempts: int | None = None,
        status: int | None = None,
        error: str | None = None,
    ) -> bool:
        """Move a pending delivery to the dead letters; return whether it was pending.

        ``attempts``, ``status`` and ``error`` describe a last attempt, made at ``now``, not yet
        recorded; when None, the row's recorded values are kept.
        """
        params = {
            "destination": destination,
            "msg_id": msg_id,
            "now": now,
            "reason": reason,
            "attempts": attempts,
            "status": status,
            "error": error,
        }
        with self.transaction():
            if self.conn.execute(BURY, params).rowcount == 0:
                return False
            self.conn.execute(
                "DELETE FROM deliveries WHERE destination = ? AND msg_id = ?",
                (destination, msg_id),
            )
        return True

    @maps_sqlite_errors
    def evict(
        self,
        destination: str,
        now: float,
        *,
        max_pending: int | None = None,
        max_age: float | None = None,
    ) -> dict[str, int]:
        """Enforce the outbox bound: move the oldest pending deliveries to the dead letters.

        Deliveries older than ``max_age`` seconds go first (reason ``max_age``), then the
        oldest ones beyond ``max_pending`` (reason ``max_pending``). Claimed rows (being
        attempted) stay, and count towards ``max_pending``.

        Returns:
            How many deliveries were moved, by reason; empty when the bound holds.
        """
        moved: dict[str, int] = {}
        claimed = json.dumps(list(self._claims.get(destination, {})))
        with self.transaction():
            if max_age is not None:
                victims = self.conn.execute(
                    "SELECT msg_id FROM deliveries WHERE destination = ? AND delivered_at IS NULL"
                    " AND created_at < ? AND msg_id NOT IN (SELECT value FROM json_each(?))",
                    (destination, now - max_age, claimed),
                ).fetchall()
                self._bury_all(destination, victims, now, "max_age", moved)
            if max_pending is not None:
                pending = self.pending_count(destination)
                victims = self.conn.execute(
                    "SELECT msg_id FROM deliveries WHERE destination = ? AND delivered_at IS NULL"
                    " AND msg_id NOT IN (SELECT value FROM json_each(?)) ORDER BY seq LIMIT ?",
                    (destination, claimed, max(0, pending - max_pending)),
                ).fetchall()
                self._bury_all(destination, victims, now, "max_pending", moved)
        return moved

    def _bury_all(
        self,
        destination: str,
        victims: list[tuple[str]],
        now: float,
        reason: str,
        moved: dict[str, int],
    ) -> None:
        """Bury each listed delivery with ``reason`` and count it in ``moved``."""
        for (msg_id,) in victims:
            self.bury(destination, msg_id, now=now, reason=reason)
        if victims:
            moved[reason] = len(victims)

    # Destinations.

    @maps_sqlite_errors
    def disable(self, destination: str, now: float, reason: str) -> bool:
        """Disable a destination; return False if it already was (its reason is kept)."""
        cursor = self.conn.execute(
            "INSERT INTO destinations (name, disabled_at, disabled_reason) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET disabled_at = excluded.disabled_at,"
            " disabled_reason = excluded.disabled_reason WHERE disabled_at IS NULL",
            (destination, now, reason),
        )
        return cursor.rowcount > 0

    @maps_sqlite_errors
    def enable(self, destination: str) -> bool:
        """Enable a destination again; return False if it was not disabled."""
        cursor = self.conn.execute(
            "UPDATE destinations SET disabled_at = NULL, disabled_reason = NULL"
            " WHERE name = ? AND disabled_at IS NOT NULL",
            (destination,),
        )
        return cursor.rowcount > 0

    @maps_sqlite_errors
    def is_disabled(self, destination: str) -> bool:
        """Return whether the destination is disabled."""
        row = self.conn.execute(
            "SELECT 1 FROM destinations WHERE name = ? AND disabled_at IS NOT NULL",
            (destination,),
        ).fetchone()
        return row is not None

    @maps_sqlite_errors
    def stats(self, now: float, destinations: Iterable[str] = ()) -> list[DestinationStats]:
        """Return the state of every destination named here or present in the file, by name."""
        pending = {
            name: (count, oldest, failing)
            for name, count, oldest, failing in self.conn.execute(
                "SELECT destination, COUNT(*), MIN(created_at), SUM(last_attempt_at IS NOT NULL)"
                " FROM deliveries WHERE delivered_at IS NULL GROUP BY destination"
            )
        }
        dead = dict(
            self.conn.execute(
                "SELECT destination, COUNT(*) FROM dead_letters GROUP BY destination"
            ).fetchall()
        )
        disabled = {
            name: (at, reason)
            for name, at, reason in self.conn.execute(
                "SELECT name, disabled_at, disabled_reason FROM destinations"
            )
        }
        names = sorted({*destinations, *pending, *dead, *disabled})
        result = []
        for name in names:
            count, oldest, failing = pending.get(name, (0, None, 0))
            disabled_at, reason = disabled.get(name, (None, None))
            result.append(
                DestinationStats(
                    name=name,
                    pending=count,
                    oldest_age=None if oldest is None else max(0.0, now - oldest),
                    failing=failing,
                    dead=dead.get(name, 0),
                    disabled_at=disabled_at,
                    disabled_reason=reason,
                )
            )
        return result

    # Dead letters.

    @maps_sqlite_errors
    def dead_letters(
        self,
        *,
        destination: str | None = None,
        since: float | None = None,
        msg_ids: Collection[str] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """List dead letters in enqueue order, optionally filtered.

        Args:
            destination: only this destination's.
            since: only deliveries enqueued at or after this time (the event's time, not the
                time it died, so that "since the outage began" selects what users expect).
            msg_ids: only these message ids.
            limit: at most this many, the oldest first.
        """
        params = filter_params(destination, since, None, msg_ids)
        rows = self.conn.execute(SELECT_DEAD, {**params, "limit": -1 if limit is None else limit})
        return [DeadLetter(*row) for row in rows]

    @maps_sqlite_errors
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
        """Move dead letters, delivered rows or both back to pending, due at ``now`` with
        their attempts reset.

        They keep their ``msg_id`` (receivers deduplicate on it) and their place in the
        enqueue order. The filters are those of :meth:`dead_letters`, plus ``until``
        (enqueued before it); none means all.

        Returns:
            How many deliveries were moved back (with ``dry_run``: would be), by source.
        """
        params = filter_params(destination, since, until, msg_ids)
        if dry_run:
            return {
                source: self.conn.execute(COUNT_REPLAYABLE[source], params).fetchone()[0]
                for source in sources
            }
        moved: dict[ReplaySource, int] = {}
        with self.transaction():
            for source in sources:
                first, then = REPLAY[source]
                cursor = self.conn.execute(first, {**params, "now": now})
                if source == "dead":
                    moved[source] = cursor.rowcount
                    self.conn.execute(then, params)
                else:
                    moved[source] = self.conn.execute(then, {**params, "now": now}).rowcount
        return moved
