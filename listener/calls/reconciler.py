"""The reconciler: records every gap in the realtime link and rebuilds what it missed.

Theory of operation. A *gap* is any time when no socket was joined and healthy:

- from the last frame of a failed link (its last answered heartbeat, if it went deaf) to the
  join reply of the next one: the session reports both (:meth:`Reconciler.lost`,
  :meth:`Reconciler.joined`);
- from the daemon's last persisted moment (:meth:`Reconciler.covered_until`, which the store
  keeps) to its first join after a restart;
- the first start ever, with no history at all: a gap of unknown length.

Each gap is logged with its length when it ends and counted (``gaps_total`` and
``gap_seconds_total``, by cause). Then, at once, a pass asks ``list_calls`` for every call
that may have moved since the gap began (:func:`~listener.calls.reconcile.list_calls_request`),
diffs the answer with the call map and emits the transitions the daemon missed, each call's in
its own order, as ordinary events: ``origin = "reconcile"``, the row as their payload and the
id the realtime event would have had. The dispatcher hands on an id once, so the realtime
event and its reconciled twin are never both delivered. The first start ever loads the open
calls into the map instead, and emits nothing for them.

A pass that fails (network, an HTTP error, an RPC error, an answer that is not a list, rows
that cannot be read or whose status the status map does not know) is logged, counted
(``reconcile_failures_total``) and retried on the shared backoff: the gap stays open until a
pass succeeds. The transitions of the rows that could be read are emitted at once (a retry
does not emit them again: the map has them by then); nothing is made up from the others.

With no gap open, a refresh every ``interval`` asks after the calls open for longer than an
interval (:func:`~listener.calls.reconcile.refresh_request`), so a ``call_ended`` the channel
lost without any gap is still seen. Any pass restarts the interval, so refreshes add at most
one ``list_calls`` per interval; a failed refresh waits for the next interval.

In a cluster (``[store]``, a :class:`Cluster`), one instance lists calls for all: the leader.
A follower whose gap ends waits until the cluster has covered it (the moment until which the
cluster missed nothing, in the shared store, reaches the follower's join: the leader has
reconciled, or another instance heard it all), then takes the calls that moved since the gap
began from the shared call map, silently: their transitions reached the handlers through the
instance that rebuilt or heard them (the claims run each handler once per event, cluster
wide). Its refreshes take the shared map's recent calls likewise. A follower that becomes
leader meanwhile, or finds the store not answering, lists calls itself, as an instance on its
own does (the claims still make each rebuilt transition reach a handler once); so does each
instance's first start in a cluster that has no history yet (a silent load).

None of this is on the socket's path: :meth:`~Reconciler.lost` and :meth:`~Reconciler.joined`
return at once, and the passes run in their own task, which waits only for room in the
handler queues for what it emits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import structlog

from listener.calls.reconcile import (
    MARGIN,
    Missed,
    diff,
    list_calls_request,
    open_calls_request,
    refresh_request,
)
from listener.calls.state import CallRecord, StatusMap, format_time
from listener.calls.tracker import CallTracker
from listener.core import metrics
from listener.core.errors import ListenerError, RpcActionError, RpcError
from listener.core.events import Event
from listener.core.retry import Backoff, BackoffPolicy
from listener.realtime.connection import EventSink
from listener.rpc.client import RpcClient

__all__ = ["Cluster", "ReconcileSettings", "Reconciler"]

_log = structlog.get_logger(__name__)

Cause = Literal["link", "restart", "first_start"]
# Seconds between a follower's looks at how far the cluster has covered: the leader's batches
# come once a second.
_FOLLOW_EVERY: Final = 0.2
# Seconds a follower waits for the leader's pass over a gap before it lists calls itself: a
# leader that rejoined passes within a second or two.
_FOLLOW_AT_MOST: Final = 10.0
# Calls a follower takes from the shared map between two turns of the event loop: adopting
# 10,000 open calls held it for 28 ms in one go (2.8 µs each), a batch of 1,000 for 3 ms.
_ADOPT_BATCH: Final = 1000


class Cluster(Protocol):
    """The cluster an instance belongs to, as reconciliation asks it
    (:class:`~listener.calls.shared.ClusterCalls`). The reads raise
    :class:`~listener.core.errors.ListenerError` when the shared store does not answer."""

    def leads(self) -> bool:
        """Whether this instance leads now."""
        ...

    async def covered(self) -> float | None:
        """The moment until which the cluster missed nothing, or None."""
        ...

    async def calls_since(self, since: float) -> tuple[list[CallRecord], list[tuple[str, str]]]:
        """The shared map's open calls and those whose last event came since ``since``, with
        the lifecycle events handed on of them (call key, event name)."""
        ...


@dataclass(frozen=True, slots=True)
class ReconcileSettings:
    """How reconciliation behaves; the ``[calls]`` section maps onto it. Seconds throughout.

    Attributes:
        enabled: ask ``list_calls`` at all; without it gaps are still recorded.
        interval: how often the open calls are refreshed, and how long a call must have been
            open to be asked after.
        lookback_max: the furthest back a pass looks, however long the gap.
        statuses: what Sippet's status strings mean.
        backoff: the retry schedule of a failed pass.
    """

    enabled: bool = True
    interval: float = 60.0
    lookback_max: float = 86400.0
    statuses: StatusMap = field(default_factory=StatusMap)
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)


class _Failed(Exception):
    """A pass got no rows to diff: ``reason`` is the metric's label."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Gap:
    start: float | None  # None: the first start ever, no history
    cause: Cause


def _earlier(first: _Gap, second: _Gap) -> _Gap:
    if first.start is None or (second.start is not None and first.start <= second.start):
        return first
    return second


class Reconciler:
    """Records gaps and runs the passes that cover them (see the module docstring).

    It is the session's :class:`~listener.realtime.session.LinkWatch`. Until :meth:`resume`
    says otherwise, the daemon is taken to have no history.

    Attributes:
        caught_up: set while no gap is under way or waiting for its pass: the call map then
            holds all that Sippet said.

    Args:
        settings: see :class:`ReconcileSettings`.
        rpc: the client ``list_calls`` goes through.
        tracker: the call map (read by the diff, written by silent loads).
        emit: where rebuilt events go (the dispatcher's intake).
        topic: the topic rebuilt events carry.
        clock: wall-clock seconds (tests pass their own).
        cluster: the cluster this instance belongs to, if any: only its leader lists calls.
    """

    def __init__(
        self,
        settings: ReconcileSettings,
        rpc: RpcClient,
        tracker: CallTracker,
        emit: EventSink,
        *,
        topic: str,
        clock: Callable[[], float] = time.time,
        cluster: Cluster | None = None,
    ) -> None:
        self.settings = settings
        self._rpc = rpc
        self._tracker = tracker
        self._emit = emit
        self._topic = topic
        self._clock = clock
        # The gap under way (no socket joined), and the one ended but not reconciled yet.
        self._down: _Gap | None = _Gap(None, "first_start")
        self._pending: _Gap | None = None
        # Bumped by each gap that ends, so a pass knows whether another came meanwhile.
        self._generation = 0
        self._wake = asyncio.Event()
        self._backoff = Backoff(settings.backoff)
        self._next_refresh = 0.0
        self.caught_up = asyncio.Event()
        self._cluster = cluster
        # When the latest gap ended (a follower waits for the cluster to cover it), and when a
        # follower last took the shared map's calls.
        self._joined_at = 0.0
        self._pulled_at: float | None = None

    def resume(self, last_seen: float | None) -> None:
        """Start from the store's last moment seen: from then until the first join is a gap."""
        if last_seen is not None:
            self._down = _Gap(last_seen, "restart")

    def lost(self, at: float) -> None:
        """No socket is joined and healthy since ``at``."""
        if self._down is None:
            self._down = _Gap(at, "link")
        self.caught_up.clear()

    def joined(self, at: float) -> None:
        """A socket is joined since ``at``: the gap under way, if any, ends."""
        gap, self._down = self._down, None
        if gap is None:
            return
        self._joined_at = at
        metrics.GAPS.labels(cause=gap.cause).inc()
        if gap.start is None:
            _log.info("first start: no call history", reconcile=self.settings.enabled)
        else:
            seconds = max(0.0, at - gap.start)
            metrics.GAP_SECONDS.labels(cause=gap.cause).inc(seconds)
            _log.info(
                "gap in the realtime link",
                cause=gap.cause,
                seconds=round(seconds, 3),
                since=format_time(gap.start),
            )
        if not self.settings.enabled:
            self.caught_up.set()
            return
        self._pending = gap if self._pending is None else _earlier(self._pending, gap)
        self._generation += 1
        self._wake.set()

    def covered_until(self, now: float) -> float | None:
        """The last moment until which nothing was missed: ``now``, or the start of the
        earliest gap not reconciled yet (None while there is no history)."""
        open_gaps = [gap for gap in (self._down, self._pending) if gap is not None]
        if not open_gaps:
            return now
        starts = [gap.start for gap in open_gaps]
        return None if None in starts else min(start for start in starts if start is not None)

    async def run(self) -> None:
        """Reconcile each gap as it ends and refresh the open calls, until cancelled."""
        while True:
            await self._due()
            await self._pass()

    async def _due(self) -> None:
        """Wait until a gap waits for its pass, or a refresh is due (only while joined)."""
        loop = asyncio.get_running_loop()
        while self._pending is None:
            self._wake.clear()
            delay = self._next_refresh - loop.time()
            if self._down is None and delay <= 0:
                return
            with contextlib.suppress(TimeoutError):
                # While the link is down the join wakes us; a refresh would only race it.
                async with asyncio.timeout(None if self._down is not None else delay):
                    await self._wake.wait()

    async def _pass(self) -> None:
        gap, generation = self._pending, self._generation
        # From here on, a join wakes a retry at once.
        self._wake.clear()
        loop = asyncio.get_running_loop()
        self._next_refresh = loop.time() + self.settings.interval
        if await self._followed(gap, generation):
            return
        now = self._clock()
        request = self._request(gap, now)
        if request is None:
            return
        try:
            rows = await self._list_calls(request)
        except _Failed as exc:
            await self._failed(gap, exc.reason, error=str(exc))
            return
        result = diff(self._tracker.state, rows, self.settings.statuses)
        first_start = gap is not None and gap.start is None
        emitted, loaded = await self._apply(result.missed, load=first_start)
        if result.malformed or result.unknown_status:
            reason = "unknown_status" if result.unknown_status else "malformed"
            await self._failed(
                gap,
                reason,
                error="rows skipped",
                rows=len(rows),
                malformed=result.malformed,
                unknown_status=result.unknown_status,
            )
            return
        self._backoff.reset()
        if gap is not None:
            self._covered(
                gap, generation, "reconciled", rows=len(rows), emitted=emitted, loaded=loaded
            )
        elif emitted:
            _log.info("refresh found missed transitions", rows=len(rows), emitted=emitted)

    async def _followed(self, gap: _Gap | None, generation: int) -> bool:
        """As a follower, take the leader's pass from the shared map (see the module
        docstring); False when this instance must list calls itself: on its own, leading, or
        the store does not answer."""
        cluster = self._cluster
        if cluster is None or cluster.leads():
            return False
        try:
            if gap is not None:
                end = self._joined_at
                # Not for ever: a leader whose own link stays down, one that keeps no
                # state or runs an older version, or whose shared writes fail, never moves
                # the moment past this join. Then this instance lists calls itself (the
                # claims still hand each rebuilt transition to each handler once).
                give_up = self._clock() + _FOLLOW_AT_MOST
                waiting_logged = False
                while (covered := await cluster.covered()) is None or covered < end:
                    if cluster.leads() or (covered is None and gap.start is None):
                        # The first start of a cluster: nobody has history to share, and
                        # the load emits nothing (each instance loads its own, at once).
                        return False
                    if self._clock() >= give_up:
                        _log.warning(
                            "the leader has not covered this gap in the shared call map;"
                            " listing calls here"
                        )
                        return False
                    if not waiting_logged:
                        _log.info("waiting for the leader's pass over this gap")
                        waiting_logged = True
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_FOLLOW_EVERY):
                            await self._wake.wait()
                    if self._generation != generation:
                        # Another gap ended meanwhile: the next pass covers both.
                        return True
            now = self._clock()
            lookback = now - self.settings.lookback_max
            if gap is not None:
                since = lookback if gap.start is None else max(gap.start - MARGIN, lookback)
            elif self._pulled_at is None:
                since = now - self.settings.interval - MARGIN
            else:
                since = self._pulled_at - MARGIN
            records, handled = await cluster.calls_since(since)
        except ListenerError as exc:
            _log.warning("the shared call map does not answer; listing calls here", error=str(exc))
            return False
        self._pulled_at = now
        adopted = 0
        by_call: dict[str, list[tuple[str, str]]] = {}
        for key, name in handled:
            by_call.setdefault(key, []).append((key, name))
        for start in range(0, len(records), _ADOPT_BATCH):
            batch = records[start : start + _ADOPT_BATCH]
            # Each call with its handled events: between batches the persister may save and
            # let go of a call adopted earlier, and a handled event applied after that would
            # be dropped (the call not in memory), its event then admitted again. Events
            # merged in between are no harm: a call only ever moves forward.
            calls_handled = [pair for record in batch for pair in by_call.get(record.call_key, ())]
            adopted += self._tracker.adopt(batch, calls_handled)
            await asyncio.sleep(0)
        self._backoff.reset()
        if gap is not None:
            message = "reconciled from the shared call map"
            self._covered(gap, generation, message, rows=len(records), adopted=adopted)
        return True

    def _covered(self, gap: _Gap, generation: int, message: str, **detail: int) -> None:
        """A pass covered ``gap``: it closes, unless another gap ended meanwhile."""
        if self._generation == generation:
            self._pending = None
            if self._down is None:
                self.caught_up.set()
        since = None if gap.start is None else format_time(gap.start)
        _log.info(message, cause=gap.cause, since=since, **detail)

    def _request(self, gap: _Gap | None, now: float) -> dict[str, Any] | None:
        settings, state = self.settings, self._tracker.state
        if gap is None:
            return refresh_request(
                state, now=now, open_for=settings.interval, lookback_max=settings.lookback_max
            )
        if gap.start is None:
            return open_calls_request(now=now, lookback_max=settings.lookback_max)
        return list_calls_request(
            state,
            since=gap.start,
            now=now,
            margin=MARGIN,
            lookback_max=settings.lookback_max,
        )

    async def _list_calls(self, request: dict[str, Any]) -> list[Any]:
        """The rows of a ``list_calls`` answer.

        Raises:
            _Failed: there are none to diff.
        """
        try:
            data = await self._rpc.run("list_calls", **request)
        except RpcActionError as exc:
            raise _Failed("rpc_error", str(exc)) from None
        except RpcError as exc:
            raise _Failed("request", str(exc)) from None
        if not isinstance(data, list):
            raise _Failed("malformed", f"the answer is a {type(data).__name__}, not a list")
        return data

    async def _apply(self, missed: Sequence[Missed], *, load: bool) -> tuple[int, int]:
        """Emit the missed transitions, in order; on a load, merge those of calls the map
        did not know into it instead. Return how many were emitted and loaded."""
        now = self._clock()
        events = [
            Event.create(item.name, item.payload, self._topic, now, id=item.id, origin="reconcile")
            for item in missed
        ]
        state = self._tracker.state
        # The open calls met on the first start were open before it: nothing to say of them.
        strangers = {
            event.call_key
            for event in events
            if load and event.call_key is not None and state.get(event.call_key) is None
        }
        emitted = loaded = 0
        for event in events:
            if event.call_key in strangers:
                state.merge_event(event)
                loaded += 1
                continue
            metrics.RECONCILED.labels(event=event.name).inc()
            emitted += 1
            wait = self._emit(event)
            if wait is not None:
                await wait
        return emitted, loaded

    async def _failed(self, gap: _Gap | None, reason: str, *, error: str, **detail: int) -> None:
        """Count and log a failed pass; after a gap's, wait out the backoff (a new gap cuts it
        short). A failed refresh waits for the next interval instead."""
        metrics.RECONCILE_FAILURES.labels(reason=reason).inc()
        if gap is None:
            _log.warning("list_calls refresh failed", reason=reason, error=error, **detail)
            return
        delay = self._backoff.next_delay()
        _log.warning(
            "list_calls pass failed; the gap stays open",
            reason=reason,
            error=error,
            retry_in=round(delay, 3),
            **detail,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()
