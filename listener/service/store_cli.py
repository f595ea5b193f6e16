"""``sippet-listener store ...``: the shared PostgreSQL store, for operators; and the store's
part of ``check-config``.

``store migrate`` applies the schema's pending migrations (the daemon does so at start too);
running it twice, or on two hosts at once, is safe. ``store status`` says what the store
holds and who leads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from listener.cluster.url import StoreUrl
from listener.core.errors import ConfigError
from listener.service import config
from listener.service.inspection import add_config_argument

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
    # Imported here: without a store, no command loads psycopg (see daemon._shared_store).
    from listener.cluster.database import StoreRefused, probe

    try:
        version = await probe(url, settings.store.connect_timeout)
    except StoreRefused as exc:
        raise ConfigError(exc.key, exc.problem) from None
    return f"; store: PostgreSQL {version} at {url}"


async def _migrate(args: argparse.Namespace) -> int:
    from listener.cluster.database import connect
    from listener.cluster.schema import migrate

    url, timeout = _configured(args)
    async with await connect(url, timeout) as conn:
        applied = await migrate(conn, url)
    done = ", ".join(str(version) for version in applied.applied) or "none"
    sys.stdout.write(f"{url}: schema version {applied.version} (applied now: {done})\n")
    return 0


async def _status(args: argparse.Namespace) -> int:
    from listener.cluster.database import connect
    from listener.cluster.status import read_status

    url, timeout = _configured(args)
    async with await connect(url, timeout) as conn:
        status = await read_status(conn, url)
    if args.json:
        sys.stdout.write(json.dumps({"store": str(url), **dataclasses.asdict(status)}) + "\n")
        return 0
    sys.stdout.write(
        f"{url}: schema {status.schema}; {status.events} events; claims: "
        f"{status.in_flight} in flight, {status.lapsed} lapsed\n"
    )
    for lease in status.leases:
        when = f"expires in {lease.expires_in:.1f} s" if lease.expires_in > 0 else "lapsed"
        sys.stdout.write(f"lease {lease.name}: {lease.holder}, term {lease.term}, {when}\n")
    return 0


def _configured(args: argparse.Namespace) -> tuple[StoreUrl, float]:
    settings = config.load_settings(args.config)
    url = config.store_url(settings)
    if url is None:
        raise ConfigError("store.url", f"no store configured in {args.config}")
    return url, settings.store.connect_timeout


def add_store_commands(commands: Any) -> None:
    """Add ``store migrate|status`` to the CLI's sub-parsers."""
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
    status_cmd = actions.add_parser(
        "status",
        help="what the store holds: schema, events, claims in flight and lapsed, leases",
        description="Read the store's schema version, how many events it records, the "
        "claims held and those lapsed unfinished (the leader hands them out again), and who "
        "holds each lease. Read-only; safe while instances run.",
    )
    status_cmd.add_argument("--json", action="store_true", help="one JSON object")
    for sub, run in ((migrate_cmd, _migrate), (status_cmd, _status)):
        add_config_argument(sub)
        sub.set_defaults(run=run)
