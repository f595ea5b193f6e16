"""``systemctl reload`` that works where ``ExecReload=`` cannot read the service's credentials.

On systemd 252 (Debian 12), ``ExecReload=`` runs in a mount namespace where
``/run/credentials`` is an inaccessible mount (systemd issue #35227), so a reload command that
validates the configuration by reading the secret key itself dies before it signals. So the
validation happens where the secrets are readable: in the daemon. The reload command only
signals it and waits for its verdict:

1. the daemon writes a :class:`ReloadRecord` (``reload-status.json`` in its state directory)
   after every reload it attempts, with a generation counter;
2. ``sippet-listener reload --pid $MAINPID`` reads the current generation, sends SIGHUP, and
   waits until the generation moves on; it exits 0 if the daemon applied the new
   configuration and 78 (printing the daemon's reason) if the daemon refused it and kept the
   running one. systemd reports that exit as the reload's outcome.

The record holds no secret: errors name keys and files, never values.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["STATUS_FILE", "ReloadRecord", "ReloadTimeout", "read_record", "request_reload"]

STATUS_FILE = "reload-status.json"


class ReloadTimeout(Exception):
    """The daemon did not answer a reload within the time allowed."""


@dataclass(frozen=True, slots=True)
class ReloadRecord:
    """What the daemon says about its latest reload.

    Attributes:
        pid: the daemon's process id (a record left by an earlier process is not an answer).
        generation: how many reloads this process has attempted.
        ok: whether the last one was applied.
        error: why it was refused (one line naming the key or file), else None.
    """

    pid: int
    generation: int
    ok: bool
    error: str | None = None

    def write(self, state_dir: Path) -> None:
        """Replace the record atomically: a reader never sees half a file."""
        path = state_dir / STATUS_FILE
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(asdict(self)), encoding="utf-8")
        os.replace(partial, path)


def read_record(state_dir: Path) -> ReloadRecord | None:
    """The daemon's latest record, or None if there is none (yet) or it is unreadable."""
    try:
        data = json.loads((state_dir / STATUS_FILE).read_text(encoding="utf-8"))
        return ReloadRecord(
            pid=int(data["pid"]),
            generation=int(data["generation"]),
            ok=bool(data["ok"]),
            error=data.get("error"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def request_reload(
    pid: int,
    state_dir: Path,
    *,
    timeout: float,
    kill: Callable[[int, int], None] = os.kill,
    poll_interval: float = 0.05,
) -> ReloadRecord:
    """Send SIGHUP to ``pid`` and return the daemon's verdict on that reload.

    Raises:
        ProcessLookupError: no process ``pid``.
        ReloadTimeout: no verdict within ``timeout`` seconds.
    """
    before = read_record(state_dir)
    generation = before.generation if before is not None and before.pid == pid else 0
    kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    # Polling a file: the reload command is a one-shot client, and the daemon's only other
    # channel (sd_notify) talks to systemd, not to us.
    while time.monotonic() < deadline:
        record = read_record(state_dir)
        if record is not None and record.pid == pid and record.generation > generation:
            return record
        time.sleep(poll_interval)
    raise ReloadTimeout(f"the daemon (pid {pid}) gave no answer within {timeout:g}s")
