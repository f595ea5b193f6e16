"""The ``sippet-listener`` command, run as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from listener.calls.state import CallRecord
from listener.calls.store import CallStore, store_path
from listener.testing import FakeSippet

CLI = [sys.executable, "-m", "listener.service.cli"]


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
    assert (code, out.strip()) == (0, f"{good}: ok (handlers: none)")

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
        {
            "event": "incoming_call",
            "payload": {"callUuid": "c-1", "fromNumber": "+15550100"},
            "origin": "realtime",
        },
        {"event": "call_ended", "payload": {"call_uuid": "c-1"}, "origin": "realtime"},
    ]
    assert "channel joined" in err
    assert fake.api_key not in err
    assert not [token for token in fake._tokens if token in err]
    await fake.wait_until(lambda: fake.stats()["sockets"] == 0)


@pytest.mark.timeout(60)
async def test_demo_runs_handlers_on_the_embedded_fake_server() -> None:
    code, _, err = await run_cli(
        "demo", "--duration", "5", "--speed", "4", "--calls-per-second", "3", "--token-ttl", "2"
    )
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    received = {line["event_name"] for line in lines if line["event"] == "event received"}
    assert {"incoming_call", "call_answered", "call_ended"} <= received
    fired = [line for line in lines if line["event"] == "rpc rule fired"]
    assert fired, "the demo's block-list rule never fired"
    assert fired[0]["action"] == "end_call"
    assert any(line["event"] == "token rotated" for line in lines)


async def test_run_dispatches_to_configured_handlers_and_stops_on_sigterm(
    fake: FakeSippet, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "config.toml",
        (
            f'[sippet]\nbase_url = "{fake.base_url}"\n'
            f'[service]\nstate_dir = "{tmp_path}"\nlog_format = "json"\n'
            '[[handlers]]\nuse = "log"\nevents = ["call_*"]\n'
            '[[handlers]]\nuse = "rpc"\n[[handlers.rules]]\non = "incoming_call"\n'
            'when = { fromNumber = ["+15550000000"] }\naction = "end_call"\n'
            'input = { callUuid = "{call_key}" }\n'
        ),
    )
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "run",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SIPPET_SECRET_KEY": fake.api_key},
    )
    assert process.stderr is not None
    await fake.wait_until(lambda: fake.joins >= 1)
    await fake.broadcast("incoming_call", {"call_uuid": "c-7", "from_number": "+15550000000"})
    await fake.broadcast("call_ended", {"call_uuid": "c-7"})

    def rule_calls() -> list[object]:
        # The first start's list_calls (reconciliation) goes through the same endpoint.
        return [r.body for r in fake.rpc_requests if r.body["action"] != "list_calls"]

    await fake.wait_until(lambda: len(rule_calls()) >= 1)
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        err = (await process.stderr.read()).decode()
        assert await process.wait() == 0
    assert rule_calls() == [{"action": "end_call", "input": {"callUuid": "c-7"}}]
    logged = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [line["event_name"] for line in logged if line["event"] == "event received"] == [
        "call_ended"
    ]


async def test_rpc_command_prints_data_and_reports_errors(fake: FakeSippet, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", f'[sippet]\nbase_url = "{fake.base_url}"\n')
    env = {"SIPPET_SECRET_KEY": fake.api_key}
    fake.script_rpc(body={"success": True, "data": [{"id": "a", "status": "answered"}]})
    code, out, _ = await run_cli(
        "rpc", "list_calls", "--fields", "id,status", "--config", str(config), env=env
    )
    assert code == 0
    assert json.loads(out) == [{"id": "a", "status": "answered"}]
    assert fake.rpc_requests[-1].body == {"action": "list_calls", "fields": ["id", "status"]}

    fake.script_rpc(
        body={
            "success": False,
            "errors": [{"type": "not_found", "message": "no call %{id}", "vars": {"id": "x"}}],
        }
    )
    code, out, err = await run_cli(
        "rpc", "end_call", "--input", '{"callUuid": "x"}', "--config", str(config), env=env
    )
    assert code == 1
    assert "not_found: no call x" in err
    assert json.loads(out)["success"] is False

    code, _, err = await run_cli(
        "rpc", "end_call", "--input", "{}", "--config", str(config), env=env
    )
    assert code == 1
    assert "callUuid" in err


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("3f0c9e2a-7b1d-4c55-9a0e-2d6f8b1c4e77", "3f0c9e2a-7b1d-4c55-9a0e-2d6f8b1c4e77"),
        ("0042", "0042"),
        ("42", 42),
        ('"42"', "42"),
        ('{"id": "c-1"}', {"id": "c-1"}),
    ],
)
async def test_rpc_identity_is_a_bare_key_an_integer_or_json(
    fake: FakeSippet, tmp_path: Path, given: str, sent: object
) -> None:
    config = write_config(tmp_path / "c.toml", f'[sippet]\nbase_url = "{fake.base_url}"\n')
    code, _, err = await run_cli(
        "rpc",
        "update_contact",
        "--identity",
        given,
        "--input",
        '{"notes":"x"}',
        "--config",
        str(config),
        env={"SIPPET_SECRET_KEY": fake.api_key},
    )
    assert code == 0, err
    assert [request.body for request in fake.rpc_requests] == [
        {"action": "update_contact", "identity": sent, "input": {"notes": "x"}}
    ]


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--input", "{bad", "not valid JSON"),
        ("--input", "[1]", "must be a JSON object, not list"),
        ("--filter", "{oops", "not valid JSON"),
        ("--page", "20", "must be a JSON object, not int"),
        ("--identity", '{"id": ', "not valid JSON"),
    ],
)
async def test_rpc_arguments_that_cannot_be_read_exit_64_naming_the_flag(
    fake: FakeSippet, tmp_path: Path, flag: str, value: str, problem: str
) -> None:
    # The configuration is valid: a usage error must not be reported as a configuration one.
    config = write_config(tmp_path / "c.toml", f'[sippet]\nbase_url = "{fake.base_url}"\n')
    identity = [] if flag == "--identity" else ["--identity", "c-1"]
    code, out, err = await run_cli(
        "rpc",
        "update_contact",
        *identity,
        flag,
        value,
        "--config",
        str(config),
        env={"SIPPET_SECRET_KEY": fake.api_key},
    )
    assert code == 64
    assert err.startswith(f"sippet-listener: {flag}: {problem}")
    assert err.count("\n") == 1
    assert out == ""
    assert fake.rpc_requests == []


async def test_rpc_with_a_broken_configuration_still_exits_78(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", "[sippet]\nbase_urll = 1\n")
    code, _, err = await run_cli(
        "rpc",
        "update_contact",
        "--identity",
        "c-1",
        "--input",
        "{}",
        "--config",
        str(config),
        env={"SIPPET_SECRET_KEY": "sk_test_x1"},
    )
    assert code == 78
    assert "configuration error: sippet.base_urll: unknown key" in err


async def test_mint_token_hides_the_token_unless_asked(fake: FakeSippet, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", f'[sippet]\nbase_url = "{fake.base_url}"\n')
    env = {"SIPPET_SECRET_KEY": fake.api_key}
    code, out, _ = await run_cli("mint-token", "--config", str(config), env=env)
    assert code == 0
    assert set(json.loads(out)) == {"ttl_seconds", "expires_at"}
    code, out, _ = await run_cli("mint-token", "--show", "--config", str(config), env=env)
    assert json.loads(out)["token"] in fake._tokens
    code, _, err = await run_cli(
        "mint-token", "--config", str(config), env={"SIPPET_SECRET_KEY": "sk_wrong_123456"}
    )
    assert code == 1
    assert "HTTP 401" in err
    assert "sk_wrong_123456" not in err


async def test_calls_prints_the_call_map_open_calls_first(tmp_path: Path) -> None:
    code, _, err = await run_cli("calls", "--state-dir", str(tmp_path))
    assert (code, err.strip()) == (
        1,
        f"{tmp_path / 'calls.sqlite3'}: no call store yet (the daemon creates it on start)",
    )
    with CallStore(store_path(tmp_path)) as store:
        store.save(
            30.0,
            calls=[
                CallRecord("c-ended", "ended", 30.0, "+15550100", None, 10.0, 12.0, 30.0),
                CallRecord("c-ringing", "ringing", 20.0, "+15550101", started_at=20.0),
            ],
        )
    code, out, _ = await run_cli("calls", "--state-dir", str(tmp_path))
    assert code == 0
    header, ringing, ended = (line.split() for line in out.splitlines())
    assert header == ["call", "status", "from", "to", "started", "answered", "ended", "last_event"]
    assert ringing[:6] == [
        "c-ringing",
        "ringing",
        "+15550101",
        "-",
        "1970-01-01T00:00:20+00:00",
        "-",
    ]
    assert ended[:3] == ["c-ended", "ended", "+15550100"]
