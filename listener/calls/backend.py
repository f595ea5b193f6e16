"""The call store's interface: what the persister writes the call map and the gap record
through, with two implementations.

- :class:`~listener.calls.store.CallStore`: one SQLite file under ``service.state_dir``, the
  default, for an instance on its own.
- :class:`~listener.calls.shared.SharedCallStore` (``[store]``): the same file, and behind it
  the PostgreSQL store every instance of a cluster shares, so that an instance that starts
  knows the calls the others saw and the moment until which the cluster missed nothing.

Both are used from one worker thread at a time (the persister's), and read back on the event
loop through a :class:`~listener.calls.store.CallReader` of the SQLite file at :attr:`path`:
the shared one keeps that file a superset of what the instance knows, so a read back never
waits for the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from listener.calls.state import CallRecord

__all__ = ["CallBackend"]


class CallBackend(Protocol):
    """The call store as the persister uses it. Every method raises
    :class:`~listener.calls.store.StoreError` when the local file fails."""

    @property
    def path(self) -> Path:
        """The SQLite file the calls let go of are read back from."""
        ...

    def save(
        self,
        now: float,
        *,
        calls: Iterable[CallRecord] = (),
        handled: Iterable[str] = (),
        handled_calls: Iterable[tuple[str, str]] = (),
        seen_until: float | None = None,
    ) -> None:
        """Write a batch: calls, ids and lifecycle events (call key, event name) handled at
        ``now``, and the last moment until which nothing was missed."""
        ...

    def calls(self, since: float | None = None) -> list[CallRecord]:
        """Every stored call, or the open ones and those whose last event came since."""
        ...

    def handled_ids(self) -> set[str]:
        """The ids stored as handled."""
        ...

    def handled_calls(self, since: float | None = None) -> list[tuple[str, str]]:
        """The lifecycle events stored as handled (of the calls :meth:`calls` returns)."""
        ...

    def last_seen(self) -> float | None:
        """The last moment until which nothing was missed, or None without history."""
        ...

    def ended_keys(self) -> list[str]:
        """The keys of the stored calls that ended."""
        ...

    def prune(self, before: float) -> int:
        """Forget what is older than ``before``; return how many calls went."""
        ...

    def close(self) -> None:
        """Close the store."""
        ...
