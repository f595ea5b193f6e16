"""Shared fixtures: a fake Sippet on loopback and a session running against it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from listener.cluster.database import connect
from listener.cluster.schema import migrate
from listener.cluster.url import StoreUrl
from listener.core.events import Event
from listener.core.retry import BackoffPolicy
from listener.realtime.connection import LinkSettings
from listener.realtime.session import LinkWatch, Session, SessionSettings
from listener.realtime.tokens import TokenSource
from listener.testing import FakeSippet
from tests.postgres import PostgresServer, postgres_server

# Timing-driven tests scale from this unit (seconds) so the suite stays fast.
MS = 0.001


class Collector:
    """Receives events like a handler would, and lets a test wait for a count of them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Event]:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.events

    def payloads(self, key: str) -> list[Any]:
        return [event.payload.get(key) for event in self.events]


def fast_settings(base_url: str, **overrides: Any) -> SessionSettings:
    """Session settings with short intervals, suitable for tests."""
    link = LinkSettings(
        heartbeat_interval=1.0, join_timeout=2.0, connect_timeout=2.0, close_timeout=1.0
    )
    settings = SessionSettings(
        base_url,
        link,
        backoff=BackoffPolicy(initial=50 * MS, cap=400 * MS),
        rotation_retry=200 * MS,
    )
    link_fields = {k: overrides.pop(k) for k in list(overrides) if hasattr(link, k)}
    return replace(settings, link=replace(link, **link_fields), **overrides)


@pytest.fixture
async def fake() -> AsyncIterator[FakeSippet]:
    async with FakeSippet(api_key="sk_test_4f1c9a7e2b") as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


RunSession = Callable[..., contextlib.AbstractAsyncContextManager[tuple[Session, Collector]]]


@pytest.fixture
def run_session(fake: FakeSippet, http: httpx.AsyncClient) -> RunSession:
    """Start a session against ``fake``; yields (session, collector), stops it afterwards."""

    @contextlib.asynccontextmanager
    async def start(
        *,
        wait_joined: bool = True,
        api_key: str | None = None,
        watch: LinkWatch | None = None,
        **overrides: Any,
    ) -> AsyncIterator[tuple[Session, Collector]]:
        collector = Collector()
        tokens = TokenSource(http, fake.base_url, api_key or fake.api_key)
        settings = fast_settings(fake.base_url, **overrides)
        session = Session(settings, tokens, collector, watch=watch)
        task = asyncio.create_task(session.run())
        try:
            if wait_joined:
                async with asyncio.timeout(10):
                    await session.joined.wait()
            yield session, collector
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await session.stop()

    return start


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (started on first use)."""
    with postgres_server() as server:
        yield server


_databases = itertools.count()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL of a fresh, empty database of its own for this test."""
    postgres.ensure_running()
    return postgres.create_database(f"test_{next(_databases)}")


@pytest.fixture
async def store(pg_url: str) -> StoreUrl:
    """A fresh shared store of its own for this test, migrated."""
    url = StoreUrl(pg_url)
    async with await connect(url) as conn:
        await migrate(conn, url)
    return url
