"""sippet-listener: a realtime event daemon for the Sippet telephony platform.

This module is the plugin authors' door, and the only one: everything a handler needs is
importable from here (and the test kit from :mod:`listener.testing`). The subpackages
(``listener.core``, ``listener.realtime``, ``listener.rpc``, ``listener.calls``,
``listener.dispatch``, ``listener.webhooks``, ``listener.service``) are internal and change
without notice.
"""

from __future__ import annotations

# First, before anything imports structlog or httpx: see the module (-1.0 to -5.8 MiB idle).
import listener.core.extras  # noqa: F401  # isort: skip
from listener.calls.state import CallLookup, CallRecord
from listener.core.errors import (
    AuthError,
    ConfigError,
    HandlerLoadError,
    LinkError,
    ListenerError,
    MintError,
    RpcActionError,
    RpcError,
    RpcInputError,
    TokenError,
)
from listener.core.events import Event
from listener.core.templating import (
    MISSING,
    FieldPath,
    Location,
    Template,
    TemplateError,
    compile_template,
)
from listener.dispatch.handler import Context, Handler, handler
from listener.rpc.catalog import CATALOG, PAYLOAD_KEYS, ActionSpec
from listener.rpc.client import RpcClient, ValidationResult

__all__ = [
    "CATALOG",
    "MISSING",
    "PAYLOAD_KEYS",
    "ActionSpec",
    "AuthError",
    "CallLookup",
    "CallRecord",
    "ConfigError",
    "Context",
    "Event",
    "FieldPath",
    "Handler",
    "HandlerLoadError",
    "LinkError",
    "ListenerError",
    "Location",
    "MintError",
    "RpcActionError",
    "RpcClient",
    "RpcError",
    "RpcInputError",
    "Template",
    "TemplateError",
    "TokenError",
    "ValidationResult",
    "compile_template",
    "handler",
]
