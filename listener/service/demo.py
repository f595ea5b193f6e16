"""The ``demo`` command: the daemon's three uses against the embedded fake Sippet, no account.

A ``log`` handler shows the calls, an ``rpc`` rule ends those from a blocked number, and a
``webhook`` handler forwards them to an embedded receiver (:class:`WebhookReceiver`), whose
deliveries the demo logs as they arrive. Once, the receiver goes down for a few seconds, so
that the destination's outage, its probes and the backlog draining show too. The status page
is served on a free loopback port, announced at start.

The only runtime module that imports the test kit (an import-linter contract says so).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import socket
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from listener.core.events import call_key_of
from listener.dispatch.loader import load_handlers
from listener.service.config import Settings, parse_settings
from listener.service.daemon import Daemon
from listener.testing.receiver import ReceivedRequest, WebhookReceiver
from listener.testing.server import FakeSippet
from listener.testing.traffic import CALLERS, simulate_calls

__all__ = ["DEMO_BLOCKED", "DEMO_RECEIVER", "demo_settings", "run_demo"]

_log = structlog.get_logger(__name__)
# The demo's rpc rule ends every call from this (simulated) caller.
DEMO_BLOCKED = CALLERS[1]
# The webhook destination's name, as the delivery lines and the status page show it.
DEMO_RECEIVER = "demo-receiver"
# The call lifecycle only: transcript deltas would double the lines and show nothing new.
_SHOWN_EVENTS = ["incoming_call", "call_answered", "call_ended"]


def demo_settings(
    base_url: str,
    state_dir: Path,
    *,
    heartbeat_interval: float,
    log_level: str,
    receiver_url: str,
    metrics_listen: str,
) -> Settings:
    """The demo's configuration: a log handler, an rpc rule ending calls from one number and
    a webhook destination; metrics and the status page on ``metrics_listen``."""
    return parse_settings(
        {
            "sippet": {"base_url": base_url, "heartbeat_interval": heartbeat_interval},
            "service": {
                "state_dir": str(state_dir),
                "log_level": log_level,
                "metrics_listen": metrics_listen,
            },
            "handlers": [
                {
                    "use": "log",
                    "events": _SHOWN_EVENTS,
                    "payload": False,
                    "fields": ["fromNumber", "toNumber", "status"],
                },
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
                {
                    "use": "webhook",
                    "name": DEMO_RECEIVER,
                    "url": receiver_url,
                    "secret": "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
                    "events": _SHOWN_EVENTS,
                    # Probes at most a second apart: the backlog drains soon after the outage.
                    "max_probe_interval": 1.0,
                    "stop_grace": 1.0,
                },
            ],
        }
    )


def _free_loopback_port() -> int:
    # The daemon binds metrics_listen itself and wants a port number; one the kernel just
    # handed out stays free in practice.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _delivery(request: ReceivedRequest) -> dict[str, Any]:
    """A received delivery's log fields; its latency is counted from the moment the daemon
    received the event, so that the deliveries of a drained backlog show how long they
    waited."""
    body = request.json()
    occurred = datetime.fromisoformat(body["occurred_at"]).timestamp()
    data = body.get("data")
    return {
        "destination": DEMO_RECEIVER,
        "status": request.status,
        "latency_ms": round(max(0.0, request.received_at - occurred) * 1000, 1),
        "event_name": body.get("type"),
        "call_key": call_key_of(data) if isinstance(data, dict) else None,
    }


async def _show_deliveries(receiver: WebhookReceiver) -> None:
    """Log each delivery the receiver gets, until cancelled."""
    shown = 0
    while True:
        with contextlib.suppress(TimeoutError):
            await receiver.wait_for(shown + 1, timeout=3600)
        for request in receiver.requests[shown:]:
            _log.info("webhook delivered", **_delivery(request))
        shown = len(receiver.requests)


async def _calls_once_joined(
    daemon: Daemon, fake: FakeSippet, calls_per_second: float, speed: float
) -> None:
    """Simulate calls from the first join on, so that the first call shows whole."""
    await daemon.session.joined.wait()
    await simulate_calls(fake, calls_per_second=calls_per_second, speed=speed)


async def _outage(receiver: WebhookReceiver, at: float, seconds: float) -> None:
    """Take the receiver down at ``at`` seconds for ``seconds``, once."""
    await asyncio.sleep(at)
    _log.info("demo: receiver down", destination=DEMO_RECEIVER, seconds=seconds)
    await receiver.down()
    await asyncio.sleep(seconds)
    await receiver.up()
    _log.info("demo: receiver up", destination=DEMO_RECEIVER)


async def run_demo(
    stop: asyncio.Event,
    *,
    token_ttl: float,
    heartbeat_interval: float,
    calls_per_second: float,
    speed: float,
    duration: float | None,
    log_level: str,
    outage_at: float,
    outage_seconds: float,
) -> int:
    """Run the daemon against a fake Sippet with simulated calls until ``stop`` is set."""
    with tempfile.TemporaryDirectory(prefix="sippet-listener-demo-") as state_dir:
        async with FakeSippet(token_ttl=token_ttl) as fake, WebhookReceiver() as receiver:
            # A strict server: the demo shows tokens being rotated before it acts.
            fake.behaviour.expiry_action = "close_socket"
            port = _free_loopback_port()
            settings = demo_settings(
                fake.base_url,
                Path(state_dir),
                heartbeat_interval=heartbeat_interval,
                log_level=log_level,
                receiver_url=receiver.url,
                metrics_listen=f"127.0.0.1:{port}",
            )
            _log.info(
                "demo: fake Sippet listening",
                base_url=fake.base_url,
                token_ttl=token_ttl,
                blocked_number=DEMO_BLOCKED,
            )
            _log.info("demo: status page", url=f"http://127.0.0.1:{port}/")
            daemon = Daemon(settings, fake.api_key, load_handlers(settings.handlers))
            background = {
                asyncio.create_task(_calls_once_joined(daemon, fake, calls_per_second, speed)),
                asyncio.create_task(_show_deliveries(receiver)),
                asyncio.create_task(_outage(receiver, outage_at, outage_seconds)),
            }
            if duration is not None:
                asyncio.get_running_loop().call_later(duration, stop.set)
            try:
                await daemon.run(stop)
            finally:
                for task in background:
                    task.cancel()
                await asyncio.wait(background)
            _log.info(
                "demo: done",
                events=daemon.dispatcher.received,
                rotations=daemon.session.rotations,
                rpc_calls=len(fake.rpc_requests),
                deliveries=len(receiver.requests),
            )
    return 0
