"""sippet-listener: a realtime event daemon for the Sippet telephony platform."""

from __future__ import annotations

from listener.errors import (
    AuthError,
    ConfigError,
    HandlerLoadError,
    LinkError,
    ListenerError,
    RpcActionError,
    RpcError,
    RpcInputError,
)
from listener.events import Event

__all__ = [
    "AuthError",
    "ConfigError",
    "Event",
    "HandlerLoadError",
    "LinkError",
    "ListenerError",
    "RpcActionError",
    "RpcError",
    "RpcInputError",
]
