"""Child processes of a bench run: the fake server, client drivers, helpers; /proc readings.

Every child talks JSON lines on stdout, reads its commands (or just its end) on stdin, and
ends when stdin closes, so nothing outlives the run. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CLIENT_CPUS",
    "ROOT",
    "SERVER_CPUS",
    "BenchServer",
    "Child",
    "Driver",
    "cpu_seconds",
    "pin",
    "quiet",
    "rss_mib",
]

ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")
# A client at rest this long has nothing left to do: longer than the daemon's call store
# interval (1 s), after which a batch due is written.
_REST = 1.2
# The fake server on one CPU, every client (and its threads) on the others: left to the
# scheduler, each drain fell into a fast or a slow mode by whether the two shared a CPU, and
# a verdict moved from 0.66 x to 1.15 x within an hour (bench/README.md, "What runs where").
_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPUS: frozenset[int] | None = frozenset(_CPUS[:1]) if len(_CPUS) > 1 else None
CLIENT_CPUS: frozenset[int] | None = frozenset(_CPUS[1:]) if len(_CPUS) > 1 else None


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid``, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def quiet(pid: int, timeout: float = 10.0) -> float:
    """Wait until ``pid`` has used no CPU for 1.2 s (at most ``timeout`` s); return the CPU
    seconds it used meanwhile.

    The drains stop a client with ``SIGSTOP`` while its backlog queues, and a stopped process
    does nothing, so work a client defers past its last event (the daemon's call store writes
    a drain's batch within its 1 s interval) would land inside the next drain's window, where
    a client that is not stopped would long have done it. Five drains of 20,000 back to back:
    the daemon's first 150,000 events/s, the next ones 101,000-140,000; with 3 s between
    drains, 134,000-149,000; the bare loop 140,000-156,000 either way (bench/README.md,
    "Drains from a client at rest").
    """
    began = cpu_seconds(pid)
    used = began
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(_REST)
        now = cpu_seconds(pid)
        # /proc counts in ticks of 10 ms; a client at rest uses ~0.1 % (its timers).
        if now - used <= 1.0 / _TICKS:
            return used - began
        used = now
    return used - began


def pin(pid: int, cpus: frozenset[int] | None) -> None:
    """Keep every thread of ``pid`` on ``cpus`` (None: leave it to the scheduler); the
    threads it starts later inherit it."""
    if cpus is None:
        return
    # A child that has already exited has no tasks left to pin: its read says why.
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(task.name), cpus)


class Child:
    """A child process speaking JSON lines: one per answer on stdout; on ``cpus`` when given
    (:func:`pin`)."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.argv = argv
        self.log = log
        self._log_file: IO[bytes] = log.open("ab")
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env={**os.environ, **(env or {})},
            text=True,
            bufsize=1,
        )
        # Before the interpreter has started a thread of its own, so that all inherit it.
        pin(self.pid, cpus)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line from the child."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.argv[-1]}: no answer within {timeout:g} s") from None
        if line is None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(self.argv[:3])} exited; its log ends:\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def request(self, command: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Send one command and return its answer."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.read(timeout)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def close(self, timeout: float = 10.0) -> None:
        """Close stdin (the child's cue to exit), then wait, then kill if need be."""
        if self.process.poll() is None:
            self.resume()
            if self.process.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self.process.stdin.close()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._log_file.close()


class BenchServer(Child):
    """``bench.server``: the fake Sippet and its bench control endpoint, in their own process."""

    def __init__(self, log: Path) -> None:
        super().__init__([sys.executable, "-m", "bench.server"], log, cpus=SERVER_CPUS)
        info = self.read(timeout=20)
        self.base_url: str = info["base_url"]
        self.control_url: str = info["control_url"]
        self.api_key: str = info["api_key"]

    def call(self, path: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
        """POST ``body`` (GET without one) to the control endpoint; return the JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the bench's own loopback server
            self.control_url + path,
            data=data,
            method="GET" if body is None else "POST",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return json.loads(response.read())

    def stream(self, count: int, start: int, rate: float = 0.0) -> dict[str, Any]:
        """Broadcast ``count`` events numbered from ``start``; answer once all are queued."""
        timeout = 60.0 + (count / rate if rate else count / 2000)
        answer: dict[str, Any] = self.call(
            "/stream", {"count": count, "start": start, "rate": rate}, timeout
        )
        return answer


class Driver(Child):
    """A client driver (``bench/drivers/*.py``), joined once constructed."""

    def __init__(
        self,
        name: str,
        python: Path,
        script: str,
        server: BenchServer,
        log: Path,
        options: dict[str, Any] | None = None,
        *,
        root: Path = ROOT,
    ) -> None:
        # Another tree (``bench.hotpath --before``): its driver, and its ``listener`` first.
        env = None if root == ROOT else {"PYTHONPATH": str(root)}
        argv = [
            str(python),
            str(root / "bench" / "drivers" / script),
            "--base-url",
            server.base_url,
            "--api-key",
            server.api_key,
            "--options",
            json.dumps(options or {}),
        ]
        super().__init__(argv, log, env=env, cpus=CLIENT_CPUS)
        self.name = name
        self.ready = self.read(timeout=60)

    def expect(self, count: int, *, keep: bool = True) -> None:
        self.request({"cmd": "expect", "count": count, "keep": keep})

    def wait(self, timeout: float, *, records: bool = True) -> dict[str, Any]:
        return self.request(
            {"cmd": "wait", "timeout": timeout, "records": records}, timeout=timeout + 60
        )

    def stats(self) -> dict[str, Any]:
        return self.request({"cmd": "stats"})

    def quit(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError, BrokenPipeError):
            self.request({"cmd": "quit"}, timeout=15)
        self.close()
