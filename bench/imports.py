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

``python -m bench.imports`` prints both tables (its own server).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import ROOT, BenchServer, rss_mib

__all__ = ["HEAVY", "idle_run", "main", "marginal", "run_imports"]

# The suspects: what the daemon's dependencies and its own optional stacks cost.
HEAVY = (
    "pydantic",
    "httpx",
    "tenacity",
    "structlog",
    "rich",
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


def run_imports(server: BenchServer, logs: Path, loop: str = "asyncio") -> dict[str, float]:
    """Which of :data:`HEAVY` ``run`` loads (minimal configuration), with their ms."""
    _, stderr = _run_joined(
        server, [sys.executable, "-X", "importtime"], loop, logs / f"importtime-run-{loop}.log"
    )
    loaded = _importtime(stderr)
    return {module: loaded[module] for module in HEAVY if module in loaded}


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


def main() -> int:
    logs = ROOT / "bench" / "results" / "imports"
    logs.mkdir(parents=True, exist_ok=True)
    server = BenchServer(logs / "server.log")
    try:
        server.call("/configure", {"token_ttl": 3600})
        loaded = run_imports(server, logs)
        idle = {loop: idle_run(server, logs, loop) for loop in ("asyncio", "uvloop")}
    finally:
        server.close()
    print(f"idle RSS of `run`, minimal config: asyncio {idle['asyncio']:.1f} MiB,", end=" ")
    print(f"uvloop {idle['uvloop']:.1f} MiB\n")
    print("| module | alone after asyncio: ms | MiB | loaded by `run` (ms there) |")
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
