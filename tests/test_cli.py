"""The ``sippet-listener`` command, run as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from listener.calls.state import CallRecord
from listener.calls.store import CallStore, store_path
from listener.service.cli import main
from listener.testing import FakeSippet

CLI = [sys.executable, "-m", "listener.service.cli"]
# The start of every line in the pretty format: the local time.
CLOCK = r"\d\d:\d\d:\d\d  "


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
    # Neither stream is a terminal: JSON lines on both, as before.
    assert all(line.startswith("{") for line in err.splitlines())
    assert fake.api_key not in err
    assert not [token for token in fake._tokens if token in err]
    await fake.wait_until(lambda: fake.stats()["sockets"] == 0)


async def read_until(
    stream: asyncio.StreamReader, found: Callable[[str], bool], timeout: float = 10
) -> list[str]:
    """The lines read from ``stream`` up to and including the first that ``found`` accepts."""
    lines: list[str] = []
    async with asyncio.timeout(timeout):
        while not lines or not found(lines[-1]):
            line = await stream.readline()
            assert line, f"the stream ended first: {lines}"
            lines.append(line.decode().rstrip("\n"))
    return lines


# Fast calls, quick rotations, and a receiver outage from 1 s to 2.5 s of a 5 s run.
DEMO_ARGS = (
    "demo",
    "--duration",
    "5",
    "--speed",
    "4",
    "--calls-per-second",
    "3",
    "--token-ttl",
    "2",
    "--outage-at",
    "1",
    "--outage-seconds",
    "1.5",
)


@pytest.mark.timeout(60)
async def test_demo_shows_handlers_an_rpc_rule_and_webhooks_through_an_outage() -> None:
    code, _, err = await run_cli(*DEMO_ARGS)
    assert code == 0, err
    # stderr is not a terminal: JSON lines, every one of them.
    lines = [json.loads(line) for line in err.splitlines()]
    received = {line["event_name"] for line in lines if line["event"] == "event received"}
    assert received == {"incoming_call", "call_answered", "call_ended"}
    fired = [line for line in lines if line["event"] == "rpc rule fired"]
    assert fired, "the demo's block-list rule never fired"
    assert fired[0]["action"] == "end_call"
    assert any(line["event"] == "token rotated" for line in lines)
    (page,) = [line for line in lines if line["event"] == "demo: status page"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", page["url"])

    def first(message: str) -> int:
        return next(i for i, line in enumerate(lines) if line["event"] == message)

    down, up = first("demo: receiver down"), first("demo: receiver up")
    unhealthy = first("webhook destination unhealthy: deliveries paused, probing it")
    recovered = first("webhook destination recovered: delivering its backlog")
    assert down < unhealthy < up < recovered
    delivered = [i for i, line in enumerate(lines) if line["event"] == "webhook delivered"]
    assert {lines[i]["status"] for i in delivered} == {200}
    assert [i for i in delivered if i < down], "nothing was delivered before the outage"
    # Once its attempts fail the receiver is down: nothing arrives until it is back.
    assert not [i for i in delivered if unhealthy < i < up]
    # The backlog drains: as many deliveries after the outage as it held, and the oldest waited
    # at least from the first failed attempt until the receiver came back.
    drained = [lines[i] for i in delivered if i > up]
    assert len(drained) >= lines[recovered]["backlog"] >= 1
    waited = _seconds_between(lines[unhealthy]["timestamp"], lines[up]["timestamp"])
    assert max(line["latency_ms"] for line in drained) >= waited * 1000
    done = lines[-1]
    assert done["event"] == "demo: done"
    assert done["deliveries"] == len(delivered)


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


@pytest.mark.timeout(60)
async def test_demo_in_the_pretty_format_serves_its_status_page_and_reads_as_one_liners() -> None:
    process = await asyncio.create_subprocess_exec(
        *CLI, *DEMO_ARGS, "--format", "pretty", stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    head = await read_until(process.stderr, lambda line: "status page: " in line)
    url = head[-1].split("status page: ")[1]
    async with httpx.AsyncClient() as http:
        # The daemon's own server ("/" is the page, /healthz its neighbour) once it listens.
        await read_until(process.stderr, lambda line: "● joined" in line)
        assert (await http.get(url + "healthz")).status_code == 200
    async with asyncio.timeout(30):
        rest = (await process.stderr.read()).decode()
        assert await process.wait() == 0
    lines = [*head, *rest.splitlines()]
    assert all(re.match(CLOCK, line) for line in lines), lines
    text = "\n".join(line[len("00:00:00  ") :] for line in lines)

    def shows(pattern: str) -> bool:
        return re.search(f"^{pattern}$", text, re.MULTILINE) is not None

    assert shows(r"status page: http://127\.0\.0\.1:\d+/")
    assert shows(r"incoming_call +[0-9a-f]{8}  \+15550000000 → \+15557654321  ringing")
    assert shows(r"rpc end_call +[0-9a-f]{8}  rule 0 on incoming_call")
    assert shows(r"--> 200 demo-receiver \d+ ms  (incoming_call|call_answered|call_ended) \S{8}")
    assert shows(r"↻ token rotated +link-\d+")
    assert shows(r"✗ outage +demo-receiver down for 1\.5 s \(simulated\)")
    assert shows(r"--> ERR demo-receiver cannot connect: .*: unhealthy, deliveries paused, probing")
    assert shows(r"<-- demo-receiver recovered after [\d.]+ s \(\d+ probes?\): delivering .*")
    assert shows(r"demo done +\d+ events?, \d+ token rotations?, \d+ rpc calls?, \d+ webhook .*")
    assert "{" not in text
    assert "sk_test_fake_secret_key" not in text


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


def _read_terminal(fd: int) -> str:
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the child has closed its side
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


@pytest.mark.timeout(60)
async def test_on_a_terminal_the_demo_prints_coloured_one_liners_by_default() -> None:
    terminal, child_side = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "demo",
        "--duration",
        "2",
        "--outage-at",
        "60",
        stderr=child_side,
        env={**os.environ, "NO_COLOR": ""},
    )
    os.close(child_side)
    output = await asyncio.to_thread(_read_terminal, terminal)
    assert await process.wait() == 0
    assert "\x1b[" in output
    lines = re.sub(r"\x1b\[\d+m", "", output).splitlines()
    assert all(re.match(CLOCK, line) for line in lines), lines
    assert any(re.match(f"{CLOCK}● joined +events", line) for line in lines)


async def test_run_and_tail_in_the_pretty_format_print_one_line_per_event(
    fake: FakeSippet, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "config.toml",
        (
            f'[sippet]\nbase_url = "{fake.base_url}"\n[service]\nstate_dir = "{tmp_path}"\n'
            '[[handlers]]\nuse = "log"\n'
        ),
    )
    payload = {"call_uuid": "3f0c9e2a-7b1d", "from_number": "+15550100", "status": "ringing"}
    env = {**os.environ, "SIPPET_SECRET_KEY": fake.api_key}
    pipe = asyncio.subprocess.PIPE
    run, tail = [
        await asyncio.create_subprocess_exec(
            *CLI,
            command,
            "--config",
            str(config),
            "--format",
            "pretty",
            stdout=pipe,
            stderr=pipe,
            env=env,
        )
        for command in ("run", "tail")
    ]
    assert run.stderr is not None
    assert tail.stdout is not None
    assert tail.stderr is not None
    await fake.wait_until(lambda: fake.joins >= 2)
    await fake.broadcast("incoming_call", {**payload, "toNumber": "+15557654321"})
    await fake.broadcast("call_ended", {"callUuid": "3f0c9e2a-7b1d"})
    logged = await read_until(run.stderr, lambda line: "call_ended" in line)
    printed = await read_until(tail.stdout, lambda line: "call_ended" in line)
    # A reload that changes the level keeps the command line's format.
    config.write_text(config.read_text().replace("[service]\n", '[service]\nlog_level = "debug"\n'))
    run.send_signal(signal.SIGHUP)
    logged += await read_until(run.stderr, lambda line: "configuration reloaded" in line)
    await fake.broadcast("call_answered", {"callUuid": "3f0c9e2a-7b1d"})
    logged += await read_until(run.stderr, lambda line: "call_answered" in line)
    for process in (run, tail):
        process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        logged += (await run.stderr.read()).decode().splitlines()
        tail_log = (await tail.stderr.read()).decode()
        assert [await run.wait(), await tail.wait()] == [0, 0]
    events = [
        "incoming_call    3f0c9e2a  +15550100 → +15557654321  ringing",
        "call_ended       3f0c9e2a",
    ]
    # The log handler's line (from its payload text) and tail's (from the event) read alike.
    assert [line[10:] for line in logged if "  3f0c9e2a" in line] == [
        *events,
        "call_answered    3f0c9e2a",
    ]
    assert [line[10:] for line in printed if "3f0c9e2a" in line] == events
    assert all(re.match(CLOCK, line) for line in [*logged, *printed]), [*logged, *printed]
    assert any(re.match(f"{CLOCK}● joined +events", line) for line in logged)
    assert "● joined" in tail_log
    output = "\n".join([*logged, *printed, tail_log])
    assert fake.api_key not in output
    assert not [token for token in fake._tokens if token in output]


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["tail", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (["demo", "--duration", "soon"], "argument --duration: invalid float value: 'soon'"),
        (["reload"], "the following arguments are required: --pid"),
        (["reload", "--pid", "x"], "argument --pid: invalid int value: 'x'"),
        (["rpc"], "the following arguments are required: action"),
        (["calls", "--state-dir"], "argument --state-dir: expected one argument"),
        (["webhooks", "dead", "--limit", "ten"], "argument --limit: invalid int value: 'ten'"),
        (["webhooks", "attempts"], "the following arguments are required: --id"),
        (
            ["webhooks", "replay", "--since", "soon"],
            "argument --since: 'soon' is not an ISO 8601 time",
        ),
    ],
)
def test_a_bad_argument_to_any_command_exits_64_naming_the_flag(
    argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 64
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: sippet-listener")
    assert f": error: {problem}" in err.splitlines()[-1]


async def test_usage_and_configuration_errors_exit_64_and_78_from_the_real_command(
    tmp_path: Path,
) -> None:
    code, out, err = await run_cli("run", "--format", "fancy")
    assert (code, out) == (64, "")
    assert "sippet-listener run: error: argument --format: invalid choice: 'fancy'" in err
    config = write_config(tmp_path / "c.toml", '[service]\nlog_format = "fancy"\n')
    code, _, err = await run_cli(
        "run", "--config", str(config), env={"SIPPET_SECRET_KEY": "sk_test_x1"}
    )
    assert code == 78
    assert err.startswith("sippet-listener: configuration error: service.log_format: ")
    assert "Traceback" not in err


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
