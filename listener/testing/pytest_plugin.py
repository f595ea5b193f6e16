"""pytest plugin (entry point ``pytest11``): the ``fake_sippet`` fixture for plugin authors.

Installed with sippet-listener; the fixture needs ``pytest-asyncio`` (the ``testing`` extra)::

    async def test_my_handler(fake_sippet):
        await fake_sippet.broadcast("incoming_call", {"callUuid": "c-1"})

pytest loads this plugin in every environment sippet-listener is installed in, with the extra
or without it, so loading it must never fail: without pytest-asyncio, only a test that asks
for ``fake_sippet`` fails, saying what to install.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NoReturn

import pytest

from listener.testing.server import FakeSippet

__all__ = ["fake_sippet"]

_NEEDS_ASYNCIO = (
    "the fake_sippet fixture needs pytest-asyncio: pip install 'sippet-listener[testing]'"
)


async def _running_fake() -> AsyncIterator[FakeSippet]:
    """A running fake Sippet on loopback, with default behaviour, stopped after the test."""
    async with FakeSippet() as fake:
        yield fake


def _needs_pytest_asyncio() -> NoReturn:
    """Stands in for the fake Sippet where pytest-asyncio is not installed."""
    pytest.fail(_NEEDS_ASYNCIO, pytrace=False)


# One name, two fixture types (pytest-asyncio's and pytest's own).
fake_sippet: object
try:
    from pytest_asyncio import fixture as _async_fixture
except ImportError:
    fake_sippet = pytest.fixture(_needs_pytest_asyncio, name="fake_sippet")
else:
    fake_sippet = _async_fixture(_running_fake, name="fake_sippet")
