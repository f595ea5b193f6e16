"""The plugin authors' door: what ``listener`` and ``listener.testing`` export, and only that."""

from __future__ import annotations

import subprocess
import sys

import pytest

import listener
import listener.testing

# What docs/handlers.md promises plugin authors; removing one breaks plugins in the wild.
PROMISED = {
    "Context",
    "Event",
    "Handler",
    "RpcClient",
    "ValidationResult",
    "handler",
    "ListenerError",
    "ConfigError",
    "RpcError",
    "RpcActionError",
    "RpcInputError",
}


@pytest.mark.parametrize("door", [listener, listener.testing], ids=lambda m: m.__name__)
def test_every_exported_name_exists(door: object) -> None:
    exported = getattr(door, "__all__", None)
    assert exported, f"{door} has no __all__"
    missing = [name for name in exported if not hasattr(door, name)]
    assert not missing


def test_the_public_api_keeps_its_promises() -> None:
    assert set(listener.__all__) >= PROMISED


def test_the_daemon_does_not_load_the_test_kit() -> None:
    """``sippet-listener run`` must not pay for the fake server (only ``demo`` loads it)."""
    probe = (
        "import sys, listener.service.cli\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('listener.testing'))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
