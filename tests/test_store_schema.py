"""The shared store's migrations: applied once, safe to run twice or on two hosts at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from listener.cluster.database import StoreError, connect
from listener.cluster.schema import SCHEMA_VERSION, migrate
from listener.cluster.store import SharedStore
from listener.cluster.url import StoreUrl
from listener.core.events import Event
from tests.postgres import PASSWORD
from tests.test_cli import run_cli, write_config

TABLES = {
    "sippet_schema",
    "sippet_leases",
    "sippet_events",
    "sippet_claims",
    *("sippet_deliveries", "sippet_dead_letters", "sippet_destinations", "sippet_attempts"),
    *("sippet_calls", "sippet_handled_calls", "sippet_moments"),
}


async def tables(url: StoreUrl) -> set[str]:
    async with await connect(url) as conn:
        rows = await (
            await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ).fetchall()
    return {name for (name,) in rows}


async def test_migrate_creates_the_schema_once(pg_url: str) -> None:
    url = StoreUrl(pg_url)
    async with await connect(url) as conn:
        first = await migrate(conn, url)
        again = await migrate(conn, url)
    assert first.applied == tuple(range(1, SCHEMA_VERSION + 1))
    assert (again.version, again.applied) == (SCHEMA_VERSION, ())
    assert await tables(url) == TABLES


async def test_migrators_starting_together_take_turns(pg_url: str) -> None:
    url = StoreUrl(pg_url)
    conns = [await connect(url) for _ in range(4)]
    try:
        # Someone holds the migration lock: every migrator waits for it ...
        async with await connect(url) as holder, holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock(%s)", (0x736970706574,))
            racing = [asyncio.ensure_future(migrate(conn, url)) for conn in conns]
            done, _ = await asyncio.wait(racing, timeout=0.3)
            assert not done
        # ... and once it is released, exactly one of them applies the schema.
        results = await asyncio.gather(*racing)
    finally:
        for conn in conns:
            await conn.close()
    assert sorted(len(result.applied) for result in results) == [0, 0, 0, SCHEMA_VERSION]
    async with await connect(url) as conn:
        rows = await (await conn.execute("SELECT version FROM sippet_schema")).fetchall()
    assert [version for (version,) in rows] == list(range(1, SCHEMA_VERSION + 1))


async def test_a_schema_newer_than_this_version_is_refused(pg_url: str) -> None:
    url = StoreUrl(pg_url)
    async with await connect(url) as conn:
        await migrate(conn, url)
        await conn.execute("INSERT INTO sippet_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
        with pytest.raises(StoreError, match="newer than this sippet-listener knows"):
            await migrate(conn, url)


async def test_store_migrate_command(tmp_path: Path, pg_url: str) -> None:
    config = write_config(tmp_path / "c.toml", "[store]\nconnect_timeout = 2\n")
    env = {"SIPPET_STORE_URL": pg_url}
    first = await run_cli("store", "migrate", "--config", str(config), env=env)
    second = await run_cli("store", "migrate", "--config", str(config), env=env)
    assert first[0] == 0, first[2]
    assert f"schema version {SCHEMA_VERSION} (applied now: 1" in first[1]
    assert second[:2] == (0, first[1].split(" (")[0] + " (applied now: none)\n")
    assert PASSWORD not in first[1] + first[2] + second[1]
    assert await tables(StoreUrl(pg_url)) == TABLES
    # Without a store configured there is nothing to migrate: a configuration error.
    code, _, err = await run_cli("store", "migrate", "--config", str(config))
    assert code == 78
    assert "store.url: no store configured" in err


async def test_store_status_command(tmp_path: Path, store: StoreUrl) -> None:
    shared = SharedStore(store, tmp_path / "spool.sqlite3", holder="host-a:1:x")
    await shared.open()
    try:
        running = asyncio.create_task(shared.elector.run())
        await asyncio.wait_for(shared.elector.leading.wait(), 5)
        ev = Event("transcript_delta", {"n": 1}, "events", 0.0, id="evt_1")
        assert await shared.claims.claim(ev, "audit", 30)
        config = write_config(tmp_path / "c.toml", "[store]\nconnect_timeout = 2\n")
        env = {"SIPPET_STORE_URL": store.conninfo}
        text = await run_cli("store", "status", "--config", str(config), env=env)
        as_json = await run_cli("store", "status", "--json", "--config", str(config), env=env)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    finally:
        await shared.close()
    assert text[0] == 0, text[2]
    first, lease = text[1].splitlines()
    assert first.endswith(f"schema {SCHEMA_VERSION}; 1 events; claims: 1 in flight, 0 lapsed")
    assert lease.startswith("lease leader: host-a:1:x, term 1, expires in ")
    status = json.loads(as_json[1])
    assert (status["events"], status["in_flight"], status["leases"][0]["term"]) == (1, 1, 1)
    assert PASSWORD not in text[1] + as_json[1]
