"""``sippet-listener webhooks ...``: inspect and repair webhook outboxes, even while the
daemon runs (SQLite in WAL mode serves both).

Outboxes are found from the configuration: each ``webhook`` handler keeps one file under
``service.state_dir``, named after the handler, or, with a shared store (``[store] url``),
the outbox of that name in the store, which every instance delivers from. No webhook secret
is needed to inspect them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from listener.core.errors import ConfigError
from listener.service.config import load_settings, store_url
from listener.service.inspection import add_state_arguments, print_rows, when

if TYPE_CHECKING:
    from listener.webhooks.outbox_store import OutboxStore, ReplaySource

__all__ = ["add_webhooks_commands"]


def _open_all(args: argparse.Namespace) -> Iterator[tuple[tuple[str, ...], OutboxStore]]:
    # Imported here: every command parser is built on each start, and `run` without a
    # webhook handler must not load the webhook stack (about 4 MiB; bench/README.md).
    from listener.webhooks.handler import outbox_files
    from listener.webhooks.outbox import Outbox

    settings = load_settings(args.config)
    shared = store_url(settings)
    found = False
    for file in outbox_files(settings.handlers, args.state_dir or settings.service.state_dir):
        if args.destination and args.destination not in file.destinations:
            continue
        found = True
        if shared is not None:
            from listener.webhooks.shared_outbox import SharedOutbox

            timeout = settings.store.connect_timeout
            # It never claims, so its holder name is only for the record.
            with SharedOutbox(shared, file.name, holder="cli", connect_timeout=timeout) as store:
                yield file.destinations, store
            continue
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


def _moment(text: str) -> float:
    """An ISO 8601 time (UTC unless it says otherwise) as seconds since the epoch; a flag's
    type, so that a bad one exits 64 naming the flag, before any configuration is read."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


_SOURCES: dict[str, tuple[ReplaySource, ...]] = {
    "dead": ("dead",),
    "delivered": ("delivered",),
    "all": ("dead", "delivered"),
}


def _replay(args: argparse.Namespace) -> int:
    narrowed = args.id or args.since is not None or args.until is not None
    if args.all and narrowed:
        raise ConfigError("--all", "replays everything: drop --id, --since and --until")
    if not (args.all or narrowed or args.destination):
        raise ConfigError(
            "replay", "say what to replay: --destination, --since/--until, --id or --all"
        )
    sources = _SOURCES[args.status]
    moved = dict.fromkeys(sources, 0)
    for _, outbox in _open_all(args):
        found = outbox.replay(
            time.time(),
            sources=sources,
            destination=args.destination,
            since=args.since,
            until=args.until,
            msg_ids=args.id or None,
            dry_run=args.dry_run,
        )
        for source, count in found.items():
            moved[source] += count
    counts = [
        f"{count} delivered" if source == "delivered" else f"{count} dead letter{_s(count)}"
        for source, count in moved.items()
    ]
    verb = "would replay" if args.dry_run else "replayed"
    sys.stdout.write(f"{verb} {', '.join(counts)}\n")
    return 0


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _answer_text(answer: bytes, limit: int | None) -> str:
    text = answer.decode("utf-8", "replace")
    if limit is None:
        return text
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _attempts(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    notes = []
    for _, outbox in _open_all(args):
        attempts = [
            a for a in outbox.attempts(args.id) if args.destination in (None, a.destination)
        ]
        for destination in dict.fromkeys(a.destination for a in attempts):
            found = outbox.whereabouts(destination, args.id)
            state = "no longer in the outbox" if found is None else found[0]
            if found is not None and found[1] is not None:
                state += f" at {when(found[1])}"
            notes.append(f"{args.id} to {destination}: {state}")
        for attempt in attempts:
            flags = [] if attempt.counted or attempt.error_class is None else ["not counted"]
            if attempt.probe:
                flags.insert(0, "probe")
            rows.append(
                {
                    "at": when(attempt.at, "milliseconds"),
                    "destination": attempt.destination,
                    "status": "-" if attempt.status is None else attempt.status,
                    "latency_ms": round(attempt.latency * 1000, 1),
                    "class": attempt.error_class or "-",
                    "note": ", ".join(flags) or "-",
                    "error": attempt.error,
                    "answer": _answer_text(attempt.answer, None if args.json else 60),
                }
            )
    if not rows:
        sys.stderr.write(f"{args.id}: no attempt on record (never made, or pruned)\n")
        return 1
    if not args.json:
        sys.stdout.write("".join(note + "\n" for note in notes))
    print_rows(
        rows,
        args.json,
        ["at", "destination", "status", "latency_ms", "class", "note", "answer"],
    )
    return 0


def _enable(args: argparse.Namespace) -> int:
    changed = False
    for _, outbox in _open_all(args):
        changed = outbox.enable(args.destination) or changed
    state = "enabled" if changed else "was not disabled"
    sys.stdout.write(f"{args.destination}: {state}\n")
    return 0


def add_webhooks_commands(commands: Any) -> None:
    """Add ``webhooks status|dead|replay|attempts|enable`` to the CLI's sub-parsers."""
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

    replay = sub.add_parser(
        "replay",
        help="send dead or delivered deliveries again (same webhook-id, at the rate limit)",
        description="Move the selected deliveries back to pending: the daemon sends them "
        "again with their webhook-id, at the destination's rate_limit. Times are the events' "
        "(when they were enqueued), ISO 8601, UTC unless they say otherwise.",
    )
    common(replay)
    replay.add_argument("--id", action="append", help="a webhook-id (repeatable)")
    replay.add_argument("--all", action="store_true", help="every one (of --status)")
    replay.add_argument("--since", type=_moment, help="events enqueued at or after this time")
    replay.add_argument("--until", type=_moment, help="events enqueued before this time")
    replay.add_argument(
        "--status",
        choices=tuple(_SOURCES),
        default="dead",
        help="dead letters, delivered deliveries (kept for the handler's retention) or both"
        " (default: %(default)s)",
    )
    replay.add_argument("--dry-run", action="store_true", help="only count what would be replayed")
    replay.set_defaults(sync=_replay)

    attempts = sub.add_parser(
        "attempts", help="one message's attempts: time, status, latency, class, answer"
    )
    common(attempts)
    attempts.add_argument("--id", required=True, help="the webhook-id")
    attempts.add_argument("--json", action="store_true", help="one JSON object per line")
    attempts.set_defaults(sync=_attempts)

    enable = sub.add_parser("enable", help="re-enable a destination disabled by HTTP 410")
    common(enable, destination=False)
    enable.add_argument("destination", help="the destination's name")
    enable.set_defaults(sync=_enable)
