"""The benchmark still runs: ``python -m bench --smoke`` prints every row of its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_bench_smoke_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    measures = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    for prefix in (
        "throughput, drain",
        "latency at 500/s",
        "recovery: drop_all",
        "rotation: 200/s",
        "webhooks: 100 deliveries x 1",
        "webhooks: drain a 200 backlog",
        "end to end: drain 300 x 1",
        "end to end: latency at 500/s",
        "footprint",
        "reconcile: 100 open calls, 50 end",
        "throughput, drain 500 x 1, call state on vs off",
        "idle RSS: `sippet-listener run`",
        "#14 drain, interleaved",
        "#14 latency at 500/s, interleaved",
    ):
        assert any(m.startswith(prefix) for m in measures), (prefix, done.stdout)
    for client in (
        "bare websockets+json loop (limit)",
        "sippet-listener (Daemon",
        "reference: forwarding loop",
        "sippet-listener (Daemon, webhook handler",
        "sippet-listener (Daemon, no-op handler, uvloop)",
    ):
        assert any(client in row for row in rows), (client, done.stdout)
    assert "failed:" not in done.stdout, done.stdout
