"""What the delivery engine and the CLI ask of an outbox: the one interface a store implements.

:class:`~listener.webhooks.outbox.Outbox` (SQLite, one file) satisfies it, and so does
:class:`~listener.webhooks.shared_outbox.SharedOutbox` (the PostgreSQL store several instances
share: claims with ``FOR UPDATE SKIP LOCKED`` under a lease); nothing else is needed above
it. Every method is synchronous and called from one thread at a time (:mod:`.store` runs the
engine's on a thread of its own); times are seconds since the epoch, passed in.

The contract of a claim: :meth:`OutboxStore.claim` (or a commit, of the rows it inserts)
returns due rows that no other claim returns until :meth:`OutboxStore.commit` records their
outcomes or :meth:`OutboxStore.release` gives them back; a claim does not outlive the
process that made it (the SQLite store keeps it in memory; the shared store,
:mod:`.shared_outbox`, puts a lease on the row that :meth:`OutboxStore.renew` extends), so a
row claimed but never finished is due again after a crash.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Literal, Protocol

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

__all__ = ["DEAD_ONLY", "OutboxStore", "ReplaySource"]

ReplaySource = Literal["dead", "delivered"]
DEAD_ONLY: tuple[ReplaySource, ...] = ("dead",)


class OutboxStore(Protocol):
    """The outbox, as the worker, the writer, the forwarder's housekeeping and the CLI use it."""

    # The delivery engine.

    def commit(
        self, rows: Sequence[NewDelivery], outcomes: Sequence[Outcome], take: Take | None = None
    ) -> list[Delivery]:
        """Insert new deliveries (one already stored is skipped) and record attempts'
        outcomes, atomically; the outcomes' rows are no longer claimed once it returns.

        With ``take``, the commit may also claim some of its new rows for the caller, as a
        claim right after it would (due by ``take.now``, at most ``take.limits`` a
        destination, none while the destination is disabled, none behind an earlier pending
        row of its call for ``take.per_call``), and returns those; a store may claim none.
        """
        ...

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
        """Enforce the bound if given (oldest unclaimed pending rows to the dead letters),
        then claim up to ``limit`` due rows, earliest due first (none while the destination
        is disabled; with ``per_call``, none behind an earlier pending row of its call)."""
        ...

    def release(self, destination: str, msg_ids: Iterable[str]) -> None:
        """Give back claimed rows unattempted: they are due as they were."""

    def renew(self) -> None:
        """Keep the claims held (called every ``poll_interval`` or so): a store whose claims
        are leases extends them when they are due for it; one whose claims live in memory
        has nothing to do."""

    def pending_count(self, destination: str) -> int:
        """How many deliveries to ``destination`` are pending (claimed ones included)."""
        ...

    def prune(self, before: float, limit: int = 10_000) -> int:
        """Forget attempts and delivered rows older than ``before``, about ``limit`` of each
        at most; return how many went."""
        ...

    def close(self) -> None:
        """Close the store; claims end with it."""

    # Inspection and repair (the CLI; the gauges use stats too).

    def stats(self, now: float, destinations: Iterable[str] = ()) -> list[DestinationStats]:
        """Every destination named here or stored, by name."""
        ...

    def dead_letters(
        self,
        *,
        destination: str | None = None,
        since: float | None = None,
        msg_ids: Collection[str] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """Dead letters in enqueue order, filtered."""
        ...

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
        """Make dead or delivered deliveries pending again, same ids; counts by source."""
        ...

    def attempts(self, msg_id: str) -> list[Attempt]:
        """A message's attempts to any destination in time order, its 2xx included."""
        ...

    def whereabouts(self, destination: str, msg_id: str) -> tuple[str, float | None] | None:
        """``pending``, ``dead`` or ``delivered`` (with when), or None if not stored."""
        ...

    def disable(self, destination: str, now: float, reason: str) -> bool:
        """Disable a destination (the status page's pause); False if it already was."""
        ...

    def enable(self, destination: str) -> bool:
        """Enable a destination disabled by a 410; False if it was not disabled."""
        ...
