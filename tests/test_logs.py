"""No secret reaches a log line: not the key, not a token, not inside a URL."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from listener.core.logs import configure_logging, redact_text, register_secret
from listener.testing import FakeSippet
from tests.conftest import RunSession


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
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
    fake: FakeSippet, run_session: RunSession, captured: io.StringIO
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
    lines = [json.loads(line) for line in output.splitlines()]
    # The debug output did include the libraries' handshake lines, URLs and all.
    assert any("session_token=[REDACTED]" in line["event"] for line in lines), output[:2000]
    assert any(line.get("logger", "").startswith("httpx") for line in lines)
    assert fake.api_key not in output
    assert tokens
    assert not [token for token in tokens if token in output]
