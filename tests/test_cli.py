"""The ``sippet-listener`` command, run as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from listener.testing import FakeSippet

CLI = [sys.executable, "-m", "listener.cli"]


def write_config(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


async def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(timeout):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_check_config_valid_and_invalid(tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.toml", '[sippet]\nbase_url = "https://api.sippet.ai"\n')
    code, out, _ = await run_cli(
        "check-config", "--config", str(good), env={"SIPPET_SECRET_KEY": "sk_test_x1"}
    )
    assert (code, out.strip()) == (0, f"{good}: ok")

    bad = write_config(tmp_path / "bad.toml", "[sippet]\nheartbeat_intervall = 5\n")
    code, _, err = await run_cli(
        "check-config", "--config", str(bad), env={"SIPPET_SECRET_KEY": "sk_test_x1"}
    )
    assert code == 78
    assert "sippet.heartbeat_intervall: unknown key; did you mean 'heartbeat_interval'?" in err
    assert "Traceback" not in err

    code, _, err = await run_cli(
        "check-config",
        "--config",
        str(good),
        env={"SIPPET_SECRET_KEY": "", "CREDENTIALS_DIRECTORY": ""},
    )
    assert code == 78
    assert "sippet.api_key_file: no secret key" in err


async def test_tail_prints_one_json_object_per_event(fake: FakeSippet, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.toml",
        (
            f'[sippet]\nbase_url = "{fake.base_url}"\nheartbeat_interval = 1.0\n'
            '[service]\nlog_level = "debug"\n'
        ),
    )
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "tail",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SIPPET_SECRET_KEY": fake.api_key},
    )
    assert process.stdout is not None
    assert process.stderr is not None
    await fake.wait_until(lambda: fake.joins >= 1)
    await fake.broadcast("incoming_call", {"callUuid": "c-1", "fromNumber": "+15550100"})
    await fake.broadcast("call_ended", {"call_uuid": "c-1"})
    async with asyncio.timeout(10):
        lines = [json.loads(await process.stdout.readline()) for _ in range(2)]
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        err = (await process.stderr.read()).decode()
        assert await process.wait() == 0
    assert lines == [
        {"event": "incoming_call", "payload": {"callUuid": "c-1", "fromNumber": "+15550100"}},
        {"event": "call_ended", "payload": {"call_uuid": "c-1"}},
    ]
    assert "channel joined" in err
    assert fake.api_key not in err
    assert not [token for token in fake._tokens if token in err]
    await fake.wait_until(lambda: fake.stats()["sockets"] == 0)


@pytest.mark.timeout(60)
async def test_demo_runs_on_the_embedded_fake_server() -> None:
    code, out, err = await run_cli(
        "demo", "--duration", "4", "--speed", "4", "--calls-per-second", "3", "--token-ttl", "2"
    )
    assert code == 0, err
    names = {json.loads(line)["event"] for line in out.splitlines()}
    assert {"incoming_call", "call_answered", "call_ended"} <= names
    assert "token rotated" in err
