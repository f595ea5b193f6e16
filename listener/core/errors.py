"""Every error sippet-listener raises on purpose.

The tree::

    ListenerError
    ├── ConfigError                  a setting is missing or invalid (exit code 78)
    ├── ProtocolError
    │   ├── LocalProtocolError       we broke the Phoenix rules: a bug here
    │   └── RemoteProtocolError      the server sent a frame we cannot read
    ├── TokenError
    │   ├── AuthError                the secret key was refused (HTTP 401/403)
    │   └── MintError                minting failed (network, 5xx, 429, unusable answer)
    ├── LinkError                    the realtime link failed; ``reason`` says how
    ├── RpcError                     an RPC call failed before or at the HTTP layer
    │   ├── RpcInputError            the request was rejected locally, before sending
    │   └── RpcActionError           Sippet answered ``{"success": false, "errors": [...]}``
    ├── HandlerLoadError             a handler could not be imported or configured (exit 78)
    ├── templating.TemplateError     a rule's template could not be filled from an event
    └── handlers.rpc.RulesFailed     one or more rules of the ``rpc`` handler failed

Messages are lowercase facts and never carry a secret.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "HandlerLoadError",
    "LinkError",
    "ListenerError",
    "LocalProtocolError",
    "MintError",
    "ProtocolError",
    "RemoteProtocolError",
    "RpcActionError",
    "RpcError",
    "RpcInputError",
    "TokenError",
]


class ListenerError(Exception):
    """Base class of every error raised on purpose by sippet-listener."""


class ConfigError(ListenerError):
    """A setting is missing or invalid.

    ``key`` is the dotted path of the setting (``sippet.heartbeat_interval``).
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


class ProtocolError(ListenerError):
    """A Phoenix protocol rule was broken."""


class LocalProtocolError(ProtocolError, RuntimeError):
    """This process broke the protocol (an illegal state transition): a bug."""


class RemoteProtocolError(ProtocolError):
    """The server sent something that is not a valid Phoenix V2 frame."""


class TokenError(ListenerError):
    """A realtime session token could not be had."""


class AuthError(TokenError):
    """Sippet refused the secret key; retrying with the same key will not help soon."""

    def __init__(self, status: int) -> None:
        super().__init__(f"session mint refused: HTTP {status}: the secret key was not accepted")
        self.status = status


class MintError(TokenError):
    """Minting failed (network error, HTTP 5xx or 429, or an unusable answer).

    ``retry_after`` is the server's ``Retry-After``, in seconds, when it sent one.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LinkError(ListenerError):
    """The realtime link failed.

    ``reason`` is a short machine-readable word (``upgrade_refused``, ``join_refused``,
    ``channel_closed``, ``server_closed``, ``heartbeat_timeout``, ...) used for metrics. The
    other attributes are what the server said, when it said it: ``status`` of a refused
    upgrade, ``close_code`` of a server close, ``retry_after`` from a ``Retry-After`` header.
    Which of these mean "the token was refused" is the session's call, not the link's.
    """

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        status: int | None = None,
        close_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status
        self.close_code = close_code
        self.retry_after = retry_after


class RpcError(ListenerError):
    """An RPC call failed before Sippet could answer it with an error envelope."""


class RpcInputError(RpcError, ValueError):
    """An RPC request was invalid and was not sent (unknown action, missing key)."""


class RpcActionError(RpcError):
    """Sippet answered ``{"success": false}``; ``errors`` holds every ``AshRpcError``."""

    def __init__(self, action: str, errors: list[dict[str, object]]) -> None:
        self.action = action
        self.errors = errors
        first = errors[0] if errors else {}
        self.type = str(first.get("type", "unknown"))
        self.message = _fill_vars(first)
        self.short_message = str(first.get("shortMessage", ""))
        raw_fields = first.get("fields")
        raw_path = first.get("path")
        self.fields = [str(f) for f in raw_fields] if isinstance(raw_fields, list) else []
        self.path = [str(p) for p in raw_path] if isinstance(raw_path, list) else []
        details = first.get("details")
        self.details = details if isinstance(details, dict) else {}
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"rpc {action} failed: {self.type}: {self.message}{more}")


def _fill_vars(error: dict[str, object]) -> str:
    """Return the error's message with its ``%{var}`` templates filled from ``vars``."""
    message = str(error.get("message", ""))
    variables = error.get("vars")
    if isinstance(variables, dict):
        for name, value in variables.items():
            message = message.replace(f"%{{{name}}}", str(value))
    return message


class HandlerLoadError(ListenerError):
    """A handler could not be loaded: bad ``use`` reference, import error or bad config."""

    def __init__(self, handler: str, problem: str) -> None:
        super().__init__(f"handler {handler!r}: {problem}")
        self.handler = handler
        self.problem = problem
