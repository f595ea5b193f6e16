"""``sippet-listener run`` as systemd runs it: a real process, a real notify socket, signals,
the metrics and health endpoint, reloads, and nothing secret in anything it prints."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict

from listener.core.events import Event
from listener.dispatch.handler import Context, Handler
from listener.service import daemon as daemon_module
from listener.testing import FakeSippet, running_daemon


class GatedRecorder(Handler):
    """Appends each event's call key to ``record``, ``delay`` seconds after taking it, but
    takes none before its process got SIGUSR1.

    Loaded by the daemon under test (``use = "tests.test_service:GatedRecorder"``): the signal
    and the file are how a test in another process holds it back and sees what it handled.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        record: Path
        delay: float

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.released = asyncio.Event()

    async def setup(self, ctx: Context) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.released.set)

    async def handle(self, event: Event, ctx: Context) -> None:
        await self.released.wait()
        await asyncio.sleep(self.config.delay)
        with self.config.record.open("a") as record:
            record.write(f"{event.call_key}\n")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServiceProcess:
    """The daemon in a child process, with its notify socket and its log file."""

    def __init__(self, tmp_path: Path, fake: FakeSippet) -> None:
        self.fake = fake
        self.config = tmp_path / "config.toml"
        self.log = tmp_path / "daemon.log"
        self.port = free_port()
        self.notify_path = tmp_path / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        self.messages: list[str] = []
        self.process: asyncio.subprocess.Process | None = None

    def write_config(
        self,
        handlers: str = '[[handlers]]\nuse = "log"\n',
        extra: str = "",
        log_level: str = "debug",
    ) -> None:
        self.config.write_text(
            f'[sippet]\nbase_url = "{self.fake.base_url}"\nheartbeat_interval = 0.5\n'
            "backoff_initial = 0.05\nbackoff_max = 0.2\n"
            f'[service]\nstate_dir = "{self.config.parent}"\nlog_format = "json"\n'
            f'log_level = "{log_level}"\nmetrics_listen = "127.0.0.1:{self.port}"\n'
            f"drain_timeout = 2.0\n{extra}{handlers}"
        )

    async def start(self, *, watchdog_usec: int | None = None) -> None:
        env = {
            **os.environ,
            "SIPPET_SECRET_KEY": self.fake.api_key,
            "NOTIFY_SOCKET": str(self.notify_path),
        }
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        if self.log.exists():
            # Each run's log of its own (``log`` is the latest): a restarted instance's
            # earlier life is what a failure is often about.
            earlier = len(list(self.log.parent.glob("daemon.*.log")))
            self.log.rename(self.log.with_name(f"daemon.{earlier + 1}.log"))
        with self.log.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "listener.service.cli",
                "run",
                "--config",
                str(self.config),
                stderr=log,
                env=env,
            )

    async def message(self, starts: str, timeout: float = 10.0) -> str:
        """The next notification starting with ``starts`` (earlier ones are kept)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                data = (await loop.sock_recv(self.notify, 4096)).decode()
                self.messages.append(data)
                if data.startswith(starts):
                    return data

    def pending_messages(self) -> list[str]:
        """Notifications already waiting, without blocking."""
        found = []
        while True:
            try:
                found.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                self.messages.extend(found)
                return found

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient() as client:
            return await client.get(f"http://127.0.0.1:{self.port}{path}")

    async def poll(self, path: str, check: Callable[[httpx.Response], bool]) -> str:
        """GET ``path`` until ``check`` holds: the state lives in another process."""
        async with asyncio.timeout(10):
            while True:
                response = await self.get(path)
                if check(response):
                    return response.text
                await asyncio.sleep(0.02)

    async def signal_and_wait(self, signum: int, timeout: float = 10.0) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        async with asyncio.timeout(timeout):
            return await self.process.wait()

    def log_lines(self) -> list[dict[str, object]]:
        return [
            json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")
        ]

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.notify.close()


@pytest.fixture
async def service(tmp_path: Path, fake: FakeSippet) -> AsyncIterator[ServiceProcess]:
    process = ServiceProcess(tmp_path, fake)
    process.write_config()
    yield process
    await process.stop()


async def test_ready_only_after_join_and_readyz_follows_the_link(
    service: ServiceProcess, fake: FakeSippet
) -> None:
    fake.behaviour.refuse_joins = True
    await service.start()
    await fake.wait_until(lambda: fake.join_refusals >= 2)
    assert not [m for m in service.pending_messages() if "READY=1" in m]
    assert (await service.get("/readyz")).status_code == 503
    assert (await service.get("/healthz")).status_code == 200

    fake.behaviour.refuse_joins = False
    ready = await service.message("READY=1")
    assert "STATUS=joined events" in ready
    readyz = await service.get("/readyz")
    assert (readyz.status_code, readyz.json()["reason"]) == (200, "joined")

    # The server goes away: readiness drops until the link is back.
    fake.behaviour.upgrade_status = 503
    await fake.drop_all()
    await service.poll("/readyz", lambda r: r.status_code == 503)
    fake.behaviour.upgrade_status = None
    await service.poll("/readyz", lambda r: r.status_code == 200)
    assert await service.signal_and_wait(signal.SIGTERM) == 0


async def test_watchdog_pings_only_while_heartbeats_are_answered(
    service: ServiceProcess, fake: FakeSippet
) -> None:
    await service.start(watchdog_usec=200_000)  # a ping is due every 0.1 s
    await service.message("READY=1")
    await service.message("WATCHDOG=1")
    fake.behaviour.answer_heartbeats = False
    fake.behaviour.refuse_joins = True
    await fake.drop_all()
    await fake.wait_until(lambda: fake.join_refusals >= 1)
    service.pending_messages()
    refusals = fake.join_refusals
    # Not joined: five periods without a ping, while the daemon is alive and retrying, so the
    # silence comes from the health check and not from a stuck or dead process.
    with pytest.raises(TimeoutError):
        await service.message("WATCHDOG=1", timeout=0.5)
    assert service.process is not None
    assert service.process.returncode is None
    assert fake.join_refusals > refusals, "the daemon stopped retrying during the silence"
    fake.behaviour.answer_heartbeats = True
    fake.behaviour.refuse_joins = False
    await service.message("WATCHDOG=1")
    assert await service.signal_and_wait(signal.SIGTERM) == 0


async def test_sighup_applies_a_valid_config_and_keeps_the_socket(
    service: ServiceProcess, fake: FakeSippet
) -> None:
    await service.start()
    await service.message("READY=1")
    service.write_config(
        handlers=(
            '[[handlers]]\nuse = "log"\n'
            '[[handlers]]\nuse = "log"\nname = "calls-only"\nevents = ["call_*"]\n'
        )
    )
    assert service.process is not None
    service.process.send_signal(signal.SIGHUP)
    reloading = await service.message("RELOADING=1")
    monotonic_usec = int(reloading.split("MONOTONIC_USEC=")[1].split()[0])
    assert abs(monotonic_usec - time.monotonic_ns() // 1000) < 30_000_000
    after = await service.message("READY=1")
    assert "calls-only" in after
    await fake.broadcast("call_ended", {"callUuid": "c-1"})
    await fake.broadcast("incoming_call", {"callUuid": "c-2"})
    await service.poll("/metrics", lambda r: 'handler="calls-only",outcome="ok"} 1.0' in r.text)
    assert (fake.mints, fake.joins) == (1, 1), "the reload dropped the socket"
    assert await service.signal_and_wait(signal.SIGTERM) == 0


async def test_sighup_with_an_invalid_config_keeps_the_old_one(
    service: ServiceProcess, fake: FakeSippet
) -> None:
    await service.start()
    await service.message("READY=1")
    service.write_config(handlers='[[handlers]]\nuse = "log"\nlevle = "debug"\n')
    assert service.process is not None
    service.process.send_signal(signal.SIGHUP)
    await service.message("RELOADING=1")
    refused = await service.message("READY=1")
    assert "reload failed: handlers[0].levle: unknown key; did you mean 'level'?" in refused
    assert "running the previous configuration" in refused
    await fake.broadcast("incoming_call", {"callUuid": "c-1"})
    await service.poll("/metrics", lambda r: 'handler="log",outcome="ok"} 1.0' in r.text)
    assert await service.signal_and_wait(signal.SIGTERM) == 0
    assert any(
        line["event"] == "reload refused; the previous configuration keeps running"
        for line in service.log_lines()
    )


async def test_sigterm_handles_every_accepted_event_before_exiting_0(
    service: ServiceProcess, fake: FakeSippet, tmp_path: Path
) -> None:
    record = tmp_path / "handled"
    service.write_config(
        handlers=(
            '[[handlers]]\nuse = "tests.test_service:GatedRecorder"\nconcurrency = 1\n'
            f'record = "{record}"\ndelay = 0.02\n'
        )
    )
    await service.start()
    await service.message("READY=1")
    calls = [f"c-{seq}" for seq in range(20)]
    for call in calls:
        await fake.broadcast("incoming_call", {"callUuid": call})
    await service.poll(
        "/metrics",
        lambda r: 'sippet_listener_events_received_total{event="incoming_call"} 20.0' in r.text,
    )
    assert not record.exists(), "the handler is held: nothing can have been handled yet"
    assert service.process is not None
    service.process.send_signal(signal.SIGTERM)
    await service.message("STOPPING=1")
    await fake.wait_until(lambda: fake.stats()["sockets"] == 0)
    # The link is gone and 20 x 20 ms of work is left: only a drain lets the handler do it.
    service.process.send_signal(signal.SIGUSR1)
    async with asyncio.timeout(10):
        assert await service.process.wait() == 0
    handled = record.read_text().split() if record.exists() else []
    assert handled == calls


async def test_metrics_count_what_happened_and_no_secret_is_printed(
    service: ServiceProcess, fake: FakeSippet
) -> None:
    fake.token_ttl = 1.0
    await service.start()
    await service.message("READY=1")
    for seq in range(3):
        await fake.broadcast("incoming_call", {"callUuid": f"c-{seq}"})
    await fake.broadcast("brand_new_event", {})
    await fake.wait_until(lambda: fake.mints >= 2)
    text = ""
    async with asyncio.timeout(10):
        while "sippet_listener_token_rotations_total 1.0" not in text:
            text = (await service.get("/metrics")).text
            await asyncio.sleep(0.02)
    assert 'sippet_listener_events_received_total{event="incoming_call"} 3.0' in text
    assert 'sippet_listener_events_received_total{event="brand_new_event"} 1.0' in text
    assert 'sippet_listener_token_mints_total{outcome="ok"}' in text
    assert "sippet_listener_socket_joined 1.0" in text
    assert "sippet_listener_heartbeat_rtt_seconds_count" in text
    assert await service.signal_and_wait(signal.SIGTERM) == 0
    output = service.log.read_text()
    assert "session_token=[REDACTED]" in output, "debug logs should show the redacted URL"
    assert fake.api_key not in output
    assert not [token for token in fake._tokens if token in output]


class _Cycle:
    """One half of a reference cycle (weakly referable, so that its collection shows)."""

    def __init__(self) -> None:
        self.other: object = None


async def test_a_cycle_that_reached_the_oldest_generation_is_collected_on_a_timer(
    fake: FakeSippet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Garbage in the oldest generation goes within the collection period, not whenever a
    full collection comes round."""
    monkeypatch.setattr(daemon_module, "_COLLECT_EVERY", 0.2)
    async with running_daemon(fake, [{"use": "log"}]):
        first, second = _Cycle(), _Cycle()
        first.other, second.other = second, first
        collected = asyncio.Event()
        weakref.finalize(first, collected.set)
        gc.collect(1)  # reachable now: moved to the oldest generation
        del first, second
        await asyncio.wait_for(collected.wait(), 5)
