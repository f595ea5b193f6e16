"""The session supervisor: keeps one joined socket alive for the life of the process.

Each attempt takes a token (re-minted when it is missing, refused or past its rotation
point), builds the socket URL anew, connects and joins. Every failure is classified once,
in :meth:`Session._after_failure`:

- auth-shaped (401/403 at upgrade, a refused join, a ``phx_close`` we did not ask for, a
  server close once the token has expired): drop the token; the first such failure in a row
  retries at once with a fresh token, later ones back off;
- anything else: back off, keeping the token if it is still good.

Backoff never gives up and resets only after a socket stayed joined for ``stable_after``
seconds, so a server that accepts and then drops every socket is not hammered.

Tokens are rotated before they expire, make-before-break: at ``rotate_at`` of the TTL a new
token is minted and a second socket joined; then the old socket leaves. Events that reach both
sockets during the overlap are delivered once (``listener.realtime.handover``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import structlog

from listener.core import metrics
from listener.core.errors import AuthError, LinkError, MintError
from listener.core.events import Event
from listener.core.retry import Backoff, BackoffPolicy
from listener.realtime.connection import Connection, EventSink, LinkSettings
from listener.realtime.handover import Handover
from listener.realtime.tokens import SessionToken, TokenSource

__all__ = ["Session", "SessionSettings", "socket_url"]

_log = structlog.get_logger(__name__)
# A server close this close to the token's expiry is taken as the token running out.
_EXPIRY_SKEW = 2.0


def socket_url(base_url: str, token: str) -> str:
    """Return the Phoenix socket URL for ``base_url`` (http → ws, https → wss).

    The token comes first and ``vsn`` last, as phoenix.js builds it.
    """
    parts = urlsplit(base_url)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + "/socket/websocket"
    query = urlencode({"session_token": token, "vsn": "2.0.0"})
    return urlunsplit((scheme, parts.netloc, path, query, ""))


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """How the supervisor behaves. Durations are in seconds.

    Attributes:
        base_url: Sippet's API root; the socket URL is derived from it.
        link: per-socket settings.
        rotate_at: fraction of a token's TTL after which it is rotated.
        stable_after: a socket joined this long resets the backoff.
        backoff_initial: first backoff delay (the very first retry goes at once).
        backoff_max: the longest delay between attempts.
        rotation_retry: wait before retrying a failed rotation (the old socket stays up).
    """

    base_url: str
    link: LinkSettings = field(default_factory=LinkSettings)
    rotate_at: float = 0.75
    stable_after: float = 30.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    rotation_retry: float = 5.0


class Session:
    """Keeps the events channel joined and passes every event to ``deliver``.

    Args:
        settings: see :class:`SessionSettings`.
        tokens: where tokens come from.
        deliver: called once per event, in arrival order, on the event loop; must not block,
            but may return an awaitable to slow the intake down (see ``Connection``).
    """

    def __init__(
        self,
        settings: SessionSettings,
        tokens: TokenSource,
        deliver: EventSink,
    ) -> None:
        self.settings = settings
        self._tokens = tokens
        self._deliver = deliver
        self._backoff = Backoff(
            BackoffPolicy(initial=settings.backoff_initial, cap=settings.backoff_max)
        )
        self._token: SessionToken | None = None
        self._auth_failures = 0
        self._link_count = 0
        self.connection: Connection | None = None
        self._links: set[Connection] = set()
        self.joined = asyncio.Event()
        self.rotations = 0
        self.reconnects = 0

    @property
    def healthy(self) -> bool:
        """Joined, and the last heartbeat (or the join) was answered within two intervals."""
        conn = self.connection
        if conn is None or not conn.joined or conn.last_heartbeat_ok is None:
            return False
        age = time.monotonic() - conn.last_heartbeat_ok
        return age <= 2 * self.settings.link.heartbeat_interval

    async def run(self) -> None:
        """Keep the channel joined until cancelled; never returns on its own."""
        while True:
            connection = await self._establish()
            failure = await self._serve(connection)
            await self._after_failure(failure, joined_since=connection)

    async def stop(self) -> None:
        """Leave the channel and close every socket (call after cancelling :meth:`run`)."""
        self.connection = None
        self._set_joined(False)
        links, self._links = self._links, set()
        await asyncio.gather(*(link.leave() for link in links))

    async def _establish(self) -> Connection:
        """Mint (when needed), connect and join, retrying until it works."""
        while True:
            try:
                token = await self._fresh_token()
                connection = self._new_connection(token, self._deliver)
                await connection.open()
            except AuthError as exc:
                self._token = None
                delay = self._backoff.next_delay()
                _log.error(
                    "secret key refused; check SIPPET_SECRET_KEY",
                    status=exc.status,
                    retry_in=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            except MintError as exc:
                delay = self._backoff.next_delay()
                _log.warning("session mint failed", error=str(exc), retry_in=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            except LinkError as exc:
                await self._after_failure(exc, joined_since=None)
                continue
            self._auth_failures = 0
            self.connection = connection
            self._set_joined(True)
            _log.info("channel joined", topic=self.settings.link.topic, link=connection.name)
            return connection

    async def _serve(self, connection: Connection) -> LinkError:
        """Hold the link, rotating its token on time; return why the link finally failed."""
        retry_rotation_at: float | None = None
        while True:
            token = self._token
            assert token is not None
            rotate_at = token.minted_at + token.ttl * self.settings.rotate_at
            if retry_rotation_at is not None:
                rotate_at = retry_rotation_at
            ended = asyncio.ensure_future(connection.wait_closed())
            done, _ = await asyncio.wait({ended}, timeout=max(0.0, rotate_at - time.time()))
            if ended in done:
                self._set_joined(False)
                self.connection = None
                return ended.result()
            ended.cancel()
            rotated = await self._rotate(connection)
            if rotated is None:
                retry_rotation_at = time.time() + self.settings.rotation_retry
            else:
                connection, retry_rotation_at = rotated, None

    async def _rotate(self, old: Connection) -> Connection | None:
        """Replace ``old`` by a socket on a fresh token; None if that failed (``old`` stays)."""
        handover = Handover()
        deliver = self._deliver

        def from_old(event: Event) -> Awaitable[Any] | None:
            handover.from_old(event)
            return deliver(event)

        old.on_event = from_old
        try:
            token = await self._tokens.mint()
            new = self._new_connection(token, handover.from_new)
            await new.open()
        except (AuthError, MintError, LinkError) as exc:
            old.on_event = deliver
            _log.warning(
                "token rotation failed; keeping the current socket",
                error=str(exc),
                retry_in=self.settings.rotation_retry,
            )
            return None
        self._token = token
        self.connection = new
        await old.leave()
        for event in handover.finish():
            wait = deliver(event)
            if wait is not None:
                await wait
        new.on_event = deliver
        self.rotations += 1
        metrics.ROTATIONS.inc()
        _log.info("token rotated", link=new.name, held_back=handover.held)
        return new

    async def _after_failure(self, failure: LinkError, joined_since: Connection | None) -> None:
        """Classify a failure, pick the delay, wait it out."""
        token = self._token
        auth = failure.auth or (
            failure.reason == "server_closed"
            and token is not None
            and token.remaining() <= _EXPIRY_SKEW
        )
        self.reconnects += 1
        metrics.RECONNECTS.labels(reason=failure.reason).inc()
        if joined_since is not None and joined_since.joined_for >= self.settings.stable_after:
            self._backoff.reset()
        if auth:
            self._token = None
            self._auth_failures += 1
        delay = self._backoff.next_delay()
        if auth and self._auth_failures == 1:
            # The token may simply have run out: one immediate retry with a fresh one.
            delay = 0.0
        if failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        _log.warning(
            "realtime link failed",
            reason=failure.reason,
            detail=failure.detail,
            auth=auth,
            retry_in=round(delay, 3),
        )
        if delay:
            await asyncio.sleep(delay)

    async def _fresh_token(self) -> SessionToken:
        """The current token while it is before its rotation point, else a new one."""
        token = self._token
        if token is None or token.remaining() <= token.ttl * (1 - self.settings.rotate_at):
            token = self._token = await self._tokens.mint()
        return token

    def _new_connection(self, token: SessionToken, on_event: EventSink) -> Connection:
        self._link_count += 1
        self._links = {link for link in self._links if not link.closed}
        url = socket_url(self.settings.base_url, token.value)
        connection = Connection(url, self.settings.link, on_event, name=f"link-{self._link_count}")
        self._links.add(connection)
        return connection

    def _set_joined(self, joined: bool) -> None:
        metrics.SOCKET_STATE.set(1 if joined else 0)
        if joined:
            self.joined.set()
        else:
            self.joined.clear()
