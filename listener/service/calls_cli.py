"""``sippet-listener calls``: the call map as the daemon last wrote it, even while it runs.

The daemon writes its map to ``calls.sqlite3`` under ``service.state_dir`` about once a
second (SQLite in WAL mode lets this command read meanwhile). No secret is needed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from listener.calls.state import CallRecord
from listener.calls.store import CallReader, store_path
from listener.service.config import load_settings
from listener.service.inspection import add_state_arguments, print_rows, when

__all__ = ["add_calls_command"]

_COLUMNS = ["call", "status", "from", "to", "started", "answered", "ended", "last_event"]


def _row(record: CallRecord, as_json: bool) -> dict[str, Any]:
    """One call: as JSON with times in epoch seconds and its origins, or written out."""
    parties: dict[str, Any] = {"from": record.from_number, "to": record.to_number}
    times: dict[str, Any] = {
        "started": record.started_at,
        "answered": record.answered_at,
        "ended": record.ended_at,
        "last_event": record.last_event_at,
    }
    extra: dict[str, Any] = {"origins": dict(record.origins)}
    if not as_json:
        parties = {column: number or "-" for column, number in parties.items()}
        times = {column: when(at) for column, at in times.items()}
        extra = {}
    return {"call": record.call_key, "status": record.status, **parties, **times, **extra}


def _calls(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or load_settings(args.config).service.state_dir
    path = store_path(state_dir)
    if not path.exists():
        sys.stderr.write(f"{path}: no call store yet (the daemon creates it on start)\n")
        return 1
    reader = CallReader(path)
    try:
        records = reader.calls()
    finally:
        reader.close()
    # Open calls first, then the most recently heard of.
    records.sort(key=lambda record: (record.status == "ended", -record.last_event_at))
    print_rows([_row(record, args.json) for record in records], args.json, _COLUMNS)
    return 0


def add_calls_command(commands: Any) -> None:
    """Add ``calls`` to the CLI's sub-parsers."""
    calls = commands.add_parser(
        "calls",
        help="print the call map (open calls first) from the state directory",
        description="Print what the daemon knows of each call, open calls first, from the "
        "call store under service.state_dir. Safe while the daemon runs; it writes the "
        "store about once a second.",
    )
    add_state_arguments(calls)
    calls.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per call, times in seconds since the epoch, with origins",
    )
    calls.set_defaults(sync=_calls)
