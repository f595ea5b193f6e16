"""The ``webhook`` handler: forward events to your own endpoints, signed, durably.

One destination per table::

    [[handlers]]
    use = "webhook"
    name = "crm"                       # also the destination's name in CLI and metrics
    url = "https://hooks.example.com/sippet"
    secret = "whsec_..."               # or secret_file = "..."; a list during rotation
    events = ["call_*"]

or several behind one outbox, each with its own filter; destination keys at the top level
(all but ``url``) are every destination's defaults::

    [[handlers]]
    use = "webhook"
    secret_file = "/etc/sippet-listener/shared.whsec"
    [[handlers.destinations]]
    name = "crm"
    url = "..."

Requests follow Standard Webhooks (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``). An event counts as handled once it is committed to the outbox
(SQLite under ``service.state_dir``, or the shared store's when the daemon sets
:attr:`WebhookHandler.shared_outbox`), so a crash after that loses nothing; delivery, retries,
dead letters and 410s are ``listener.webhooks.forwarder``'s business. The settings are
:class:`~listener.webhooks.config.WebhookConfig`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from listener.core.errors import ConfigError
from listener.core.events import Event
from listener.core.validation import format_validation_error
from listener.dispatch.handler import Context, Handler
from listener.webhooks.config import WebhookConfig
from listener.webhooks.forwarder import WebhookForwarder
from listener.webhooks.outbox_store import OutboxStore

__all__ = ["OutboxFile", "WebhookHandler", "outbox_files", "outbox_path"]


def outbox_path(state_dir: Path, handler_name: str) -> Path:
    """Where the handler called ``handler_name`` keeps its outbox."""
    return state_dir / f"webhooks-{handler_name}.sqlite3"


@dataclass(frozen=True, slots=True)
class OutboxFile:
    """A webhook handler's outbox and the destinations whose deliveries it keeps; ``name``
    is the handler's, which names its outbox in the shared store."""

    path: Path
    destinations: tuple[str, ...]
    name: str


def outbox_files(handlers: Sequence[Mapping[str, Any]], state_dir: Path) -> list[OutboxFile]:
    """Every ``webhook`` handler's outbox, named as the running daemon names it.

    Takes the ``[[handlers]]`` tables as read from the file. Each webhook table's own keys
    are validated, but no secret is read: inspecting an outbox needs none.

    Raises:
        ConfigError: a webhook table is invalid (``handlers[N].key``).
    """
    found = []
    for index, entry in enumerate(handlers):
        if entry.get("use") != "webhook":
            continue
        # The loader's rule: the table's name, else the handler's own.
        name = str(entry.get("name") or WebhookHandler.name)
        section = {key: value for key, value in entry.items() if key in WebhookConfig.model_fields}
        try:
            config = WebhookConfig.model_validate(section)
        except ValidationError as exc:
            field, problem = format_validation_error(exc, WebhookConfig)
            raise ConfigError(f"handlers[{index}].{field}", problem) from None
        names = tuple(config.destination_names(name))
        found.append(OutboxFile(outbox_path(state_dir, name), names, name))
    return found


class WebhookHandler(Handler):
    """Commits every event to the outbox for each destination that wants it."""

    name = "webhook"
    events = ("*",)
    # An event's handling is one wait for the batch commit that takes it: the events being
    # handled at once are the rows the writer can commit together. The dispatcher's default
    # of 8 capped a traced drain's commits at 7.2 rows with the writer's gathering (4.2
    # without), 32 took them to 13.7 and the calls to the outbox thread from 0.19 to 0.09 a
    # delivery; see bench/README.md for the drain it bought. A table's ``concurrency`` wins.
    concurrency = 32
    Config = WebhookConfig
    config: WebhookConfig

    def __init__(self, config: WebhookConfig) -> None:
        super().__init__(config)
        # Read and check the secrets now, so that a bad one stops start-up, named; the
        # destinations are built in setup, once the handler's name is known.
        self._secrets = config.signing_secrets()
        self.forwarder: WebhookForwarder | None = None
        # Set by the daemon of an instance sharing a store: opens the outbox named after the
        # handler there (on the outbox's thread), given the SQLite file it replaces; and
        # whether this instance leads (see WebhookForwarder's ``leads``).
        self.shared_outbox: Callable[[str, Path], OutboxStore] | None = None
        self.leads: Callable[[], bool] | None = None
        # The events staged (by id: the dispatcher holds each until its handle()) and their
        # commits.
        self._staged: dict[int, tuple[Event, asyncio.Future[None]]] = {}

    async def setup(self, ctx: Context) -> None:
        destinations = self.config.build(ctx.name, self._secrets)
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        shared = self.shared_outbox
        if shared is not None:
            # Bound here, so that handle() on SQLite alone stays as it was.
            self.handle = self._handle_staged  # type: ignore[method-assign]
        path = outbox_path(ctx.state_dir, ctx.name)
        self.forwarder = WebhookForwarder(
            destinations,
            path,
            retention=self.config.retention,
            shared_outbox=None if shared is None else functools.partial(shared, ctx.name, path),
            leads=self.leads,
        )
        await self.forwarder.start()

    def stage_event(self, event: Event) -> bool:
        """Queue ``event``'s rows for the next commit now (the dispatcher of an instance of a
        cluster calls this in the call's order, see ``listener.dispatch.dispatcher.Staged``);
        ``handle()`` then waits for that commit. Only with the shared store's outbox."""
        assert self.forwarder is not None, "stage_event() before setup()"
        if self.shared_outbox is None or id(event) in self._staged:
            return False
        committed = self.forwarder.submit(event)
        if committed is None:
            return False
        self._staged[id(event)] = (event, committed)
        return True

    async def handle(self, event: Event, ctx: Context) -> None:
        assert self.forwarder is not None, "handle() before setup()"
        committed = self.forwarder.submit(event)
        if committed is not None:
            # Handled means durable: after this, a crash cannot lose the event.
            await asyncio.shield(committed)

    async def _handle_staged(self, event: Event, ctx: Context) -> None:
        """``handle()`` with the shared store's outbox: waits for the commit of what
        :meth:`stage_event` queued, or does all of it."""
        staged = self._staged.pop(id(event), None)
        if staged is None or staged[0] is not event:
            await WebhookHandler.handle(self, event, ctx)
        else:
            await asyncio.shield(staged[1])

    async def teardown(self, ctx: Context) -> None:
        if self.forwarder is not None:
            await self.forwarder.stop(self.config.stop_grace)

    def status(self) -> str | None:
        return None if self.forwarder is None else self.forwarder.describe()
