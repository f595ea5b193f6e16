"""Minting session tokens against the fake server, and reading every answer shape."""

from __future__ import annotations

import time

import httpx
import pytest

from listener.core.errors import AuthError, MintError
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


async def test_5xx_and_429_are_retried_honouring_retry_after(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    fake.behaviour.mint_failures = 2
    fake.behaviour.mint_failure_status = 429
    fake.behaviour.retry_after = 1
    source = TokenSource(http, fake.base_url, fake.api_key, backoff_initial=0.001, backoff_max=5.0)
    started = time.monotonic()
    await source.mint()
    # Two Retry-After: 1 waits, not the 1 ms backoff.
    assert time.monotonic() - started >= 2.0
    assert fake.mint_refusals == 2
    assert fake.mints == 1


async def test_retries_end_in_mint_error(fake: FakeSippet, http: httpx.AsyncClient) -> None:
    fake.behaviour.mint_failures = 10
    source = TokenSource(
        http, fake.base_url, fake.api_key, attempts=3, backoff_initial=0.001, backoff_max=0.01
    )
    with pytest.raises(MintError):
        await source.mint()
    assert fake.mint_refusals == 3


async def test_network_errors_are_retried(http: httpx.AsyncClient) -> None:
    source = TokenSource(
        http,
        "http://127.0.0.1:9",
        "sk_x_123456",
        attempts=2,
        backoff_initial=0.001,
        backoff_max=0.01,
    )
    with pytest.raises(MintError, match="ConnectError"):
        await source.mint()
