"""What ``sippet-listener run`` loads, and what each heavy import costs.

- :func:`idle_run`: the real command (``python -m listener.service.cli run``) with a minimal
  configuration (the bench server's ``base_url``, a temporary ``state_dir``, no handler, no
  metrics endpoint), joined; its RSS 2 s after the server accepted the join. ``python -m
  bench`` prints it next to the bare loop's idle RSS from the same run.
- :func:`run_imports`: the same command under ``python -X importtime``: which of the
  :data:`HEAVY` modules it loads.
- :func:`marginal`: each :data:`HEAVY` module alone in a fresh interpreter, on top of
  ``asyncio`` (which every path loads; ``listener.*`` modules also on top of the ``listener``
  package, whose door every command loads): its cumulative import time (``-X importtime``,
  median of 3) and the RSS it adds. Shared dependencies make these overlap (httpx and uvicorn both
  bring h11 and anyio...): each figure is "this module, if nothing else had loaded its
  dependencies".

- :func:`layers`: what the idle RSS of ``run`` is made of: a fresh interpreter imports the run
  path's dependencies a layer at a time, in the order ``run`` loads them (the bare loop's
  ``asyncio`` + ``websockets`` first, then httpx, structlog, pydantic with its first model,
  the rest, our own package), RSS after each; what ``run`` holds beyond the last layer is its
  running state (the HTTP client's SSL context, the call store, the link).
- :func:`idle_side_by_side`: the bare loop's idle RSS and ``run``'s, for this tree and, with
  ``--before TREE``, another checkout, in each ``--python`` given, interleaved over rounds.

``python -m bench.imports [--before TREE] [--python PY ...] [--rounds N]`` prints the tables
(its own server).
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import BARE
from bench.procs import ROOT, BenchServer, Driver, rss_mib
from listener.core.extras import HIDDEN

__all__ = ["HEAVY", "LAYERS", "idle_run", "idle_side_by_side", "layers", "main", "marginal",
           "run_imports"]  # fmt: skip

# The suspects: what the daemon's dependencies and its own optional stacks cost.
HEAVY = (
    "pydantic",
    "httpx",
    "tenacity",
    "structlog",
    "rich.traceback",
    "click",
    "greenlet",
    "prometheus_client",
    "uvicorn",
    "starlette.applications",
    "sqlite3",
    "standardwebhooks",
    "h11",
    "websockets.asyncio.client",
    "orjson",
    "uvloop",
    "listener.rpc.catalog",
    "listener.webhooks.handler",
    "listener.service.health",
    "listener.service.webhooks_cli",
    "listener.testing",
)
_SETTLE = 2.0
# The run path's imports in the order `run` loads them, a layer each (each layer's modules
# load what they need of the earlier ones' and nothing more). The pydantic layer builds one
# model: the first one costs what no import shows (pydantic's plugin lookup, the core's
# first schema).
LAYERS = (
    ("the bare loop's: asyncio, json, websockets' client", "import asyncio, json, argparse\n"
     "import websockets.asyncio.client"),
    ("httpx (httpcore, h11, anyio, idna, email, http.cookiejar)",
     "import httpx, httpcore, h11, anyio, httpcore._backends.anyio"),
    ("structlog", "import structlog"),
    ("pydantic, and a first model", "from pydantic import BaseModel, Field\n"
     "class Model(BaseModel):\n    value: int = Field(default=1, ge=0)"),
    ("tenacity, orjson, sqlite3, tomllib, importlib.metadata, difflib, zoneinfo",
     "import tenacity, orjson, sqlite3, tomllib, importlib.metadata, difflib, zoneinfo"),
    ("our own: everything of listener/ that `run` imports", "import listener.service.cli"),
)  # fmt: skip
# Layer by layer, hiding what listener.core.extras hides (as the door does, which the last
# layer loads).
_LAYERS_PROBE = """
import sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
print(rss())
hidden = [name for name in {hidden!r} if name not in sys.modules]
sys.modules.update(dict.fromkeys(hidden))
for layer in {layers!r}:
    if layer == "import listener.service.cli":
        for name in hidden:
            del sys.modules[name]
    exec(layer)
    print(rss())
"""
_PROBE = (
    "import {base}\n"
    "def rss():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmRSS:'):\n"
    "            return int(line.split()[1]) / 1024\n"
    "before = rss()\n"
    "import {module}\n"
    "print(rss() - before)\n"
)


def _config(server: BenchServer, state_dir: str) -> Path:
    path = Path(state_dir) / "config.toml"
    path.write_text(
        f'[sippet]\nbase_url = "{server.base_url}"\n'
        f'[service]\nstate_dir = "{state_dir}"\nlog_level = "warning"\nlog_format = "json"\n',
        encoding="utf-8",
    )
    return path


def _run_joined(
    server: BenchServer, argv_prefix: list[str], loop: str, log: Path, root: Path = ROOT
) -> tuple[float, str]:
    """Start ``run``, wait until it joined and settled; (RSS MiB, its stderr)."""
    with tempfile.TemporaryDirectory(prefix="sippet-bench-idle-") as state_dir:
        config = _config(server, state_dir)
        joins = int(server.call("/stats")["joins"])
        env = {**os.environ, "SIPPET_SECRET_KEY": server.api_key, "SIPPET_EVENT_LOOP": loop}
        with log.open("w+b") as err:
            process = subprocess.Popen(
                [*argv_prefix, "-m", "listener.service.cli", "run", "-c", str(config)],
                cwd=root,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
            try:
                deadline = time.monotonic() + 30
                while int(server.call("/stats")["joins"]) <= joins:
                    if process.poll() is not None or time.monotonic() > deadline:
                        err.seek(0)
                        tail = err.read().decode(errors="replace")[-1500:]
                        raise RuntimeError(f"run did not join; its stderr ends:\n{tail}")
                    time.sleep(0.05)
                time.sleep(_SETTLE)
                rss = rss_mib(process.pid)
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            err.seek(0)
            return rss, err.read().decode(errors="replace")


def idle_run(
    server: BenchServer,
    logs: Path,
    loop: str = "asyncio",
    python: Path | None = None,
    *,
    root: Path = ROOT,
) -> float:
    """RSS (MiB) of ``sippet-listener run`` with a minimal configuration, joined and idle
    (``root``: the tree whose ``listener`` runs, the working directory being first on the
    path of ``python -m``)."""
    interpreter = str(python or sys.executable)
    log = logs / f"idle-run-{Path(interpreter).parent.parent.name}-{loop}-{root.name}.log"
    rss, _ = _run_joined(server, [interpreter], loop, log, root)
    return rss


def _importtime(stderr: str) -> dict[str, float]:
    """Module -> cumulative import time in ms, from ``-X importtime`` lines."""
    times: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        times[name.strip()] = int(cumulative) / 1000
    return times


# `run` under a probe that writes, when it exits, the modules it has loaded: `-X importtime`
# also lists the imports that failed (an extra not installed, or one hidden).
_MODULES_PROBE = """
import atexit, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
del sys.argv[:2]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_imports(server: BenchServer, logs: Path, loop: str = "asyncio") -> dict[str, float]:
    """Which of :data:`HEAVY` ``run`` loads (minimal configuration), with their ms."""
    out = logs / f"modules-run-{loop}.txt"
    argv = [sys.executable, "-X", "importtime", "-c", _MODULES_PROBE, str(out)]
    _, stderr = _run_joined(server, argv, loop, logs / f"importtime-run-{loop}.log")
    times, loaded = _importtime(stderr), set(out.read_text(encoding="utf-8").split())
    return {module: times[module] for module in HEAVY if module in loaded}


def marginal(module: str, runs: int = 3) -> tuple[float, float] | None:
    """(ms, MiB) of importing ``module`` alone after ``asyncio``; None if not installed."""
    times, sizes = [], []
    for _ in range(runs):
        # Ours on top of the package (its door loads the core every command needs).
        base = "asyncio, sys, listener" if module.startswith("listener.") else "asyncio, sys"
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", _PROBE.format(base=base, module=module)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            return None
        times.append(_importtime(done.stderr)[module])
        sizes.append(float(done.stdout))
    return statistics.median(times), statistics.median(sizes)


def layers(python: Path, root: Path = ROOT) -> list[tuple[str, float]]:
    """(layer, MiB it adds) for :data:`LAYERS` in ``python``, the interpreter itself first."""
    code = _LAYERS_PROBE.format(hidden=HIDDEN, layers=[layer for _, layer in LAYERS])
    done = subprocess.run(
        [str(python), "-c", code], cwd=root, capture_output=True, text=True, check=True, timeout=60
    )
    sizes = [float(line) for line in done.stdout.split()]
    names = ["the interpreter (`python -c pass`)"] + [name for name, _ in LAYERS]
    return [(names[0], sizes[0])] + [
        (name, after - before)
        for name, (before, after) in zip(names[1:], itertools.pairwise(sizes), strict=True)
    ]


def _bare_idle(server: BenchServer, logs: Path) -> float:
    """The bare loop's RSS 2 s after its join (the footprint row's reference)."""
    driver = Driver("bare", Path(sys.executable), BARE.script, server, logs / "idle-bare.log")
    try:
        time.sleep(_SETTLE)
        return rss_mib(driver.process.pid)
    finally:
        driver.quit()


def idle_side_by_side(
    server: BenchServer,
    logs: Path,
    pythons: list[Path],
    before: Path | None,
    rounds: int,
) -> dict[str, list[float]]:
    """Idle RSS (MiB) per round: the bare loop, then ``run`` of this tree and ``before`` in
    each interpreter; one of each per round, in turn."""
    trees = [("this tree", ROOT)] + ([("before", before)] if before is not None else [])
    runs: dict[str, list[float]] = {"bare loop": []}
    for _ in range(rounds):
        runs["bare loop"].append(_bare_idle(server, logs))
        for python in pythons:
            for label, root in trees:
                key = f"`run`, {label}, {python.parent.parent.name}"
                runs.setdefault(key, []).append(idle_run(server, logs, python=python, root=root))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.imports", description=__doc__)
    parser.add_argument("--before", type=Path, help="another checkout's tree, for a before")
    parser.add_argument(
        "--python",
        type=Path,
        action="append",
        help="an interpreter to run `run` in (repeatable; default: this one; e.g."
        " bench/.venvs/production/bin/python, as `pip install sippet-listener` runs it)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    pythons = [path.absolute() for path in args.python or [Path(sys.executable)]]
    logs = ROOT / "bench" / "results" / "imports"
    logs.mkdir(parents=True, exist_ok=True)
    server = BenchServer(logs / "server.log")
    began = time.strftime("%H:%M:%S")
    try:
        server.call("/configure", {"token_ttl": 3600})
        idle = idle_side_by_side(server, logs, pythons, args.before, args.rounds)
        loaded = run_imports(server, logs)
    finally:
        server.close()
    bare = statistics.median(idle["bare loop"])
    print(f"{began}-{time.strftime('%H:%M:%S')}: idle RSS 2 s after the join, MiB, median of")
    print(f"{args.rounds} rounds (every run listed), one of each per round\n")
    print("| process | idle RSS | runs | vs the bare loop |")
    print("|---|---:|---|---:|")
    for label, values in idle.items():
        median = statistics.median(values)
        listed = ", ".join(f"{value:.1f}" for value in values)
        print(f"| {label} | {median:.1f} | {listed} | {median / bare:.2f} x |")
    for python in pythons:
        print(f"\nWhat `run` loads, a layer at a time ({python.parent.parent.name}), MiB:\n")
        print("| layer | adds | total |")
        print("|---|---:|---:|")
        total = 0.0
        for name, size in layers(python):
            total += size
            print(f"| {name} | {size:.1f} | {total:.1f} |")
    print("\n| module | alone after asyncio: ms | MiB | loaded by `run` (ms there) |")
    print("|---|---:|---:|---|")
    for module in HEAVY:
        cost = marginal(module)
        there = f"yes ({loaded[module]:.1f})" if module in loaded else "no"
        if cost is None:
            print(f"| `{module}` | not installed | | {there} |")
        else:
            print(f"| `{module}` | {cost[0]:.1f} | {cost[1]:.1f} | {there} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
