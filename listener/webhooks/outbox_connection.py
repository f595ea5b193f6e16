"""One connection to an outbox file: opening it at the current schema, transactions, errors.

The delivery engine and the CLI open the same file from two processes while the daemon runs.
WAL journaling lets that reader/writer pair proceed without blocking each other for long, and
``busy_timeout`` makes a writer wait for the other's commit instead of failing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Concatenate, ParamSpec, Self, TypeVar

from listener.core.errors import ListenerError
from listener.webhooks.outbox_schema import MIGRATIONS, SCHEMA_VERSION

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


class OutboxConnection:
    """One connection to an outbox file, which is created on first open.

    Use it from one thread at a time (the connection is opened with
    ``check_same_thread=False`` so that a dedicated worker thread may own it). Methods are
    atomic on their own; wrap several in :meth:`transaction` to commit them as one. Every
    method raises :class:`OutboxError` when SQLite fails (a lock held longer than
    ``busy_timeout``, a full disk, a corrupt file); anything else is a bug.

    Args:
        path: the database file; its directory must exist.
        busy_timeout: seconds to wait for another process's write lock before failing.

    Raises:
        OutboxError: the file cannot be opened or was written by a newer schema version.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        try:
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox open failed: {exc}") from exc
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise

    @maps_sqlite_errors
    def _setup(self) -> None:
        """Switch to WAL and create or check the schema."""
        self._conn.execute("PRAGMA journal_mode = WAL")
        # With WAL, NORMAL loses at most the last commits on power loss, never on a crash of
        # this process, and skips an fsync per commit.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        with self.transaction():
            (version,) = self._conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"outbox schema version {version} is newer than this program's"
                    f" ({SCHEMA_VERSION})"
                )
            # One transaction for every step: a file is at its old version or the current one,
            # never half-way.
            for step in MIGRATIONS[version:]:
                for statement in step.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
            if version < SCHEMA_VERSION:
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection; calling it again does nothing."""
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the enclosed calls as one transaction; nested uses join the outer one.

        The write lock is taken at the start (``BEGIN IMMEDIATE``), so a transaction never
        fails half-way because another process wrote first.
        """
        if self._conn.in_transaction:
            yield
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
