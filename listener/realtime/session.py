"""The session supervisor: keeps one joined socket alive for the life of the process.

Each attempt takes a token (re-minted when it is missing, refused or past its rotation
point), builds the socket URL anew, connects and joins. A failure, of a mint or of a link,
is classified in one place, the pure function :func:`classify`, into a :class:`Decision`:

- the token was refused (HTTP 401/403 at upgrade, a refused join, a ``phx_close`` we did not
  ask for, close code 1008, a server close once the token has run out): drop it; the first
  such failure in a row retries at once with a fresh token, later ones back off;
- the key was refused at mint (401/403), the mint failed (network, 5xx, 429), or the link
  failed in any other way: back off, keeping the token if it is still good;
- a ``Retry-After`` from the server is a lower bound on the wait (``listener.core.retry``);
- refusals, of the token or the key, refused upgrades and failed mints, back off on the
  policy's shorter ``refusal_cap``: the server is answering, and the window ends the moment
  it says yes.

Mints are single requests: this loop is the only retry schedule, so a mint outage is paced
by the same backoff as everything else and ends within one delay of the server recovering.

The backoff starts over after a link that proved healthy: joined, with its heartbeats
answered, for ``stable_after`` seconds (rotations do not interrupt that; a link that went
deaf counts only up to its last answered heartbeat). Its failure is
retried at once, and further failures climb the schedule again from the shortest delay, so a
fault after a healthy spell never waits out the delays of earlier faults. A link that fails
before it proved healthy does not reset anything: a server that accepts and then drops every
socket, or keeps refusing, meets an ever longer backoff (up to its cap), never a hammering.

Tokens are rotated before they expire, make-before-break: at ``rotate_at`` of the TTL (on
the monotonic clock) a new token is minted and a second socket joined; then the old socket
leaves. Events that reach both sockets during the overlap are delivered once
(``listener.realtime.handover``). Behind slow handlers, what the old socket still brings as
it leaves, and what the new one held back, wait in memory (``_Feed``) and go on at the
handlers' pace after the rotation; the new socket's later events go behind them, the socket
paused while more than a thousand wait.

Every event delivered gets its stable id (``listener.core.ids``) on the way out, after the
handover's de-duplication, from one :class:`~listener.core.ids.EventIds` that lives as long
as the session. One numbering for the stream delivered, not one per socket: a socket's own
count of identical events would start again at 0 on its successor and re-issue, within the
id window, an id its predecessor had just given to another occurrence.

A :class:`LinkWatch` hears when no socket is joined and healthy any more (at the last moment
the failed link was heard from) and when one is again (at its join reply): the gaps that
reconciliation covers. A rotation has no gap, unless the old socket died before the new one
was joined.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit, urlunsplit

import structlog

from listener.core import metrics
from listener.core.errors import AuthError, LinkError, MintError
from listener.core.events import Event
from listener.core.ids import EventIds
from listener.core.retry import AUTH_STATUSES, Backoff, BackoffPolicy, honour_retry_after
from listener.realtime.connection import Connection, EventSink, LinkSettings
from listener.realtime.handover import Handover
from listener.realtime.tokens import SessionToken, TokenSource

__all__ = [
    "Decision",
    "Failure",
    "LinkWatch",
    "Session",
    "SessionSettings",
    "classify",
    "socket_url",
]

# What a mint or a link can fail with.
Failure = AuthError | MintError | LinkError

_log = structlog.get_logger(__name__)
# A server close this close to the token's expiry is taken as the token running out.
_EXPIRY_SKEW = 2.0
# Close code 1008, policy violation: the server refusing what we sent, here the token.
_POLICY_VIOLATION = 1008
# Failures that mean the server no longer accepts this token.
_TOKEN_REFUSALS = frozenset({"join_refused", "channel_closed"})


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

    These defaults are the daemon's: the ``[sippet]`` configuration section reads them from
    here.

    Attributes:
        base_url: Sippet's API root; the socket URL is derived from it.
        link: per-socket settings.
        rotate_at: fraction of a token's TTL after which it is rotated.
        stable_after: a link joined, its heartbeats answered, this long has proved healthy:
            if it fails, the backoff starts over.
        backoff: the reconnect schedule (its first delay is for the first retry).
        rotation_retry: wait before retrying a failed rotation (the old socket stays up).
    """

    base_url: str
    link: LinkSettings = field(default_factory=LinkSettings)
    rotate_at: float = 0.75
    stable_after: float = 5.0
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    rotation_retry: float = 5.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failure (see :func:`classify`); nothing set means "back off".

    Attributes:
        drop_token: the token was refused or has run out: mint a fresh one.
        at_once: retry without waiting (the schedule still advances, so this happens once).
        start_over: the failed link had proved healthy: restart the schedule first.
        retry_after: the server's lower bound on the wait, in seconds.
        refusal: the server answered and said no, or not now: back off on the policy's
            ``refusal_cap``.
    """

    drop_token: bool = False
    at_once: bool = False
    start_over: bool = False
    retry_after: float | None = None
    refusal: bool = False


def classify(
    failure: Failure,
    *,
    token_remaining: float | None,
    refusals: int,
    proved_healthy: bool = False,
) -> Decision:
    """Decide what a failed mint or link means for the token and the next attempt.

    Args:
        failure: what failed, as the token source or the link reported it.
        token_remaining: seconds of validity left on the token in use (None: no token).
        refusals: token refusals in a row before this one, since the last join.
        proved_healthy: the link had proved healthy before it failed.
    """
    if isinstance(failure, AuthError):
        # The key itself was refused: a fresh token cannot be had sooner by hurrying.
        return Decision(refusal=True)
    if isinstance(failure, MintError):
        return Decision(retry_after=failure.retry_after, refusal=True)
    refused = (
        failure.status in AUTH_STATUSES
        or failure.reason in _TOKEN_REFUSALS
        or failure.close_code == _POLICY_VIOLATION
        or (
            failure.reason == "server_closed"
            and token_remaining is not None
            and token_remaining <= _EXPIRY_SKEW
        )
    )
    return Decision(
        drop_token=refused,
        # The token may simply have run out: one immediate retry with a fresh one.
        at_once=refused and refusals == 0,
        start_over=proved_healthy,
        retry_after=failure.retry_after,
        refusal=refused or failure.reason == "upgrade_refused",
    )


class LinkWatch(Protocol):
    """Told when the channel stops and starts being covered; times are wall-clock seconds."""

    def lost(self, at: float) -> None:
        """No socket is joined and healthy since ``at`` (its last frame or heartbeat reply)."""

    def joined(self, at: float) -> None:
        """A socket is joined again since ``at`` (its join reply)."""


class _Unwatched:
    def lost(self, at: float) -> None:
        del at

    def joined(self, at: float) -> None:
        del at


def _wall(monotonic: float) -> float:
    """The wall-clock time of a moment on the monotonic clock."""
    return time.time() - (time.monotonic() - monotonic)


class _Feed:
    """Events on their way to the handlers that wait here, in arrival order, and what comes
    after them: while anything waits, every socket's events go behind it.

    A socket normally hands its events straight on and pauses while the handlers' queues
    are full. One that is leaving must not pause (its leave's acknowledgement comes behind
    every event the server still holds for it), so its events wait here instead
    (:meth:`hold`), as does what the handover kept back for its successor; the successor's
    events go behind them (:meth:`offer`), the socket paused while more than ``bound``
    wait. They go on at the handlers' pace, on a task of their own, so that a rotation does
    not wait for them (it could not end before its new token expired behind slow handlers).
    """

    def __init__(self, deliver: EventSink, bound: int = 1000) -> None:
        self._deliver = deliver
        self._bound = bound
        self._queue: deque[Event] = deque()
        self._task: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._closing = False
        #: Whether events wait here: what comes next goes behind them.
        self.busy = False

    def hold(self, event: Event) -> None:
        """Queue ``event``, never pausing its socket."""
        self._queue.append(event)
        if not self.busy:
            self.busy = True
            self._task = asyncio.ensure_future(self._run())

    def offer(self, event: Event) -> Awaitable[None] | None:
        """Queue ``event``; return what its socket waits for while more than ``bound``
        events wait."""
        self.hold(event)
        if len(self._queue) <= self._bound or self._closing:
            return None
        if self._room is None:
            self._room = asyncio.get_running_loop().create_future()
        # One future for every socket that waits: a reader cancelled while it waits must
        # not cancel it for the others.
        return asyncio.shield(self._room)

    def release(self) -> None:
        """Let a socket paused while more than ``bound`` wait go on (it is leaving)."""
        if self._room is not None:
            if not self._room.done():
                self._room.set_result(None)
            self._room = None

    def close(self) -> None:
        """Pause no socket any more: they are leaving, and a paused one would hold its leave
        up for as long as the handlers take."""
        self._closing = True
        self.release()

    async def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for what waits to go on; return how many did not
        (they are dropped)."""
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=timeout)
        left = len(self._queue)
        if self._task is not None:
            self._task.cancel()
        self._queue.clear()
        return left

    async def _run(self) -> None:
        try:
            while self._queue:
                event = self._queue.popleft()
                try:
                    wait = self._deliver(event)
                except Exception:
                    # As a socket's reader would have: this event is lost, not the others
                    # (nor their order).
                    _log.exception("event could not be handed to the handlers", event=event.name)
                    continue
                if len(self._queue) <= self._bound // 2:
                    self.release()
                if wait is not None:
                    await wait
        finally:
            # No await since the queue was found empty: the next event goes straight on.
            self.busy = False
            self._task = None
            self.release()


class Session:
    """Keeps the events channel joined and passes every event to ``deliver``, with its id.

    Args:
        settings: see :class:`SessionSettings`.
        tokens: where tokens come from. Each :meth:`TokenSource.mint` should be one request
            (the default): this loop does the retrying.
        deliver: called once per event, in arrival order, on the event loop; must not block,
            but may return an awaitable to slow the intake down (see ``Connection``).
        ids: gives each event its id (its window is the id window).
        watch: told of every gap (see :class:`LinkWatch`).
        tls: the TLS context of every ``wss://`` link (see :class:`Connection`).
    """

    def __init__(
        self,
        settings: SessionSettings,
        tokens: TokenSource,
        deliver: EventSink,
        *,
        ids: EventIds | None = None,
        watch: LinkWatch | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self._tls = tls
        self._tokens = tokens
        self._sink = deliver
        self._deliver: EventSink = self._stamped
        self._feed = _Feed(self._stamp)
        self._ids = ids or EventIds()
        self._watch: LinkWatch = watch or _Unwatched()
        self._backoff = Backoff(settings.backoff)
        self._token: SessionToken | None = None
        self._refusals = 0
        self._joined_since = 0.0
        self._link_count = 0
        self.connection: Connection | None = None
        self._links: set[Connection] = set()
        self.joined = asyncio.Event()
        self.rotations = 0
        self.reconnects = 0

    @property
    def token(self) -> SessionToken | None:
        """The token in use (or about to be), for display: its value is never shown."""
        return self._token

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
            link, failure = await self._serve(connection)
            self._watch.lost(_wall(link.answered_until or time.monotonic()))
            await self._recover(failure, proved_healthy=self._proved_healthy(link))

    async def stop(self) -> None:
        """Leave the channel and close every socket (call after cancelling :meth:`run`)."""
        if self.connection is not None:
            self._watch.lost(time.time())
        self.connection = None
        self._set_joined(False)
        links, self._links = self._links, set()
        self._feed.close()
        await asyncio.gather(*(link.leave() for link in links))
        if dropped := await self._feed.flush(self.settings.link.close_timeout):
            _log.warning("events not handed to the handlers before the stop", events=dropped)

    async def _establish(self) -> Connection:
        """Mint (when needed), connect and join, retrying until it works."""
        while True:
            try:
                token = await self._fresh_token()
                connection = await self._open(token, self._deliver)
            except (AuthError, MintError, LinkError) as exc:
                await self._recover(exc)
                continue
            assert connection.joined_at is not None
            self._refusals = 0
            self._joined_since = connection.joined_at
            self.connection = connection
            self._set_joined(True)
            self._watch.joined(_wall(connection.joined_at))
            _log.info("channel joined", topic=self.settings.link.topic, link=connection.name)
            return connection

    async def _serve(self, connection: Connection) -> tuple[Connection, LinkError]:
        """Hold the link, rotating its token on time; return the link that finally failed
        (``connection`` or a successor), and why."""
        retry_rotation_at: float | None = None
        while True:
            token = self._token
            assert token is not None
            rotate_at = token.deadline(self.settings.rotate_at)
            if retry_rotation_at is not None:
                rotate_at = retry_rotation_at
            ended = asyncio.ensure_future(connection.wait_closed())
            done, _ = await asyncio.wait({ended}, timeout=max(0.0, rotate_at - time.monotonic()))
            if ended in done:
                self._set_joined(False)
                self.connection = None
                return connection, ended.result()
            ended.cancel()
            rotated = await self._rotate(connection)
            if isinstance(rotated, Connection):
                connection, retry_rotation_at = rotated, None
            else:
                retry_rotation_at = time.monotonic() + rotated

    async def _rotate(self, old: Connection) -> Connection | float:
        """Replace ``old`` by a socket on a fresh token; if that failed (``old`` stays up),
        return the seconds to wait before trying again."""
        handover = Handover()
        deliver = self._deliver
        feed = self._feed
        # While the old socket leaves, what it still brings waits in the feed rather than
        # for room in the handlers' queues, so that the leave's acknowledgement (behind
        # every event the server queued for that socket) comes within close_timeout.
        # Paused by full queues as at other times, it was closed unacknowledged behind slow
        # handlers, and what the server still held for it, sent before the new socket
        # joined, was lost (85 of 2,000: tests/test_session.py, "behind slow handlers").
        leaving = False

        def from_old(event: Event) -> Awaitable[Any] | None:
            handover.from_old(event)
            if leaving:
                feed.hold(event)
                return None
            return deliver(event)

        old.on_event = from_old
        try:
            token = await self._tokens.mint()
            new = await self._open(token, handover.from_new)
        except (AuthError, MintError, LinkError) as exc:
            old.on_event = deliver
            # Only the pacing applies: the current socket keeps its token, and every rotation
            # mints afresh anyway.
            decision = classify(exc, token_remaining=_remaining(self._token), refusals=0)
            retry_in = honour_retry_after(self.settings.rotation_retry, decision.retry_after)
            _log.warning(
                "token rotation failed; keeping the current socket",
                error=str(exc),
                retry_in=round(retry_in, 3),
            )
            return retry_in
        self._token = token
        self.connection = new
        until, joined_at = old.answered_until, new.joined_at
        if old.closed and until is not None and joined_at is not None and until < joined_at:
            # The old socket died while the new one was joining: what came between was missed.
            self._watch.lost(_wall(until))
            self._watch.joined(_wall(joined_at))
        leaving = True
        # The old socket may be paused behind what waits in the feed: not any more.
        feed.release()
        await old.leave()
        handover.finish()
        # What the new socket brought meanwhile goes behind the old one's; then the switch,
        # with no await since the last pop, so that nothing falls between the two.
        while (event := handover.pop()) is not None:
            feed.hold(event)
        new.on_event = deliver
        self.rotations += 1
        metrics.ROTATIONS.inc()
        _log.info("token rotated", link=new.name, held_back=handover.held)
        return new

    async def _recover(self, failure: Failure, *, proved_healthy: bool = False) -> None:
        """Act on the classification of ``failure``, then wait as long as it says."""
        decision = classify(
            failure,
            token_remaining=_remaining(self._token),
            refusals=self._refusals,
            proved_healthy=proved_healthy,
        )
        if decision.start_over:
            self._backoff.reset()
        if decision.drop_token:
            self._token = None
            self._refusals += 1
        delay = self._backoff.next_delay(refusal=decision.refusal)
        if decision.at_once:
            delay = 0.0
        delay = honour_retry_after(delay, decision.retry_after)
        retry_in = round(delay, 3)
        if isinstance(failure, AuthError):
            _log.error(
                "secret key refused; check SIPPET_SECRET_KEY",
                status=failure.status,
                retry_in=retry_in,
            )
        elif isinstance(failure, LinkError):
            self.reconnects += 1
            metrics.RECONNECTS.labels(reason=failure.reason).inc()
            _log.warning(
                "realtime link failed",
                reason=failure.reason,
                detail=failure.detail,
                token_refused=decision.drop_token,
                retry_in=retry_in,
            )
        else:
            _log.warning("session mint failed", error=str(failure), retry_in=retry_in)
        if delay:
            await asyncio.sleep(delay)

    def _stamped(self, event: Event) -> Awaitable[Any] | None:
        """Every socket's events: behind those that wait in the feed, if any, else on."""
        if self._feed.busy:
            return self._feed.offer(event)
        return self._sink(self._ids.stamp(event))

    def _stamp(self, event: Event) -> Awaitable[Any] | None:
        # orjson decoded the payload, so it has the canonical form an id needs.
        return self._sink(self._ids.stamp(event))

    def _proved_healthy(self, link: Connection) -> bool:
        # Rotations hand over without a gap, so health is counted from the session's join.
        until = link.answered_until
        return until is not None and until - self._joined_since >= self.settings.stable_after

    async def _fresh_token(self) -> SessionToken:
        """The current token while it is before its rotation point, else a new one."""
        token = self._token
        if token is None or time.monotonic() >= token.deadline(self.settings.rotate_at):
            token = self._token = await self._tokens.mint()
        return token

    async def _open(self, token: SessionToken, on_event: EventSink) -> Connection:
        """A new link, connected and joined (``stop`` closes it if cancelled meanwhile)."""
        self._link_count += 1
        self._links = {link for link in self._links if not link.closed}
        url = socket_url(self.settings.base_url, token.value)
        name = f"link-{self._link_count}"
        connection = Connection(url, self.settings.link, on_event, name=name, tls=self._tls)
        self._links.add(connection)
        try:
            await connection.open()
        except LinkError:
            # It has ended, but one refused at the upgrade never started, so it never counts
            # as closed and the pruning above kept it: one Connection (its token URL with it)
            # per refused upgrade or failed connect, for the daemon's lifetime (the soak's
            # heap dumps: 9 -> 33 over 300 s).
            self._links.discard(connection)
            raise
        return connection

    def _set_joined(self, joined: bool) -> None:
        metrics.SOCKET_STATE.set(1 if joined else 0)
        if joined:
            self.joined.set()
        else:
            self.joined.clear()


def _remaining(token: SessionToken | None) -> float | None:
    return None if token is None else token.remaining()
