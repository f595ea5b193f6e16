"""The outbox and the one thread that owns its connection, so SQLite never blocks the loop."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Concatenate, ParamSpec, TypeVar

from listener.webhooks.outbox import Outbox

__all__ = ["Store"]

_T = TypeVar("_T")
_P = ParamSpec("_P")


class Store:
    """Runs calls on the outbox, one at a time, on the outbox's own thread.

    A call runs to its end even if the awaiting task is cancelled: what must happen with a
    commit (counting, logging) belongs inside the call, not after the ``await``.
    """

    def __init__(self, executor: ThreadPoolExecutor, outbox: Outbox) -> None:
        self._executor = executor
        self._outbox = outbox

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open (or create) the outbox on a new thread."""
        executor = ThreadPoolExecutor(1, thread_name_prefix="sippet-outbox")
        try:
            outbox = await asyncio.get_running_loop().run_in_executor(executor, Outbox, path)
        except BaseException:
            executor.shutdown()
            raise
        return cls(executor, outbox)

    async def run(
        self, function: Callable[Concatenate[Outbox, _P], _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Return ``function(outbox, *args, **kwargs)``, run on the outbox thread."""
        call = functools.partial(function, self._outbox, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        """Close the outbox and end its thread."""
        await self.run(Outbox.close)
        self._executor.shutdown()
