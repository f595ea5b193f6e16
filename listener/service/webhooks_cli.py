"""``sippet-listener webhooks ...``: inspect and repair webhook outboxes, even while the
daemon runs (SQLite in WAL mode serves both).

Outboxes are found from the configuration: each ``webhook`` handler keeps one file under
``service.state_dir``, named after the handler. No secret is needed to inspect them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from listener.core.errors import ConfigError
from listener.service.config import load_settings
from listener.service.inspection import add_state_arguments, print_rows, when
from listener.webhooks.handler import outbox_files
from listener.webhooks.outbox import Outbox

__all__ = ["add_webhooks_commands"]


def _open_all(args: argparse.Namespace) -> Iterator[tuple[tuple[str, ...], Outbox]]:
    settings = load_settings(args.config)
    found = False
    for file in outbox_files(settings.handlers, args.state_dir or settings.service.state_dir):
        if args.destination and args.destination not in file.destinations:
            continue
        found = True
        if not file.path.exists():
            sys.stderr.write(f"{file.path}: no outbox yet (the daemon creates it on start)\n")
            continue
        with Outbox(file.path) as outbox:
            yield file.destinations, outbox
    if not found:
        what = f"destination {args.destination!r}" if args.destination else "webhook handler"
        raise ConfigError("handlers", f"no {what} in {args.config}")


def _status(args: argparse.Namespace) -> int:
    now = time.time()
    rows = []
    for names, outbox in _open_all(args):
        for entry in outbox.stats(now, names):
            if args.destination and entry.name != args.destination:
                continue
            rows.append(
                {
                    "destination": entry.name,
                    "pending": entry.pending,
                    "oldest_age_s": round(entry.oldest_age, 1) if entry.oldest_age else 0,
                    "failing": entry.failing,
                    "dead": entry.dead,
                    "disabled": entry.disabled_reason or "no"
                    if not entry.disabled
                    else f"yes ({entry.disabled_reason})",
                }
            )
    print_rows(
        rows, args.json, ["destination", "pending", "oldest_age_s", "failing", "dead", "disabled"]
    )
    return 0


def _dead(args: argparse.Namespace) -> int:
    rows = []
    for _, outbox in _open_all(args):
        for letter in outbox.dead_letters(destination=args.destination, limit=args.limit):
            rows.append(
                {
                    "id": letter.msg_id,
                    "destination": letter.destination,
                    "event": letter.event,
                    "call_key": letter.call_key,
                    "created": when(letter.created_at),
                    "dead_since": when(letter.dead_at),
                    "attempts": letter.attempts,
                    "last_status": letter.last_status,
                    "reason": letter.reason,
                    "last_error": letter.last_error,
                }
            )
    print_rows(
        rows,
        args.json,
        ["id", "destination", "event", "created", "attempts", "last_status", "reason"],
    )
    return 0


def _since(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError("--since", f"{text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _replay(args: argparse.Namespace) -> int:
    since = _since(args.since) if args.since else None
    total = 0
    for _, outbox in _open_all(args):
        total += outbox.replay(
            time.time(), destination=args.destination, since=since, msg_ids=args.id or None
        )
    sys.stdout.write(f"replayed {total} dead letter{'s' if total != 1 else ''}\n")
    return 0


def _enable(args: argparse.Namespace) -> int:
    changed = False
    for _, outbox in _open_all(args):
        changed = outbox.enable(args.destination) or changed
    state = "enabled" if changed else "was not disabled"
    sys.stdout.write(f"{args.destination}: {state}\n")
    return 0


def add_webhooks_commands(commands: Any) -> None:
    """Add ``webhooks status|dead|replay|enable`` to the CLI's sub-parsers."""
    webhooks = commands.add_parser(
        "webhooks",
        help="inspect webhook outboxes, list and replay dead letters",
        description="Inspect and repair webhook delivery. Safe while the daemon runs: it "
        "picks up replayed and re-enabled deliveries within a second.",
    )
    sub = webhooks.add_subparsers(dest="webhooks_command", required=True, metavar="COMMAND")

    def common(parser: argparse.ArgumentParser, destination: bool = True) -> None:
        add_state_arguments(parser)
        if destination:
            parser.add_argument("--destination", "-d", help="only this destination")

    status = sub.add_parser(
        "status", help="per destination: pending, oldest, failing, dead, disabled"
    )
    common(status)
    status.add_argument("--json", action="store_true", help="one JSON object per line")
    status.set_defaults(sync=_status)

    dead = sub.add_parser("dead", help="list dead letters")
    common(dead)
    dead.add_argument("--limit", type=int, default=None)
    dead.add_argument("--json", action="store_true", help="one JSON object per line")
    dead.set_defaults(sync=_dead)

    replay = sub.add_parser("replay", help="move dead letters back to pending (same webhook-id)")
    common(replay)
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", action="append", help="a webhook-id (repeatable)")
    which.add_argument("--all", action="store_true", help="every dead letter")
    which.add_argument("--since", help="dead letters of events since this ISO 8601 time")
    replay.set_defaults(sync=_replay)

    enable = sub.add_parser("enable", help="re-enable a destination disabled by HTTP 410")
    common(enable, destination=False)
    enable.add_argument("destination", help="the destination's name")
    enable.set_defaults(sync=_enable)
