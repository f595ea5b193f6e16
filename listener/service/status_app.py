"""The status page's routes on the metrics server: ``/``, ``/status``, ``/events`` and the rest.

=====================  ======================================================================
``GET /``              the page (server-rendered, then live)
``GET /status``        the snapshot as JSON (``sippet-listener status`` reads it)
``GET /events``        server-sent views (:mod:`.sse`)
``GET /static/...``    the page's script and style
``GET /api/attempts``  a delivery's attempts (``?msg_id=``), to any destination
``POST /login``        sign in with the admin token (form field ``token``)
``POST /logout``       sign out
``POST /api/action``   an admin action (:mod:`.actions`), JSON, with ``X-CSRF-Token``
=====================  ======================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from listener.service.actions import COOKIE, SESSION_SECONDS, ActionError, AdminGate, perform
from listener.service.sse import Feed
from listener.service.status import StatusBoard, forwarders
from listener.service.status_page import SECURITY_HEADERS, render_page, static_asset
from listener.service.status_view import view
from listener.webhooks.outbox_store import OutboxStore

if TYPE_CHECKING:
    from listener.service.daemon import Daemon

__all__ = ["StatusApp"]

_log = structlog.get_logger(__name__)
# How often the dead letters shown are read from the outbox.
_REFRESH_EVERY = 1.0
_MAX_MSG_ID = 200
_MAX_BODY = 4096


def _whereabouts(
    outbox: OutboxStore, destination: str, msg_id: str
) -> tuple[str, float | None] | None:
    return outbox.whereabouts(destination, msg_id)


def _clock(moment: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(moment)) + f".{int(moment % 1 * 1000):03d}"


class StatusApp:
    """The routes, and the background work they need (:meth:`run`)."""

    def __init__(self, daemon: Daemon, board: StatusBoard, admin_token: str | None) -> None:
        self._daemon = daemon
        self._board = board
        self.gate = AdminGate(admin_token)
        self.feed = Feed(
            board.snapshot,
            lambda snapshot, admin: view(snapshot, admin=admin),
            self._scope_is_admin,
        )

    def routes(self) -> list[BaseRoute]:
        """The routes to add to the metrics server."""
        return [
            Route("/", self._page),
            Route("/status", self._status),
            Route("/events", self.feed),
            Route("/static/{name}", self._static),
            Route("/favicon.ico", self._no_icon),
            Route("/api/attempts", self._attempts),
            Route("/api/action", self._action, methods=["POST"]),
            Route("/login", self._login, methods=["POST"]),
            Route("/logout", self._logout, methods=["POST"]),
        ]

    async def run(self) -> None:
        """Feed the live clients and read the dead letters shown, until cancelled."""
        feed = asyncio.create_task(self.feed.run(), name="status-page-feed")
        try:
            while True:
                await self._board.refresh()
                await asyncio.sleep(_REFRESH_EVERY)
        finally:
            self.feed.close()
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed

    def _view(self, admin: bool) -> dict[str, Any]:
        return view(self._board.snapshot(), admin=admin)

    def _scope_is_admin(self, scope: dict[str, Any]) -> bool:
        return self.gate.session(dict(Request(scope).cookies)) is not None

    def _admin_state(self, request: Request) -> tuple[str, str]:
        if not self.gate.enabled:
            return "off", ""
        session = self.gate.session(dict(request.cookies))
        return ("on", self.gate.csrf(session)) if session is not None else ("login", "")

    async def _page(self, request: Request) -> Response:
        admin, csrf = self._admin_state(request)
        page = render_page(self._view(admin == "on"), admin=admin, csrf=csrf)
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    async def _status(self, request: Request) -> Response:
        del request
        return JSONResponse(self._board.snapshot(), headers={"cache-control": "no-store"})

    async def _static(self, request: Request) -> Response:
        found = static_asset(request.path_params["name"])
        if found is None:
            return Response("not found", status_code=404)
        data, media = found
        return Response(data, media_type=media, headers=SECURITY_HEADERS)

    async def _no_icon(self, request: Request) -> Response:
        # Browsers ask for it whatever the page says; a 404 would be a console error.
        del request
        return Response(status_code=204)

    async def _attempts(self, request: Request) -> Response:
        msg_id = request.query_params.get("msg_id", "")
        if not msg_id or len(msg_id) > _MAX_MSG_ID:
            return JSONResponse({"message": "msg_id: required"}, status_code=400)
        attempts: list[dict[str, Any]] = []
        where: list[str] = []
        for _, forwarder in forwarders(self._daemon):
            for attempt in await forwarder.inspect(lambda outbox: outbox.attempts(msg_id)):
                attempts.append(
                    {
                        "at": attempt.at,
                        "time": _clock(attempt.at),
                        "destination": attempt.destination,
                        "status": attempt.status,
                        "took": f"{attempt.latency * 1000:.0f} ms",
                        "error_class": attempt.error_class,
                        "error": attempt.error,
                        "probe": attempt.probe,
                    }
                )
            for destination in forwarder.destinations:
                found = await forwarder.inspect(_whereabouts, destination.name, msg_id)
                if found is not None:
                    state, at = found
                    where.append(f"{destination.name}: {state}" + (f" {_clock(at)}" if at else ""))
        attempts.sort(key=lambda item: item["at"])
        return JSONResponse({"attempts": attempts, "whereabouts": where})

    async def _action(self, request: Request) -> Response:
        client = request.client.host if request.client else "?"
        try:
            self.gate.check(request)
            raw = await request.body()
            if len(raw) > _MAX_BODY:
                raise ActionError(413, "request too large")
            try:
                body = await request.json()
            except ValueError:
                raise ActionError(400, "the body must be a JSON object") from None
            if not isinstance(body, dict):
                raise ActionError(400, "the body must be a JSON object")
            message = await perform(body, list(forwarders(self._daemon)), client)
        except ActionError as exc:
            _log.warning("status page action refused", client=client, reason=str(exc))
            return JSONResponse({"message": str(exc)}, status_code=exc.status)
        return JSONResponse({"message": message})

    async def _login(self, request: Request) -> Response:
        client = request.client.host if request.client else "?"
        raw = await request.body()
        # The one field of a urlencoded form: no multipart parser needed.
        offered = parse_qs(raw[:_MAX_BODY].decode("utf-8", "replace")).get("token", [""])[0]
        same_origin = self.gate.same_origin(request)
        session = self.gate.sign_in(offered) if same_origin else None
        if session is None:
            reason = "wrong token" if same_origin else "from another origin"
            _log.warning("status page sign-in refused", client=client, reason=reason)
            # A short pause makes guessing slow; the token's length makes it hopeless.
            await asyncio.sleep(0.5)
            return Response("wrong admin token", status_code=403, headers=SECURITY_HEADERS)
        _log.info("status page sign-in", client=client)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            session,
            max_age=int(SESSION_SECONDS),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def _logout(self, request: Request) -> Response:
        self.gate.sign_out(request.cookies.get(COOKIE))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response
