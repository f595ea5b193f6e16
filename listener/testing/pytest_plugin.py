"""pytest plugin (entry point ``pytest11``): the ``fake_sippet`` fixture for plugin authors.

Installed with sippet-listener; needs ``pytest-asyncio`` (the ``testing`` extra)::

    async def test_my_handler(fake_sippet):
        await fake_sippet.broadcast("incoming_call", {"callUuid": "c-1"})
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from listener.testing.server import FakeSippet

__all__ = ["fake_sippet"]


@pytest_asyncio.fixture
async def fake_sippet() -> AsyncIterator[FakeSippet]:
    """A running fake Sippet on loopback, with default behaviour, stopped after the test."""
    async with FakeSippet() as fake:
        yield fake
