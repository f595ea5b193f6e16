"""The outbox's gauges: measured as often as their cost allows, on a real outbox file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path

from listener.webhooks.gauges import Gauges
from listener.webhooks.outbox import Outbox
from listener.webhooks.outbox_rows import DestinationStats
from listener.webhooks.store import Store


class SlowOutbox(Outbox):
    """An outbox whose measure takes 20 ms, as one of ~60,000 pending rows does."""

    measures = 0

    def stats(self, now: float, destinations: Iterable[str] = ()) -> list[DestinationStats]:
        SlowOutbox.measures += 1
        time.sleep(0.02)
        return super().stats(now, destinations)


async def test_a_costly_measure_is_repeated_a_twentieth_of_the_time_at_most_unless_forced(
    tmp_path: Path,
) -> None:
    store = await Store.open_with(lambda: SlowOutbox(tmp_path / "outbox.sqlite3"))
    gauges = Gauges(["crm"])
    try:
        SlowOutbox.measures = 0
        started = time.monotonic()
        while time.monotonic() - started < 0.5:
            await gauges.measure(store)
            # A housekeeper's round every 5 ms.
            await asyncio.sleep(0.005)
        took = time.monotonic() - started
        # 20 ms, then at least 380 ms before the next: 2 in half a second (without the
        # bound, 20).
        assert SlowOutbox.measures <= 1 + took / 0.4
        assert [entry.name for entry in gauges.stats] == ["crm"]
        before = SlowOutbox.measures
        await gauges.measure(store, force=True)
        assert SlowOutbox.measures == before + 1
    finally:
        await store.close()
