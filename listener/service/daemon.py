"""The composition root: settings in, a running daemon out.

Builds the shared HTTP pool, the token source, the RPC client, the handlers, the call tracker,
the dispatcher, the reconciler and the session supervisor; loads the call store; runs them
until asked to stop; then stops them in order: tell systemd (``STOPPING=1``), leave the
channel (no new events), let handlers drain for ``service.drain_timeout``, write the call
store's last batch, tear handlers down, close the pool.

The flow of an event: the session stamps its id; the dispatcher drops it if that id was
handed on before, merges it into the call map and queues it for each handler with its call
as of this event. The reconciler hears of every gap from the session and feeds what the
link missed into the same dispatcher; the persister writes the map, the ids handed on and the
last moment seen to ``calls.sqlite3`` under ``service.state_dir``, once a second.

systemd hears ``READY=1`` only once the channel is joined, ``WATCHDOG=1`` only while its
heartbeats are answered, and a ``STATUS=`` line that says what is going on. A reload
(:meth:`Daemon.reload`, on SIGHUP) keeps the socket: handlers whose ``[[handlers]]`` table did
not change keep running untouched, removed ones drain and are torn down, new ones are set up;
a configuration that does not load leaves the running one in place.

With a shared store (``[store]``, see ``listener.cluster``): the daemon migrates it at start,
claims each (event, handler) there before handling, keeps the ``webhook`` handlers' outboxes
there (every instance delivers from them, ``listener.webhooks.shared_outbox``), and takes part
in the election of the leader that sweeps lapsed claims and prunes the store. The call map
and the gap record are shared there too (``listener.calls.shared``): an instance that starts
knows the calls the others saw, and only the leader lists calls after a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib.util
import os
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import structlog

from listener.calls.backend import CallBackend
from listener.calls.persister import Persister
from listener.calls.reconciler import Cluster, Reconciler, ReconcileSettings
from listener.calls.store import CallStore, store_path
from listener.calls.tracker import CallTracker
from listener.cluster.url import StoreUrl
from listener.core.errors import ConfigError, HandlerLoadError, ListenerError
from listener.core.events import Event
from listener.core.ids import EventIds
from listener.core.logs import configure_logging, register_secret
from listener.core.retry import BackoffPolicy
from listener.dispatch.dispatcher import Dispatcher, DispatchReport, HandlerRunner
from listener.dispatch.handler import Context, Handler
from listener.dispatch.loader import LoadedHandler
from listener.realtime.connection import LinkSettings
from listener.realtime.session import Session, SessionSettings
from listener.realtime.tokens import TokenSource
from listener.rpc.client import RpcClient
from listener.service.config import Settings, SippetSettings, StoreSettings, read_admin_token
from listener.service.linklog import LinkLog
from listener.service.status import StatusBoard
from listener.service.systemd import Notifier

if TYPE_CHECKING:
    from listener.calls.shared import SharedCallStore
    from listener.cluster.store import SharedStore
    from listener.service.health import HealthServer
    from listener.service.status_app import StatusApp

__all__ = [
    "LOOP_ENV",
    "Daemon",
    "Loader",
    "loop_factory",
    "reconcile_settings",
    "session_settings",
    "stop_on_signals",
]

_log = structlog.get_logger(__name__)
# How often the status line is refreshed when systemd asked for no watchdog.
_STATUS_EVERY = 10.0
# How often the cyclic GC's oldest generation is collected (see Daemon._collect_cycles).
_COLLECT_EVERY = 20.0

Loader = Callable[[], tuple[Settings, list[LoadedHandler]]]
# auto (the default): uvloop when installed (`pip install sippet-listener[fast]`); asyncio: the
# standard library's loop even so; uvloop: uvloop or a configuration error.
LOOP_ENV = "SIPPET_EVENT_LOOP"
_LOOPS = ("auto", "asyncio", "uvloop")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop every command runs on, as ``$SIPPET_EVENT_LOOP`` says (None: asyncio's).

    Chosen from the environment, not the configuration file: the loop exists before the file
    is read. uvloop bought the figures in bench/README.md ("uvloop" rows).

    Raises:
        ConfigError: an unknown value, or ``uvloop`` asked for and not installed.
    """
    choice = os.environ.get(LOOP_ENV, "").strip().lower() or "auto"
    if choice not in _LOOPS:
        raise ConfigError(LOOP_ENV, f"{choice!r} is not one of {', '.join(_LOOPS)}")
    if choice == "asyncio" or (choice == "auto" and importlib.util.find_spec("uvloop") is None):
        return None
    try:
        import uvloop
    except ImportError:
        raise ConfigError(
            LOOP_ENV, "uvloop is not installed (pip install 'sippet-listener[fast]')"
        ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _backoff(sippet: SippetSettings) -> BackoffPolicy:
    return BackoffPolicy(initial=sippet.backoff_initial, cap=sippet.backoff_max)


def reconcile_settings(settings: Settings) -> ReconcileSettings:
    """Map the ``[calls]`` section (and ``[sippet]``'s backoff) onto the reconciler's."""
    calls = settings.calls
    return ReconcileSettings(
        enabled=calls.reconcile,
        interval=calls.reconcile_interval,
        lookback_max=calls.lookback_max,
        statuses=calls.statuses,
        backoff=_backoff(settings.sippet),
    )


def session_settings(sippet: SippetSettings) -> SessionSettings:
    """Map the ``[sippet]`` section onto the supervisor's settings."""
    link = LinkSettings(
        topic=sippet.topic,
        heartbeat_interval=sippet.heartbeat_interval,
        join_timeout=sippet.join_timeout,
        connect_timeout=sippet.connect_timeout,
        close_timeout=sippet.close_timeout,
        max_message_size=sippet.max_message_size,
    )
    return SessionSettings(
        base_url=sippet.base_url,
        link=link,
        rotate_at=sippet.rotate_at,
        stable_after=sippet.stable_after,
        backoff=_backoff(sippet),
        rotation_retry=sippet.rotation_retry,
    )


class Daemon:
    """Keeps the channel joined and feeds every event to the handlers until stopped.

    Args:
        settings: the whole configuration.
        api_key: the organisation's secret key.
        handlers: the loaded handlers (see ``listener.dispatch.loader``).
        persist: keep the call map, the ids handed on and the last moment seen in
            ``service.state_dir``; without it (``tail``) they live in memory only and every
            start is a first start.
        store: the shared store's URL (``config.store_url``), for an instance of a cluster;
            without it (the default, and ``tail``, the demo, the test harness) none is used,
            whatever the environment holds.
        notifier: where service notifications go (default: ``$NOTIFY_SOCKET``, if set).
        tls: what Sippet's certificate is checked against, for its HTTPS requests and its
            socket alike (default: httpx's: ``$SSL_CERT_FILE`` or ``$SSL_CERT_DIR`` when
            set, else certifi's bundle).
    """

    def __init__(
        self,
        settings: Settings,
        api_key: str,
        handlers: Sequence[LoadedHandler] = (),
        *,
        persist: bool = True,
        notifier: Notifier | None = None,
        store: StoreUrl | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        sippet = settings.sippet
        self.settings = settings
        self.notifier = notifier or Notifier.from_environment()
        # One context for the mints, the RPC and every socket. websockets made a new one
        # per connection (each token rotation), from the system's trust store where the
        # HTTP client used certifi's: a load of the CA certificates each time, 20 ms of the
        # event loop (ssl.create_default_context, this machine) and 0.8 MiB while it lived.
        self._tls = httpx.create_ssl_context() if tls is None else tls
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=10.0), verify=self._tls)
        self.rpc = RpcClient(sippet.base_url, api_key, http=self._http)
        # One request per mint: the session's own backoff paces the retries.
        tokens = TokenSource(self._http, sippet.base_url, api_key)
        self.handlers = list(handlers)
        self.store = _shared_store(settings, store) if store is not None else None
        # The call map's share of it, once open.
        self.shared_calls: SharedCallStore | None = None
        self.tracker = CallTracker(settings.calls.id_window)
        self.dispatcher = Dispatcher([self._runner(item) for item in self.handlers], self.tracker)
        self.reconciler = Reconciler(
            reconcile_settings(settings),
            self.rpc,
            self.tracker,
            self.dispatcher.submit,
            topic=sippet.topic,
            cluster=_cluster_calls(self.store) if self.store is not None else None,
        )
        # The status page's view of the link's gaps, passed on to the reconciler.
        self.link_log = LinkLog(self.reconciler)
        self.session = Session(
            session_settings(sippet),
            tokens,
            self.dispatcher.submit,
            ids=EventIds(settings.calls.id_window),
            watch=self.link_log,
            tls=self._tls,
        )
        self.board = StatusBoard(self)
        if settings.service.metrics_address is not None:
            self.board.observe()
        self.status_page: StatusApp | None = None
        self._persist = persist
        self.report: DispatchReport | None = None
        self._reloading = asyncio.Lock()
        # Why the latest reload was refused (None after one that applied), for `reload`.
        self.last_reload_error: str | None = None
        self._status = ""

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): joined, and its heartbeats answered.

        A shared store that does not answer leaves it ready, and says so in the reason:
        the instance still hears every event and keeps it in its spool, which is what it is
        there for; every instance shares that store, so none would do better, and an
        orchestrator seeing them all unready at once would only hold a rolling upgrade.
        """
        if not self.session.joined.is_set():
            return False, "events channel not joined"
        if not self.session.healthy:
            return False, "heartbeats unanswered"
        store = self._store_state()
        return True, f"joined; {store}" if store else "joined"

    def _store_state(self) -> str | None:
        """What the shared store (the claims, the call map) is up to, when not simply answering."""
        if self.store is None:
            return None
        spooled = self.store.claims.spool.events
        parts = []
        if self.store.claims.down or not self.store.ready.is_set():
            # Which says it of the call map too.
            return f"store not answering; {spooled} events spooled"
        if spooled:
            parts.append(f"store answering; {spooled} events spooled")
        if self.shared_calls is not None and self.shared_calls.not_sharing:
            # Still ready: the call map goes on locally, and is shared once the store takes it.
            parts.append("store not taking the call map; kept locally")
        return "; ".join(parts) or None

    def status_line(self) -> str:
        """What ``systemctl status`` shows: link state, handlers, and their own words."""
        state = "joined" if self.session.joined.is_set() else "connecting"
        parts = [f"{state} {self.settings.sippet.topic}", f"{self.dispatcher.received} events"]
        if self.store is not None:
            elector = self.store.elector
            parts.append(f"leader (term {elector.term})" if elector.is_leader else "follower")
            if store := self._store_state():
                parts.append(store)
        for item, runner in zip(self.handlers, self.dispatcher.runners, strict=True):
            extra = item.handler.status()
            pending = f", {runner.pending} pending" if runner.pending else ""
            parts.append(f"{item.settings.name}{pending}{f': {extra}' if extra else ''}")
        return "; ".join(parts)

    async def run(self, stop: asyncio.Event) -> None:
        """Set up the handlers, run until ``stop`` is set, then shut down in order.

        Raises:
            HandlerLoadError: a handler's ``setup`` failed; nothing was connected.
            ListenerError: the metrics endpoint could not listen.
        """
        health = self._health_server()
        loop = type(asyncio.get_running_loop())
        _log.info("starting", event_loop=f"{loop.__module__}.{loop.__qualname__}")
        try:
            if self.store is not None:
                from listener.cluster.database import StoreRefused

                try:
                    migrated = await self.store.open()
                except StoreRefused as exc:
                    # Wrong password or database: a restart cannot fix it (exit 78).
                    raise ConfigError(exc.key, exc.problem) from None
                if migrated is not None:
                    _log.info(
                        "shared store open", store=str(self.store.url), schema=migrated.version
                    )
            persister = await self._open_store()
            try:
                await self._setup(self.dispatcher.runners)
            except BaseException:
                await persister.close()
                raise
        except BaseException:
            if self.store is not None:
                await self.store.close()
            await self._http.aclose()
            self.notifier.close()
            raise
        if health is not None:
            await health.start()
        self.dispatcher.start()
        # These run for the life of the daemon: any ending means something broke.
        lifelong = {
            asyncio.create_task(self.session.run(), name="sippet-session"),
            asyncio.create_task(self._keep_watch(), name="sippet-watchdog"),
            asyncio.create_task(persister.run(), name="sippet-call-store"),
            asyncio.create_task(self._collect_cycles(), name="sippet-gc"),
        }
        if self.store is not None:
            retain = self.settings.calls.retain_ended
            lifelong.add(
                asyncio.create_task(
                    self.store.run(retain, self._redeliver), name="sippet-shared-store"
                )
            )
        # In a cluster only the leader lists calls; the others take its results from the
        # shared call map (see listener.calls.reconciler).
        if self.reconciler.settings.enabled:
            lifelong.add(asyncio.create_task(self.reconciler.run(), name="sippet-reconciler"))
        ready = asyncio.create_task(self._notify_ready(), name="sippet-ready")
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({*lifelong, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopping}:
                task.result()
        finally:
            self.notifier.stopping()
            _log.info("stopping", drain_timeout=self.settings.service.drain_timeout)
            for task in (*lifelong, ready, stopping):
                task.cancel()
            for task in (*lifelong, ready):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.session.stop()
            self.report = await self.dispatcher.stop(self.settings.service.drain_timeout)
            await persister.close()
            await self._teardown(self.dispatcher.runners)
            if self.store is not None:
                await self.store.close()
            if health is not None:
                await health.stop()
            await self._http.aclose()
            self.notifier.close()

    async def reload(self, load: Loader) -> bool:
        """Apply a new configuration without dropping the socket; False if it was refused.

        ``load`` reads and validates the configuration and loads its handlers; any
        ``ConfigError`` or ``HandlerLoadError`` (from it or from a new handler's setup) keeps
        the running configuration, and says so in the logs and the service status.
        """
        async with self._reloading:
            self.notifier.reloading()
            try:
                settings, handlers = load()
                await self._apply(settings, handlers)
            except (ConfigError, HandlerLoadError) as exc:
                _log.error(
                    "reload refused; the previous configuration keeps running", error=str(exc)
                )
                self.notifier.ready(f"reload failed: {exc}; running the previous configuration")
                self.last_reload_error = str(exc)
                return False
            self.last_reload_error = None
            _log.info(
                "configuration reloaded", handlers=[item.settings.name for item in self.handlers]
            )
            self.notifier.ready(self.status_line())
            return True

    async def _apply(self, settings: Settings, loaded: list[LoadedHandler]) -> None:
        old = list(zip(self.handlers, self.dispatcher.runners, strict=True))
        handlers: list[LoadedHandler] = []
        runners: list[HandlerRunner] = []
        fresh: list[HandlerRunner] = []
        for item in loaded:
            match = next(
                (pair for pair in old if pair[0].entry is not None and pair[0].entry == item.entry),
                None,
            )
            if match is None:
                handlers.append(item)
                runners.append(self._runner(item))
                fresh.append(runners[-1])
            else:
                # Unchanged table: keep the running instance, its queue and its state.
                old.remove(match)
                handlers.append(match[0])
                runners.append(match[1])
        await self._setup(fresh)
        for section in ("sippet", "calls", "store"):
            if getattr(settings, section) != getattr(self.settings, section):
                _log.warning(f"[{section}] settings changed: they apply after a restart")
        service = settings.service
        if (service.log_level, service.log_format) != (
            self.settings.service.log_level,
            self.settings.service.log_format,
        ):
            configure_logging(service.log_level, service.log_format)
        self.settings = settings.model_copy(
            update={
                "sippet": self.settings.sippet,
                "calls": self.settings.calls,
                "store": self.settings.store,
            }
        )
        removed = self.dispatcher.replace(runners)
        if self.status_page is not None:
            self.board.observe()
        self.handlers = handlers
        for runner in removed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(service.drain_timeout):
                    await runner.drain()
            abandoned = await runner.stop()
            if abandoned:
                _log.warning(
                    "removed handler stopped with events unhandled",
                    handler=runner.settings.name,
                    abandoned=abandoned,
                )
        await self._teardown([pair[1] for pair in old])

    async def _redeliver(self, event: Event, handler: str) -> None:
        """Hand ``event`` to ``handler`` again: its claim lapsed on an instance that died, or
        it waited in the spool for the store to answer."""
        runner = next((r for r in self.dispatcher.runners if r.settings.name == handler), None)
        if runner is None:
            assert self.store is not None
            _log.warning("claim owed to a handler not configured here", handler=handler)
            self.store.claims.done(event, handler)
            return
        call = self.tracker.get(event.call_key) if event.call_key else None
        wait = runner.offer(event, call)
        if wait is not None:
            await wait

    def _runner(self, item: LoadedHandler) -> HandlerRunner:
        context = Context(
            rpc=self.rpc,
            config=item.handler.config,
            name=item.settings.name,
            state_dir=self.settings.service.state_dir,
            calls=self.tracker,
        )
        if self.store is None:
            return HandlerRunner(item.handler, item.settings, context)
        _share_outbox(item.handler, self.store, self.settings.store)
        return HandlerRunner(item.handler, item.settings, context, self.store.claims)

    async def _open_store(self) -> Persister:
        """Load the call store into the tracker and tell the reconciler where history ends.

        Raises:
            ListenerError: the state directory or the store cannot be opened.
        """
        retain = self.settings.calls.retain_ended
        if not self._persist:
            return Persister(None, self.tracker, self.reconciler.covered_until, retain=retain)
        state_dir = self.settings.service.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ListenerError(
                f"service.state_dir: cannot create {state_dir}: {exc.strerror}"
            ) from None
        opener = (
            CallStore
            if self.store is None
            else _shared_calls(self.store, covers=self.reconciler.settings.enabled)
        )
        store, last_seen = await Persister.open(store_path(state_dir), self.tracker, opener)
        if self.store is not None:
            from listener.calls.shared import SharedCallStore

            if isinstance(store, SharedCallStore):
                self.shared_calls = store
        self.reconciler.resume(last_seen)
        return Persister(store, self.tracker, self.reconciler.covered_until, retain=retain)

    def _health_server(self) -> HealthServer | None:
        address = self.settings.service.metrics_address
        if address is None:
            return None
        # Imported here: uvicorn and starlette cost about 8 MiB of idle RSS (bench/README.md),
        # for a daemon that serves no metrics.
        from listener.service.health import HealthServer
        from listener.service.status_app import StatusApp

        token = read_admin_token(self.settings.service)
        if token is not None:
            register_secret(token)
        page = self.status_page = StatusApp(self, self.board, token)
        try:
            return HealthServer(
                *address, readiness=self.readiness, routes=page.routes(), background=page.run
            )
        except OSError as exc:
            raise ListenerError(
                f"service.metrics_listen: cannot listen on "
                f"{self.settings.service.metrics_listen}: {exc.strerror}"
            ) from None

    async def _notify_ready(self) -> None:
        await self.session.joined.wait()
        self._status = self.status_line()
        self.notifier.ready(self._status)

    async def _keep_watch(self) -> None:
        """Ping the watchdog while the link is healthy; keep the status line current."""
        interval = self.notifier.watchdog_interval()
        period = min(interval / 2, _STATUS_EVERY) if interval else _STATUS_EVERY
        while True:
            await asyncio.sleep(period)
            if self.session.healthy:
                # A link that stopped answering heartbeats gets no ping: if it does not
                # recover, systemd restarts the service.
                self.notifier.watchdog()
            status = self.status_line()
            if status != self._status:
                self._status = status
                self.notifier.status(status)

    async def _collect_cycles(self) -> None:
        """Collect the cyclic GC's oldest generation every ``_COLLECT_EVERY`` seconds.

        Every link that ends (a rotation about every 1.5 s in the soak) leaves a reference
        cycle (its socket, protocol, buffers, compressors) that outlived a young collection,
        so it waits in the oldest generation; with the heap frozen at start and young
        collections every 7,000 net allocations (``listener.dispatch.dispatcher``), a full
        collection came about once in 140 s in the soak, and the memory of what waited was
        reused by nothing else meanwhile. ``python -m bench --soak --duration 300``, minutes
        apart on the shared machine: RSS 60.0 -> 63.0 MiB from 30 s to the end without this,
        60.0 -> 60.5 with a full collection every 20 s (bench/README.md, "The soak"). One
        takes ~80 µs with the soak's 3,400 objects not frozen (timed in-process, 50 runs).
        """
        while True:
            await asyncio.sleep(_COLLECT_EVERY)
            gc.collect()

    async def _setup(self, runners: Sequence[HandlerRunner]) -> None:
        done: list[HandlerRunner] = []
        for runner in runners:
            try:
                await runner.handler.setup(runner.context)
            except Exception as exc:
                await self._teardown(done)
                raise HandlerLoadError(
                    runner.settings.name, f"setup failed: {type(exc).__name__}: {exc}"
                ) from None
            done.append(runner)

    async def _teardown(self, runners: Sequence[HandlerRunner]) -> None:
        for runner in runners:
            try:
                await runner.handler.teardown(runner.context)
            except Exception as exc:
                _log.error(
                    "handler teardown failed",
                    handler=runner.settings.name,
                    error=f"{type(exc).__name__}: {exc}",
                )


def _shared_store(settings: Settings, url: StoreUrl) -> SharedStore:
    # Imported here: psycopg, its pool and the cluster modules add 9.3 MiB of RSS to a
    # single instance (max RSS after importing them on top of the CLI), which has no use
    # for them.
    from listener.cluster.leader import LeaseSettings
    from listener.cluster.spool import SPOOL_FILE
    from listener.cluster.store import SharedStore

    store = settings.store
    lease = LeaseSettings(
        ttl=store.lease_ttl, renew_every=store.lease_renew, connect_timeout=store.connect_timeout
    )
    return SharedStore(
        url,
        settings.service.state_dir / SPOOL_FILE,
        pool_size=store.pool_size,
        connect_timeout=store.connect_timeout,
        lease=lease,
    )


def _cluster_calls(store: SharedStore) -> Cluster:
    from listener.calls.shared import ClusterCalls

    return ClusterCalls(store)


def _shared_calls(store: SharedStore, *, covers: bool) -> Callable[[Path], CallBackend]:
    """The opener of the call store of an instance sharing ``store`` (tried at once only if
    the store answered at start); ``covers``: whether this instance reconciles its gaps."""
    from listener.calls.shared import SharedCallStore

    elector = store.elector
    return functools.partial(
        SharedCallStore,
        url=store.url,
        timeout=store.connect_timeout,
        leads=lambda: elector.is_leader,
        covers=covers,
        answering=store.ready.is_set(),
    )


def _share_outbox(handler: Handler, store: SharedStore, settings: StoreSettings) -> None:
    """A ``webhook`` handler of an instance sharing a store keeps its outbox there."""
    # No webhook handler exists before its module is loaded: the webhook stack stays out of
    # a daemon without one (as in listener.service.status.forwarders).
    if "listener.webhooks.handler" not in sys.modules:
        return
    from listener.webhooks.handler import WebhookHandler

    if isinstance(handler, WebhookHandler):
        from listener.webhooks.shared_outbox import open_shared

        handler.shared_outbox = functools.partial(
            open_shared,
            store.url,
            holder=store.holder,
            lease_ttl=settings.lease_ttl,
            renew_every=settings.lease_renew,
            connect_timeout=settings.connect_timeout,
        )
        handler.leads = lambda: store.elector.is_leader


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGINT or SIGTERM (a second SIGINT interrupts at once, as usual)."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            loop.remove_signal_handler(signal.SIGINT)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
