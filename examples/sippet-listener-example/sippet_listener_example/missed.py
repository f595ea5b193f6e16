"""Missed-call follow-up: every caller nobody answered becomes a Sippet contact.

On ``call_ended`` whose status says nobody answered (``no_answer`` by default), the handler
looks the caller's number up with ``list_contacts`` and, when no contact has it, creates one
with ``create_contact``, tagged ``metadata = {"source": "missed-call"}`` by default, so the
team's call-back list is complete::

    [[handlers]]
    use = "missed_calls"
    statuses = ["no_answer", "busy"]
    full_name = "Missed call {number}"

Sippet may deliver an event twice (across a reconnect), so the handler remembers the last
``remember`` calls it followed up and skips a repeat. Missed calls from one number are followed
up one at a time, so the second finds the contact the first created.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from typing import Any
from weakref import WeakValueDictionary

from pydantic import BaseModel, ConfigDict, Field

from listener import Context, Event, Handler, RpcError

__all__ = ["MissedCalls", "MissedCallsConfig"]

# Withheld and internal numbers ("anonymous", "1001") are nobody to call back.
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
# What setup() asks Sippet to validate: a contact as this handler would create it.
_SAMPLE_NUMBER = "+15555550123"


def _normal(status: str) -> str:
    """Fold a status's spelling: ``no_answer``, ``no-answer`` and ``noAnswer`` are one."""
    return status.replace("_", "").replace("-", "").lower()


def _caller(event: Event) -> str | None:
    """The caller's E.164 number, whichever spelling the payload uses, or None."""
    number = event.field("fromNumber")
    return number if isinstance(number, str) and _E164.fullmatch(number) else None


class MissedCallsConfig(BaseModel):
    """``[[handlers]]`` settings for ``use = "missed_calls"``.

    Attributes:
        statuses: call statuses that mean "missed" (spelling-insensitive).
        inbound_only: ignore outbound calls nobody picked up.
        full_name: the new contact's name; ``{number}`` is replaced by the caller's number.
        metadata: set on every contact created.
        remember: how many followed-up calls to remember, to skip repeated deliveries.
    """

    # forbid: a misspelt key is a start-up error naming it, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)

    statuses: list[str] = Field(default=["no_answer"], min_length=1)
    inbound_only: bool = True
    full_name: str = Field(default="Missed call {number}", min_length=1)
    metadata: dict[str, str] = {"source": "missed-call"}
    remember: int = Field(default=10_000, ge=1)


class MissedCalls(Handler[MissedCallsConfig]):
    """Create a contact for each caller whose call ended unanswered, unless one exists."""

    name = "missed_calls"
    events = ("call_ended",)
    # A lookup and a create, each retried through transient failures, fit well within this;
    # the table's ``timeout = ...`` overrides it.
    timeout = 20.0

    def __init__(self, config: MissedCallsConfig | None = None) -> None:
        super().__init__(config or MissedCallsConfig())
        self._statuses = frozenset(_normal(status) for status in self.config.statuses)
        # Calls followed up, oldest first; a repeated delivery of one of them is skipped.
        self._done: OrderedDict[str, None] = OrderedDict()
        # One lock per number being followed up; it goes away when nobody holds it.
        self._numbers: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()
        self.created = 0
        self.failed = 0

    def matches(self, event: Event) -> bool:
        """Only unanswered (inbound) calls from a real number; no I/O, as matches() must."""
        status = event.field("status")
        if not isinstance(status, str) or _normal(status) not in self._statuses:
            return False
        direction = event.field("direction")
        if self.config.inbound_only and direction not in (None, "inbound"):
            return False
        return _caller(event) is not None

    async def setup(self, ctx: Context[MissedCallsConfig]) -> None:
        """Ask Sippet once whether it would accept the contacts this handler creates.

        Raises:
            ValueError: Sippet rejects them (say, a metadata key it refuses): start-up stops.
        """
        try:
            verdict = await ctx.rpc.validate("create_contact", input=self._contact(_SAMPLE_NUMBER))
        except RpcError as exc:
            # Sippet unreachable: the daemon reconnects by itself, so start anyway.
            ctx.log.warning("could not check the contact template", error=str(exc))
            return
        if not verdict.ok:
            problem = verdict.errors[0].get("message", "rejected") if verdict.errors else "rejected"
            raise ValueError(f"sippet rejects the contacts this handler would create: {problem}")
        ctx.log.info("missed-call follow-up ready", statuses=sorted(self.config.statuses))

    async def handle(self, event: Event, ctx: Context[MissedCallsConfig]) -> None:
        """Make the caller a contact, unless this call was followed up or one exists."""
        key = event.call_key
        number = _caller(event)
        if number is None:
            return
        if key is not None and key in self._done:
            ctx.log.info("missed call already followed up")
            return
        lock = self._numbers.get(number)
        if lock is None:
            lock = self._numbers[number] = asyncio.Lock()
        async with lock:
            contact_id = await self._find(ctx, number)
            if contact_id is None:
                contact_id = await self._create(ctx, number)
                self.created += 1
                ctx.log.info("contact created for missed caller", contact_id=contact_id)
            else:
                ctx.log.info("missed caller is already a contact", contact_id=contact_id)
        if key is not None:
            self._remember(key)

    async def on_error(
        self, event: Event, error: Exception, ctx: Context[MissedCallsConfig]
    ) -> None:
        """A follow-up failed (Sippet refused, or the timeout ran out): the caller still needs
        a call back, so say who, for whoever reads the logs, and count it for the status."""
        self.failed += 1
        ctx.log.warning("call the missed caller back by hand", caller=_caller(event))

    async def teardown(self, ctx: Context[MissedCallsConfig]) -> None:
        """Say how much was done; there is nothing to release."""
        ctx.log.info(
            "missed-call follow-up stopped", contacts_created=self.created, failed=self.failed
        )

    def status(self) -> str | None:
        """What ``systemctl status`` shows for this handler."""
        failed = f", failed: {self.failed}" if self.failed else ""
        return f"contacts created: {self.created}{failed}"

    async def _find(self, ctx: Context[MissedCallsConfig], number: str) -> str | None:
        """The id of a contact with ``number``, or None."""
        # A pure read: the client retries it through any transient failure.
        data = await ctx.rpc.run(
            "list_contacts", fields=["id"], filter={"phoneE164": {"eq": number}}
        )
        # Without ``page`` Sippet answers a plain list; a page object is accepted too.
        items = data.get("results") if isinstance(data, dict) else data
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and item.get("id") is not None:
                return str(item["id"])
        return None

    async def _create(self, ctx: Context[MissedCallsConfig], number: str) -> str | None:
        """Create the contact for ``number``; return its id."""
        # Not retry_unsafe: after a lost reply, a resend could create the contact twice.
        # A failure propagates instead; the dispatcher logs it, on_error asks for a call back,
        # and the call is not remembered, so a redelivery tries again (and finds the contact
        # if the first try did land).
        data = await ctx.rpc.run("create_contact", input=self._contact(number), fields=["id"])
        contact_id = data.get("id") if isinstance(data, dict) else None
        return None if contact_id is None else str(contact_id)

    def _contact(self, number: str) -> dict[str, Any]:
        """The ``create_contact`` input for ``number``."""
        return {
            "fullName": self.config.full_name.replace("{number}", number),
            "phoneE164": number,
            "metadata": dict(self.config.metadata),
        }

    def _remember(self, key: str) -> None:
        self._done[key] = None
        while len(self._done) > self.config.remember:
            self._done.popitem(last=False)
