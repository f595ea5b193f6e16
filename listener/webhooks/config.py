"""The ``webhook`` handler's settings: validated once, here, then turned into destinations.

pydantic checks every key of a ``[[handlers]]`` table where the user wrote it, so an error
names it (``handlers[N].key``; the loader adds the ``handlers[N].`` part). Two checks need
more than the table and come after validation, named the same way: the signing secrets (read
from ``secret_file``, checked by the Standard Webhooks library) and the handler's name, which
also names the destination of the one-``url`` form.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from standardwebhooks.webhooks import Webhook

from listener.core.errors import ConfigError
from listener.core.logs import register_secret
from listener.core.secrets import read_secret_file
from listener.webhooks.destination import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RETRY_SCHEDULE,
    DEFAULT_TIMEOUT,
    Destination,
)
from listener.webhooks.signing import RESERVED_HEADERS

__all__ = ["DestinationConfig", "WebhookConfig"]

# Destination names key outbox rows, metrics labels and CLI arguments.
_NAME = "[A-Za-z0-9_.-]+"


def _check_url(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("must be an absolute http:// or https:// URL")
    return url


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    for name in headers:
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"{name!r} is set by the forwarder")
    return headers


def _check_schedule(schedule: tuple[float, ...]) -> tuple[float, ...]:
    if not schedule or not all(math.isfinite(delay) and delay >= 0 for delay in schedule):
        raise ValueError("must be a non-empty list of seconds >= 0")
    return schedule


def _check_events(events: tuple[str, ...]) -> tuple[str, ...]:
    if not events:
        raise ValueError("must list at least one glob (use '*' for all)")
    return events


def _check_secret(secret: str, key: str) -> None:
    try:
        Webhook(secret)
    except Exception:  # the library raises assorted types
        # Never echo the secret itself, nor the library's words about it.
        raise ConfigError(
            key,
            "not a valid Standard Webhooks secret: expected whsec_ followed by base64 "
            "(24 to 64 random bytes)",
        ) from None


_Url = Annotated[str, AfterValidator(_check_url)]


def _check_unique(destinations: list[DestinationConfig]) -> list[DestinationConfig]:
    names = [item.name for item in destinations]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate destination names: {', '.join(duplicates)}")
    return destinations


class _DestinationFields(BaseModel):
    """The settings a destination has in either form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str | list[str] | None = None
    secret_file: Path | None = None
    headers: Annotated[dict[str, str], AfterValidator(_check_headers)] = Field(default_factory=dict)
    # Not "timeout": that key is the dispatcher's (how long handle() may take).
    request_timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0, allow_inf_nan=False)
    retry_schedule: Annotated[tuple[float, ...], AfterValidator(_check_schedule)] = (
        DEFAULT_RETRY_SCHEDULE
    )
    ordering: Literal["none", "per_call"] = "none"
    max_in_flight: int = Field(default=DEFAULT_MAX_IN_FLIGHT, ge=1)
    max_pending: int | None = Field(default=None, ge=1)
    max_age: float | None = Field(default=None, gt=0)

    def _signing_secrets(self, prefix: str) -> tuple[str, ...]:
        """The secrets from ``secret_file`` (one per line) or ``secret``, registered for
        redaction and checked; ``prefix`` places this table's keys in the handler's."""
        key = prefix + ("secret_file" if self.secret_file is not None else "secret")
        if self.secret_file is not None:
            text = read_secret_file(self.secret_file, key)
            values = tuple(line.strip() for line in text.splitlines() if line.strip())
        elif isinstance(self.secret, list):
            values = tuple(self.secret)
        else:
            values = (self.secret,) if self.secret else ()
        if not values:
            raise ConfigError(key, "a signing secret is required: secret or secret_file")
        for value in values:
            register_secret(value)
            _check_secret(value, key)
        return values

    def _destination(
        self, name: str, url: str, events: tuple[str, ...], secrets: tuple[str, ...]
    ) -> Destination:
        return Destination(
            name=name,
            url=url,
            secrets=secrets,
            events=events,
            headers=dict(self.headers),
            timeout=self.request_timeout,
            retry_schedule=self.retry_schedule,
            ordering=self.ordering,
            max_in_flight=self.max_in_flight,
            max_pending=self.max_pending,
            max_age=self.max_age,
        )


class DestinationConfig(_DestinationFields):
    """One entry of ``destinations``."""

    name: str = Field(pattern=f"^{_NAME}$")
    url: _Url
    events: Annotated[tuple[str, ...], AfterValidator(_check_events)] = ("*",)


class WebhookConfig(_DestinationFields):
    """``[[handlers]]`` settings for ``use = "webhook"``: ``url`` or ``destinations``."""

    url: _Url | None = None
    destinations: Annotated[list[DestinationConfig], AfterValidator(_check_unique)] = Field(
        default_factory=list
    )
    stop_grace: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _one_form(self) -> WebhookConfig:
        if (self.url is None) == (not self.destinations):
            raise ValueError("give either url (one destination) or [[destinations]]")
        return self

    def destination_names(self, handler_name: str) -> list[str]:
        """The destinations' names, under which the outbox keeps their deliveries: the
        handler's own name for the one-``url`` form."""
        if self.url is not None:
            return [handler_name]
        return [item.name for item in self.destinations]

    def signing_secrets(self) -> list[tuple[str, ...]]:
        """Each destination's secrets, in order, read and checked now.

        Raises:
            ConfigError: a secret is missing, unreadable or invalid.
        """
        if self.url is not None:
            return [self._signing_secrets("")]
        return [
            item._signing_secrets(f"destinations[{index}].")
            for index, item in enumerate(self.destinations)
        ]

    def build(self, handler_name: str, secrets: Sequence[tuple[str, ...]]) -> list[Destination]:
        """The runtime destinations, signing with what :meth:`signing_secrets` returned.

        Raises:
            ConfigError: the handler's name cannot name the one-``url`` form's destination.
        """
        names = self.destination_names(handler_name)
        if self.url is not None:
            if not re.fullmatch(_NAME, names[0]):
                raise ConfigError(
                    "name",
                    f"{names[0]!r} cannot name a webhook destination: use letters, digits"
                    " and _.- only",
                )
            return [self._destination(names[0], self.url, ("*",), secrets[0])]
        return [
            item._destination(name, item.url, item.events, found)
            for item, name, found in zip(self.destinations, names, secrets, strict=True)
        ]
