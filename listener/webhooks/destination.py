"""A webhook destination as the delivery engine sees it: plain values, validated upstream.

Users' settings are validated once, by the ``webhook`` handler's pydantic models
(:mod:`.config`), which build these; code that builds one directly (tests, benchmarks) owns
its values. The defaults live here, for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "DEFAULT_RETRY_SCHEDULE", "DEFAULT_TIMEOUT", "Destination"]

# Svix's schedule, the one the Standard Webhooks spec's example follows: about 27.5 hours.
DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
# The spec recommends "somewhere between 15 and 30s".
DEFAULT_TIMEOUT = 15.0
DEFAULT_MAX_IN_FLIGHT = 8


@dataclass(frozen=True, slots=True)
class Destination:
    """Where and how to forward events.

    Attributes:
        name: unique id used by the outbox, the CLI and metrics (letters, digits, ``_.-``).
            Deliveries are stored under it, so renaming a destination strands its pending ones.
        url: the http(s) URL to POST to.
        secrets: one or more Standard Webhooks secrets (``whsec_`` + base64). Every one signs
            each request, so that during a rotation the receiver accepts either.
        events: event-name globs (:func:`fnmatch.fnmatchcase`); ``*`` forwards everything.
        headers: extra request headers (they may override ``user-agent``, not the signed or
            content headers).
        timeout: seconds one attempt may take in all, from connecting to the last byte read.
        retry_schedule: delay before each attempt, in seconds: the first entry is the delay of
            the first attempt after enqueueing, and its length is the number of attempts.
        ordering: ``per_call`` holds back a call's delivery while an earlier delivery of the
            same call to this destination is pending (even if it is waiting for a retry hours
            away); ``none`` attempts everything as soon as it is due.
        max_in_flight: attempts running at once for this destination.
        max_pending: the outbox bound: beyond this many pending deliveries the oldest become
            dead letters (with a warning). Checked at most every ``poll_interval``, when the
            worker has a free slot, so it can be exceeded for a while. None for no bound.
        max_age: pending deliveries older than this many seconds become dead letters. None for
            no bound.
    """

    name: str
    url: str = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)
    events: tuple[str, ...] = ("*",)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    ordering: Literal["none", "per_call"] = "none"
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_pending: int | None = None
    max_age: float | None = None

    def accepts(self, event_name: str) -> bool:
        """Return whether events named ``event_name`` are forwarded here."""
        return any(fnmatchcase(event_name, glob) for glob in self.events)
