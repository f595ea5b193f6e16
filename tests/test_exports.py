"""The plugin authors' door: what ``listener`` and ``listener.testing`` export, and only that."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


# Runs pytest with pytest-asyncio unimportable, as where the testing extra is not installed.
_WITHOUT_PYTEST_ASYNCIO = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    class Uninstalled(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "pytest_asyncio":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Uninstalled())
    import pytest

    sys.exit(pytest.main(sys.argv[1:]))
    """
)

_PLUGIN_USER_TESTS = textwrap.dedent(
    """
    import sys

    def test_the_plugin_loaded_without_pytest_asyncio():
        assert "listener.testing.pytest_plugin" in sys.modules
        assert "pytest_asyncio" not in sys.modules

    def test_the_fixture_says_what_to_install(fake_sippet):
        pass
    """
)


def test_the_pytest_plugin_loads_without_pytest_asyncio(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (tmp_path / "test_plugin_user.py").write_text(_PLUGIN_USER_TESTS, encoding="utf-8")
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTEST_ADDOPTS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_PLUGINS")
    }
    result = subprocess.run(
        # The distribution is still installed: keep pytest from loading its entry point, and
        # its assertion rewriter (which would find the module) from going before the blocker.
        [sys.executable, "-c", _WITHOUT_PYTEST_ASYNCIO, "-p", "no:asyncio", "--assert=plain"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    out = result.stdout
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, out + result.stderr
    assert "1 passed, 1 error" in out
    assert (
        "the fake_sippet fixture needs pytest-asyncio: pip install 'sippet-listener[testing]'"
    ) in out
