"""No secret reaches a log line, in either format: not the key, not a token, not inside a URL.
And the pretty format's lines, colours and ``NO_COLOR``."""

from __future__ import annotations

import ast
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

import listener
from listener.core import pretty
from listener.core.logs import configure_logging, redact_text, register_secret
from listener.testing import FakeSippet
from tests.conftest import RunSession

_CLOCK = r"\d\d:\d\d:\d\d"


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as the daemon's stderr is when run by hand."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(params=["json", "pretty"])
def log_format(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def captured(log_format: str) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("debug", log_format, stream)
    yield stream
    logging.getLogger().handlers.clear()
    structlog.reset_defaults()


def test_redact_text_covers_urls_headers_and_webhook_secrets() -> None:
    register_secret("sk_live_abcdef123456")
    line = (
        "GET /socket/websocket?session_token=st_abc.def-123&vsn=2.0.0 "
        "x-api-key: sk_live_abcdef123456 authorization: Bearer eyJhbGciOi.x.y "
        "secret=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    )
    redacted = redact_text(line)
    for secret in ("st_abc.def-123", "sk_live_abcdef123456", "eyJhbGciOi", "whsec_MfKQ9r8"):
        assert secret not in redacted
    assert "vsn=2.0.0" in redacted


async def test_daemon_logs_never_contain_the_key_or_any_token(
    fake: FakeSippet, run_session: RunSession, captured: io.StringIO, log_format: str
) -> None:
    fake.token_ttl = 0.6
    fake.behaviour.expiry_action = "close_socket"
    async with run_session() as (session, events):
        await fake.wait_until(lambda: fake.mints >= 3)
        fake.behaviour.upgrade_status = 403
        await fake.drop_all()
        await fake.wait_until(lambda: len([u for u in fake.upgrades if u.status == 403]) >= 2)
        fake.behaviour.upgrade_status = None
        await fake.wait_until(lambda: fake.joins >= 4)
        await session.joined.wait()
        await fake.broadcast("incoming_call", {"callUuid": "c-1"})
        await events.wait_for(1)
    tokens = list(fake._tokens)
    output = captured.getvalue()
    # The debug output did include the libraries' handshake lines, URLs and all.
    assert "session_token=[REDACTED]" in output, output[:2000]
    assert "HTTP Request: POST" in output  # httpx's line about the mint
    if log_format == "json":
        lines = [json.loads(line) for line in output.splitlines()]
        assert any(line.get("logger", "").startswith("httpx") for line in lines)
    else:
        assert re.search(rf"^{_CLOCK}  ↻ token rotated +link-\d+$", output, re.MULTILINE)
    assert fake.api_key not in output
    assert tokens
    assert not [token for token in tokens if token in output]


def test_pretty_lines_redact_fields_and_messages(captured: io.StringIO, log_format: str) -> None:
    register_secret("sk_live_zyxwvu987654")
    log = structlog.get_logger("test")
    log.warning(
        "cannot reach https://x.example/?api_key=sk_live_zyxwvu987654",
        url="wss://s.example/socket/websocket?session_token=st_ab.cd-9&vsn=2.0.0",
        headers={"authorization": "Bearer eyJhbGciOi.x.y"},
    )
    output = captured.getvalue()
    for secret in ("sk_live_zyxwvu987654", "st_ab.cd-9", "eyJhbGciOi"):
        assert secret not in output
    assert output.count("[REDACTED]") == 3
    if log_format == "pretty":
        assert re.fullmatch(
            rf"{_CLOCK}  WARNING cannot reach https://x\.example/\?api_key=\[REDACTED\]  "
            r"url=wss://s\.example/socket/websocket\?session_token=\[REDACTED\]&vsn=2\.0\.0 "
            r'headers=\{"authorization":"\[REDACTED\]"\}\n',
            output,
        ), output


def test_pretty_forms_of_the_daemons_lines() -> None:
    stream = io.StringIO()
    configure_logging("info", "pretty", stream)
    try:
        log = structlog.get_logger("handler")
        event = log.bind(handler="log", event_name="incoming_call", call_key="3f0c9e2a-7b1d-4c55")
        event.info(
            "event received",
            origin="reconcile",
            payload='{"from_number":"+15550100","to_number":"+15557654321","status":"ringing"}',
        )
        event.bind(handler="rpc").info("rpc rule fired", rule=0, action="end_call")
        log.info(
            "webhook delivered",
            destination="crm",
            status=200,
            latency_ms=4.2,
            event_name="call_ended",
            call_key="c-1",
        )
        log.warning(
            "webhook destination unhealthy: deliveries paused, probing it",
            destination="crm",
            status=503,
            error="HTTP 503",
        )
        log.info(
            "webhook destination recovered: delivering its backlog",
            destination="crm",
            outage_seconds=4.123,
            probes=3,
            backlog=12,
        )
        log.info("token rotated", link="link-2", held_back=0)
        log.warning("realtime link failed", reason="heartbeat_timeout", detail="", retry_in=0.5)
        log.info("gap in the realtime link", cause="reconnect", seconds=1.25, since="x")
        log.info("reconciled", cause="reconnect", since="x", rows=3, emitted=1, loaded=0)
        log.info("something else", count=2, note="two words", missing=None)
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    lines = [line.split("  ", 1) for line in stream.getvalue().splitlines()]
    assert all(re.fullmatch(_CLOCK, clock) for clock, _ in lines)
    assert [text for _, text in lines] == [
        "incoming_call    3f0c9e2a  +15550100 → +15557654321  ringing  [reconcile]",
        "rpc end_call     3f0c9e2a  rule 0 on incoming_call",
        "--> 200 crm 4 ms  call_ended c-1",
        "--> 503 crm HTTP 503: unhealthy, deliveries paused, probing",
        "<-- crm recovered after 4.1 s (3 probes): delivering its backlog (12)",
        "↻ token rotated  link-2",
        "✗ link failed    heartbeat_timeout, retrying in 0.5 s",
        "gap              1.2 s (reconnect)",
        "reconciled       reconnect: 3 calls listed, 1 missed transition emitted",
        'something else  count=2 note="two words"',
    ]


@pytest.mark.parametrize(("no_color", "coloured"), [("", True), ("1", False)])
def test_auto_is_pretty_on_a_terminal_coloured_unless_no_color(
    monkeypatch: pytest.MonkeyPatch, no_color: str, coloured: bool
) -> None:
    monkeypatch.setenv("NO_COLOR", no_color)
    terminal, pipe = Terminal(), io.StringIO()
    try:
        for stream in (terminal, pipe):
            configure_logging("info", "auto", stream)
            structlog.get_logger("test").info("token rotated", link="link-2", held_back=0)
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    assert ("\x1b[" in terminal.getvalue()) is coloured
    assert re.sub(r"\x1b\[\d+m", "", terminal.getvalue()).endswith("↻ token rotated  link-2\n")
    # Not a terminal: JSON, as journald wants it.
    assert json.loads(pipe.getvalue())["event"] == "token rotated"


def test_every_one_line_form_is_keyed_on_a_message_the_code_still_logs() -> None:
    # A message reworded where it is logged would fall back to the generic form unnoticed.
    roots = [Path(listener.__file__).parent, Path(listener.__file__).parent.parent / "handlers"]
    literals = {
        node.value
        for root in roots
        for path in root.rglob("*.py")
        if path.name != "pretty.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert set(pretty._FORMS) - literals == set()
