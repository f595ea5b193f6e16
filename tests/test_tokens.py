"""Minting session tokens against the fake server, and reading every answer shape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from structlog.testing import capture_logs

from listener.core.errors import AuthError, MintError
from listener.core.retry import NO_DELAY, BackoffPolicy
from listener.realtime.tokens import DEFAULT_TTL, TokenSource, parse_mint_response
from listener.testing import FakeSippet

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@pytest.mark.parametrize(
    ("body", "ttl"),
    [
        ({"token": "t", "expires_at": "2027-01-15T08:05:00Z", "ttl_seconds": 300}, 300.0),
        ({"token": "t", "ttl_seconds": 120}, 120.0),
        ({"token": "t", "expires_at": NOW + 90}, 90.0),
        ({"token": "t", "expires_at": (NOW + 60) * 1000}, 60.0),
        ({"token": "t", "expires_at": "2027-01-15T08:05:00+00:00"}, 300.0),
        ({"token": "t", "expires_at": "2027-01-15T08:02:00Z", "ttl_seconds": None}, 120.0),
        ({"session_token": "t"}, DEFAULT_TTL),
    ],
)
def test_parse_mint_response(body: dict[str, object], ttl: float) -> None:
    token = parse_mint_response(body, NOW)
    assert token.value == "t"
    assert token.ttl == pytest.approx(ttl)


def test_expires_at_is_derived_from_ttl() -> None:
    token = parse_mint_response({"token": "t", "ttl_seconds": 300}, NOW)
    assert token.expires_at == NOW + 300
    secret = parse_mint_response({"token": "st_secret_value"}, NOW)
    assert "st_secret_value" not in repr(secret)


def test_the_lifetime_runs_on_the_monotonic_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    token = parse_mint_response({"token": "t", "ttl_seconds": 300}, time.time())
    # The wall clock jumps an hour (NTP, a resumed VM): the token's lifetime does not.
    monkeypatch.setattr(time, "time", lambda: NOW + 3600)
    assert token.remaining() == pytest.approx(300, abs=1)
    assert token.deadline(0.75) == pytest.approx(token.minted_monotonic + 225)


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"token": ""},
        {"expires_at": "x"},
        {"token": "t", "expires_at": NOW - 5},
    ],
)
def test_unusable_answers_raise_mint_error(body: object) -> None:
    with pytest.raises(MintError):
        parse_mint_response(body, NOW)


async def test_mint_against_the_fake_server(fake: FakeSippet, http: httpx.AsyncClient) -> None:
    token = await TokenSource(http, fake.base_url, fake.api_key).mint()
    assert token.ttl == pytest.approx(fake.token_ttl, abs=1)
    assert token.remaining() > 0
    assert fake.mints == 1


async def test_refused_key_raises_auth_error_without_the_key(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    with pytest.raises(AuthError) as caught:
        await TokenSource(http, fake.base_url, "sk_wrong_key_123456").mint()
    assert caught.value.status == 401
    assert "sk_wrong_key_123456" not in str(caught.value)


async def test_a_mint_is_one_request_by_default(fake: FakeSippet, http: httpx.AsyncClient) -> None:
    """The session supervisor's source: its own loop retries, so nothing is nested here; the
    server's Retry-After travels with the error for that loop to honour."""
    fake.behaviour.mint_failures = 10
    fake.behaviour.mint_failure_status = 429
    fake.behaviour.retry_after = 7
    with pytest.raises(MintError) as caught:
        await TokenSource(http, fake.base_url, fake.api_key).mint()
    assert fake.mint_refusals == 1
    assert caught.value.retry_after == 7.0


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_retryable_statuses_are_retried_honouring_retry_after(
    fake: FakeSippet, http: httpx.AsyncClient, status: int
) -> None:
    fake.behaviour.mint_failures = 2
    fake.behaviour.mint_failure_status = status
    fake.behaviour.retry_after = 1
    # Retry-After raises the 1 ms backoff to the policy's cap: 0.2 s, twice.
    backoff = BackoffPolicy(initial=0.001, cap=0.2, jitter=0.0)
    source = TokenSource(http, fake.base_url, fake.api_key, attempts=3, backoff=backoff)
    started = time.monotonic()
    with capture_logs() as logs:
        await source.mint()
    elapsed = time.monotonic() - started
    retries = [entry for entry in logs if entry["event"] == "session mint failed, retrying"]
    assert [entry["delay"] for entry in retries] == [0.2, 0.2]
    assert 0.4 <= elapsed < 1.0
    assert fake.mint_refusals == 2
    assert fake.mints == 1


async def test_retries_end_in_mint_error(fake: FakeSippet, http: httpx.AsyncClient) -> None:
    fake.behaviour.mint_failures = 10
    source = TokenSource(http, fake.base_url, fake.api_key, attempts=3, backoff=NO_DELAY)
    with pytest.raises(MintError):
        await source.mint()
    assert fake.mint_refusals == 3


@pytest.fixture
async def hang_up_server() -> AsyncIterator[tuple[str, list[int]]]:
    """A server that closes every connection without answering; yields its URL and a list
    with one entry per connection."""
    connections: list[int] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", connections


async def test_network_errors_are_retried(
    http: httpx.AsyncClient, hang_up_server: tuple[str, list[int]]
) -> None:
    url, connections = hang_up_server
    source = TokenSource(http, url, "sk_x_123456", attempts=3, backoff=NO_DELAY)
    # A reset or an empty answer, depending on the timing of the close.
    with pytest.raises(MintError, match=r"^session mint failed: (ReadError|RemoteProtocolError)$"):
        await source.mint()
    assert len(connections) == 3
