"""``sippet-listener status``: ask the running daemon how it is, for people and scripts.

Reads ``/status`` on the daemon's ``service.metrics_listen`` (no secret needed) and prints
the link, the handlers and the destinations in a few lines. Exit 0 when joined and healthy,
1 when not, 2 when the daemon cannot be reached (not running, or no ``metrics_listen``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from listener.service.config import load_settings
from listener.service.inspection import add_config_argument
from listener.service.status_view import span

__all__ = ["EXIT_UNREACHABLE", "add_status_command", "status_lines"]

EXIT_UNREACHABLE = 2
# A wildcard bind is reached on loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - what to dial instead


def _link_line(link: dict[str, Any], now: float) -> str:
    if not link["joined"]:
        state = "not joined"
    else:
        since = link["joined_since"]
        state = f"joined {link['topic']}" + (f" for {span(now - since)}" if since else "")
        if not link["healthy"]:
            state += ", heartbeats unanswered"
    return (
        f"link: {state}; token {span(link['token_remaining'])} left,"
        f" {link['rotations']} rotations; heartbeat {span(link['heartbeat_rtt'])};"
        f" last hour: {link['reconnects_last_hour']} reconnects,"
        f" {len(link['gaps_last_hour'])} gaps"
    )


def _handler(entry: dict[str, Any]) -> str:
    text = f"{entry['name']} {entry['events']} events"
    for key in ("errors", "timeouts", "dropped"):
        if entry[key]:
            text += f", {entry[key]} {key}"
    return text + (f", {entry['queue_depth']} queued" if entry["queue_depth"] else "")


def _destination(entry: dict[str, Any]) -> str:
    if entry["disabled"]:
        health = f"disabled ({entry['disabled_reason']})"
    elif entry["healthy"]:
        health = "healthy"
    else:
        health = f"UNHEALTHY for {span(entry['unhealthy_for'])}"
    ratio = entry["success_ratio"]
    text = f"{entry['name']} {health}, {entry['pending'] or 0} pending"
    if entry["oldest_age"]:
        text += f" (oldest {span(entry['oldest_age'])})"
    text += f", {entry['dead'] or 0} dead"
    if ratio is not None:
        text += f", {ratio:.0%} ok"
    if entry["last_error"] and (entry["disabled"] or not entry["healthy"]):
        text += f", last error: {entry['last_error']}"
    return text


def status_lines(snapshot: dict[str, Any]) -> list[str]:
    """The few lines ``status`` prints for a ``/status`` snapshot."""
    now = snapshot["time"]
    handlers = "; ".join(_handler(entry) for entry in snapshot["handlers"]) or "none"
    destinations = "; ".join(_destination(entry) for entry in snapshot["destinations"])
    lines = [_link_line(snapshot["link"], now), f"handlers: {handlers}"]
    if destinations:
        lines.append(f"destinations: {destinations}")
    lines.append("status: ok" if snapshot["ok"] else f"status: NOT OK ({snapshot['reason']})")
    return lines


def _status(args: argparse.Namespace) -> int:
    service = load_settings(args.config).service
    address = service.metrics_address
    if address is None:
        sys.stderr.write(
            f"sippet-listener: status: service.metrics_listen is not set in {args.config}:"
            " the daemon serves no status\n"
        )
        return EXIT_UNREACHABLE
    host, port = address
    host = _WILDCARDS.get(host, host)
    url = f"http://[{host}]:{port}/status" if ":" in host else f"http://{host}:{port}/status"
    try:
        response = httpx.get(url, timeout=args.timeout)
        response.raise_for_status()
        snapshot = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        sys.stderr.write(f"sippet-listener: status: cannot reach the daemon at {url}: {exc}\n")
        return EXIT_UNREACHABLE
    if args.json:
        sys.stdout.write(json.dumps(snapshot) + "\n")
    else:
        sys.stdout.write("\n".join(status_lines(snapshot)) + "\n")
    return 0 if snapshot["ok"] else 1


def add_status_command(commands: Any) -> None:
    """Add ``status`` to the CLI's sub-parsers."""
    status = commands.add_parser(
        "status",
        help="ask the running daemon for its link, handlers and destinations (exit 0, 1 or 2)",
        description="Read the running daemon's /status on service.metrics_listen and print "
        "the link, the handlers and the destinations. Exit 0 when joined and healthy, 1 "
        "when not, 2 when the daemon cannot be reached.",
    )
    add_config_argument(status)
    status.add_argument(
        "--timeout", type=_seconds, default=5.0, help="seconds to wait (default: %(default)s)"
    )
    status.add_argument("--json", action="store_true", help="print the whole snapshot as JSON")
    status.set_defaults(sync=_status)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value
