"""Logging: structlog for our lines, stdlib for libraries, one redacting pipeline for both.

JSON lines when stderr is not a terminal (journald, files), one concise line per thing that
happened on a terminal (:mod:`listener.core.pretty`).
The websockets and httpx loggers put URLs in their lines (the socket URL carries the session
token in its query string), so every record, ours or theirs, passes :func:`redact` before it
is rendered. Secrets known by value (the API key, minted tokens, webhook secrets) are
registered with :func:`register_secret` and replaced wherever they appear.
"""

from __future__ import annotations

import logging
import re
import sys
from collections import deque
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from listener.core.pretty import PrettyRenderer, resolve_format, use_colors

__all__ = ["configure_logging", "redact", "redact_text", "register_secret"]

REDACTED = "[REDACTED]"
# Tokens rotate every few minutes; remembering the recent ones is enough.
_secrets: deque[str] = deque(maxlen=64)
_PATTERNS = (
    # Query parameters and headers that carry credentials, in URLs and in header dumps.
    re.compile(r"(?i)((?:session_token|token|api_key|apikey)=)[^&\s\"'<>]+"),
    re.compile(
        r"(?i)((?:x-api-key|authorization|webhook-signature)[\"']?\s*[:=]\s*[\"']?)"
        r"(?:Bearer\s+)?[^\s\"',}]+"
    ),
    re.compile(r"()whsec_[A-Za-z0-9+/=_-]+"),
)
# Fields whose value is a credential whatever it looks like (a header dict, a bare token).
_SECRET_FIELDS = frozenset(
    {
        "authorization",
        "x-api-key",
        "api_key",
        "apikey",
        "token",
        "session_token",
        "admin_token",
        "secret",
        "password",
        "cookie",
        "webhook-signature",
    }
)
_QUIET_LIBRARIES = ("websockets", "httpx", "httpcore", "uvicorn", "uvicorn.error")


def register_secret(value: str) -> None:
    """Make sure ``value`` never appears in a log line from now on."""
    if len(value) >= 6 and value not in _secrets:
        _secrets.append(value)


def redact_text(text: str) -> str:
    """Return ``text`` with every known secret and credential-shaped value replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(rf"\g<1>{REDACTED}", text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            key: REDACTED if _is_secret_field(key) else _redact_value(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact_value(item) for item in value]
    return value


def _is_secret_field(key: object) -> bool:
    return isinstance(key, str) and key.lower() in _SECRET_FIELDS


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact every value of the event dict (nested ones too), and the
    whole value of a field named like a credential."""
    for key, value in event_dict.items():
        if _is_secret_field(key) and value is not None:
            event_dict[key] = REDACTED
        elif isinstance(value, str | dict | list | tuple):
            event_dict[key] = _redact_value(value)
        elif isinstance(value, BaseException):
            event_dict[key] = redact_text(repr(value))
    return event_dict


def _drop_color_message(
    _logger: WrappedLogger, _method: str, event_dict: MutableMapping[str, Any]
) -> EventDict:
    # uvicorn duplicates its message with ANSI colours in an extra field.
    event_dict.pop("color_message", None)
    return dict(event_dict)


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and the stdlib root logger through one redacting formatter.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``json``, ``pretty`` (``console`` is its older spelling), or ``auto`` (pretty
            on a terminal, else JSON).
        stream: where lines go (stderr by default, leaving stdout to command output).
    """
    out = stream if stream is not None else sys.stderr
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if resolve_format(fmt, out) == "json"
        else PrettyRenderer(colors=use_colors(out))
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _drop_color_message],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in _QUIET_LIBRARIES:
        # Library chatter (every HTTP request, every frame) only when asked for with debug.
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
