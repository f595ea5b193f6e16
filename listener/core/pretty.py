"""One concise line per thing that happened, for a person at a terminal (Stripe CLI style).

The daemon's log lines are structured events with fixed messages; :class:`PrettyRenderer`
gives the interesting ones (events, rpc rules, deliveries, the link's joins, rotations and
failures, gaps and reconciliations) a one-line form of their own and every other one a
compact generic form::

    13:28:17  incoming_call    7b76a2e8  +15550000000 → +15557654321  ringing
    13:28:17  rpc end_call     7b76a2e8  rule 0 on incoming_call
    13:28:17  --> 200 crm 4 ms  call_ended 7b76a2e8
    13:28:19  ↻ token rotated  link-2

It renders what :func:`listener.core.logs.redact` has already cleaned, so it sees no secret.
Colours only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Literal, TextIO

from structlog.typing import EventDict, WrappedLogger

from listener.core.events import Event

__all__ = ["Format", "PrettyRenderer", "event_text", "resolve_format", "use_colors"]

#: What a stream gets: JSON lines for machines, or this module's lines for people.
Format = Literal["json", "pretty"]

_LABEL_WIDTH = 16
_SHORT_ID = 8
_RESET = "\x1b[0m"
_COLOURS = {
    "event": "\x1b[36m",  # cyan
    "rpc": "\x1b[35m",  # magenta
    "ok": "\x1b[32m",  # green
    "link": "\x1b[34m",  # blue
    "dim": "\x1b[2m",
    "warning": "\x1b[33m",  # yellow
    "error": "\x1b[31m",  # red
}
_LEVEL_COLOURS = {"warning": "warning", "error": "error", "critical": "error"}
# Keys every line carries (or the pipeline adds) that the one-line forms leave out.
_PLUMBING = frozenset({"event", "timestamp", "level", "logger", "handler", "exception"})


def resolve_format(fmt: str, stream: TextIO) -> Format:
    """``auto`` is pretty on a terminal and JSON elsewhere (journald, pipes, files);
    ``console``, the older spelling, is pretty."""
    if fmt == "auto":
        return "pretty" if stream.isatty() else "json"
    return "json" if fmt == "json" else "pretty"


def use_colors(stream: TextIO) -> bool:
    """Whether lines written to ``stream`` may carry ANSI colours."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def short_id(value: object) -> str:
    """The first characters of a call key: enough to tell calls apart on a screen."""
    return "-" if value in (None, "") else str(value)[:_SHORT_ID]


def _clock(timestamp: object) -> str:
    """``HH:MM:SS`` in local time, from the pipeline's ISO UTC timestamp (or epoch seconds)."""
    if isinstance(timestamp, int | float):
        moment = datetime.fromtimestamp(timestamp).astimezone()
    elif isinstance(timestamp, str):
        try:
            moment = datetime.fromisoformat(timestamp).astimezone()
        except ValueError:
            return timestamp
    else:
        moment = datetime.now().astimezone()
    return moment.strftime("%H:%M:%S")


def event_line(
    name: str, call_key: object, payload: Mapping[str, Any] | None, origin: object = "realtime"
) -> str:
    """An event's line after its time: name, short call id, from → to, status, and its
    origin when it was rebuilt from ``list_calls``."""
    parts = [f"{name:<{_LABEL_WIDTH}} {short_id(call_key):<{_SHORT_ID}}"]
    if payload:
        # The payload's own spelling, whichever it is: Event.field reads them all.
        event = Event.create(name, dict(payload), "", 0.0)
        caller, callee = event.field("fromNumber"), event.field("toNumber")
        if caller is not None or callee is not None:
            parts.append(f"{caller or '?'} → {callee or '?'}")
        status = event.field("status")
        if status is not None:
            parts.append(str(status))
    if origin not in (None, "realtime"):
        parts.append(f"[{origin}]")
    return "  ".join(parts).rstrip()


def _payload_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The fields an ``event received`` line shows: the ones the log handler was told to
    show, over the payload text when it is whole JSON."""
    found: dict[str, Any] = {}
    text = entry.get("payload")
    if isinstance(text, str):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None  # truncated: the named fields still show
        if isinstance(parsed, dict):
            found.update(parsed)
    for key in ("fromNumber", "from_number", "toNumber", "to_number", "status"):
        if entry.get(key) is not None:
            found[key] = entry[key]
    return found


def _seconds(value: object) -> str:
    return f"{value:.1f} s" if isinstance(value, int | float) else "?"


def _ms(value: object) -> str:
    return f"{value:.0f} ms" if isinstance(value, int | float) else "? ms"


def _count(value: object, noun: str) -> str:
    """``1 call``, ``3 calls``."""
    return f"{value} {noun}" if value == 1 else f"{value} {noun}s"


def _retry(entry: Mapping[str, Any]) -> str:
    retry_in = entry.get("retry_in")
    return f", retrying in {_seconds(retry_in)}" if retry_in else ", retrying now"


# Each form returns (label, detail, colour); label and detail make the line after the time.
_Form = Callable[[Mapping[str, Any]], tuple[str, str, str]]


def _received(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    line = event_line(
        str(entry.get("event_name")), entry.get("call_key"), _payload_of(entry), entry.get("origin")
    )
    return "", line, "event"


def _rule_fired(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    label = f"rpc {entry.get('action')}"
    detail = (
        f"{short_id(entry.get('call_key'))}  rule {entry.get('rule')} on {entry.get('event_name')}"
    )
    return label, detail, "rpc"


def _rule_failed(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    label = f"rpc {entry.get('action')} FAILED"
    detail = f"{short_id(entry.get('call_key'))}  rule {entry.get('rule')}: {entry.get('error')}"
    return label, detail, "error"


def _delivered(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    about = (
        f"  {entry['event_name']} {short_id(entry.get('call_key'))}"
        if "event_name" in entry
        else ""
    )
    line = f"--> {entry.get('status')} {entry.get('destination')} {_ms(entry.get('latency_ms'))}"
    return "", line + about, "ok"


def _unhealthy(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    answer = entry.get("status") or "ERR"
    why = entry.get("error") or "no answer"
    line = f"--> {answer} {entry.get('destination')} {why}: unhealthy, deliveries paused, probing"
    return "", line, "warning"


def _recovered(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    backlog = entry.get("backlog")
    line = (
        f"<-- {entry.get('destination')} recovered after {_seconds(entry.get('outage_seconds'))}"
        f" ({_count(entry.get('probes'), 'probe')}): delivering its backlog"
        + ("" if backlog is None else f" ({backlog})")
    )
    return "", line, "ok"


def _gave_up(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    line = (
        f"--> {entry.get('status') or 'ERR'} {entry.get('destination')} gave up after "
        f"{_count(entry.get('attempts'), 'attempt')} ({entry.get('error')}): dead letter"
    )
    return "", line, "error"


def _gone(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    return "", f"--> 410 {entry.get('destination')} gone: disabled until re-enabled", "error"


def _joined(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    return "● joined", f"{entry.get('topic')} ({entry.get('link')})", "link"


def _rotated(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    held = entry.get("held_back")
    detail = f"{entry.get('link')}" + (f", {held} events held back" if held else "")
    return "↻ token rotated", detail, "link"


def _rotation_failed(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    detail = f"{entry.get('error')}; keeping the socket{_retry(entry)}"
    return "↻ rotation failed", detail, "warning"


def _link_failed(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    detail = f"{entry.get('reason')}" + (f": {entry['detail']}" if entry.get("detail") else "")
    return "✗ link failed", detail + _retry(entry), "warning"


def _key_refused(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    detail = f"HTTP {entry.get('status')}: check SIPPET_SECRET_KEY{_retry(entry)}"
    return "✗ key refused", detail, "error"


def _mint_failed(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    return "✗ mint failed", f"{entry.get('error')}{_retry(entry)}", "warning"


def _heartbeat(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    detail = f"unanswered after {_seconds(entry.get('interval'))}, dropping {entry.get('link')}"
    return "✗ heartbeat", detail, "warning"


def _gap(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    return "gap", f"{_seconds(entry.get('seconds'))} ({entry.get('cause')})", "warning"


def _reconciled(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    detail = (
        f"{entry.get('cause')}: {_count(entry.get('rows'), 'call')} listed, "
        f"{_count(entry.get('emitted'), 'missed transition')} emitted"
    )
    if entry.get("loaded"):
        detail += f", {_count(entry['loaded'], 'open call')} loaded"
    return "reconciled", detail, "link"


def _refreshed(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    detail = (
        f"{_count(entry.get('emitted'), 'missed transition')} emitted"
        f" ({_count(entry.get('rows'), 'call')})"
    )
    return "reconciled", detail, "link"


def _first_start(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    return "first start", "no call history", "dim"


def _demo_started(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    detail = (
        f"fake Sippet at {entry.get('base_url')}: tokens live {_seconds(entry.get('token_ttl'))},"
        f" the rpc rule ends calls from {entry.get('blocked_number')}"
    )
    return "demo", detail, "dim"


def _status_page(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    return "", f"status page: {entry.get('url')}", "ok"


def _receiver_down(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    detail = f"{entry.get('destination')} down for {_seconds(entry.get('seconds'))} (simulated)"
    return "✗ outage", detail, "warning"


def _receiver_up(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    return "● back up", f"{entry.get('destination')}", "ok"


def _demo_done(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    detail = (
        f"{_count(entry.get('events'), 'event')}, "
        f"{_count(entry.get('rotations'), 'token rotation')}, "
        f"{_count(entry.get('rpc_calls'), 'rpc call')}, "
        f"{entry.get('deliveries')} webhook deliveries"
    )
    return "demo done", detail, "dim"


_FORMS: dict[str, _Form] = {
    "event received": _received,
    "rpc rule fired": _rule_fired,
    "rpc rule failed": _rule_failed,
    "webhook delivered": _delivered,
    "webhook destination unhealthy: deliveries paused, probing it": _unhealthy,
    "webhook destination recovered: delivering its backlog": _recovered,
    "webhook delivery gave up: moved to dead letters": _gave_up,
    "webhook destination answered 410 Gone: disabled until re-enabled with the CLI;"
    " its deliveries stay pending": _gone,
    "channel joined": _joined,
    "token rotated": _rotated,
    "token rotation failed; keeping the current socket": _rotation_failed,
    "realtime link failed": _link_failed,
    "secret key refused; check SIPPET_SECRET_KEY": _key_refused,
    "session mint failed": _mint_failed,
    "heartbeat unanswered, dropping the link": _heartbeat,
    "gap in the realtime link": _gap,
    "reconciled": _reconciled,
    "refresh found missed transitions": _refreshed,
    "first start: no call history": _first_start,
    "demo: fake Sippet listening": _demo_started,
    "demo: status page": _status_page,
    "demo: receiver down": _receiver_down,
    "demo: receiver up": _receiver_up,
    "demo: done": _demo_done,
}


def _value(value: object) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, default=str, separators=(",", ":"), ensure_ascii=False)


def _generic(entry: Mapping[str, Any]) -> tuple[str, str, str]:
    """Any other line: its level if above info, its message, then its fields as
    ``key=value``."""
    fields = " ".join(
        f"{key}={_value(value)}"
        for key, value in entry.items()
        if key not in _PLUMBING and value is not None
    )
    message = str(entry.get("event", ""))
    level = str(entry.get("level", "info"))
    if level in _LEVEL_COLOURS:
        # Said in words too: colour is not always there to say it.
        message = f"{level.upper()} {message}"
    return "", f"{message}  {fields}" if fields else message, "dim"


class PrettyRenderer:
    """structlog renderer: the event dict as one line (plus a traceback if it has one).

    Args:
        colors: colour the lines (see :func:`use_colors`).
    """

    def __init__(self, colors: bool = False) -> None:
        self._colors = colors

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
        form = _FORMS.get(str(event_dict.get("event")), _generic)
        label, detail, colour = form(event_dict)
        # A warning or an error shows as one whatever its form.
        colour = _LEVEL_COLOURS.get(str(event_dict.get("level")), colour)
        text = f"{label:<{_LABEL_WIDTH}} {detail}" if label else detail
        line = f"{_clock(event_dict.get('timestamp'))}  {_paint(text, colour, self._colors)}"
        exception = event_dict.get("exception")
        return f"{line}\n{exception}" if exception else line


def event_text(event: Event, colors: bool = False) -> str:
    """The line ``tail`` prints for ``event``: the same as the log handler's in this form."""
    line = event_line(event.name, event.call_key, event.payload, event.origin)
    return f"{_clock(event.received_at)}  {_paint(line, 'event', colors)}"


def _paint(text: str, colour: str, colors: bool) -> str:
    return f"{_COLOURS[colour]}{text}{_RESET}" if colors else text
