"""Realtime session tokens: ``POST {base_url}/api/realtime/session`` with the secret key.

Sippet documents the response as ``{"token", "expires_at", "ttl_seconds"}``; the prose calls
the token ``session_token``, so that spelling is accepted too. Either expiry field may be
missing: one is derived from the other, and with neither the documented default of five
minutes is assumed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import structlog
import tenacity

from listener.core import metrics
from listener.core.errors import AuthError, MintError
from listener.core.httputil import USER_AGENT
from listener.core.logs import register_secret
from listener.core.retry import (
    AUTH_STATUSES,
    BackoffPolicy,
    TenacityWait,
    is_retryable_status,
    retry_after_seconds,
)

__all__ = ["DEFAULT_TTL", "SessionToken", "TokenSource", "parse_mint_response"]

DEFAULT_TTL = 300.0
_log = structlog.get_logger(__name__)
# Between a one-off caller's tries: full jitter, so clients failing together spread apart.
_FULL_JITTER = BackoffPolicy(jitter=1.0)


@dataclass(frozen=True, slots=True)
class SessionToken:
    """A minted token. ``value`` never shows in ``repr`` or logs.

    Its lifetime is measured on the monotonic clock, which a wall-clock step (NTP, a
    suspended VM) cannot move; the wall-clock times are for display only.

    Attributes:
        value: the token itself, for the socket URL only.
        ttl: seconds it was valid for when minted.
        minted_at: local wall-clock time of the mint.
        minted_monotonic: monotonic time of the mint.
    """

    value: str = field(repr=False)
    ttl: float
    minted_at: float
    minted_monotonic: float = field(default_factory=time.monotonic)

    @property
    def expires_at(self) -> float:
        """Local wall-clock time at which the token stops being valid."""
        return self.minted_at + self.ttl

    def deadline(self, fraction: float = 1.0) -> float:
        """The monotonic time at which ``fraction`` of the token's lifetime has gone."""
        return self.minted_monotonic + self.ttl * fraction

    def remaining(self) -> float:
        """Seconds of validity left (negative once expired)."""
        return self.deadline() - time.monotonic()


def _parse_expires_at(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Epoch seconds, or milliseconds from a JavaScript-minded server.
        return float(value) / 1000.0 if value > 1e11 else float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def parse_mint_response(body: Any, now: float) -> SessionToken:
    """Build a :class:`SessionToken` from the mint endpoint's JSON answer.

    The TTL is taken from ``ttl_seconds`` when present, because it does not depend on clock
    agreement with the server; else from ``expires_at`` minus ``now``.

    Raises:
        MintError: the answer has no usable token.
    """
    if not isinstance(body, dict):
        raise MintError("session mint answer is not a JSON object")
    token = body.get("token") or body.get("session_token")
    if not isinstance(token, str) or not token:
        raise MintError("session mint answer has no token")
    ttl_value = body.get("ttl_seconds")
    ttl: float | None = None
    if isinstance(ttl_value, int | float) and not isinstance(ttl_value, bool) and ttl_value > 0:
        ttl = float(ttl_value)
    if ttl is None:
        expires_at = _parse_expires_at(body.get("expires_at"))
        ttl = expires_at - now if expires_at is not None else DEFAULT_TTL
    if ttl <= 0:
        raise MintError("session mint answer holds a token that has already expired")
    return SessionToken(token, ttl, now)


class _Retryable(Exception):
    """A mint attempt that may succeed if tried again (network error, a retryable status)."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class TokenSource:
    """Mints session tokens.

    By default each :meth:`mint` is one request: the session supervisor retries in its own
    loop, on its own backoff, and a second schedule nested inside it would only stretch every
    wait. A one-off caller (``sippet-listener mint-token``) asks for ``attempts`` instead.

    Args:
        http: the client to use (its pool is shared with the rest of the daemon).
        base_url: Sippet's API root, e.g. ``https://api.sippet.ai``.
        api_key: the organisation's secret key; sent as ``x-api-key`` and nowhere else.
        attempts: tries per :meth:`mint` call for network errors and retryable statuses.
        backoff: the wait between those tries; its ``cap`` also caps a ``Retry-After``.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        api_key: str,
        *,
        attempts: int = 1,
        backoff: BackoffPolicy = _FULL_JITTER,
    ) -> None:
        self._http = http
        self._url = base_url.rstrip("/") + "/api/realtime/session"
        self._api_key = api_key
        register_secret(api_key)
        self._retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(_Retryable),
            wait=TenacityWait(backoff, cap=backoff.cap),
            stop=tenacity.stop_after_attempt(attempts),
            reraise=True,
            before_sleep=self._log_retry,
        )

    async def mint(self) -> SessionToken:
        """Mint a fresh token.

        Raises:
            AuthError: the key was refused (HTTP 401/403); never retried here.
            MintError: every attempt failed (with the last ``Retry-After``, if any), or the
                answer was unusable.
        """
        try:
            token: SessionToken = await self._retrying(self._mint_once)
        except _Retryable as exc:
            metrics.TOKEN_MINTS.labels(outcome="failed").inc()
            raise MintError(f"session mint failed: {exc}", retry_after=exc.retry_after) from None
        except AuthError:
            metrics.TOKEN_MINTS.labels(outcome="refused").inc()
            raise
        except MintError:
            metrics.TOKEN_MINTS.labels(outcome="failed").inc()
            raise
        metrics.TOKEN_MINTS.labels(outcome="ok").inc()
        _log.debug("session token minted", ttl=token.ttl)
        return token

    async def _mint_once(self) -> SessionToken:
        headers = {
            "content-type": "application/json",
            "x-api-key": self._api_key,
            "user-agent": USER_AGENT,
        }
        try:
            response = await self._http.post(self._url, headers=headers, content=b"{}")
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}") from None
        status = response.status_code
        if status in AUTH_STATUSES:
            raise AuthError(status)
        if is_retryable_status(status):
            raise _Retryable(f"HTTP {status}", retry_after_seconds(response.headers))
        if not response.is_success:
            raise MintError(f"session mint failed: HTTP {status}")
        try:
            body = response.json()
        except ValueError:
            raise MintError("session mint answer is not JSON") from None
        token = parse_mint_response(body, time.time())
        register_secret(token.value)
        return token

    @staticmethod
    def _log_retry(retry_state: tenacity.RetryCallState) -> None:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        _log.info(
            "session mint failed, retrying",
            error=str(exc),
            attempt=retry_state.attempt_number,
            delay=round(delay, 3),
        )
