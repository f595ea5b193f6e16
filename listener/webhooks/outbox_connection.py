"""One connection to an outbox file: opening it at the current schema, transactions, errors.

The delivery engine and the CLI open the same file from two processes while the daemon runs.
WAL journaling lets that reader/writer pair proceed without blocking each other for long, and
``busy_timeout`` makes a writer wait for the other's commit instead of failing.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from listener.core.errors import ListenerError
from listener.core.sqlite import Database
from listener.webhooks.outbox_schema import MIGRATIONS

__all__ = ["OutboxConnection", "OutboxError", "maps_sqlite_errors"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_C = TypeVar("_C", bound="OutboxConnection")


class OutboxError(ListenerError):
    """The outbox file could not be opened, read or written (the message says why)."""


def maps_sqlite_errors(
    method: Callable[Concatenate[_C, _P], _R],
) -> Callable[Concatenate[_C, _P], _R]:
    """Translate sqlite3 errors raised by an outbox method into :class:`OutboxError`."""

    @functools.wraps(method)
    def wrapper(self: _C, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {method.__name__} failed: {exc}") from exc

    return wrapper


class OutboxConnection(Database):
    """One connection to an outbox file, which is created (or migrated) on open.

    Use it from one thread at a time (a dedicated worker thread may own it). Methods are
    atomic on their own; wrap several in :meth:`transaction` to commit them as one. Every
    method raises :class:`OutboxError` when SQLite fails (a lock held longer than
    ``busy_timeout``, a full disk, a corrupt file); anything else is a bug.
    """

    what = "outbox"
    error = OutboxError
    migrations = tuple(
        tuple(statement for statement in step.split(";") if statement.strip())
        for step in MIGRATIONS
    )
