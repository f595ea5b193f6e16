"""The ``webhook`` handler end to end: daemon, socket, outbox, receiver, CLI, and kill -9."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from listener.core.errors import ConfigError
from listener.dispatch.loader import load_handler
from listener.testing import FakeSippet, running_daemon, settle
from listener.testing.receiver import ReceivedRequest, WebhookReceiver
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


def test_the_handlers_concurrency_defaults_to_32_unless_its_table_says_otherwise() -> None:
    """Each handle() only waits for the batch commit of its event: more at once, larger commits."""
    table = {"use": "webhook", "url": "https://x.example/", "secret": SECRET}
    assert load_handler(table, "handlers[0]").settings.concurrency == 32
    assert load_handler({**table, "concurrency": 4}, "handlers[0]").settings.concurrency == 4


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
    ({"rate_limit": 0}, "rate_limit"),
    ({"max_probe_interval": 0}, "max_probe_interval"),
    ({"max_probe_interval": math.inf}, "max_probe_interval"),
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
@pytest.mark.parametrize("form", ["url", "destinations", "top level of destinations"])
def test_every_invalid_key_is_named_where_it_is_written(
    change: dict[str, Any], key: str, form: str
) -> None:
    """Each bad setting stops loading with its own key, in either form and as every
    destination's default, and never with its secret."""
    table: dict[str, Any] = {"url": "https://example.com/hook"}
    if not {"secret", "secret_file"} & change.keys():
        table["secret"] = SECRET
    table.update(change)
    if form == "url":
        entry, where = {"use": "webhook", **table}, "handlers[3]"
    elif form == "destinations":
        entry = {"use": "webhook", "destinations": [{"name": "a", **table}]}
        where = "handlers[3].destinations[0]"
    else:
        shared = {name: value for name, value in table.items() if name != "url" or name in change}
        destination = {"name": "a", "url": "https://example.com/hook"}
        entry, where = {"use": "webhook", **shared, "destinations": [destination]}, "handlers[3]"
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


# A value other than the default for every key a destination can take from the top level.
_LENT = {
    "headers": {"x-team": "ops"},
    "request_timeout": 3.0,
    "retry_schedule": [1, 2],
    "ordering": "per_call",
    "max_in_flight": 2,
    "max_pending": 10,
    "max_age": 60.0,
    "rate_limit": 5.0,
    "max_probe_interval": 0.5,
}


def test_top_level_keys_are_every_destinations_defaults() -> None:
    """In the destinations form no top-level key is left unused: each one, the secret too, is
    the default of every destination, and a destination's own key replaces it whole."""
    # A setting added later is either lent here or the handler's own, never ignored.
    assert (
        _LENT.keys() | {"url", "secret", "secret_file", "destinations", "stop_grace", "retention"}
        == WebhookConfig.model_fields.keys()
    )
    own = {
        "headers": {"x-own": "1"},
        "request_timeout": 4.0,
        "retry_schedule": [3],
        "ordering": "none",
        "max_in_flight": 3,
        "max_pending": 20,
        "max_age": 120.0,
        "rate_limit": 7.0,
        "max_probe_interval": 1.5,
    }
    config = WebhookConfig.model_validate(
        {
            "secret": SECRET,
            **_LENT,
            "destinations": [
                {"name": "a", "url": "https://a.example/"},
                {"name": "b", "url": "https://b.example/", "secret": OLD_SECRET, **own},
            ],
        }
    )
    a, b = config.build("fanout", config.signing_secrets())
    assert a == Destination("a", "https://a.example/", (SECRET,), **as_destination(_LENT))
    assert b == Destination("b", "https://b.example/", (OLD_SECRET,), **as_destination(own))


def as_destination(settings: dict[str, Any]) -> dict[str, Any]:
    """A table's settings as the Destination fields they become."""
    return {
        "timeout" if key == "request_timeout" else key: (
            tuple(value) if isinstance(value, list) else value
        )
        for key, value in settings.items()
    }


def test_a_top_level_secret_file_signs_for_destinations_without_one(tmp_path: Path) -> None:
    shared = tmp_path / "shared.whsec"
    shared.write_text(f"{SECRET}\n")
    destinations = [
        {"name": "a", "url": "https://a.example/"},
        {"name": "b", "url": "https://b.example/", "secret": OLD_SECRET},
    ]
    config = WebhookConfig.model_validate(
        {"secret_file": str(shared), "destinations": destinations}
    )
    assert config.signing_secrets() == [(SECRET,), (OLD_SECRET,)]
    shared.unlink()
    with pytest.raises(ConfigError) as caught:
        load_handler(
            {"use": "webhook", "secret_file": str(shared), "destinations": destinations},
            "handlers[2]",
        )
    assert caught.value.key == "handlers[2].secret_file"


def test_a_destination_without_a_secret_anywhere_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_handler(
            {"use": "webhook", "destinations": [{"name": "a", "url": "https://a.example/"}]},
            "handlers[0]",
        )
    assert caught.value.key == "handlers[0].destinations[0].secret"
    assert "once at the top level" in caught.value.problem


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"url": "https://a.example/", "secret": SECRET, "secret_file": "a.whsec"}, "handlers[1]"),
        (
            {
                "secret": SECRET,
                "secret_file": "a.whsec",
                "destinations": [{"name": "a", "url": "https://a.example/"}],
            },
            "handlers[1]",
        ),
        (
            {
                "destinations": [
                    {
                        "name": "a",
                        "url": "https://a.example/",
                        "secret": SECRET,
                        "secret_file": "a.whsec",
                    }
                ]
            },
            "handlers[1].destinations[0]",
        ),
    ],
)
def test_secret_and_secret_file_together_are_an_error(entry: dict[str, Any], where: str) -> None:
    """Neither wins silently; the CLI, which reads no secret, refuses the table too."""
    with pytest.raises(ConfigError) as caught:
        load_handler({"use": "webhook", **entry}, "handlers[1]")
    assert caught.value.key == f"{where}.secret_file"
    assert "secret and secret_file are both given" in caught.value.problem
    assert SECRET not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        outbox_files([{"use": "log"}, {"use": "webhook", **entry}], Path("/state"))
    assert caught.value.key == f"{where}.secret_file"


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
        OutboxFile(tmp_path / "webhooks-webhook.sqlite3", ("webhook",), "webhook"),
        OutboxFile(tmp_path / "webhooks-fanout.sqlite3", ("a", "b"), "fanout"),
    ]
    assert load_handler(single, "handlers[1]").settings.name == "webhook"
    with pytest.raises(ConfigError) as caught:
        outbox_files([{"use": "webhook", "url": "ftp://x", "secret": SECRET}], tmp_path)
    assert caught.value.key == "handlers[0].url"


def config_text(
    fake: FakeSippet,
    receiver: WebhookReceiver,
    state: Path,
    schedule: str = "[0, 0.05, 0.1]",
    extra: str = "",
) -> str:
    return (
        f'[sippet]\nbase_url = "{fake.base_url}"\nheartbeat_interval = 1.0\n'
        f'[service]\nstate_dir = "{state}"\nlog_format = "json"\n'
        f'[[handlers]]\nuse = "webhook"\nname = "crm"\nurl = "{receiver.url}"\n'
        f'secret = "{SECRET}"\nretry_schedule = {schedule}\n{extra}'
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
    # A slow receiver keeps deliveries in flight when the daemon dies, however long the CLI
    # polls below take on a loaded machine (0.2 s let all 60 through before the kill).
    receiver.respond_with(200, delay=1.0)
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
    receiver.respond_with(422)
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


def test_retention_is_the_outboxs_and_must_be_positive() -> None:
    with pytest.raises(ConfigError) as caught:
        load_handler(
            {"use": "webhook", "url": "https://x.example", "secret": SECRET, "retention": 0},
            "handlers[0]",
        )
    assert caught.value.key == "handlers[0].retention"
    with pytest.raises(ConfigError) as caught:
        load_handler(
            {
                "use": "webhook",
                "destinations": [
                    {"name": "a", "url": "https://y", "secret": SECRET, "retention": 60}
                ],
            },
            "handlers[0]",
        )
    assert caught.value.key == "handlers[0].destinations[0].retention"


async def test_a_receiver_outage_with_retry_after_loses_nothing(
    fake: FakeSippet, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """The issue's outage, 6 times shorter: the receiver answers 503 with Retry-After: 1 for
    2.5 s while 100 events arrive at 100/s (the 15 s outage at 10/s); a three-try schedule of
    0.15 s that the old engine used up in the first seconds. Every event is delivered within 5 s
    of the outage's end, none is a dead letter, and probes honoured the Retry-After."""
    config = tmp_path / "config.toml"
    config.write_text(config_text(fake, receiver, tmp_path))
    daemon = await start_daemon(config, fake)
    try:
        receiver.respond_with(503, {"retry-after": "1"})
        began = time.monotonic()
        for seq in range(100):
            await fake.broadcast("call_transcript_delta", {"callUuid": f"c-{seq % 7}", "seq": seq})
            # The arrival rate is the scenario, not a wait for something to happen.
            await asyncio.sleep(0.01)
        await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - began)))
        receiver.respond_with(200)
        ended = time.time()
        await receiver.wait_until(lambda _: len(by_id(receiver)) >= 100, timeout=10)
        last = max(r.received_at for r in receiver.requests if r.status == 200)
        _, dead = await cli("webhooks", "dead", "--json", "--config", str(config))
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    assert last - ended < 5.0
    assert dead == ""
    seqs = sorted(json.loads(next(iter(b)))["data"]["seq"] for b in by_id(receiver).values())
    assert seqs == list(range(100))
    # The attempts already running when the outage began meet it together; then one probe
    # at a time, each at least the Retry-After after the one before.
    refused = sorted(r.received_at for r in receiver.requests if r.status == 503)
    probes = [at for at in refused if at - refused[0] > 0.5]
    assert 1 <= len(probes) <= 3
    gaps = [later - earlier for earlier, later in itertools.pairwise([refused[0], *probes])]
    assert min(gaps) >= 0.95


async def test_replay_by_time_range_resends_with_the_same_ids_and_attempts_show_it(
    fake: FakeSippet, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """Three batches delivered; a replay of what was delivered between two times sends the
    middle one again with the same webhook-ids (a dry run first sends nothing), and the
    attempts command prints each delivery's timeline."""
    config = tmp_path / "config.toml"
    config.write_text(config_text(fake, receiver, tmp_path))
    daemon = await start_daemon(config, fake)
    bounds = []
    try:
        for batch in range(3):
            for seq in range(batch * 3, batch * 3 + 3):
                await fake.broadcast("call_ended", {"callUuid": f"c-{seq}", "seq": seq})
            await receiver.wait_for(batch * 3 + 3)
            bounds.append(datetime.now(UTC).isoformat())
        middle = ids_of(receiver.requests[3:6])
        window = ["--since", bounds[0], "--until", bounds[1]]
        args = ["webhooks", "replay", "--destination", "crm", "--status", "delivered", *window]
        # Delivered rows are recorded with the outcome's commit, just after the answer.
        await cli_until("would replay 3 delivered", *args, "--dry-run", "--config", str(config))
        assert len(receiver.requests) == 9
        code, out = await cli(*args, "--config", str(config))
        assert (code, out.strip()) == (0, "replayed 3 delivered")
        resent = await receiver.wait_for(12)
        assert sorted(ids_of(resent[9:])) == sorted(middle)
        out = await cli_until(
            "delivered at", "webhooks", "attempts", "--id", middle[0], "--config", str(config)
        )
        lines = out.splitlines()
        assert lines[0].startswith(f"{middle[0]} to crm: delivered at ")
        assert lines[1].split() == [
            "at",
            "destination",
            "status",
            "latency_ms",
            "class",
            "note",
            "answer",
        ]
        assert [line.split()[1:3] for line in lines[2:]] == [["crm", "200"], ["crm", "200"]]
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait() == 0


def ids_of(requests: list[ReceivedRequest]) -> list[str]:
    return [request.headers["webhook-id"] for request in requests]


@pytest.mark.parametrize("fmt", ["pretty", "json"])
async def test_run_shows_each_delivery_on_a_terminal_and_not_in_the_journal(
    fake: FakeSippet, receiver: WebhookReceiver, tmp_path: Path, fmt: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(config_text(fake, receiver, tmp_path), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "run",
        "--config",
        str(config),
        "--format",
        fmt,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SIPPET_SECRET_KEY": fake.api_key},
    )
    assert process.stderr is not None
    await fake.wait_until(lambda: fake.joined_sockets >= 1)
    await fake.broadcast("incoming_call", {"callUuid": "5d1e0c7a-2b9f", "status": "ringing"})
    await receiver.wait_for(1)
    # The line, if any, is logged before the outcome is committed, so once the receiver
    # has the delivery and the daemon stops, everything it would say is on stderr.
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        logged = (await process.stderr.read()).decode()
        assert await process.wait() == 0
    if fmt == "pretty":
        assert re.search(r"--> 200 crm [\d.]+ ms  incoming_call 5d1e0c7a", logged), logged
    else:
        lines = [json.loads(line) for line in logged.splitlines()]
        assert any(line["event"] == "channel joined" for line in lines)
        assert not any(line["event"] == "webhook delivered" for line in lines)
