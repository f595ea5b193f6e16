"""The ``demo`` command: the daemon's main job against the embedded fake Sippet, no account.

The only runtime module that imports the test kit (an import-linter contract says so).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import structlog

from listener.dispatch.loader import load_handlers
from listener.service.config import Settings, parse_settings
from listener.service.daemon import Daemon
from listener.testing.server import FakeSippet
from listener.testing.traffic import CALLERS, simulate_calls

__all__ = ["DEMO_BLOCKED", "demo_settings", "run_demo"]

_log = structlog.get_logger(__name__)
# The demo's rpc rule ends every call from this (simulated) caller.
DEMO_BLOCKED = CALLERS[1]


def demo_settings(
    base_url: str, state_dir: Path, *, heartbeat_interval: float, log_level: str
) -> Settings:
    """The demo's configuration: a log handler and an rpc rule ending calls from one number."""
    return parse_settings(
        {
            "sippet": {"base_url": base_url, "heartbeat_interval": heartbeat_interval},
            "service": {"state_dir": str(state_dir), "log_level": log_level},
            "handlers": [
                {"use": "log", "payload": False, "fields": ["fromNumber", "status"]},
                {
                    "use": "rpc",
                    "rules": [
                        {
                            "on": "incoming_call",
                            "when": {"fromNumber": [DEMO_BLOCKED]},
                            "action": "end_call",
                            "input": {"callUuid": "{call_key}"},
                        }
                    ],
                },
            ],
        }
    )


async def run_demo(
    stop: asyncio.Event,
    *,
    token_ttl: float,
    heartbeat_interval: float,
    calls_per_second: float,
    speed: float,
    duration: float | None,
    log_level: str,
) -> int:
    """Run the daemon against a fake Sippet with simulated calls until ``stop`` is set."""
    with tempfile.TemporaryDirectory(prefix="sippet-listener-demo-") as state_dir:
        async with FakeSippet(token_ttl=token_ttl) as fake:
            # A strict server: the demo shows tokens being rotated before it acts.
            fake.behaviour.expiry_action = "close_socket"
            settings = demo_settings(
                fake.base_url,
                Path(state_dir),
                heartbeat_interval=heartbeat_interval,
                log_level=log_level,
            )
            _log.info(
                "demo: fake Sippet listening",
                base_url=fake.base_url,
                token_ttl=token_ttl,
                blocked_number=DEMO_BLOCKED,
            )
            traffic = asyncio.create_task(
                simulate_calls(fake, calls_per_second=calls_per_second, speed=speed)
            )
            if duration is not None:
                asyncio.get_running_loop().call_later(duration, stop.set)
            try:
                daemon = Daemon(settings, fake.api_key, load_handlers(settings.handlers))
                await daemon.run(stop)
            finally:
                traffic.cancel()
                await asyncio.wait({traffic})
            _log.info(
                "demo: done",
                events=daemon.dispatcher.received,
                rotations=daemon.session.rotations,
                rpc_calls=len(fake.rpc_requests),
            )
    return 0
