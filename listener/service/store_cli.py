"""``sippet-listener store ...``: the shared PostgreSQL store, for operators; and the store's
part of ``check-config``.

``store migrate`` applies the schema's pending migrations (the daemon does so at start too);
running it twice, or on two hosts at once, is safe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from listener.cluster.database import StoreRefused, connect, probe
from listener.cluster.schema import migrate
from listener.core.errors import ConfigError
from listener.service import config

__all__ = ["add_store_commands", "check_store"]


async def check_store(settings: config.Settings) -> str:
    """Connect to the configured store once; say what it is, for check-config's line
    (``"; store: PostgreSQL 15.4 at postgresql://..."``, or nothing when there is none).

    A server that refuses the URL (password, user, database) is a configuration error; one
    that does not answer is not (the configuration may well be right, and ``run`` waits for
    it): :class:`~listener.cluster.database.StoreUnreachable` then, exit 1.

    Raises:
        ConfigError: the URL is invalid or refused.
        StoreUnreachable: nobody answered at the URL's address.
    """
    url = config.store_url(settings)
    if url is None:
        return ""
    try:
        version = await probe(url, settings.store.connect_timeout)
    except StoreRefused as exc:
        raise ConfigError(exc.key, exc.problem) from None
    return f"; store: PostgreSQL {version} at {url}"


async def _migrate(args: argparse.Namespace) -> int:
    settings = config.load_settings(args.config)
    url = config.store_url(settings)
    if url is None:
        raise ConfigError("store.url", "no store configured: nothing to migrate")
    conn = await connect(url, settings.store.connect_timeout)
    async with conn:
        applied = await migrate(conn, url)
    done = ", ".join(str(version) for version in applied.applied) or "none"
    sys.stdout.write(f"{url}: schema version {applied.version} (applied now: {done})\n")
    return 0


def add_store_commands(commands: Any) -> None:
    """Add ``store migrate`` to the CLI's sub-parsers."""
    store = commands.add_parser(
        "store",
        help="the shared PostgreSQL store ([store] url)",
        description="Operate on the PostgreSQL store that several instances share.",
    )
    actions = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    migrate_cmd = actions.add_parser(
        "migrate",
        help="apply the schema's pending migrations (the daemon also does at start)",
        description="Bring the store's schema to this version's. Idempotent; two instances "
        "migrating at once take turns (a transaction-scoped advisory lock). A schema newer "
        "than this version knows is refused (exit 1).",
    )
    migrate_cmd.add_argument(
        "--config",
        "-c",
        type=Path,
        default=config.DEFAULT_CONFIG_PATH,
        help="TOML configuration file (default: %(default)s)",
    )
    migrate_cmd.set_defaults(run=_migrate)
