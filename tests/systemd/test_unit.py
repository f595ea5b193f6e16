"""The unit under a real systemd 252: start, status, reload, watchdog, stop, secrets, template,
security. The fake Sippet runs in this process on the host's loopback, which the container
shares; every call into the container runs in a thread so the fake keeps serving meanwhile."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable

import pytest

from listener.testing import FakeSippet
from tests.systemd.conftest import Container

UNIT = "sippet-listener"


@pytest.fixture
async def fake() -> AsyncIterator[FakeSippet]:
    # A key of its own per test: a leak is then unambiguous.
    async with FakeSippet(api_key=f"sk_tier_{secrets.token_hex(12)}") as server:
        yield server


async def sh(
    box: Container, script: str, *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(box.sh, script, check=check)


def config(fake: FakeSippet, handlers: str = '[[handlers]]\nuse = "log"\n') -> str:
    # state_dir is left out on purpose: the daemon follows systemd's $STATE_DIRECTORY.
    return (
        f'[sippet]\nbase_url = "{fake.base_url}"\nheartbeat_interval = 1.0\n'
        'backoff_initial = 0.2\nbackoff_max = 1.0\n[service]\nlog_format = "json"\n'
        f"drain_timeout = 5.0\n{handlers}"
    )


async def start(box: Container, *units: str) -> None:
    """``systemctl start``; on failure, the units' journal is the useful part of the report."""
    names = " ".join(units)
    done = await sh(box, f"systemctl start {names}", check=False)
    if done.returncode != 0:
        journal = (await sh(box, f"journalctl --no-pager -n 40 -u {' -u '.join(units)}")).stdout
        raise AssertionError(f"systemctl start {names} failed:\n{done.stderr}\n{journal}")


async def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``check`` (which asks the container, in a thread) until it holds."""
    async with asyncio.timeout(timeout):
        # The container's state has no event to await: poll it.
        while not await asyncio.to_thread(check):  # noqa: ASYNC110
            await asyncio.sleep(0.2)


async def install(box: Container, fake: FakeSippet, name: str = "config") -> None:
    key = "secret-key" if name == "config" else f"{name}.secret-key"
    await asyncio.to_thread(box.write, f"/etc/sippet-listener/{name}.toml", config(fake))
    await asyncio.to_thread(box.write, f"/etc/sippet-listener/{key}", fake.api_key, "0600")


def handled_by(box: Container, handler: str) -> str:
    """The payloads the ``log`` handler called ``handler`` wrote to the journal."""
    journal = box.sh(f"journalctl -u {UNIT} -o cat --no-pager").stdout
    lines = [json.loads(line) for line in journal.splitlines() if line.startswith("{")]
    return " ".join(str(line.get("payload")) for line in lines if line.get("handler") == handler)


@pytest.fixture
async def started(container: Container, fake: FakeSippet) -> AsyncIterator[Container]:
    await install(container, fake)
    await start(container, UNIT)
    yield container
    await sh(container, f"systemctl stop {UNIT}; systemctl reset-failed {UNIT}", check=False)


async def test_start_returns_once_joined_and_status_shows_the_state_line(
    started: Container, fake: FakeSippet
) -> None:
    # Type=notify: `systemctl start` came back only after READY=1, sent once joined.
    assert fake.joined_sockets == 1
    status = (await sh(started, f"systemctl status --no-pager {UNIT}")).stdout
    assert "Active: active (running)" in status
    assert re.search(r'Status: "joined events; \d+ events; log"', status), status


async def test_reload_keeps_the_socket_and_an_invalid_config_fails_it(
    started: Container, fake: FakeSippet
) -> None:
    await asyncio.to_thread(
        started.write,
        "/etc/sippet-listener/config.toml",
        config(fake, '[[handlers]]\nuse = "log"\n[[handlers]]\nuse = "log"\nname = "second"\n'),
    )
    await sh(started, f"systemctl reload {UNIT}")
    assert "second" in started.show(UNIT, "StatusText")
    assert (fake.mints, fake.joins) == (1, 1), "the reload dropped the socket"

    await asyncio.to_thread(
        started.write,
        "/etc/sippet-listener/config.toml",
        config(fake, '[[handlers]]\nuse = "log"\nlevle = "debug"\n'),
    )
    refused = await sh(started, f"systemctl reload {UNIT}", check=False)
    assert refused.returncode != 0
    journal = (await sh(started, f"journalctl -u {UNIT} -o cat --no-pager")).stdout
    assert "reload refused: handlers[0].levle: unknown key" in journal
    assert started.show(UNIT, "ActiveState") == "active"
    assert "running the previous configuration" in started.show(UNIT, "StatusText")
    await fake.broadcast("incoming_call", {"callUuid": "after-refusal"})
    await eventually(lambda: "after-refusal" in handled_by(started, "second"))
    assert (fake.mints, fake.joins) == (1, 1)


async def test_watchdog_restarts_a_daemon_cut_off_from_sippet(
    container: Container, fake: FakeSippet
) -> None:
    # Compressed: the shipped 90 s would make this tier take minutes.
    await asyncio.to_thread(
        container.write,
        f"/run/systemd/system/{UNIT}.service.d/fast.conf",
        "[Service]\nWatchdogSec=4s\nRestartSec=1s\n",
    )
    await sh(container, "systemctl daemon-reload")
    await install(container, fake)
    try:
        await start(container, UNIT)
        fake.behaviour.answer_heartbeats = False
        fake.behaviour.upgrade_status = 503
        await eventually(lambda: container.show(UNIT, "NRestarts") != "0", timeout=30)
        journal = (await sh(container, f"journalctl -u {UNIT} --no-pager")).stdout
        assert "Watchdog timeout" in journal
        fake.behaviour.answer_heartbeats = True
        fake.behaviour.upgrade_status = None
        await fake.wait_until(lambda: fake.joined_sockets == 1, timeout=30)
        await eventually(lambda: container.show(UNIT, "ActiveState") == "active")
    finally:
        await sh(
            container,
            f"systemctl stop {UNIT}; systemctl reset-failed {UNIT}; "
            f"rm -r /run/systemd/system/{UNIT}.service.d; systemctl daemon-reload",
            check=False,
        )


async def test_stop_drains_and_exits_0_and_the_key_is_nowhere(
    started: Container, fake: FakeSippet
) -> None:
    for seq in range(20):
        await fake.broadcast("incoming_call", {"callUuid": f"c-{seq}"})
    await sh(started, f"systemctl stop {UNIT}")
    assert started.show(UNIT, "Result") == "success"
    assert started.show(UNIT, "ExecMainStatus") == "0"
    journal = (await sh(started, f"journalctl -u {UNIT} -o cat --no-pager")).stdout
    lines = [json.loads(line) for line in journal.splitlines() if line.startswith("{")]
    handled = [
        line for line in lines if line.get("event") == "event received" and "c-" in str(line)
    ]
    assert len(handled) == 20, "not every event was handled before the exit"
    shown = await sh(
        started, f"systemctl show {UNIT}; systemctl status --no-pager {UNIT}", check=False
    )
    everything = shown.stdout + (await sh(started, "journalctl -o verbose --no-pager")).stdout
    assert fake.api_key not in everything


async def test_the_template_runs_two_instances_side_by_side(
    container: Container, fake: FakeSippet
) -> None:
    # README: a host runs the template or the plain unit, not both (the plain unit's state
    # directory would contain the instances'): start from a host that only had the template.
    await sh(container, "rm -rf /var/lib/sippet-listener /var/lib/private/sippet-listener")
    await install(container, fake, "acme")
    await install(container, fake, "globex")
    try:
        await start(container, f"{UNIT}@acme", f"{UNIT}@globex")
        assert fake.joined_sockets == 2
        pids = [container.show(f"{UNIT}@{name}", "MainPID") for name in ("acme", "globex")]
        uids = (await sh(container, f"ps -o uid= -p {','.join(pids)}")).stdout.split()
        # Each instance runs as a dynamic user of its own, never root.
        assert len(set(uids)) == 2
        assert "0" not in uids
    finally:
        await sh(container, f"systemctl stop {UNIT}@acme {UNIT}@globex", check=False)


async def test_the_security_exposure_stays_ok(container: Container) -> None:
    report = (await sh(container, f"systemd-analyze security --no-pager {UNIT}")).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", report)
    assert found is not None, report
    assert float(found.group(1)) <= 2.0
