"""What the commands share: how they are told where the configuration and the state are
(``--config``, ``--state-dir``), and how the inspection commands print rows."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from listener.service.config import DEFAULT_CONFIG_PATH

__all__ = ["add_config_argument", "add_state_arguments", "print_rows", "when"]


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` (``-c``), the configuration file every command but ``demo`` reads."""
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help="TOML configuration file (default: %(default)s)",
    )


def add_state_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and ``--state-dir`` (which overrides ``service.state_dir``)."""
    add_config_argument(parser)
    parser.add_argument("--state-dir", type=Path, default=None, help="override service.state_dir")


def when(timestamp: float | None, timespec: str = "seconds") -> str:
    """A time as ISO 8601 UTC (to the second by default), or ``-`` when there is none."""
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec=timespec)


def print_rows(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    """Print ``rows`` as one JSON object per line, or as a table of ``columns``."""
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row, default=str) + "\n")
        return
    table = [columns] + [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        sys.stdout.write(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            + "\n"
        )
