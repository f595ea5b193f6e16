"""Where an event's time goes inside the daemon, from its intake to its POST: bench-only stamps.

:func:`install` wraps, in this process only and before the daemon starts, the few functions an
event passes through on its way to the receiver (no file of ``listener/`` is changed), and
notes ``time.time()`` at each, keyed by the event's ``seq``:

====================  =========================================================================
stamp                 taken
====================  =========================================================================
``intake``            ``Event.received_at``: the frame was read and decoded
``asked``             ``Claims.claim`` starts: a handler worker took the event (a store only;
                      without one, ``handle``)
``sent``              ``Claims._send`` starts: the claim's batch goes to the pool (a store only)
``answered_claim``    the batch's statement returned (a store only)
``handle``            ``WebhookHandler.handle`` starts, or ``stage_event`` (the claim was won)
``flush``             ``BatchWriter._flush`` takes the batch (the previous commit is back,
                      the batch gathered)
``commit_start``      ``Outbox.commit`` (or ``SharedOutbox.commit``) starts on the outbox thread
``commit_end``        ``Outbox.commit`` returns on the outbox thread
``committed``         ``WebhookForwarder._on_commit`` runs on the loop (the batch's future is set)
``claim_start``       ``Worker._claim_on_store`` starts on the outbox thread (the claim that
                      returned the row); for a row its commit claimed, ``committed``
``claim_end``         ``Worker._claim_on_store`` returns; for a row its commit claimed,
                      ``committed``
``attempt``           ``Worker._attempt`` starts (a slot took the claimed row, its task got the
                      loop)
``post``              ``Http1Pool.post`` starts (headers signed)
``answered``          ``Http1Pool.post`` returns (the answer read)
====================  =========================================================================

Each wrapper finds the ``seq`` in the event's payload or in the row's body (orjson): a few µs
per stamp, so traced runs are for the breakdown, not for the throughput.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from typing import Any

import orjson

from listener.cluster import claims as cluster_claims
from listener.webhooks import forwarder, handler, http1, outbox, shared_outbox, worker, writer

STAMPS = (
    "intake",
    "asked",
    "sent",
    "answered_claim",
    "handle",
    "flush",
    "commit_start",
    "commit_end",
    "committed",
    "claim_start",
    "claim_end",
    "attempt",
    "post",
    "answered",
)
_AT = {name: index for index, name in enumerate(STAMPS)}
TRACE: dict[int, list[float]] = {}
# Calls on the outbox thread and what they carried: commits, rows, outcomes, taken (the new
# rows a commit claimed), claims, claimed; the cluster's claim statements and the events they
# carried (cluster_claims, cluster_claimed), and its other writes (cluster_writes: the done
# marks).
COUNTS: Counter[str] = Counter()


def _seq_of(body: bytes) -> int | None:
    seq = orjson.loads(body).get("data", {}).get("seq")
    return seq if isinstance(seq, int) else None


def _stamp(seq: int | None, name: str, at: float) -> None:
    if seq is None:
        return
    stamps = TRACE.get(seq)
    if stamps is None:
        stamps = TRACE[seq] = [0.0] * len(STAMPS)
    # The first time counts: a retried commit or a second attempt is not the path measured.
    if not stamps[_AT[name]]:
        stamps[_AT[name]] = at


def install() -> None:
    """Wrap the functions on the event's path (call before the daemon starts)."""
    handle = handler.WebhookHandler.handle

    @functools.wraps(handle)
    async def traced_handle(self: Any, event: Any, ctx: Any) -> None:
        seq = event.payload.get("seq")
        _stamp(seq, "intake", event.received_at)
        _stamp(seq, "handle", time.time())
        await handle(self, event, ctx)

    def traced(commit: Any) -> Any:
        @functools.wraps(commit)
        def traced_commit(self: Any, rows: Any, outcomes: Any, take: Any = None) -> Any:
            began = time.time()
            taken = commit(self, rows, outcomes, take)
            ended = time.time()
            COUNTS.update(commits=1, rows=len(rows), outcomes=len(outcomes), taken=len(taken))
            for row in rows:
                seq = _seq_of(row.body)
                _stamp(seq, "commit_start", began)
                _stamp(seq, "commit_end", ended)
            return taken

        return traced_commit

    on_commit = forwarder.WebhookForwarder._on_commit

    @functools.wraps(on_commit)
    def traced_on_commit(self: Any, rows: list[Any], outcomes: list[Any], taken: list[Any]) -> None:
        now = time.time()
        for row in rows:
            _stamp(_seq_of(row.body), "committed", now)
        # A row its commit claimed has no claim of its own: both stamps are the hand-over.
        for row in taken:
            seq = _seq_of(row.body)
            _stamp(seq, "claim_start", now)
            _stamp(seq, "claim_end", now)
        on_commit(self, rows, outcomes, taken)

    claim = worker.Worker._claim_on_store

    @functools.wraps(claim)
    def traced_claim(self: Any, store: Any, *args: Any, **kwargs: Any) -> Any:
        began = time.time()
        result = claim(self, store, *args, **kwargs)
        ended = time.time()
        COUNTS.update(claims=1, claimed=len(result.rows))
        for row in result.rows:
            seq = _seq_of(row.body)
            _stamp(seq, "claim_start", began)
            _stamp(seq, "claim_end", ended)
        return result

    attempt = worker.Worker._attempt

    @functools.wraps(attempt)
    async def traced_attempt(self: Any, row: Any, *args: Any, **kwargs: Any) -> None:
        _stamp(_seq_of(row.body), "attempt", time.time())
        await attempt(self, row, *args, **kwargs)

    post = http1.Http1Pool.post

    @functools.wraps(post)
    async def traced_post(self: Any, url: str, body: bytes, *args: Any, **kwargs: Any) -> Any:
        seq = _seq_of(body)
        _stamp(seq, "post", time.time())
        reply = await post(self, url, body, *args, **kwargs)
        _stamp(seq, "answered", time.time())
        return reply

    cluster_claim = cluster_claims.Claims.claim

    @functools.wraps(cluster_claim)
    async def traced_cluster_claim(self: Any, event: Any, *args: Any, **kwargs: Any) -> Any:
        _stamp(event.payload.get("seq"), "asked", time.time())
        return await cluster_claim(self, event, *args, **kwargs)

    fetch = cluster_claims.Claims._fetch_retrying_conflicts

    @functools.wraps(fetch)
    async def traced_fetch(self: Any, query: Any, params: dict[str, Any]) -> Any:
        seqs = [event.get("payload", {}).get("seq") for event in orjson.loads(params["events"])]
        now = time.time()
        for seq in seqs:
            _stamp(seq, "sent", now)
        rows = await fetch(self, query, params)
        now = time.time()
        COUNTS.update(cluster_claims=1, cluster_claimed=len(seqs))
        for seq in seqs:
            _stamp(seq, "answered_claim", now)
        return rows

    execute = cluster_claims.Claims._execute

    @functools.wraps(execute)
    async def traced_execute(self: Any, query: Any, params: dict[str, Any]) -> Any:
        # Nearly all of them the done marks (the rest: renewals, a restart's release).
        COUNTS.update(cluster_writes=1)
        return await execute(self, query, params)

    cluster_claims.Claims._execute = traced_execute  # type: ignore[method-assign]

    def timed(name: str, call: Any) -> Any:
        """The outbox thread's time in ``call``: its total and its longest, in µs."""

        @functools.wraps(call)
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                took = round((time.perf_counter() - began) * 1e6)
                COUNTS.update({f"{name}_us": took})
                COUNTS[f"{name}_max_us"] = max(COUNTS[f"{name}_max_us"], took)

        return timed_call

    # The shared outbox's housekeeping, on the thread its commits take turns on.
    for name in ("stats", "renew", "prune"):
        setattr(
            shared_outbox.SharedOutbox,
            name,
            timed(name, getattr(shared_outbox.SharedOutbox, name)),
        )
    cluster_claims.Claims.claim = traced_cluster_claim  # type: ignore[method-assign]
    cluster_claims.Claims._fetch_retrying_conflicts = traced_fetch  # type: ignore[method-assign]
    # A tree before staged handlers (an A/B run) has no stage_event.
    stage = getattr(handler.WebhookHandler, "stage_event", None)
    if stage is not None:

        @functools.wraps(stage)
        def traced_stage(self: Any, event: Any) -> bool:
            # A staged event's rows go to the writer here, before its handle() (the first
            # stamp counts).
            seq = event.payload.get("seq")
            _stamp(seq, "intake", event.received_at)
            _stamp(seq, "handle", time.time())
            return bool(stage(self, event))

        handler.WebhookHandler.stage_event = traced_stage  # type: ignore[method-assign]
    flush = writer.BatchWriter._flush

    @functools.wraps(flush)
    async def traced_flush(self: Any) -> bool:
        now = time.time()
        for row in self._rows:
            _stamp(_seq_of(row.body), "flush", now)
        return bool(await flush(self))

    writer.BatchWriter._flush = traced_flush  # type: ignore[method-assign]
    handler.WebhookHandler.handle = traced_handle  # type: ignore[method-assign]
    outbox.Outbox.commit = traced(outbox.Outbox.commit)  # type: ignore[method-assign]
    # The shared store's outbox (a daemon given ``store``) commits through its own class.
    shared_outbox.SharedOutbox.commit = traced(  # type: ignore[method-assign]
        shared_outbox.SharedOutbox.commit
    )
    forwarder.WebhookForwarder._on_commit = traced_on_commit  # type: ignore[method-assign]
    worker.Worker._claim_on_store = traced_claim  # type: ignore[method-assign]
    worker.Worker._attempt = traced_attempt  # type: ignore[method-assign]
    http1.Http1Pool.post = traced_post  # type: ignore[method-assign]


def take() -> tuple[dict[int, list[float]], dict[str, int]]:
    """The stamps and the counts so far, forgotten here."""
    stamps, counts = dict(TRACE), dict(COUNTS)
    TRACE.clear()
    COUNTS.clear()
    return stamps, counts
