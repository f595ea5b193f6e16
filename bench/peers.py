"""The clients compared, and the peers' own virtualenvs under ``bench/.venvs/``.

Each peer gets a venv of its own, created on first use with ``python -m venv`` and pinned
versions (the peer baseline's): ``realtime`` pins ``websockets<16``, so it cannot share ours.
A venv is reused while its recorded requirements match.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import ROOT

__all__ = [
    "BARE",
    "DAEMON",
    "DAEMON_UVLOOP",
    "OURS",
    "PEERS",
    "PRODUCTION",
    "Client",
    "ensure_venv",
]

VENVS = ROOT / "bench" / ".venvs"
_MARKER = "bench-requirements.txt"


@dataclass(frozen=True, slots=True)
class Client:
    """One client: how to run its driver, and what was changed so it can run at all."""

    key: str
    label: str
    script: str
    requirements: tuple[str, ...] = ()
    shims: str = "none"
    options: dict[str, object] = field(default_factory=dict)

    @property
    def is_peer(self) -> bool:
        return bool(self.requirements)


BARE = Client("bare", "bare websockets+json loop (limit)", "bare.py")
DAEMON = Client(
    "sippet",
    "sippet-listener (Daemon, no-op handler)",
    "daemon.py",
    # Backoff resets after a socket stayed joined 0.5 s instead of 30 s, so that the recovery
    # trials, 0.75 s apart, each measure "a drop after a healthy period". The loop is
    # asyncio's, named: the [fast] extra's uvloop is DAEMON_UVLOOP's, in the same run.
    options={"sippet": {"stable_after": 0.5}, "loop": "asyncio"},
)
DAEMON_UVLOOP = Client(
    "sippet-uvloop",
    "sippet-listener (Daemon, no-op handler, uvloop)",
    "daemon.py",
    options={"sippet": {"stable_after": 0.5}, "loop": "uvloop"},
)
OURS = (DAEMON, DAEMON_UVLOOP)
# `sippet-listener run` as a user installs it, for the idle RSS rows: the bench's own venv has
# the dev extras, whose import-linter brings rich, which structlog and httpx then import.
PRODUCTION = (
    Client("production", "pip install sippet-listener", "", ("-e", str(ROOT))),
    Client("production-fast", "pip install sippet-listener[fast]", "", ("-e", f"{ROOT}[fast]")),
)
PEERS = (
    Client(
        "realtime",
        "realtime 2.34.1 (supabase)",
        "realtime_peer.py",
        ("realtime==2.34.1", "websockets==15.0.1", "pydantic==2.14.3", "httpx==0.28.1"),
        "VSN=2.0.0; V1<->V2 translator + broadcast re-wrap; bare topic",
    ),
    Client(
        "phoenix",
        "phoenix-channels-python-client 0.4.1",
        "phoenix_peer.py",
        ("phoenix-channels-python-client==0.4.1", "websockets==17.4", "pydantic==2.14.3"),
        "null-join_ref broadcast fix; max_topic_queue_size=1_000_000",
    ),
)


def ensure_venv(client: Client, log: Path) -> Path:
    """The Python of ``client``'s venv, created (or re-created) if need be.

    Raises:
        RuntimeError: the venv or the install failed (the log holds pip's output).
    """
    if not client.is_peer:
        return Path(sys.executable)
    venv = VENVS / client.key
    python = venv / "bin" / "python"
    wanted = "\n".join(client.requirements) + "\n"
    marker = venv / _MARKER
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    with log.open("ab") as out:
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", *client.requirements],
        ]
        for argv in steps:
            done = subprocess.run(argv, stdout=out, stderr=out, timeout=900, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[:4])} failed ({done.returncode}); see {log}")
    marker.write_text(wanted)
    return python
