"""A status snapshot (:mod:`.status`) as the page shows it: tables of display cells.

One view feeds both the HTML the server renders (:mod:`.status_page`) and the updates the
page's script receives over server-sent events, so that the rows are formatted in one place
and the script only ever puts text in cells (``textContent``). A cell is a string, or a
:class:`Cell` dict with a CSS class from :data:`CLASSES` and, for a button, an action from
:data:`ACTIONS` with the destination or message it applies to.
"""

from __future__ import annotations

import time
from typing import Any, TypedDict

from listener.core.pretty import short_id

__all__ = ["ACTIONS", "ADMIN_ACTIONS", "CLASSES", "Cell", "Row", "span", "view"]

CLASSES = frozenset({"ok", "bad", "warn", "muted", "mono"})
ADMIN_ACTIONS = frozenset({"replay", "pause", "resume", "enable"})
# "timeline" only reads: it is offered without the admin token too.
ACTIONS = ADMIN_ACTIONS | {"timeline"}


class Cell(TypedDict, total=False):
    t: str
    c: str
    a: str
    dest: str
    msg: str


Row = list[str | Cell]


def _clock(moment: float | None) -> str:
    if moment is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(moment))


def span(seconds: float | None) -> str:
    """A duration in a few characters: ``850 ms``, ``42 s``, ``12 min``, ``3.5 h``, or ``-``."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _link(link: dict[str, Any], now: float) -> list[Row]:
    joined = link["joined"]
    state: Cell = {
        "t": f"joined {link['topic']}" if joined else "not joined",
        "c": "ok" if joined and link["healthy"] else "bad",
    }
    if joined and not link["healthy"]:
        state["t"] += " (heartbeats unanswered)"
    since = link["joined_since"]
    gaps = link["gaps_last_hour"]
    lost = sum((gap["end"] or now) - gap["start"] for gap in gaps)
    rotation = link["last_rotation_at"]
    return [
        ["Channel", state],
        ["Since", "-" if since is None else f"{_clock(since)} ({span(now - since)})"],
        ["Token remaining", span(link["token_remaining"])],
        [
            "Last rotation",
            "none yet" if rotation is None else f"{_clock(rotation)} ({link['rotations']} in all)",
        ],
        ["Heartbeat round-trip", span(link["heartbeat_rtt"])],
        [
            "Reconnects, last hour",
            f"{link['reconnects_last_hour']} ({link['reconnects_total']} in all)",
        ],
        ["Gaps, last hour", f"{len(gaps)}, {span(lost)} in all" if gaps else "none"],
        *_cluster(link.get("cluster")),
    ]


def _cluster(cluster: dict[str, Any] | None) -> list[Row]:
    """The shared store's rows, when there is one: who this instance is and its role."""
    if cluster is None:
        return []
    role = f"leader (term {cluster['term']})" if cluster["leader"] else "follower"
    spooled = f"{cluster['spooled']} events spooled"
    store: Cell
    if not cluster["store_answering"]:
        store = {"t": f"not answering; {spooled}", "c": "bad"}
    else:
        said = ["answering", *([spooled] if cluster["spooled"] else [])]
        local = not cluster["call_map_shared"]
        if local:
            said.append("not taking the call map, kept locally")
        store = {"t": "; ".join(said), "c": "warn" if local else "ok"}
    return [["Instance", f"{cluster['instance']}: {role}"], ["Shared store", store]]


def _call_row(call: dict[str, Any], now: float, *, ended: bool) -> Row:
    status: Cell = {"t": str(call["status"]), "c": "muted" if ended else "ok"}
    parties = f"{call['from'] or '?'} → {call['to'] or '?'}"
    start = call["started_at"] or call["last_event_at"]
    age = _clock(call["ended_at"]) if ended else span(now - start)
    return [
        status,
        parties,
        age,
        {"t": short_id(call["call_key"]), "c": "mono"},
        call["last_event"] or "-",
    ]


def _outcomes(event: dict[str, Any]) -> Cell:
    parts = []
    bad = False
    for outcome in event["outcomes"]:
        text = f"{outcome['handler']} {outcome['outcome']} {span(outcome['seconds'])}"
        if outcome["error"]:
            text += f" ({outcome['error']})"
        bad = bad or outcome["outcome"] != "ok"
        parts.append(text)
    return {"t": "; ".join(parts) or "-", "c": "bad" if bad else "ok" if parts else "muted"}


def _event_row(event: dict[str, Any], timelines: bool) -> Row:
    name: Cell = {"t": event["name"]}
    if timelines and event["id"]:
        name = {"t": event["name"], "a": "timeline", "msg": event["id"]}
    return [
        _clock(event["received_at"]),
        name,
        {"t": short_id(event["call_key"]), "c": "mono"},
        {"t": event["origin"], "c": "warn" if event["origin"] != "realtime" else "muted"},
        _outcomes(event),
        {"t": event["summary"], "c": "mono"},
    ]


def _destination_row(entry: dict[str, Any], admin: bool) -> Row:
    name = entry["name"]
    if entry["disabled"]:
        health: Cell = {"t": f"disabled: {entry['disabled_reason'] or '?'}", "c": "warn"}
    elif entry["healthy"]:
        health = {"t": "healthy", "c": "ok"}
    else:
        health = {"t": f"unhealthy for {span(entry['unhealthy_for'])}", "c": "bad"}
    ratio = entry["success_ratio"]
    row: Row = [
        name,
        health,
        "-" if entry["pending"] is None else str(entry["pending"]),
        span(entry["oldest_age"]),
        "-" if ratio is None else f"{ratio:.0%}",
        {"t": str(entry["dead"] or 0), "c": "bad" if entry["dead"] else "muted"},
        {"t": entry["last_error"] or "-", "c": "bad" if entry["last_error"] else "muted"},
    ]
    if admin:
        paused = entry["disabled"] and (entry["disabled_reason"] or "").startswith("paused")
        if paused:
            row.append({"t": "Resume", "a": "resume", "dest": name})
        elif entry["disabled"]:
            row.append({"t": "Re-enable", "a": "enable", "dest": name})
        else:
            row.append({"t": "Pause", "a": "pause", "dest": name})
    return row


def _dead_rows(destinations: list[dict[str, Any]], admin: bool) -> list[Row]:
    rows = []
    for entry in destinations:
        for letter in entry["dead_letters"]:
            row: Row = [
                {"t": letter["msg_id"], "a": "timeline", "msg": letter["msg_id"], "c": "mono"},
                entry["name"],
                letter["event"],
                _clock(letter["dead_at"]),
                str(letter["attempts"]),
                letter["reason"],
                {"t": letter["last_error"] or "-", "c": "muted"},
            ]
            if admin:
                row.append(
                    {"t": "Replay", "a": "replay", "dest": entry["name"], "msg": letter["msg_id"]}
                )
            rows.append(row)
    return rows


def view(snapshot: dict[str, Any], *, admin: bool) -> dict[str, Any]:
    """The page's tables and headline for ``snapshot``; buttons that act only if ``admin``."""
    now = snapshot["time"]
    destinations = snapshot["destinations"]
    calls = snapshot["calls"]
    if snapshot["ok"]:
        headline: Cell = {"t": "joined and healthy", "c": "ok"}
    elif not snapshot["ready"]:
        headline = {"t": snapshot["reason"], "c": "bad"}
    else:
        unwell = [e["name"] for e in destinations if e["disabled"] or not e["healthy"]]
        headline = {"t": f"destinations need attention: {', '.join(unwell)}", "c": "bad"}
    return {
        "headline": headline,
        "updated": _clock(now),
        "destinations": [entry["name"] for entry in destinations],
        "open_calls": f"{calls['open_count']} open"
        + (
            f", the latest {len(calls['open'])} shown"
            if calls["open_count"] > len(calls["open"])
            else ""
        ),
        "tables": {
            "link": _link(snapshot["link"], now),
            "calls": [_call_row(call, now, ended=False) for call in calls["open"]],
            "ended": [_call_row(call, now, ended=True) for call in calls["ended"]],
            "events": [_event_row(event, bool(destinations)) for event in snapshot["events"]],
            "handlers": [
                [
                    entry["name"],
                    str(entry["events"]),
                    {"t": str(entry["errors"]), "c": "bad" if entry["errors"] else "muted"},
                    {"t": str(entry["timeouts"]), "c": "bad" if entry["timeouts"] else "muted"},
                    str(entry["queue_depth"]),
                ]
                for entry in snapshot["handlers"]
            ],
            "destinations": [_destination_row(entry, admin) for entry in destinations],
            "dead": _dead_rows(destinations, admin),
        },
    }
