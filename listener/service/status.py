"""The daemon's state in one JSON-ready snapshot: ``/status``, the status page, ``status``.

Everything is read from memory: the session, the call map, the dispatcher's recent events
and outcomes (its observer deques), the handlers' counters, and each webhook forwarder's
figures as its housekeeper last measured them (every ``poll_interval``). So a snapshot costs
the same with ten thousand pending deliveries as with none. Only the dead letters listed on
the page come from the outbox, read by :meth:`StatusBoard.refresh` in the background.

Times are wall-clock seconds since the epoch; durations are seconds.
"""

from __future__ import annotations

import heapq
import json
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog

from listener.calls.state import CallRecord
from listener.core import metrics
from listener.core.events import Event
from listener.dispatch.dispatcher import Handled
from listener.service.linklog import HOUR

if TYPE_CHECKING:
    from listener.service.daemon import Daemon
    from listener.webhooks.forwarder import WebhookForwarder
    from listener.webhooks.outbox_rows import DeadLetter
    from listener.webhooks.outbox_store import OutboxStore

__all__ = ["RECENT_EVENTS", "StatusBoard", "forwarders"]

_log = structlog.get_logger(__name__)
RECENT_EVENTS = 200
# Outcomes kept: a few handlers' worth for each recent event.
_RECENT_OUTCOMES = RECENT_EVENTS * 8
_RECENT_ENDED = 20
# Open calls listed (the most recently heard first); the rest are counted.
_OPEN_SHOWN = 200
_DEAD_SHOWN = 20
_SUMMARY_CHARS = 160


def forwarders(daemon: Daemon) -> Iterator[tuple[str, WebhookForwarder]]:
    """Each running webhook handler's name and forwarder."""
    # No webhook handler exists before its module is loaded: checking keeps the webhook stack
    # (about 4 MiB, bench/README.md) out of a daemon configured without one.
    if "listener.webhooks.handler" not in sys.modules:
        return
    from listener.webhooks.handler import WebhookHandler

    for item in daemon.handlers:
        handler = item.handler
        if isinstance(handler, WebhookHandler) and handler.forwarder is not None:
            yield item.settings.name, handler.forwarder


def _dead_letters(outbox: OutboxStore, destination: str) -> list[DeadLetter]:
    return outbox.dead_letters(destination=destination, limit=_DEAD_SHOWN)


def _summary(event: Event) -> str:
    text = json.dumps(event.payload, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= _SUMMARY_CHARS else text[: _SUMMARY_CHARS - 1] + "…"


def _rtt_totals() -> tuple[float, float]:
    """The heartbeat round-trip histogram's (sum, count), read from its collector alone."""
    total = count = 0.0
    for family in metrics.HEARTBEAT_RTT.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total, count


class StatusBoard:
    """Observes one daemon and makes snapshots of it.

    Installs the dispatcher's observer deques (:meth:`observe`, also called for each runner
    a reload adds), and keeps what the snapshot needs across calls: the heartbeat round-trip
    since the previous look, the time of the last rotation, the dead letters last read.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.events: deque[Event] = deque(maxlen=RECENT_EVENTS)
        self.outcomes: deque[Handled] = deque(maxlen=_RECENT_OUTCOMES)
        self._rtt = (0.0, 0.0)
        self._last_rtt: float | None = None
        self._rotations = 0
        self._last_rotation: float | None = None
        self._dead: dict[str, list[dict[str, Any]]] = {}

    def observe(self) -> None:
        """Make the dispatcher report each event, and every current runner its outcomes,
        here: only for a daemon that serves the page (an append per event and handler that
        nothing would read otherwise)."""
        self._daemon.dispatcher.seen = self.events
        for runner in self._daemon.dispatcher.runners:
            runner.handled = self.outcomes

    async def refresh(self) -> None:
        """Read the dead letters shown on the page (only of destinations that have some)."""
        dead: dict[str, list[dict[str, Any]]] = {}
        for _, forwarder in forwarders(self._daemon):
            for view in forwarder.views():
                if view.stats is None or not view.stats.dead:
                    continue
                try:
                    letters = await forwarder.inspect(_dead_letters, view.name)
                except Exception:
                    _log.exception("status page: reading dead letters failed")
                    continue
                dead[view.name] = [
                    {
                        "msg_id": letter.msg_id,
                        "event": letter.event,
                        "call_key": letter.call_key,
                        "created_at": letter.created_at,
                        "dead_at": letter.dead_at,
                        "attempts": letter.attempts,
                        "reason": letter.reason,
                        "last_error": letter.last_error,
                    }
                    for letter in letters
                ]
        self._dead = dead

    def snapshot(self) -> dict[str, Any]:
        """The whole state, JSON-ready."""
        daemon = self._daemon
        now = time.time()
        ready, reason = daemon.readiness()
        destinations = self._destinations()
        healthy = ready and all(
            entry["healthy"] and not entry["disabled"] for entry in destinations
        )
        return {
            "time": now,
            "ok": healthy,
            "ready": ready,
            "reason": reason,
            "link": self._link(now),
            "handlers": self._handlers(),
            "destinations": destinations,
            "calls": self._calls(),
            "events": self._events(),
        }

    def _link(self, now: float) -> dict[str, Any]:
        daemon = self._daemon
        session = daemon.session
        token = session.token
        if session.rotations != self._rotations:
            self._rotations = session.rotations
            self._last_rotation = None if token is None else token.minted_at
        totals = _rtt_totals()
        if totals[1] > self._rtt[1]:
            self._last_rtt = (totals[0] - self._rtt[0]) / (totals[1] - self._rtt[1])
            self._rtt = totals
        gaps = daemon.link_log.gaps(now)
        joined = session.joined.is_set()
        return {
            "topic": daemon.settings.sippet.topic,
            "joined": joined,
            "healthy": session.healthy,
            "joined_since": daemon.link_log.joined_at if joined else None,
            "token_expires_at": None if token is None else token.expires_at,
            "token_remaining": None if token is None else token.remaining(),
            "rotations": session.rotations,
            "last_rotation_at": self._last_rotation,
            "heartbeat_rtt": self._last_rtt,
            "reconnects_total": session.reconnects,
            "reconnects_last_hour": sum(1 for gap in gaps if gap.start >= now - HOUR),
            "gaps_last_hour": [{"start": gap.start, "end": gap.end} for gap in gaps],
            "cluster": self._cluster(),
        }

    def _cluster(self) -> dict[str, Any] | None:
        store = self._daemon.store
        if store is None:
            return None
        elector = store.elector
        shared = self._daemon.shared_calls
        return {
            "instance": elector.holder,
            "leader": elector.is_leader,
            "term": elector.term,
            "store_answering": store.ready.is_set() and not store.claims.down,
            "spooled": store.claims.spool.events,
            # A leader whose batches of the call map the store refuses keeps the map in its
            # own file until it takes them (the readiness reason says the same).
            "call_map_shared": not (shared is not None and shared.not_sharing),
        }

    def _handlers(self) -> list[dict[str, Any]]:
        rows = []
        for runner in self._daemon.dispatcher.runners:
            name = runner.settings.name
            counts = {
                outcome: metrics.HANDLER_OUTCOMES.labels(handler=name, outcome=outcome).value
                for outcome in ("ok", "error", "timeout", "dropped")
            }
            rows.append(
                {
                    "name": name,
                    "events": sum(counts.values()),
                    "errors": counts["error"],
                    "timeouts": counts["timeout"],
                    "dropped": counts["dropped"],
                    "queue_depth": runner.pending,
                }
            )
        return rows

    def _destinations(self) -> list[dict[str, Any]]:
        rows = []
        for handler, forwarder in forwarders(self._daemon):
            for view in forwarder.views():
                stats = view.stats
                rows.append(
                    {
                        "name": view.name,
                        "handler": handler,
                        "healthy": view.unhealthy_for is None,
                        "unhealthy_for": view.unhealthy_for,
                        "pending": None if stats is None else stats.pending,
                        "oldest_age": None if stats is None else stats.oldest_age,
                        "failing": None if stats is None else stats.failing,
                        "dead": None if stats is None else stats.dead,
                        "disabled": stats is not None and stats.disabled,
                        "disabled_reason": None if stats is None else stats.disabled_reason,
                        "success_ratio": view.success_ratio,
                        "last_error": None if view.last_error is None else view.last_error[1],
                        "last_error_at": None if view.last_error is None else view.last_error[0],
                        "dead_letters": self._dead.get(view.name, []),
                    }
                )
        return rows

    def _calls(self) -> dict[str, Any]:
        tracker = self._daemon.tracker
        # Each call's latest event among the recent ones, the latest call first.
        last: dict[str, str] = {}
        for event in reversed(self.events):
            if event.call_key is not None and event.call_key not in last:
                last[event.call_key] = event.name
        ended = []
        for key, name in last.items():
            record = tracker.get(key)
            if record is not None and record.status == "ended":
                ended.append(_call(record, name))
                if len(ended) == _RECENT_ENDED:
                    break
        open_calls = tracker.open_calls()
        latest = heapq.nlargest(_OPEN_SHOWN, open_calls, key=lambda record: record.last_event_at)
        return {
            "open_count": len(open_calls),
            "open": [_call(record, last.get(record.call_key)) for record in latest],
            "ended": ended,
        }

    def _events(self) -> list[dict[str, Any]]:
        # By id: every event the daemon's intake hands on has one (tests' own may not).
        outcomes: dict[str, list[dict[str, Any]]] = {}
        for handled, handler, outcome, seconds, error in self.outcomes:
            outcomes.setdefault(handled.id, []).append(
                {"handler": handler, "outcome": outcome, "seconds": seconds, "error": error}
            )
        return [
            {
                "id": event.id,
                "name": event.name,
                "call_key": event.call_key,
                "origin": event.origin,
                "received_at": event.received_at,
                "summary": _summary(event),
                "outcomes": outcomes.get(event.id, []) if event.id else [],
            }
            for event in reversed(self.events)
        ]


def _call(record: CallRecord, last_event: str | None) -> dict[str, Any]:
    return {
        "call_key": record.call_key,
        "status": record.status,
        "from": record.from_number,
        "to": record.to_number,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
        "last_event_at": record.last_event_at,
        "last_event": last_event,
    }
