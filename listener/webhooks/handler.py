"""The ``webhook`` handler: forward events to your own endpoints, signed, durably.

One destination per table::

    [[handlers]]
    use = "webhook"
    name = "crm"                       # also the destination's name in CLI and metrics
    url = "https://hooks.example.com/sippet"
    secret = "whsec_..."               # or secret_file = "..."; a list during rotation
    events = ["call_*"]

or several behind one outbox, each with its own filter::

    [[handlers]]
    use = "webhook"
    [[handlers.destinations]]
    name = "crm"
    url = "..."
    secret_file = "/etc/sippet-listener/crm.whsec"

Requests follow Standard Webhooks (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``). An event counts as handled once it is committed to the outbox
(SQLite under ``service.state_dir``), so a crash after that loses nothing; delivery, retries,
dead letters and 410s are ``listener.webhooks.forwarder``'s business.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from listener.core.errors import ConfigError
from listener.core.events import Event
from listener.core.logs import register_secret
from listener.core.secrets import read_secret_file
from listener.dispatch.handler import Context, Handler
from listener.webhooks.forwarder import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RETRY_SCHEDULE,
    DEFAULT_TIMEOUT,
    Destination,
    WebhookForwarder,
)

__all__ = ["DestinationConfig", "WebhookConfig", "WebhookHandler", "outbox_path"]


def outbox_path(state_dir: Path, handler_name: str) -> Path:
    """Where the handler called ``handler_name`` keeps its outbox."""
    return state_dir / f"webhooks-{handler_name}.sqlite3"


class _DestinationFields(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str | list[str] | None = None
    secret_file: Path | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    # Not "timeout": that key is the dispatcher's (how long handle() may take).
    request_timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0)
    retry_schedule: list[float] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_SCHEDULE), min_length=1
    )
    ordering: Literal["none", "per_call"] = "none"
    max_in_flight: int = Field(default=DEFAULT_MAX_IN_FLIGHT, ge=1)
    max_pending: int | None = Field(default=None, ge=1)
    max_age: float | None = Field(default=None, gt=0)

    def secrets(self, key: str) -> tuple[str, ...]:
        """The signing secrets, from ``secret`` or ``secret_file`` (one per line)."""
        if self.secret_file is not None:
            text = read_secret_file(self.secret_file, key)
            values = tuple(line.strip() for line in text.splitlines() if line.strip())
        elif isinstance(self.secret, list):
            values = tuple(self.secret)
        elif self.secret:
            values = (self.secret,)
        else:
            raise ConfigError(key, "a signing secret is required: secret or secret_file")
        for value in values:
            register_secret(value)
        return values


class DestinationConfig(_DestinationFields):
    """One entry of ``destinations``."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    url: str
    events: list[str] = Field(default_factory=lambda: ["*"])


class WebhookConfig(_DestinationFields):
    """``[[handlers]]`` settings for ``use = "webhook"``: ``url`` or ``destinations``."""

    url: str | None = None
    destinations: list[DestinationConfig] = Field(default_factory=list)
    stop_grace: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _one_form(self) -> WebhookConfig:
        if (self.url is None) == (not self.destinations):
            raise ValueError("give either url (one destination) or [[destinations]]")
        return self


class WebhookHandler(Handler):
    """Commits every event to the outbox for each destination that wants it."""

    name = "webhook"
    events = ("*",)
    Config = WebhookConfig
    config: WebhookConfig

    def __init__(self, config: WebhookConfig) -> None:
        super().__init__(config)
        # Build the destinations once now so a bad URL or secret stops start-up, named.
        self._destinations(self.name)
        self.forwarder: WebhookForwarder | None = None

    async def setup(self, ctx: Context) -> None:
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        self.forwarder = WebhookForwarder(
            self._destinations(ctx.name), outbox_path(ctx.state_dir, ctx.name)
        )
        await self.forwarder.start()

    async def handle(self, event: Event, ctx: Context) -> None:
        assert self.forwarder is not None, "handle() before setup()"
        committed = self.forwarder.submit(event)
        if committed is not None:
            # Handled means durable: after this, a crash cannot lose the event.
            await asyncio.shield(committed)

    async def teardown(self, ctx: Context) -> None:
        if self.forwarder is not None:
            await self.forwarder.stop(self.config.stop_grace)

    def status(self) -> str | None:
        return None if self.forwarder is None else self.forwarder.describe()

    def _destinations(self, handler_name: str) -> list[Destination]:
        config = self.config
        if config.url is not None:
            return [_destination(config, handler_name, config.url, ("*",), "")]
        return [
            _destination(item, item.name, item.url, tuple(item.events), f"destinations[{index}].")
            for index, item in enumerate(config.destinations)
        ]


def _destination(
    fields: _DestinationFields, name: str, url: str, events: tuple[str, ...], prefix: str
) -> Destination:
    secret_key = prefix + ("secret_file" if fields.secret_file else "secret")
    try:
        return Destination(
            name=name,
            url=url,
            secrets=fields.secrets(secret_key),
            events=events,
            headers=dict(fields.headers),
            timeout=fields.request_timeout,
            retry_schedule=tuple(fields.retry_schedule),
            ordering=fields.ordering,
            max_in_flight=fields.max_in_flight,
            max_pending=fields.max_pending,
            max_age=fields.max_age,
        )
    except ConfigError as exc:
        # Destination names its keys as webhooks.<name>.<key>; here they live in the table,
        # and its secrets come from secret or secret_file.
        field = exc.key.rsplit(".", 1)[-1] if exc.key.startswith("webhooks.") else exc.key
        key = secret_key if field == "secrets" else prefix + field
        raise ConfigError(key, exc.problem) from None
