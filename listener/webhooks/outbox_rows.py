"""The rows the webhook outbox takes in and hands back (:mod:`.outbox` stores them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Attempt",
    "Claim",
    "DeadLetter",
    "Delivery",
    "DestinationStats",
    "NewDelivery",
    "Outcome",
    "Take",
]


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A delivery to insert: one event's serialized body for one destination.

    Attributes:
        destination: the destination's name.
        msg_id: the Standard Webhooks message id, also in ``body``; stable for ever.
        event: the event name (for listings; the body is what is sent).
        call_key: the call the event belongs to, for per-call ordering; None if none.
        body: the exact bytes every attempt sends.
        created_at: when the event was enqueued.
        due_at: when the first attempt may start.
    """

    destination: str
    msg_id: str
    event: str
    call_key: str | None
    body: bytes
    created_at: float
    due_at: float


@dataclass(frozen=True, slots=True)
class Delivery:
    """A pending delivery as read back from the outbox.

    ``attempts`` counts the attempts made so far; ``seq`` is the enqueue order.
    """

    seq: int
    destination: str
    msg_id: str
    event: str
    call_key: str | None
    body: bytes
    created_at: float
    due_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class Claim:
    """What a worker gets from :meth:`.outbox.Outbox.claim`.

    Attributes:
        rows: the due deliveries to attempt, claimed: no other claim returns them until
            their outcome is committed or they are released.
        next_due: when the next eligible delivery falls due; None if none is pending.
        evicted: how many deliveries the bound moved to the dead letters, by reason.
    """

    rows: list[Delivery]
    next_due: float | None
    evicted: dict[str, int]


@dataclass(frozen=True, slots=True)
class Take:
    """What a commit may claim of its own new rows for its caller, as a claim made right
    after it would (:meth:`.outbox_store.OutboxStore.commit`).

    Attributes:
        now: the rows due by then may be claimed.
        limits: at most this many rows to each destination named; none to another.
        per_call: the destinations that order deliveries per call.
    """

    now: float
    limits: Mapping[str, int]
    per_call: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery given up on.

    Attributes:
        last_status: the HTTP status of the last attempt, None if it got no answer.
        last_error: what went wrong last, as a short fact.
        dead_at: when it was moved here.
        reason: ``exhausted`` (retry schedule used up), ``max_pending`` or ``max_age`` (the
            outbox bound pushed it out).
    """

    seq: int
    destination: str
    msg_id: str
    event: str
    call_key: str | None
    body: bytes
    created_at: float
    attempts: int
    last_status: int | None
    last_error: str | None
    dead_at: float
    reason: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt, as recorded.

    Attributes:
        at: when it started, seconds since the epoch.
        latency: seconds until it was answered, or failed.
        status: the HTTP status; None when there was no answer.
        error_class: None for a 2xx, else what kind of failure (see
            :mod:`listener.webhooks.worker`).
        error: the failure as a short fact ("HTTP 503", "timed out after 15 s").
        answer: the first bytes of the answer's body (1 KiB).
        probe: it was the one probe of an unhealthy destination.
        counted: it used up one attempt of the delivery's retry schedule.
    """

    destination: str
    msg_id: str
    at: float
    latency: float
    status: int | None
    error_class: str | None
    error: str
    answer: bytes
    probe: bool
    counted: bool


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one attempt, to be committed to the outbox with its record.

    Attributes:
        attempt: the attempt, as it goes on record.
        kind: ``delivered`` (a 2xx), ``retry`` (due again at ``due_at``), ``gone`` (410: the
            destination is disabled, the row stays pending) or ``exhausted`` (a dead letter).
        attempts: the delivery's counted attempts after this one.
        due_at: when a ``retry`` falls due.
    """

    attempt: Attempt
    kind: Literal["delivered", "retry", "gone", "exhausted"]
    attempts: int = 0
    due_at: float = 0.0

    @property
    def destination(self) -> str:
        return self.attempt.destination

    @property
    def msg_id(self) -> str:
        return self.attempt.msg_id


@dataclass(frozen=True, slots=True)
class DestinationStats:
    """One destination's outbox state.

    Attributes:
        pending: deliveries not yet delivered (including any being attempted right now).
        oldest_age: seconds since the oldest pending delivery was enqueued; None if none.
        failing: pending deliveries that were attempted and failed at least once.
        dead: deliveries in the dead-letter table.
        disabled_at: when the destination was disabled (HTTP 410), None while enabled.
        disabled_reason: why it was disabled.
    """

    name: str
    pending: int
    oldest_age: float | None
    failing: int
    dead: int
    disabled_at: float | None
    disabled_reason: str | None

    @property
    def disabled(self) -> bool:
        """Whether the destination is disabled; its deliveries wait until it is enabled."""
        return self.disabled_at is not None
