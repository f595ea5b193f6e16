"""The durable webhook outbox: pending deliveries, dead letters and disabled destinations.

Pure storage over one SQLite file: no HTTP, no asyncio, no clock (every method that needs the
time takes ``now``, seconds since the epoch). The delivery engine (:mod:`.forwarder`)
drives it from a single thread of its own (:mod:`.store`); the CLI opens the same file from
another process while the daemon runs (:mod:`.outbox_connection` says how they share it).
The file's schema and the longer queries are in :mod:`.outbox_schema`, the rows that go in
and come out in :mod:`.outbox_rows`.

Theory of operation. A delivery is one event for one destination. It is inserted before its
first attempt and moved to ``delivered`` once a 2xx answer arrives; until then it is *pending*.
A failed attempt reschedules it; when its retry schedule is exhausted, or the outbox bound for
its destination is exceeded, it moves to ``dead_letters``. :meth:`Outbox.replay` moves dead or
delivered ones back to pending. Its ``msg_id`` (the Standard Webhooks ``webhook-id``) never
changes along the way, and it is in exactly one of the three tables. Every attempt is recorded
in ``attempts``; those and the delivered rows are kept for a retention period
(:meth:`Outbox.prune`), dead letters until replayed.

Nothing here marks a row as "being attempted": one process delivers from a file, and it keeps
the ids of its in-flight rows in memory and passes them as ``exclude``. After a crash nothing is
stranded: every pending row is simply due again.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from typing import Literal

from listener.webhooks.outbox_connection import OutboxConnection, maps_sqlite_errors
from listener.webhooks.outbox_rows import (
    Attempt,
    Claim,
    DeadLetter,
    Delivery,
    DestinationStats,
    NewDelivery,
)
from listener.webhooks.outbox_schema import (
    BURY,
    COUNT_REPLAYABLE,
    DELETE_REPLAYED,
    DELIVER,
    INSERT_ATTEMPTS,
    PRUNE,
    REPLAY,
    SELECT_ATTEMPTS,
    SELECT_DEAD,
    SELECT_DUE,
    SELECT_NEXT_DUE,
    eligible_params,
    filter_params,
)

__all__ = ["Outbox", "ReplaySource"]

ReplaySource = Literal["dead", "delivered"]
_DEAD_ONLY: tuple[ReplaySource, ...] = ("dead",)


class Outbox(OutboxConnection):
    """The outbox stored in one SQLite file, created on first open.

    How to open it, share it between threads, group calls in transactions and what it raises:
    see :class:`~listener.webhooks.outbox_connection.OutboxConnection`.
    """

    # Pending deliveries.

    @maps_sqlite_errors
    def add(self, deliveries: Iterable[NewDelivery]) -> None:
        """Insert deliveries; one whose (destination, msg_id) is already pending is skipped."""
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
        self,
        destination: str,
        now: float,
        limit: int,
        *,
        exclude: Collection[str] = (),
        per_call: bool = False,
    ) -> list[Delivery]:
        """Return up to ``limit`` deliveries due at ``now``, earliest due first.

        Nothing is returned while the destination is disabled. Rows whose ``msg_id`` is in
        ``exclude`` (the caller's in-flight attempts) are skipped. With ``per_call``, a row is
        skipped while an earlier delivery of the same call to this destination is pending.
        """
        if self.is_disabled(destination):
            return []
        params = eligible_params(destination, exclude, per_call)
        rows = self.conn.execute(SELECT_DUE, {**params, "now": now, "limit": limit})
        return [Delivery(*row) for row in rows]

    @maps_sqlite_errors
    def next_due(
        self, destination: str, *, exclude: Collection[str] = (), per_call: bool = False
    ) -> float | None:
        """Return when the next eligible delivery falls due (see :meth:`due`), or None.

        None also while the destination is disabled.
        """
        if self.is_disabled(destination):
            return None
        params = eligible_params(destination, exclude, per_call)
        row = self.conn.execute(SELECT_NEXT_DUE, params).fetchone()
        return None if row is None else float(row[0])

    def claim(
        self,
        destination: str,
        now: float,
        limit: int,
        *,
        exclude: Collection[str] = (),
        per_call: bool = False,
        max_pending: int | None = None,
        max_age: float | None = None,
    ) -> Claim:
        """Enforce the outbox bound if one is given (see :meth:`evict`), then return up to
        ``limit`` due deliveries (see :meth:`due`) and when the next one after them falls due.
        """
        evicted: dict[str, int] = {}
        if max_pending is not None or max_age is not None:
            evicted = self.evict(
                destination, now, max_pending=max_pending, max_age=max_age, exclude=exclude
            )
        rows = self.due(destination, now, limit, exclude=exclude, per_call=per_call)
        taken = {*exclude, *(row.msg_id for row in rows)}
        return Claim(rows, self.next_due(destination, exclude=taken, per_call=per_call), evicted)

    @maps_sqlite_errors
    def mark_delivered(self, destination: str, delivered: Collection[tuple[str, float]]) -> None:
        """Move deliveries answered with a 2xx, given as ``(msg_id, when)``, to ``delivered``."""
        with self.transaction():
            self.conn.executemany(DELIVER, ((at, destination, msg_id) for msg_id, at in delivered))
            self.conn.executemany(
                "DELETE FROM deliveries WHERE destination = ? AND msg_id = ?",
                ((destination, msg_id) for msg_id, _ in delivered),
            )

    @maps_sqlite_errors
    def pending_count(self, destination: str) -> int:
        """Return how many deliveries to ``destination`` are pending."""
        (count,) = self.conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE destination = ?", (destination,)
        ).fetchone()
        return int(count)

    # Attempts and what was delivered.

    @maps_sqlite_errors
    def record_attempts(self, attempts: Iterable[Attempt]) -> None:
        """Add attempts to the record."""
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
        """Return the recorded attempts of message ``msg_id``, to any destination, in order."""
        rows = self.conn.execute(SELECT_ATTEMPTS, (msg_id,))
        return [Attempt(*row[:8], *(bool(flag) for flag in row[8:])) for row in rows]

    @maps_sqlite_errors
    def whereabouts(self, destination: str, msg_id: str) -> tuple[str, float | None] | None:
        """Return where a delivery is: ``pending`` (with None), ``dead`` (with when it died) or
        ``delivered`` (with when); None if the outbox does not have it (any more)."""
        row = self.conn.execute(
            "SELECT 'pending', NULL FROM deliveries WHERE destination = :d AND msg_id = :m"
            " UNION ALL SELECT 'dead', dead_at FROM dead_letters"
            " WHERE destination = :d AND msg_id = :m"
            " UNION ALL SELECT 'delivered', delivered_at FROM delivered"
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
            for statement in PRUNE.values():
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
            " last_status = ?, last_error = ? WHERE destination = ? AND msg_id = ?",
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
        exclude: Collection[str] = (),
    ) -> dict[str, int]:
        """Enforce the outbox bound: move the oldest pending deliveries to the dead letters.

        Deliveries older than ``max_age`` seconds go first (reason ``max_age``), then the
        oldest ones beyond ``max_pending`` (reason ``max_pending``). Rows in ``exclude`` (being
        attempted) stay, and count towards ``max_pending``.

        Returns:
            How many deliveries were moved, by reason; empty when the bound holds.
        """
        moved: dict[str, int] = {}
        with self.transaction():
            if max_age is not None:
                victims = self.conn.execute(
                    "SELECT msg_id FROM deliveries WHERE destination = ? AND created_at < ?"
                    " AND msg_id NOT IN (SELECT value FROM json_each(?))",
                    (destination, now - max_age, json.dumps(list(exclude))),
                ).fetchall()
                self._bury_all(destination, victims, now, "max_age", moved)
            if max_pending is not None:
                (pending,) = self.conn.execute(
                    "SELECT COUNT(*) FROM deliveries WHERE destination = ?", (destination,)
                ).fetchone()
                victims = self.conn.execute(
                    "SELECT msg_id FROM deliveries WHERE destination = ?"
                    " AND msg_id NOT IN (SELECT value FROM json_each(?)) ORDER BY seq LIMIT ?",
                    (destination, json.dumps(list(exclude)), max(0, pending - max_pending)),
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
                " FROM deliveries GROUP BY destination"
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
        sources: Collection[ReplaySource] = _DEAD_ONLY,
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
                moved[source] = self.conn.execute(REPLAY[source], {**params, "now": now}).rowcount
                self.conn.execute(DELETE_REPLAYED[source], params)
        return moved
