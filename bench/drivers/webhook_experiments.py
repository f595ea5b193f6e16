"""What changes to the off-limits webhook modules would buy: bench-only stand-ins, measured.

Each option of ``webhook_daemon.py`` here replaces, in the driver's process only, a piece of
``listener.webhooks`` with a rough version of a proposed change, so that ``python -m
bench.endtoend --variant`` measures it side by side with the real thing. They cover the
healthy path the bench drives (one destination, no rate limit, answers 200); they are not the
change itself, only its figure.

- ``prefetch: N``: the worker claims up to ``N`` due rows more than it has free slots and
  keeps them, held, in memory; a free slot takes the next kept row without a claim.
- ``lean_records: true``: a delivered row is only deleted (no copy into ``delivered``), and
  an attempt answered 2xx is not written to ``attempts``: what the records cost.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from listener.webhooks import outbox as outbox_module
from listener.webhooks import worker as worker_module

__all__ = ["install"]


def _prefetching(extra: int) -> None:
    worker_class = worker_module.Worker
    claim = worker_class._claim

    async def prefetching_claim(self: Any) -> float | None:
        ready: deque[Any] = self.__dict__.setdefault("_bench_ready", deque())
        limit, _ = self._allowance()
        if not self.health.healthy or self._bucket is not None:
            # Off the healthy path: give the kept rows back and do as the worker does.
            while ready:
                self.held.discard(ready.popleft().msg_id)
            return await claim(self)
        while limit > 0 and ready:
            _start(self, ready.popleft())
            limit -= 1
        if limit == 0:
            return None
        try:
            found = await self._store.run(
                self._claim_on_store, limit + extra, frozenset(self.held), False
            )
        except Exception:
            return float(self._poll_interval)
        for row in found.rows:
            self.held.add(row.msg_id)
        rows = deque(found.rows)
        while limit > 0 and rows:
            _start(self, rows.popleft())
            limit -= 1
        ready.extend(rows)
        if ready or limit == 0:
            return None
        if found.next_due is None:
            return float(self._poll_interval)
        return float(min(self._poll_interval, max(0.0, found.next_due - time.time())))

    def _start(self: Any, row: Any) -> None:
        task = asyncio.create_task(self._attempt(row, False))
        self.attempts.add(task)
        task.add_done_callback(self._attempt_done)

    worker_class._claim = prefetching_claim  # type: ignore[method-assign]


def _lean_records() -> None:
    outbox_class = outbox_module.Outbox
    record = outbox_class.record_attempts

    def mark_delivered(self: Any, destination: str, delivered: Any) -> None:
        self.conn.executemany(
            "DELETE FROM deliveries WHERE destination = ? AND msg_id = ?",
            ((destination, msg_id) for msg_id, _ in delivered),
        )

    def record_attempts(self: Any, attempts: Any) -> None:
        record(self, [a for a in attempts if a.error_class is not None])

    outbox_class.mark_delivered = mark_delivered  # type: ignore[assignment]
    outbox_class.record_attempts = record_attempts  # type: ignore[assignment]


def install(options: dict[str, Any]) -> None:
    """Apply the experiments named in the driver's options (before the daemon starts)."""
    if options.get("prefetch"):
        _prefetching(int(options["prefetch"]))
    if options.get("lean_records"):
        _lean_records()
