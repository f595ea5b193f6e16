"""The event loop `sippet-listener` runs on: uvloop when installed (the ``[fast]`` extra),
asyncio's when ``SIPPET_EVENT_LOOP=asyncio`` says so, a configuration error for a bad value."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from listener.testing import FakeSippet

CLI = [sys.executable, "-m", "listener.service.cli"]


async def _run_once(fake: FakeSippet, tmp_path: Path, loop: str | None) -> list[dict[str, object]]:
    """Run the daemon with one log handler until it handled an event; its JSON log lines."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[sippet]\nbase_url = "{fake.base_url}"\n'
        f'[service]\nstate_dir = "{tmp_path}"\nlog_format = "json"\n'
        '[[handlers]]\nuse = "log"\n'
    )
    env = {**os.environ, "SIPPET_SECRET_KEY": fake.api_key}
    env.pop("SIPPET_EVENT_LOOP", None)
    if loop is not None:
        env["SIPPET_EVENT_LOOP"] = loop
    process = await asyncio.create_subprocess_exec(
        *CLI, "run", "--config", str(config), stderr=asyncio.subprocess.PIPE, env=env
    )
    assert process.stderr is not None
    await fake.wait_until(lambda: fake.joins >= 1, timeout=30)
    await fake.broadcast("incoming_call", {"callUuid": "c-1"})
    lines: list[dict[str, object]] = []
    async with asyncio.timeout(15):
        while not any(line.get("event") == "event received" for line in lines):
            raw = await process.stderr.readline()
            assert raw, "the daemon exited before it handled the event"
            if raw.startswith(b"{"):
                lines.append(json.loads(raw))
        process.send_signal(signal.SIGTERM)
        await process.stderr.read()
        assert await process.wait() == 0
    return lines


def _loop_of(lines: list[dict[str, object]]) -> object:
    return next(line["event_loop"] for line in lines if line.get("event") == "starting")


async def test_the_daemon_runs_under_uvloop_when_installed(
    fake: FakeSippet, tmp_path: Path
) -> None:
    pytest.importorskip("uvloop")
    lines = await _run_once(fake, tmp_path, None)
    assert _loop_of(lines) == "uvloop.Loop"


async def test_sippet_event_loop_asyncio_turns_uvloop_off(fake: FakeSippet, tmp_path: Path) -> None:
    lines = await _run_once(fake, tmp_path, "asyncio")
    assert str(_loop_of(lines)).startswith("asyncio.")


async def test_an_unknown_event_loop_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[sippet]\nbase_url = "http://127.0.0.1:9"\n')
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "mint-token",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SIPPET_SECRET_KEY": "sk_test_x1", "SIPPET_EVENT_LOOP": "trio"},
    )
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    assert process.returncode == 78
    assert "SIPPET_EVENT_LOOP: 'trio' is not one of auto, asyncio, uvloop" in err.decode()
