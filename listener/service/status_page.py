"""The status page's HTML, rendered on the server from a view (:mod:`.status_view`).

Every value goes through :func:`html.escape`; the page loads its script and style from the
same server (``/static/...``), so the Content-Security-Policy (:data:`SECURITY_HEADERS`)
allows no inline script or style at all.
"""

from __future__ import annotations

import html
from importlib import resources
from typing import Any

from listener.service.status_view import ACTIONS, CLASSES, Cell, Row

__all__ = ["COLUMNS", "SECURITY_HEADERS", "render_page", "static_asset"]

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    # Not no-referrer: under it Chromium sends "Origin: null" with the page's own POSTs.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

COLUMNS = {
    "link": ["", ""],
    "calls": ["Status", "From → to", "Age", "Call", "Last event"],
    "ended": ["Status", "From → to", "Ended", "Call", "Last event"],
    "events": ["Time", "Event", "Call", "Origin", "Handler outcomes", "Payload"],
    "handlers": ["Handler", "Events", "Errors", "Timeouts", "Queue"],
    "destinations": [
        "Destination",
        "Health",
        "Pending",
        "Oldest pending",
        "Success",
        "Dead letters",
        "Last error",
    ],
    "dead": ["Delivery", "Destination", "Event", "Dead since", "Attempts", "Reason", "Last error"],
}
_ADMIN_COLUMN = {"destinations", "dead"}
_STATIC = {"status.js": "text/javascript", "status.css": "text/css"}


def static_asset(name: str) -> tuple[bytes, str] | None:
    """The bytes and media type of a file under ``static/``; None if there is none."""
    media = _STATIC.get(name)
    if media is None:
        return None
    data = resources.files("listener.service").joinpath("static", name).read_bytes()
    return data, f"{media}; charset=utf-8"


def _cell(cell: str | Cell) -> str:
    if isinstance(cell, str):
        return f"<td>{html.escape(cell)}</td>"
    css = cell.get("c", "")
    klass = f' class="{css}"' if css in CLASSES else ""
    text = html.escape(cell.get("t", ""))
    action = cell.get("a")
    if action not in ACTIONS:
        return f"<td{klass}>{text}</td>"
    data = "".join(
        f' data-{name}="{html.escape(cell[key])}"'  # type: ignore[literal-required]
        for key, name in (("dest", "destination"), ("msg", "msg"))
        if key in cell
    )
    return f'<td{klass}><button type="button" data-action="{action}"{data}>{text}</button></td>'


def _rows(rows: list[Row]) -> str:
    return "".join("<tr>" + "".join(_cell(cell) for cell in row) + "</tr>" for row in rows)


def _table(name: str, rows: list[Row], admin: bool) -> str:
    columns = COLUMNS[name] + (["Action"] if admin and name in _ADMIN_COLUMN else [])
    head = "" if name == "link" else "<tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"
    return f'<table><thead>{head}</thead><tbody id="t-{name}">{_rows(rows)}</tbody></table>'


def _admin_forms(admin: str, destinations: list[str]) -> str:
    if admin == "off":
        return '<p class="muted">Read-only: set <code>service.admin_token</code> to act.</p>'
    if admin == "login":
        return (
            '<form method="post" action="/login" class="inline">'
            '<input type="password" name="token" autocomplete="current-password"'
            ' placeholder="admin token" aria-label="admin token" required>'
            '<button type="submit">Sign in to act</button></form>'
        )
    options = "".join(
        f'<option value="{html.escape(name)}">{html.escape(name)}</option>' for name in destinations
    )
    return (
        '<form id="replay-filter" class="inline">Replay the dead letters of '
        f'<select name="destination" aria-label="destination">{options}</select>'
        ' enqueued in the last <input type="number" name="minutes" min="1" value="60"'
        ' aria-label="minutes"> minutes <button type="submit">Replay</button></form>'
        '<form method="post" action="/logout" class="inline"><button type="submit">'
        "Sign out</button></form>"
    )


def render_page(view: dict[str, Any], *, admin: str, csrf: str) -> str:
    """The whole page. ``admin`` is ``off`` (no token configured), ``login`` (configured,
    not signed in) or ``on``; ``csrf`` is the signed-in session's token, else empty."""
    acting = admin == "on"
    tables = view["tables"]
    headline = view["headline"]

    def table(name: str) -> str:
        return _table(name, tables[name], acting)

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf" content="{html.escape(csrf)}">
<title>sippet-listener status</title>
<link rel="stylesheet" href="/static/status.css">
<script src="/static/status.js" defer></script>
</head><body data-admin="{admin}">
<header><h1>sippet-listener</h1>
<span id="headline" class="{headline["c"]}">{html.escape(headline["t"])}</span>
<span class="muted">updated <span id="updated">{html.escape(view["updated"])}</span> UTC
<span id="live">(connecting)</span></span></header>
<p id="notice" role="status"></p>
<main>
<section id="link"><h2>Link</h2>{table("link")}</section>
<section id="handlers"><h2>Handlers</h2>{table("handlers")}</section>
<section id="destinations" class="wide"><h2>Destinations</h2>{table("destinations")}
<h3>Dead letters</h3>{table("dead")}{_admin_forms(admin, view["destinations"])}
<div id="timeline" hidden><h3>Attempts of <span id="timeline-id" class="mono"></span></h3>
<table><thead><tr><th>Time</th><th>Destination</th><th>Status</th><th>Took</th><th>Class</th>
<th>Error</th><th>Probe</th></tr></thead><tbody id="t-timeline"></tbody></table>
<p id="timeline-where" class="muted"></p></div></section>
<section id="calls" class="wide"><h2>Calls
<span id="open-calls" class="muted">{html.escape(view["open_calls"])}</span></h2>{table("calls")}
<h3>Recently ended</h3>{table("ended")}</section>
<section id="events" class="wide"><h2>Recent events</h2>
<input id="filter" type="search" placeholder="filter by event name or call"
 aria-label="filter events">{table("events")}</section>
</main></body></html>
"""
