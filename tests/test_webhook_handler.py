"""The ``webhook`` handler end to end: daemon, socket, outbox, receiver, CLI, and kill -9."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from listener.core.errors import ConfigError
from listener.dispatch.loader import load_handler
from listener.testing import FakeSippet, running_daemon, settle
from listener.testing.receiver import WebhookReceiver
from listener.webhooks.config import WebhookConfig
from listener.webhooks.destination import Destination
from listener.webhooks.handler import OutboxFile, outbox_files

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_dGhlIG9sZCBzZWNyZXQgc3RpbGwgdmFsaWQ="
CLI = [sys.executable, "-m", "listener.service.cli"]


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as server:
        yield server


def by_id(receiver: WebhookReceiver) -> dict[str, set[bytes]]:
    """Every body received, grouped by webhook-id."""
    seen: dict[str, set[bytes]] = {}
    for request in receiver.requests:
        if request.status // 100 == 2:
            seen.setdefault(request.headers["webhook-id"], set()).add(request.body)
    return seen


async def test_events_are_forwarded_signed_with_every_secret(
    fake: FakeSippet, receiver: WebhookReceiver
) -> None:
    handler = {
        "use": "webhook",
        "url": receiver.url,
        "secret": [SECRET, OLD_SECRET],
        "events": ["call_*"],
        "headers": {"x-team": "ops"},
    }
    async with running_daemon(fake, [handler]) as daemon:
        payload = {"callUuid": "c-1", "status": "completed", "blob": {"nested": [1, 2]}}
        await fake.broadcast("call_ended", payload)
        await fake.broadcast("incoming_call", {"callUuid": "c-2"})
        await settle(daemon, 2)
        [request] = await receiver.wait_for(1)
    body = json.loads(request.body)
    assert body["type"] == "call_ended"
    assert body["data"] == payload
    assert body["topic"] == "events"
    assert body["id"] == request.headers["webhook-id"]
    assert body["occurred_at"].endswith("Z")
    assert request.headers["x-team"] == "ops"
    assert request.headers["user-agent"].startswith("sippet-listener/")
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, OLD_SECRET):
        assert Webhook(secret).verify(request.body, request.headers) == body


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_handler({"use": "webhook", "url": "ftp://x", "secret": SECRET}, "handlers[2]")
    assert caught.value.key == "handlers[2].url"
    with pytest.raises(ConfigError) as caught:
        load_handler({"use": "webhook", "url": "https://x.example"}, "handlers[0]")
    assert caught.value.key == "handlers[0].secret"
    with pytest.raises(ConfigError) as caught:
        load_handler(
            {"use": "webhook", "url": "https://x.example", "secret": "whsec_short"}, "handlers[0]"
        )
    assert caught.value.key == "handlers[0].secret"
    assert "whsec_short" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_handler(
            {
                "use": "webhook",
                "url": "https://x",
                "secret": SECRET,
                "destinations": [{"name": "a", "url": "https://y", "secret": SECRET}],
            },
            "handlers[0]",
        )
    assert "either url" in caught.value.problem


_SHARED_KEYS = [
    ({"url": "ftp://example.com/"}, "url"),
    ({"url": "/relative"}, "url"),
    ({"secret": []}, "secret"),
    ({"secret": [SECRET, "whsec_"]}, "secret"),
    ({"secret_file": "/nonexistent/crm.whsec"}, "secret_file"),
    ({"headers": {"Webhook-Signature": "x"}}, "headers"),
    ({"request_timeout": 0}, "request_timeout"),
    ({"request_timeout": math.inf}, "request_timeout"),
    ({"retry_schedule": []}, "retry_schedule"),
    ({"retry_schedule": [0, -1]}, "retry_schedule"),
    ({"retry_schedule": [0, math.nan]}, "retry_schedule"),
    ({"ordering": "fifo"}, "ordering"),
    ({"max_in_flight": 0}, "max_in_flight"),
    ({"max_pending": 0}, "max_pending"),
    ({"max_age": 0}, "max_age"),
]


@pytest.mark.parametrize(("change", "key"), _SHARED_KEYS)
@pytest.mark.parametrize("form", ["url", "destinations"])
def test_every_invalid_key_is_named_where_it_is_written(
    change: dict[str, Any], key: str, form: str
) -> None:
    """Each bad setting stops loading with its own key, in either form, and never its secret."""
    table = {"url": "https://example.com/hook", "secret": SECRET, **change}
    if form == "url":
        entry, where = {"use": "webhook", **table}, "handlers[3]"
    else:
        entry = {"use": "webhook", "destinations": [{"name": "a", **table}]}
        where = "handlers[3].destinations[0]"
    with pytest.raises(ConfigError) as caught:
        load_handler(entry, "handlers[3]")
    assert caught.value.key == f"{where}.{key}"
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("destinations", "key", "problem"),
    [
        ([{"name": "a", "events": []}], "destinations[0].events", "at least one glob"),
        ([{"name": "bad name"}], "destinations[0].name", "pattern"),
        ([{"name": "a"}, {"name": "a"}], "destinations", "duplicate destination names: a"),
    ],
)
def test_destination_table_keys_are_named(
    destinations: list[dict[str, Any]], key: str, problem: str
) -> None:
    tables = [{"url": "https://example.com/", "secret": SECRET, **item} for item in destinations]
    with pytest.raises(ConfigError) as caught:
        load_handler({"use": "webhook", "destinations": tables}, "handlers[1]")
    assert caught.value.key == f"handlers[1].{key}"
    assert problem in caught.value.problem


def test_validated_settings_become_destinations_with_the_same_defaults(tmp_path: Path) -> None:
    """A table with only the required keys gives a Destination with its own defaults; a
    secret file holds one secret per line during a rotation."""
    secret_file = tmp_path / "crm.whsec"
    secret_file.write_text(f"{SECRET}\n{OLD_SECRET}\n")
    config = WebhookConfig.model_validate(
        {"url": "https://example.com/", "secret_file": str(secret_file)}
    )
    [hook] = config.build("crm", config.signing_secrets())
    assert hook == Destination("crm", "https://example.com/", (SECRET, OLD_SECRET))
    with pytest.raises(ConfigError) as caught:
        config.build("my crm", config.signing_secrets())
    assert caught.value.key == "name"


def test_outbox_files_are_named_as_the_daemon_names_them(tmp_path: Path) -> None:
    """The CLI's view of the outboxes, without reading a secret."""
    single = {"use": "webhook", "url": "https://example.com/", "secret": SECRET}
    fanout = {
        "use": "webhook",
        "name": "fanout",
        "events": ["call_*"],
        "destinations": [
            {"name": "a", "url": "https://a.example/", "secret_file": "/not/read.whsec"},
            {"name": "b", "url": "https://b.example/", "secret": SECRET},
        ],
    }
    files = outbox_files([{"use": "log"}, single, fanout], tmp_path)
    assert files == [
        OutboxFile(tmp_path / "webhooks-webhook.sqlite3", ("webhook",)),
        OutboxFile(tmp_path / "webhooks-fanout.sqlite3", ("a", "b")),
    ]
    assert load_handler(single, "handlers[1]").settings.name == "webhook"
    with pytest.raises(ConfigError) as caught:
        outbox_files([{"use": "webhook", "url": "ftp://x", "secret": SECRET}], tmp_path)
    assert caught.value.key == "handlers[0].url"


def config_text(
    fake: FakeSippet, receiver: WebhookReceiver, state: Path, schedule: str = "[0, 0.05, 0.1]"
) -> str:
    return (
        f'[sippet]\nbase_url = "{fake.base_url}"\nheartbeat_interval = 1.0\n'
        f'[service]\nstate_dir = "{state}"\nlog_format = "json"\n'
        f'[[handlers]]\nuse = "webhook"\nname = "crm"\nurl = "{receiver.url}"\n'
        f'secret = "{SECRET}"\nretry_schedule = {schedule}\n'
    )


async def start_daemon(config: Path, fake: FakeSippet) -> asyncio.subprocess.Process:
    joins = fake.joins
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "run",
        "--config",
        str(config),
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "SIPPET_SECRET_KEY": fake.api_key},
    )
    await fake.wait_until(lambda: fake.joins > joins and fake.joined_sockets >= 1)
    return process


async def cli(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def cli_until(check: str, *args: str) -> str:
    """Run a CLI command until its output contains ``check``: the state it reads lives in
    another process's SQLite file, so there is no event to wait on."""
    async with asyncio.timeout(10):
        while True:
            _, out = await cli(*args)
            if check in out:
                return out
            await asyncio.sleep(0.05)


async def test_kill_9_mid_delivery_loses_nothing(
    fake: FakeSippet, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(config_text(fake, receiver, tmp_path))
    # A slow receiver keeps deliveries in flight when the daemon dies.
    receiver.respond_with(200, delay=0.2)
    daemon = await start_daemon(config, fake)
    for seq in range(60):
        await fake.broadcast("call_transcript_delta", {"callUuid": f"c-{seq % 4}", "seq": seq})
    # Every event committed (the CLI reads the same outbox), a few delivered: now kill -9.
    async with asyncio.timeout(15):
        while True:
            _, out = await cli("webhooks", "status", "--json", "--config", str(config))
            pending = json.loads(out.splitlines()[0])["pending"]
            if pending + len(by_id(receiver)) >= 60 and receiver.requests:
                break
            await receiver.wait_for(len(receiver.requests) + 1, timeout=5)
    daemon.send_signal(signal.SIGKILL)
    await daemon.wait()
    delivered_before = len(by_id(receiver))
    assert delivered_before < 60, "everything was delivered before the kill: test proves nothing"

    receiver.respond_with(200)
    daemon = await start_daemon(config, fake)
    try:
        await receiver.wait_until(lambda _: len(by_id(receiver)) >= 60, timeout=20)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    seen = by_id(receiver)
    # At least once, and a redelivery is the same message under the same webhook-id.
    assert all(len(bodies) == 1 for bodies in seen.values())
    seqs = sorted(json.loads(next(iter(bodies)))["data"]["seq"] for bodies in seen.values())
    assert seqs == list(range(60))


async def test_cli_lists_replays_dead_letters_and_re_enables_while_running(
    fake: FakeSippet, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(config_text(fake, receiver, tmp_path))
    receiver.respond_with(500)
    daemon = await start_daemon(config, fake)
    try:
        await fake.broadcast("call_ended", {"callUuid": "c-1"})
        # Three attempts on the [0, 0.05, 0.1] schedule, then a dead letter.
        await receiver.wait_for(3)
        async with asyncio.timeout(10):
            while True:
                code, out = await cli("webhooks", "dead", "--json", "--config", str(config))
                if out.strip():
                    break
                await asyncio.sleep(0.05)
        letter = json.loads(out.splitlines()[0])
        assert (code, letter["destination"], letter["event"], letter["attempts"]) == (
            0,
            "crm",
            "call_ended",
            3,
        )
        assert letter["id"] == receiver.requests[0].headers["webhook-id"]

        receiver.respond_with(200)
        code, out = await cli("webhooks", "replay", "--all", "--config", str(config))
        assert (code, out.strip()) == (0, "replayed 1 dead letter")
        [redelivered] = [r for r in await receiver.wait_for(4) if r.status == 200]
        assert redelivered.headers["webhook-id"] == letter["id"]

        receiver.respond_with(410)
        await fake.broadcast("call_ended", {"callUuid": "c-2"})
        await receiver.wait_for(5)
        await cli_until("yes (", "webhooks", "status", "--config", str(config))
        receiver.respond_with(200)
        code, out = await cli("webhooks", "enable", "crm", "--config", str(config))
        assert (code, out.strip()) == (0, "crm: enabled")
        await receiver.wait_until(lambda requests: requests[-1].status == 200, timeout=10)
        assert json.loads(receiver.requests[-1].body)["data"] == {"callUuid": "c-2"}
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait() == 0
