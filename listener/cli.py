"""The ``sippet-listener`` command.

Exit codes follow sysexits: 0 success, 78 (EX_CONFIG) for any configuration problem, 1 for
other failures, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from listener import config
from listener.errors import ConfigError
from listener.events import Event
from listener.httputil import VERSION
from listener.logs import configure_logging, register_secret
from listener.service import Daemon, stop_on_signals

__all__ = ["EX_CONFIG", "main"]

EX_CONFIG = 78
_log = structlog.get_logger(__name__)


def _print_event(event: Event) -> None:
    line = json.dumps({"event": event.name, "payload": event.payload}, separators=(",", ":"))
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _load(path: Path) -> tuple[config.Settings, str]:
    settings = config.load_settings(path)
    api_key = config.read_secret(
        config.ENV_SECRET_KEY,
        settings.sippet.api_key_file,
        config.CREDENTIAL_NAME,
        "sippet.api_key_file",
    )
    register_secret(api_key)
    return settings, api_key


async def _tail(args: argparse.Namespace) -> int:
    settings, api_key = _load(args.config)
    configure_logging(settings.service.log_level, settings.service.log_format)
    stop = asyncio.Event()
    stop_on_signals(stop)
    await Daemon(settings.sippet, api_key, _print_event).run(stop)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from listener.testing.server import FakeSippet
    from listener.testing.traffic import simulate_calls

    configure_logging(args.log_level, "auto")
    stop = asyncio.Event()
    stop_on_signals(stop)
    async with FakeSippet(token_ttl=args.token_ttl) as fake:
        # A strict server: the demo shows tokens being rotated before it acts.
        fake.behaviour.expiry_action = "close_socket"
        sippet = config.SippetSettings(
            base_url=fake.base_url, heartbeat_interval=args.heartbeat_interval
        )
        _log.info("demo: fake Sippet listening", base_url=fake.base_url, token_ttl=args.token_ttl)
        traffic = asyncio.create_task(
            simulate_calls(fake, calls_per_second=args.calls_per_second, speed=args.speed)
        )
        if args.duration is not None:
            asyncio.get_running_loop().call_later(args.duration, stop.set)
        try:
            await Daemon(sippet, fake.api_key, _print_event).run(stop)
        finally:
            traffic.cancel()
            await asyncio.wait({traffic})
    return 0


async def _check_config(args: argparse.Namespace) -> int:
    _load(args.config)
    sys.stdout.write(f"{args.config}: ok\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sippet-listener",
        description="Realtime event daemon for Sippet: keeps the events channel joined and "
        "hands every event to handlers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            "-c",
            type=Path,
            default=config.DEFAULT_CONFIG_PATH,
            help="TOML configuration file (default: %(default)s)",
        )

    tail = commands.add_parser(
        "tail",
        help="print every event as one JSON object per line",
        description="Connect with the configured key and print each event as "
        '{"event": ..., "payload": ...} on its own line, until interrupted.',
    )
    with_config(tail)
    tail.set_defaults(run=_tail)

    demo = commands.add_parser(
        "demo",
        help="run against an embedded fake Sippet with simulated calls",
        description="Start a fake Sippet server on loopback with simulated call traffic and "
        "run the daemon against it, printing what it receives. No account needed.",
    )
    demo.add_argument("--calls-per-second", type=float, default=0.5)
    demo.add_argument(
        "--speed", type=float, default=1.0, help="how much faster than real life calls progress"
    )
    demo.add_argument(
        "--token-ttl",
        type=float,
        default=20.0,
        help="lifetime of the fake server's tokens, to watch rotations",
    )
    demo.add_argument("--heartbeat-interval", type=float, default=5.0)
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    demo.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    demo.set_defaults(run=_demo)

    check = commands.add_parser(
        "check-config", help="validate the configuration and exit (0 valid, 78 invalid)"
    )
    with_config(check)
    check.set_defaults(run=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    try:
        code: int = asyncio.run(args.run(args))
        return code
    except ConfigError as exc:
        sys.stderr.write(f"sippet-listener: configuration error: {exc}\n")
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
