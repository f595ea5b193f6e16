"""The outbox's thread and its checkpointer, on a real file: the WAL is copied back off the
commit path and does not grow without bound."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import cast

import pytest

from listener.webhooks import store as store_module
from listener.webhooks.outbox import Outbox
from listener.webhooks.outbox_rows import NewDelivery
from listener.webhooks.outbox_store import OutboxStore
from listener.webhooks.store import Store


def rows(start: int, count: int) -> list[NewDelivery]:
    now = time.time()
    return [
        NewDelivery("a", f"msg_{i}", "e", None, b"x" * 400, now, now)
        for i in range(start, start + count)
    ]


async def commit(store: Store, batch: list[NewDelivery]) -> None:
    await store.run(lambda outbox: outbox.commit(batch, []))


def size(path: Path) -> int:
    return path.stat().st_size


def autocheckpoint(outbox: OutboxStore) -> int:
    (pages,) = cast(Outbox, outbox).conn.execute("PRAGMA wal_autocheckpoint").fetchone()
    return int(pages)


async def test_commits_never_checkpoint_and_the_checkpointer_copies_the_wal_back(
    tmp_path: Path,
) -> None:
    """The writer's connection has no automatic checkpoint; the database file grows anyway,
    from the checkpointer's own connection, and the rows are all there once reopened."""
    path = tmp_path / "outbox.sqlite3"
    store = await Store.open(path)
    try:
        assert await store.run(autocheckpoint) == 0
        empty = size(path)
        await commit(store, rows(0, 500))
        async with asyncio.timeout(5):
            # Nothing announces a checkpoint: the database file growing is what shows it.
            while size(path) <= empty:  # noqa: ASYNC110
                await asyncio.sleep(store_module._CHECKPOINT_EVERY)
    finally:
        await store.close()
    with Outbox(path) as reopened:
        assert reopened.pending_count("a") == 500


async def test_the_wal_starts_over_once_it_passes_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound, a checkpoint completes on the writer's thread and the next commits
    reuse the WAL from its start: its file stays far below what went through it."""
    monkeypatch.setattr(store_module, "_WRAP_FRAMES", 64)
    path = tmp_path / "outbox.sqlite3"
    wal = Path(f"{path}-wal")
    store = await Store.open(path)
    try:
        # 1,500 commits at about the pace of a busy daemon (a few hundred a second): some
        # 60 MB of pages through a WAL that would hold them all if it never started over.
        for start in range(0, 15_000, 10):
            await commit(store, rows(start, 10))
            await asyncio.sleep(0.001)
        assert size(wal) < 16_000_000
    finally:
        await store.close()
