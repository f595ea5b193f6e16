"""The plugin authors' door: what ``listener`` and ``listener.testing`` export, and only that."""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import listener
import listener.testing
from listener.testing import FakeSippet

ROOT = Path(__file__).resolve().parent.parent
# Code that must use the door like any plugin: the built-in handlers and the example plugin.
PLUGIN_CODE = (
    ROOT / "handlers",
    ROOT / "examples" / "sippet-listener-example" / "sippet_listener_example",
)

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


# What `run` must not load when its configuration does not ask for it: the test kit and the
# demo (only `demo` needs them), the webhook stack (only with a webhook handler), the
# metrics server and the library that renders the metrics (only with service.metrics_listen),
# the shared store's driver (only with [store]), and the extras structlog and httpx load when
# installed for code the daemon never calls (listener/core/extras.py; the dev extras install
# them all). See bench/README.md for what each costs.
NOT_LOADED_BY_RUN = (
    "listener.testing",
    "listener.service.demo",
    "listener.webhooks",
    "listener.service.health",
    "listener.service.asgi",
    "uvicorn",
    "starlette",
    "prometheus_client",
    "standardwebhooks",
    "psycopg",
    "psycopg_pool",
    "listener.cluster.store",
    "click",
    "greenlet",
)
# Runs the command line as `sippet-listener run` does, and writes the modules loaded by the
# time it exits (after SIGTERM) to the file named in argv[1].
_RUN_PROBE = """
import atexit, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
import listener.service.cli
sys.exit(listener.service.cli.main(sys.argv[1:]))
"""


async def test_run_with_a_minimal_config_loads_only_what_it_uses(
    fake: FakeSippet, tmp_path: Path
) -> None:
    """``sippet-listener run``, joined and stopped, with no handler and no metrics endpoint,
    never loaded the test kit, the demo, the webhook stack or the metrics server."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[sippet]\nbase_url = "{fake.base_url}"\n[service]\nstate_dir = "{tmp_path}"\n'
    )
    out = tmp_path / "modules.txt"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _RUN_PROBE,
        str(out),
        "run",
        "--config",
        str(config),
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "SIPPET_SECRET_KEY": fake.api_key},
    )
    await fake.wait_until(lambda: fake.joins >= 1, timeout=30)
    await fake.broadcast("incoming_call", {"callUuid": "c-1"})
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        assert await process.wait() == 0
    loaded = out.read_text().split()
    # The probe sees the daemon's own modules (it ran, joined and stopped).
    assert {"listener.service.daemon", "listener.realtime.session"} <= set(loaded)
    unwanted = [
        m for m in loaded if any(m == p or m.startswith(f"{p}.") for p in NOT_LOADED_BY_RUN)
    ]
    assert unwanted == []


def test_the_extras_hidden_from_structlog_and_httpx_import_normally_afterwards() -> None:
    """The door hides click and greenlet only while structlog and httpx load: a plugin that
    imports them afterwards gets them, and structlog's console keeps rich's tracebacks (a
    fresh interpreter: this one has them all loaded)."""
    probe = (
        "import sys, listener, structlog.dev\n"
        "assert structlog.dev.rich is not None\n"
        "assert not {'click', 'greenlet'} & set(sys.modules)\n"
        "import rich.console, click, greenlet\n"
        "print(rich.console.Console.__name__, click.command.__name__, greenlet.getcurrent())"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Console command <greenlet.greenlet")


def _defining_modules() -> dict[str, str]:
    """Each name ``listener`` re-exports, by the module it is defined in."""
    tree = ast.parse(Path(listener.__file__).read_text(encoding="utf-8"))
    return {
        alias.asname or alias.name: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__"
        for alias in node.names
    }


def _has_doc_comment(module: str, name: str) -> bool:
    """Whether ``name`` is assigned in ``module`` right under a ``#:`` comment (Sphinx's
    convention for documenting data, which has no ``__doc__`` of its own)."""
    lines = inspect.getsource(sys.modules[module]).splitlines()
    return any(
        line.startswith((f"{name} =", f"{name}:")) and index and lines[index - 1].startswith("#:")
        for index, line in enumerate(lines)
    )


def test_every_exported_name_is_documented() -> None:
    modules = _defining_modules()
    undocumented = []
    for name in listener.__all__:
        value = getattr(listener, name)
        if inspect.isclass(value):
            # Its own docstring: a class without one would show its base class's.
            documented = bool(value.__dict__.get("__doc__"))
        elif inspect.isfunction(value):
            documented = bool(value.__doc__)
        else:
            documented = _has_doc_comment(modules[name], name)
        if not documented:
            undocumented.append(name)
    assert not undocumented


def test_plugin_code_imports_listener_only_through_the_door() -> None:
    offending = []
    for path in sorted(file for folder in PLUGIN_CODE for file in folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
                bad = [name for name in names if name.split(".")[0] == "listener"]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "listener":
                    # ``from listener import core`` would reach inside too.
                    bad = [a.name for a in node.names if a.name not in listener.__all__]
                else:
                    bad = [node.module] if node.module.split(".")[0] == "listener" else []
            else:
                continue
            offending += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in bad]
    assert not offending


def test_lint_imports_fails_when_a_handler_reaches_inside(tmp_path: Path) -> None:
    """The contract in pyproject.toml is live: break it in a copy, and lint-imports says so."""
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("listener", "handlers"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    log = tmp_path / "handlers" / "log.py"
    log.write_text(
        log.read_text(encoding="utf-8") + "\nfrom listener.core.events import Event as _Event\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [Path(sys.executable).with_name("lint-imports"), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "Built-in handlers and plugins use only the public API BROKEN" in result.stdout
    assert "handlers.log -> listener.core.events" in result.stdout


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
