"""What every SQLite file of the daemon shares: WAL, a versioned schema, one connection.

A subclass of :class:`Database` names its schema steps and its error class; opening a file
applies the steps it has not had, in order, and refuses a file written by a newer version.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import ClassVar, Self

from listener.core.errors import ListenerError

__all__ = ["Database"]


class Database:
    """One SQLite file, opened with WAL journaling and its schema checked.

    Use it from one thread at a time (a worker thread may own it: the connection is opened
    with ``check_same_thread=False``). WAL lets another process read while this one writes,
    and ``synchronous = NORMAL`` loses at most the last commits on power loss, never on a
    crash of this process, while sparing an fsync per commit.

    Args:
        path: the database file; its directory must exist.
        busy_timeout: seconds to wait for another connection's write lock before failing.

    Raises:
        error: the file cannot be opened or was written by a newer schema version.
    """

    #: What the file is, for messages (``call store``).
    what: ClassVar[str]
    #: The exception raised for every SQLite failure.
    error: ClassVar[type[ListenerError]]
    #: The schema's steps, each a sequence of statements: step ``n`` takes a file from
    #: ``PRAGMA user_version`` n to n + 1 (the first creates it).
    migrations: ClassVar[Sequence[Sequence[str]]]

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        with self.translated("open"):
            self.conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
        try:
            with self.translated("open"):
                self._create()
        except BaseException:
            self.conn.close()
            raise

    def _create(self) -> None:
        """Switch to WAL; create the schema, or check that it is one this code knows."""
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        current = len(self.migrations)
        with self.transaction():
            (version,) = self.conn.execute("PRAGMA user_version").fetchone()
            if version > current:
                raise self.error(
                    f"{self.what} schema version {version} is newer than this program's ({current})"
                )
            # One transaction for every step: a file is at its old version or the current
            # one, never half-way.
            for step in self.migrations[version:]:
                for statement in step:
                    self.conn.execute(statement)
            if version < current:
                self.conn.execute(f"PRAGMA user_version = {current:d}")

    def close(self) -> None:
        """Close the file; calling it again does nothing."""
        self.conn.close()

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
        """Run the enclosed statements as one transaction; nested uses join the outer one.

        The write lock is taken at the start (``BEGIN IMMEDIATE``), so a transaction never
        fails half-way because another connection wrote first.
        """
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def translated(self, action: str) -> Iterator[None]:
        """Raise SQLite's errors in the enclosed code as :attr:`error`, naming ``action``."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self.error(f"{self.what} {action} failed: {exc}") from exc
