"""The ``sippet-listener`` command.

Exit codes follow sysexits: 0 success, 64 (EX_USAGE) for a command-line argument that cannot be
read, 78 (EX_CONFIG) for any configuration or handler-loading problem, 1 for other failures (a
refused key, an RPC error), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import httpx
import structlog

from listener.core.errors import ConfigError, HandlerLoadError, ListenerError, RpcActionError
from listener.core.events import Event
from listener.core.httputil import VERSION
from listener.core.logs import configure_logging, register_secret
from listener.core.pretty import event_text, resolve_format, use_colors
from listener.dispatch.handler import Context, FunctionHandler
from listener.dispatch.loader import LoadedHandler, load_handlers, loaded_instance
from listener.realtime.tokens import TokenSource
from listener.rpc.client import RpcClient
from listener.service import config
from listener.service.allocator import release_large_blocks
from listener.service.calls_cli import add_calls_command
from listener.service.daemon import Daemon, loop_factory, stop_on_signals
from listener.service.inspection import add_config_argument
from listener.service.reload import ReloadRecord, ReloadTimeout, request_reload
from listener.service.status_cli import add_status_command
from listener.service.store_cli import add_store_commands, check_store
from listener.service.webhooks_cli import add_webhooks_commands

__all__ = ["EX_CONFIG", "EX_USAGE", "main"]

EX_USAGE = 64
EX_CONFIG = 78
_log = structlog.get_logger(__name__)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


async def _print_event(event: Event, ctx: Context[None]) -> None:
    del ctx
    _print_json({"event": event.name, "payload": event.payload, "origin": event.origin})


def _tail_printer(fmt: str) -> FunctionHandler:
    """The handler ``tail`` runs: the events are its output, on stdout, whose format they
    follow (JSON objects, or one line each)."""
    colors = use_colors(sys.stdout)

    async def print_line(event: Event, ctx: Context[None]) -> None:
        del ctx
        sys.stdout.write(event_text(event, colors) + "\n")
        sys.stdout.flush()

    printer = _print_event if resolve_format(fmt, sys.stdout) == "json" else print_line
    # One worker: lines come out in the order events were taken, whatever their call.
    return FunctionHandler(printer, name="tail", concurrency=1)


def _formatted(settings: config.Settings, fmt: str | None) -> config.Settings:
    """``settings`` with ``--format``, when given, in place of ``service.log_format``."""
    if fmt is None:
        return settings
    service = settings.service.model_copy(update={"log_format": fmt})
    return settings.model_copy(update={"service": service})


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


async def _run(args: argparse.Namespace) -> int:
    release_large_blocks()
    settings, api_key = _load(args.config)
    settings = _formatted(settings, args.format)
    handlers = load_handlers(settings.handlers)
    configure_logging(settings.service.log_level, settings.service.log_format)
    stop = asyncio.Event()
    stop_on_signals(stop)
    daemon = Daemon(settings, api_key, handlers, store=config.store_url(settings))

    def load() -> tuple[config.Settings, list[LoadedHandler]]:
        # A reload keeps the command line's --format.
        fresh = _formatted(_load(args.config)[0], args.format)
        return fresh, load_handlers(fresh.handlers)

    reloads: set[asyncio.Task[None]] = set()
    generation = 0

    async def reload() -> None:
        nonlocal generation
        ok = await daemon.reload(load)
        generation += 1
        record = ReloadRecord(os.getpid(), generation, ok, daemon.last_reload_error)
        try:
            record.write(daemon.settings.service.state_dir)
        except OSError as exc:
            _log.warning("cannot record the reload's outcome", error=exc.strerror)

    def on_sighup() -> None:
        task = asyncio.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    await daemon.run(stop)
    return 0


async def _tail(args: argparse.Namespace) -> int:
    settings, api_key = _load(args.config)
    fmt = args.format or settings.service.log_format
    configure_logging(settings.service.log_level, fmt)
    stop = asyncio.Event()
    stop_on_signals(stop)
    printer = _tail_printer(fmt)
    # tail keeps nothing on disk: a daemon may be using the state directory.
    await Daemon(settings, api_key, [loaded_instance(printer)], persist=False).run(stop)
    return 0


async def _demo(args: argparse.Namespace) -> int:
    # Imported here: the demo brings the embedded fake Sippet, which no other command needs.
    from listener.service.demo import run_demo

    # The demo's receiver shows each delivery with how long it waited; the daemon's own
    # line per delivery would say each twice.
    configure_logging(args.log_level, args.format or "auto", each_delivery=False)
    stop = asyncio.Event()
    stop_on_signals(stop)
    return await run_demo(
        stop,
        token_ttl=args.token_ttl,
        heartbeat_interval=args.heartbeat_interval,
        calls_per_second=args.calls_per_second,
        speed=args.speed,
        duration=args.duration,
        log_level=args.log_level,
        outage_at=args.outage_at,
        outage_seconds=args.outage_seconds,
    )


async def _check_config(args: argparse.Namespace) -> int:
    settings, _ = _load(args.config)
    handlers = load_handlers(settings.handlers)
    names = ", ".join(item.settings.name for item in handlers) or "none"
    config.read_admin_token(settings.service)
    store = await check_store(settings)
    sys.stdout.write(f"{args.config}: ok (handlers: {names}{store})\n")
    return 0


class _UsageError(Exception):
    """A command-line argument cannot be read: the configuration is not at fault."""

    def __init__(self, flag: str, problem: str) -> None:
        super().__init__(f"{flag}: {problem}")


def _json(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _UsageError(flag, f"not valid JSON: {exc}") from None


def _json_object(text: str | None, flag: str) -> dict[str, Any] | None:
    if text is None:
        return None
    value = _json(text, flag)
    if not isinstance(value, dict):
        raise _UsageError(flag, f"must be a JSON object, not {type(value).__name__}")
    return value


def _identity(text: str | None) -> Any:
    """A bare key, as identities usually are, goes out as a string; JSON is read only where a
    key cannot be meant: an object or a quoted string. An integer goes out as a number."""
    if text is None:
        return None
    if text.startswith(("{", '"')):
        return _json(text, "--identity")
    try:
        number = json.loads(text)
    except ValueError:
        return text
    return number if type(number) is int else text


async def _rpc(args: argparse.Namespace) -> int:
    # Read before the configuration, so a typo in a flag is reported as such.
    payload: dict[str, Any] = {
        "input": _json_object(args.input, "--input"),
        "identity": _identity(args.identity),
        "fields": args.fields.split(",") if args.fields else None,
        "filter": _json_object(args.filter, "--filter"),
        "sort": args.sort,
        "page": _json_object(args.page, "--page"),
        "unchecked": args.unchecked,
    }
    settings, api_key = _load(args.config)
    async with RpcClient(settings.sippet.base_url, api_key) as client:
        if args.validate:
            result = await client.validate(args.action, **payload)
            _print_json({"success": result.ok, "errors": result.errors})
            return 0 if result.ok else 1
        try:
            data = await client.run(args.action, retry_unsafe=args.retry_unsafe, **payload)
        except RpcActionError as exc:
            _print_json({"success": False, "errors": exc.errors})
            sys.stderr.write(f"sippet-listener: {exc}\n")
            return 1
    _print_json(data)
    return 0


async def _mint_token(args: argparse.Namespace) -> int:
    settings, api_key = _load(args.config)
    async with httpx.AsyncClient() as http:
        source = TokenSource(
            http, settings.sippet.base_url, api_key, attempts=settings.sippet.mint_attempts
        )
        token = await source.mint()
    expires = datetime.fromtimestamp(token.expires_at, UTC).isoformat(timespec="seconds")
    result: dict[str, Any] = {"ttl_seconds": token.ttl, "expires_at": expires}
    if args.show:
        result["token"] = token.value
    _print_json(result)
    return 0


async def _reload(args: argparse.Namespace) -> int:
    state_dir = _reload_state_dir(args.config)
    try:
        record = await asyncio.to_thread(request_reload, args.pid, state_dir, timeout=args.timeout)
    except ProcessLookupError:
        sys.stderr.write(f"sippet-listener: reload: no process {args.pid}\n")
        return 1
    except ReloadTimeout as exc:
        sys.stderr.write(f"sippet-listener: reload: {exc}\n")
        return 1
    if not record.ok:
        sys.stderr.write(f"sippet-listener: reload refused: {record.error}\n")
        return EX_CONFIG
    sys.stdout.write("reloaded\n")
    return 0


def _reload_state_dir(path: Path) -> Path:
    """Where the daemon records reloads: systemd's $STATE_DIRECTORY, else the config's.

    The configuration is read without secrets: it may be the very file being reloaded, and
    ExecReload= may not see the credentials anyway.
    """
    directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if directory:
        return Path(directory)
    return config.load_settings(path).service.state_dir


class _Parser(argparse.ArgumentParser):
    """Every command's parser: an argument it cannot read exits 64 (EX_USAGE), not
    argparse's 2; argparse's message names the flag. Subcommands inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _with_format(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--format",
        choices=["json", "pretty"],
        default=None,
        help="log lines as JSON or one readable line per thing that happened (default: "
        "pretty on a terminal, JSON otherwise; overrides service.log_format)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sippet-listener",
        description="Realtime event daemon for Sippet: keeps the events channel joined and "
        "hands every event to handlers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    run = commands.add_parser(
        "run",
        help="run the daemon with the configured handlers",
        description="Connect, join the events channel and dispatch every event to the "
        "configured handlers until SIGTERM or Ctrl-C.",
    )
    add_config_argument(run)
    _with_format(run)
    run.set_defaults(run=_run)

    tail = commands.add_parser(
        "tail",
        help="print every event, one per line",
        description="Connect with the configured key and print each event on its own line, "
        "until interrupted: as JSON, "
        '{"event": ..., "payload": ..., "origin": ...}, when stdout is not a terminal (or '
        "with --format json), else time, event, call, from -> to and status. Configured "
        "handlers are not run.",
    )
    add_config_argument(tail)
    _with_format(tail)
    tail.set_defaults(run=_tail)

    demo = commands.add_parser(
        "demo",
        help="run against an embedded fake Sippet with simulated calls",
        description="Start a fake Sippet server and a webhook receiver on loopback with "
        "simulated call traffic and run the daemon against them with three handlers: 'log' "
        "(one line per call event), an 'rpc' rule that ends calls from one blocked number, "
        "and 'webhook' forwarding to the receiver, which goes down once for a while. The "
        "status page's address is printed at start. No account needed.",
    )
    demo.add_argument("--calls-per-second", type=float, default=0.3)
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
    demo.add_argument(
        "--outage-at",
        type=float,
        default=6.0,
        help="seconds after start when the webhook receiver goes down (default: %(default)s)",
    )
    demo.add_argument(
        "--outage-seconds",
        type=float,
        default=5.0,
        help="how long the receiver stays down (default: %(default)s)",
    )
    demo.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _with_format(demo)
    demo.set_defaults(run=_demo)

    check = commands.add_parser(
        "check-config",
        help="validate the configuration and handlers (exit 0, or 78)",
        description="Validate the configuration file, the secret key's presence and every "
        "handler's settings, without connecting. Exit 0 if valid, 78 if not.",
    )
    add_config_argument(check)
    check.set_defaults(run=_check_config)

    rpc = commands.add_parser(
        "rpc",
        help="call one Sippet RPC action and print its data as JSON",
        description="POST one action to /rpc/public/run (or /validate) with the configured "
        'key. JSON arguments are given as text, e.g. --input \'{"callUuid": '
        '"..."}\'.',
    )
    rpc.add_argument("action", help="the action, e.g. list_calls or end_call")
    rpc.add_argument("--input", help="the input object, as JSON")
    rpc.add_argument(
        "--identity",
        help="the record to act on: its key, sent as a string (an integer is sent as a number; "
        "quote it, '\"42\"', to send a string), or a JSON object",
    )
    rpc.add_argument("--fields", help="comma-separated fields to return, e.g. id,status")
    rpc.add_argument("--filter", help="the filter object, as JSON")
    rpc.add_argument("--sort", help="the sort string, e.g. -insertedAt")
    rpc.add_argument("--page", help="the page object, as JSON, e.g. '{\"limit\": 20}'")
    rpc.add_argument(
        "--validate", action="store_true", help="only validate the payload (/rpc/public/validate)"
    )
    rpc.add_argument(
        "--unchecked", action="store_true", help="send an action the built-in catalog does not know"
    )
    rpc.add_argument(
        "--retry-unsafe",
        action="store_true",
        help="retry a mutating action after a failure that may have reached Sippet",
    )
    add_config_argument(rpc)
    rpc.set_defaults(run=_rpc)

    mint = commands.add_parser(
        "mint-token",
        help="mint a realtime session token and show its expiry",
        description="Mint a session token with the configured key (checks the key works). "
        "The token itself is printed only with --show.",
    )
    mint.add_argument("--show", action="store_true", help="also print the token")
    add_config_argument(mint)
    mint.set_defaults(run=_mint_token)

    reload = commands.add_parser(
        "reload",
        help="ask the running daemon to reload its configuration, and wait for its verdict",
        description="Send SIGHUP to the daemon and wait until it has validated and applied "
        "the configuration (exit 0), or refused it and kept the running one (exit 78, with "
        "the reason). The daemon does the validation, where its secrets are readable: this "
        "is the unit's ExecReload=.",
    )
    reload.add_argument("--pid", type=int, required=True, help="the daemon's pid ($MAINPID)")
    reload.add_argument(
        "--timeout", type=float, default=60.0, help="how long to wait (default: %(default)s s)"
    )
    add_config_argument(reload)
    reload.set_defaults(run=_reload)

    add_calls_command(commands)
    add_webhooks_commands(commands)
    add_store_commands(commands)
    add_status_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    # Until a command knows its configured level: stdout carries command output only.
    configure_logging("warning", "auto")
    try:
        if hasattr(args, "sync"):
            code: int = args.sync(args)
        else:
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                code = runner.run(args.run(args))
    except _UsageError as exc:
        sys.stderr.write(f"sippet-listener: {exc}\n")
        return EX_USAGE
    except (ConfigError, HandlerLoadError) as exc:
        sys.stderr.write(f"sippet-listener: configuration error: {exc}\n")
        return EX_CONFIG
    except ListenerError as exc:
        sys.stderr.write(f"sippet-listener: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
