"""The status page's admin: signing in with ``service.admin_token``, and the actions.

Signing in (``POST /login`` with the token) sets a random session id in an HttpOnly,
SameSite=Strict cookie; every action (``POST /api/action``) must carry that session's CSRF
token, an HMAC of the id under a key made at start, in ``X-CSRF-Token``: a page on another
site can make the browser send the cookie, never read the token. A request with a foreign
``Origin`` is refused too. Sessions live in memory, for :data:`SESSION_SECONDS` at most.
Each action is logged with its outcome; the token never is.

Actions: ``replay`` (one dead letter by ``msg_id``, or a destination's dead letters enqueued
in the last ``since_minutes``), ``pause`` and ``resume`` a destination (paused is disabled
in the outbox with the reason ``paused``, so it holds across restarts), ``enable`` a
destination a 410 disabled.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

import structlog
from starlette.requests import Request

from listener.webhooks.forwarder import WebhookForwarder

__all__ = ["COOKIE", "SESSION_SECONDS", "ActionError", "AdminGate", "perform"]

_log = structlog.get_logger(__name__)
COOKIE = "sippet_admin"
SESSION_SECONDS = 12 * 3600.0
PAUSED = "paused from the status page"


class ActionError(Exception):
    """An action that cannot be done: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminGate:
    """Who may act. ``token`` None: nobody, the page is read-only."""

    def __init__(self, token: str | None) -> None:
        self._token = token
        self._key = secrets.token_bytes(32)
        self._sessions: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        """Whether an admin token is configured."""
        return self._token is not None

    def sign_in(self, offered: str) -> str | None:
        """A new session id if ``offered`` is the token, else None."""
        if self._token is None or not hmac.compare_digest(offered.encode(), self._token.encode()):
            return None
        now = time.monotonic()
        self._sessions = {sid: until for sid, until in self._sessions.items() if until > now}
        session = secrets.token_urlsafe(32)
        self._sessions[session] = now + SESSION_SECONDS
        return session

    def sign_out(self, session: str | None) -> None:
        if session is not None:
            self._sessions.pop(session, None)

    def session(self, cookies: dict[str, str]) -> str | None:
        """The signed-in session those cookies carry, if still valid."""
        session = cookies.get(COOKIE)
        if session is None:
            return None
        until = self._sessions.get(session)
        return session if until is not None and until > time.monotonic() else None

    def csrf(self, session: str | None) -> str:
        """The session's CSRF token; empty without a session."""
        if session is None:
            return ""
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def same_origin(request: Request) -> bool:
        """Whether the request's ``Origin``, if it sent one, is this server's."""
        origin = request.headers.get("origin")
        return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"

    def check(self, request: Request) -> None:
        """Refuse an action request that is not signed in, not same-origin or lacks the
        session's CSRF token.

        Raises:
            ActionError: 403 (read-only page, missing or wrong token, foreign origin) or
                401 (not signed in).
        """
        if not self.enabled:
            raise ActionError(403, "read-only: no service.admin_token is configured")
        if not self.same_origin(request):
            raise ActionError(403, "refused: the request comes from another origin")
        session = self.session(dict(request.cookies))
        if session is None:
            raise ActionError(401, "sign in with the admin token first")
        offered = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(offered.encode(), self.csrf(session).encode()):
            raise ActionError(403, "refused: missing or wrong CSRF token")


def _owner(forwarders: list[tuple[str, WebhookForwarder]], destination: Any) -> WebhookForwarder:
    for _, forwarder in forwarders:
        if any(d.name == destination for d in forwarder.destinations):
            return forwarder
    raise ActionError(404, f"no destination {destination!r}")


async def perform(
    body: dict[str, Any], forwarders: list[tuple[str, WebhookForwarder]], client: str
) -> str:
    """Do the action ``body`` asks for; return what happened, in a few words.

    Raises:
        ActionError: the request is malformed (400) or names no destination (404).
    """
    action = body.get("action")
    destination = body.get("destination")
    if not isinstance(destination, str):
        raise ActionError(400, "destination: required")
    forwarder = _owner(forwarders, destination)
    now = time.time()
    if action == "replay":
        message = await _replay(forwarder, destination, body, now)
    elif action == "pause":
        paused = await forwarder.change(lambda outbox: outbox.disable(destination, now, PAUSED))
        message = f"{destination}: paused" if paused else f"{destination}: already disabled"
    elif action in ("resume", "enable"):
        enabled = await forwarder.change(lambda outbox: outbox.enable(destination))
        message = f"{destination}: delivering" if enabled else f"{destination}: was not disabled"
    else:
        raise ActionError(400, f"action: unknown {action!r}")
    _log.info(
        "status page action",
        action=action,
        destination=destination,
        msg_id=body.get("msg_id"),
        client=client,
        result=message,
    )
    return message


async def _replay(
    forwarder: WebhookForwarder, destination: str, body: dict[str, Any], now: float
) -> str:
    msg_id = body.get("msg_id")
    minutes = body.get("since_minutes")
    if msg_id is not None:
        if not isinstance(msg_id, str):
            raise ActionError(400, "msg_id: must be a string")
        moved = await forwarder.change(
            lambda outbox: outbox.replay(now, destination=destination, msg_ids=[msg_id])
        )
    elif isinstance(minutes, int | float) and not isinstance(minutes, bool) and minutes > 0:
        since = now - minutes * 60
        moved = await forwarder.change(
            lambda outbox: outbox.replay(now, destination=destination, since=since)
        )
    else:
        raise ActionError(400, "replay: give msg_id, or since_minutes above 0")
    return f"{destination}: {moved.get('dead', 0)} dead letters replayed"
