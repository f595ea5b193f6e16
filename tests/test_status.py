"""The status page's server side against the real daemon and the fake Sippet, over real HTTP:
``/status``, the ``status`` command's exit codes, escaping, the admin gate, and the live
feed's clients that leave or never read. The page in a browser: ``test_status_browser.py``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from listener.core.errors import ConfigError
from listener.core.events import Event
from listener.dispatch.handler import Context, FunctionHandler
from listener.service.config import ServiceSettings, read_admin_token
from listener.service.daemon import Daemon
from listener.service.status_cli import status_lines
from listener.testing import FakeSippet, running_daemon, settle
from listener.testing.receiver import WebhookReceiver
from tests.test_cli import run_cli
from tests.test_service import free_port

SECRET = "whsec_" + base64.b64encode(b"\x01" * 32).decode()
ADMIN = "admin-token-for-tests-0123456789"


async def _nothing(event: Event, ctx: Context[None]) -> None:
    del event, ctx


def _webhook(receiver: WebhookReceiver, **extra: Any) -> dict[str, Any]:
    return {
        "use": "webhook",
        "name": "crm",
        "url": receiver.url,
        "secret": SECRET,
        "retry_schedule": [0, 0.05],
        "max_probe_interval": 0.1,
        **extra,
    }


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver() as server:
        yield server


async def _get(port: int, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return await client.get(path, **kwargs)


async def _until(check: Any, timeout: float = 5.0) -> None:
    """Poll ``check``: the state changes in the daemon's own tasks, with nothing to wait on."""
    async with asyncio.timeout(timeout):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


def _config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[service]\nmetrics_listen = "127.0.0.1:{port}"\n')
    return path


async def test_status_json_and_the_status_command_exit_0_healthy_1_unhealthy_2_unreachable(
    fake: FakeSippet, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    port = free_port()
    config = _config(tmp_path, port)
    code, _, err = await run_cli("status", "--config", str(config))
    assert code == 2
    assert "cannot reach the daemon" in err
    async with running_daemon(
        fake, [_webhook(receiver)], service={"metrics_listen": f"127.0.0.1:{port}"}
    ) as daemon:
        await fake.call_event("incoming_call", "c-status", fromNumber="+100", toNumber="+200")
        await settle(daemon, 1)
        await receiver.wait_for(1)
        snapshot = (await _get(port, "/status")).json()
        assert snapshot["ok"] is True
        assert snapshot["link"]["joined"] is True
        assert snapshot["link"]["token_remaining"] > 0
        assert [entry["name"] for entry in snapshot["handlers"]] == ["crm"]
        assert snapshot["calls"]["open"][0]["from"] == "+100"
        assert snapshot["events"][0]["outcomes"][0]["outcome"] == "ok"
        code, out, _ = await run_cli("status", "--config", str(config))
        assert code == 0
        assert "link: joined events" in out
        assert "crm healthy" in out
        assert out.rstrip().endswith("status: ok")

        await receiver.down()
        await fake.call_event("call_ended", "c-status")
        await _until(lambda: not daemon.board.snapshot()["ok"])
        code, out, _ = await run_cli("status", "--config", str(config))
        assert code == 1
        assert "crm UNHEALTHY" in out
        await receiver.up()


def test_status_lines_say_why_when_not_joined() -> None:
    snapshot = {
        "time": 100.0,
        "ok": False,
        "reason": "events channel not joined",
        "link": {
            "joined": False,
            "healthy": False,
            "topic": "events",
            "joined_since": None,
            "token_remaining": None,
            "rotations": 0,
            "heartbeat_rtt": None,
            "reconnects_last_hour": 3,
            "gaps_last_hour": [{"start": 90.0, "end": None}],
        },
        "handlers": [],
        "destinations": [],
    }
    lines = status_lines(snapshot)
    assert lines[0].startswith("link: not joined;")
    assert "3 reconnects, 1 gaps" in lines[0]
    assert lines[-1] == "status: NOT OK (events channel not joined)"


async def test_the_status_command_exits_64_naming_a_bad_flag() -> None:
    code, _, err = await run_cli("status", "--timeout", "soon")
    assert code == 64
    assert "argument --timeout: 'soon' is not a number of seconds" in err


async def test_the_page_escapes_payload_values_and_sends_a_strict_policy(
    fake: FakeSippet,
) -> None:
    port = free_port()
    handler = FunctionHandler(_nothing, name="noop")
    async with running_daemon(
        fake, [handler], service={"metrics_listen": f"127.0.0.1:{port}"}
    ) as daemon:
        evil = "<script>alert('x')</script>"
        await fake.call_event("incoming_call", "c-evil", fromNumber=evil, callerName=evil)
        await settle(daemon, 1)
        page = await _get(port, "/")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert evil not in page.text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page.text
    # Only the page's own script, from the same server, and no inline one.
    assert page.text.count("<script") == 1
    assert '<script src="/static/status.js" defer></script>' in page.text


async def test_actions_need_the_admin_token_a_session_and_its_csrf_token(
    fake: FakeSippet, receiver: WebhookReceiver
) -> None:
    port = free_port()
    service = {"metrics_listen": f"127.0.0.1:{port}", "admin_token": ADMIN}
    async with (
        running_daemon(fake, [_webhook(receiver)], service=service),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        pause = {"action": "pause", "destination": "crm"}
        assert (await client.post("/api/action", json=pause)).status_code == 401
        refused = await client.post("/login", data={"token": "wrong-token-wrong-token"})
        assert refused.status_code == 403
        signed_in = await client.post("/login", data={"token": ADMIN})
        assert signed_in.status_code == 303
        forged = await client.post("/api/action", json=pause)
        assert forged.status_code == 403
        assert "CSRF" in forged.json()["message"]
        page = (await client.get("/")).text
        csrf = page.split('<meta name="csrf" content="', 1)[1].split('"', 1)[0]
        assert len(csrf) == 64
        other_site = await client.post(
            "/api/action",
            json=pause,
            headers={"x-csrf-token": csrf, "origin": "https://evil.example"},
        )
        assert other_site.status_code == 403
        done = await client.post("/api/action", json=pause, headers={"x-csrf-token": csrf})
        assert done.status_code == 200, done.text
        assert done.json()["message"] == "crm: paused"
        snapshot = (await client.get("/status")).json()
        assert snapshot["destinations"][0]["disabled_reason"].startswith("paused")
        resume = {"action": "resume", "destination": "crm"}
        resumed = await client.post("/api/action", json=resume, headers={"x-csrf-token": csrf})
        assert resumed.json()["message"] == "crm: delivering"
        unknown = {"action": "pause", "destination": "nowhere"}
        missing = await client.post("/api/action", json=unknown, headers={"x-csrf-token": csrf})
        assert missing.status_code == 404


async def test_without_an_admin_token_the_page_is_read_only(fake: FakeSippet) -> None:
    port = free_port()
    handler = FunctionHandler(_nothing, name="noop")
    async with (
        running_daemon(fake, [handler], service={"metrics_listen": f"127.0.0.1:{port}"}),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        page = (await client.get("/")).text
        assert "Read-only" in page
        assert 'name="token"' not in page
        refused = await client.post("/api/action", json={"action": "pause", "destination": "x"})
        assert refused.status_code == 403
        assert (await client.post("/login", data={"token": ADMIN})).status_code == 403


@pytest.mark.parametrize("command", ["run", "check-config"])
async def test_exits_78_naming_the_key_when_the_admin_token_is_too_short(
    tmp_path: Path, command: str
) -> None:
    config = _config(tmp_path, free_port())
    config.write_text(config.read_text() + 'admin_token = "short-token"\n')
    code, _, err = await run_cli(
        command, "--config", str(config), env={"SIPPET_SECRET_KEY": "sk_test_unused"}
    )
    assert code == 78
    assert "service.admin_token: the admin token must be at least 16" in err
    assert "short-token" not in err


def test_admin_token_sources_and_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIPPET_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert read_admin_token(ServiceSettings()) is None
    assert read_admin_token(ServiceSettings(admin_token=ADMIN)) == ADMIN  # type: ignore[arg-type]
    assert ADMIN not in repr(ServiceSettings(admin_token=ADMIN))  # type: ignore[arg-type]
    file = tmp_path / "admin.token"
    file.write_text(ADMIN + "\n")
    assert read_admin_token(ServiceSettings(admin_token_file=file)) == ADMIN
    monkeypatch.setenv("SIPPET_ADMIN_TOKEN", "from-the-environment-0123")
    assert read_admin_token(ServiceSettings()) == "from-the-environment-0123"
    monkeypatch.setenv("SIPPET_ADMIN_TOKEN", "short")
    with pytest.raises(ConfigError, match=r"service.admin_token.*at least 16") as error:
        read_admin_token(ServiceSettings())
    assert "short" not in str(error.value)


async def _open_events(port: int) -> socket.socket:
    """A client that asks for the live feed and then never reads (a tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, b"GET /events HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    return sock


def _feed(daemon: Daemon) -> Any:
    assert daemon.status_page is not None
    return daemon.status_page.feed


async def test_a_live_client_that_never_reads_slows_nothing_and_one_that_leaves_is_forgotten(
    fake: FakeSippet,
) -> None:
    port = free_port()
    handled: list[str] = []

    async def record(event: Event, ctx: Context[None]) -> None:
        del ctx
        handled.append(event.payload["n"])

    handler = FunctionHandler(record, name="recorder")
    async with running_daemon(
        fake, [handler], service={"metrics_listen": f"127.0.0.1:{port}"}
    ) as daemon:
        feed = _feed(daemon)
        with contextlib.closing(await _open_events(port)):
            await _until(lambda: len(feed.clients) == 1)
            (client,) = feed.clients
            bulk = "x" * 4000
            sent = 0
            # New views (tens of KiB each, ticked at once rather than every interval) until
            # the client's buffers are full and a write to it waits: from then on it is the
            # slow client the test is about.
            while not client.stalled:
                for _ in range(10):
                    await fake.broadcast("note", {"n": f"n-{sent}", "bulk": bulk})
                    sent += 1
                await settle(daemon, sent)
                feed.tick()
                await asyncio.sleep(0)
            for _ in range(500):
                await fake.broadcast("note", {"n": f"n-{sent}", "bulk": bulk})
                sent += 1
            await settle(daemon, sent)
            assert len(handled) == sent
            # What it has not taken is one view at most, the newest: not a queue of those
            # it missed.
            newest = f"n-{sent - 1}"
            feed.tick()
            assert client.latest is None or newest.encode() in client.latest
            # Another client is served meanwhile.
            assert newest in (await _get(port, "/status")).json()["events"][0]["summary"]
        await _until(lambda: not feed.clients)

        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
            http.stream("GET", "/events") as stream,
        ):
            first = await anext(stream.aiter_lines())
            assert first.startswith("data: {")
            assert len(feed.clients) == 1
        await _until(lambda: not feed.clients)


async def test_the_link_shows_rotations_reconnects_and_gaps_and_events_their_outcomes() -> None:
    async def fail(event: Event, ctx: Context[None]) -> None:
        del ctx
        raise RuntimeError(f"boom on {event.name}")

    handlers = [
        FunctionHandler(fail, name="status-failing"),
        FunctionHandler(_nothing, name="noop"),
    ]
    async with (
        FakeSippet(token_ttl=1.0) as fake,
        running_daemon(
            fake,
            handlers,
            sippet={"rotate_at": 0.5},
            service={"metrics_listen": f"127.0.0.1:{free_port()}"},
        ) as daemon,
    ):
        with capture_logs() as logs:
            await fake.broadcast("note", {"n": 0})
            await settle(daemon, 1)
        # Observed or not, a failure is still logged.
        assert [entry["handler"] for entry in logs if entry["event"] == "handler failed"] == [
            "status-failing"
        ]
        board = daemon.board
        await _until(lambda: board.snapshot()["link"]["last_rotation_at"] is not None)
        await fake.drop_all()
        await _until(lambda: board.snapshot()["link"]["reconnects_last_hour"] == 1)
        await _until(lambda: daemon.session.joined.is_set())
        await fake.broadcast("note", {"n": 1})
        await settle(daemon, 2)
        snapshot = board.snapshot()
    link = snapshot["link"]
    assert link["rotations"] >= 1
    assert link["reconnects_total"] == 1
    [gap] = link["gaps_last_hour"]
    assert gap["end"] is not None
    assert gap["end"] >= gap["start"]
    outcomes = {o["handler"]: o for o in snapshot["events"][0]["outcomes"]}
    assert outcomes["status-failing"]["outcome"] == "error"
    assert outcomes["status-failing"]["error"] == "RuntimeError: boom on note"
    assert outcomes["noop"]["outcome"] == "ok"
    assert [h["errors"] for h in snapshot["handlers"] if h["name"] == "status-failing"] == [2]


async def test_replaying_a_filtered_set_and_re_enabling_a_destination_gone_410(
    fake: FakeSippet, receiver: WebhookReceiver
) -> None:
    port = free_port()
    service = {"metrics_listen": f"127.0.0.1:{port}", "admin_token": ADMIN}
    async with (
        running_daemon(fake, [_webhook(receiver)], service=service) as daemon,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        await client.post("/login", data={"token": ADMIN})
        page = (await client.get("/")).text
        csrf = {"x-csrf-token": page.split('name="csrf" content="', 1)[1].split('"', 1)[0]}
        receiver.respond_with(400)
        for key in ("c-set-1", "c-set-2"):
            await fake.call_event("incoming_call", key)
        await receiver.wait_for(4)
        await _until(lambda: daemon.board.snapshot()["destinations"][0]["dead"] == 2)
        receiver.respond_with(200)
        replay = {"action": "replay", "destination": "crm", "since_minutes": 5}
        done = await client.post("/api/action", json=replay, headers=csrf)
        assert done.json()["message"] == "crm: 2 dead letters replayed"
        replayed = await receiver.wait_for(6)
        assert {r.headers["webhook-id"] for r in replayed[4:]} == {
            r.headers["webhook-id"] for r in replayed[:4]
        }

        receiver.respond_with(410)
        await fake.call_event("incoming_call", "c-gone-1")
        await _until(lambda: daemon.board.snapshot()["destinations"][0]["disabled"])
        receiver.respond_with(200)
        enable = {"action": "enable", "destination": "crm"}
        enabled = await client.post("/api/action", json=enable, headers=csrf)
        assert enabled.json()["message"] == "crm: delivering"
        await receiver.wait_until(lambda requests: requests[-1].status == 200)
        assert b"c-gone-1" in receiver.requests[-1].body


async def test_recent_events_from_big_frames_are_kept_without_their_payload(
    fake: FakeSippet,
) -> None:
    service = {"metrics_listen": f"127.0.0.1:{free_port()}"}
    async with running_daemon(
        fake, [FunctionHandler(_nothing, name="noop")], service=service
    ) as daemon:
        await fake.broadcast("ai_audit", {"callUuid": "c-big", "blob": "x" * 200_000})
        await fake.broadcast("note", {"callUuid": "c-big", "small": True})
        await settle(daemon, 2)
    big, small = daemon.board.events
    assert big.size > 200_000
    assert big.payload == {"payload_bytes": big.size}
    assert (big.name, big.call_key, big.id) == ("ai_audit", "c-big", big.id)
    assert big.id
    assert small.payload == {"callUuid": "c-big", "small": True}
    listed = daemon.board.snapshot()["events"]
    assert [event["outcomes"][0]["outcome"] for event in listed] == ["ok", "ok"]


async def test_stopping_the_daemon_ends_live_streams_instead_of_waiting_on_them(
    fake: FakeSippet, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    handler = FunctionHandler(_nothing, name="noop")
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")
        )
        async with running_daemon(fake, [handler], service={"metrics_listen": f"127.0.0.1:{port}"}):
            stream = await stack.enter_async_context(http.stream("GET", "/events"))
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("data: {")
        # The daemon has stopped: the stream ended with its response, not cut off.
        rest = [line async for line in lines]
        assert all(not line.startswith("data:") for line in rest)
    assert "graceful shutdown exceeded" not in caplog.text


async def test_a_daemon_that_serves_no_page_keeps_no_recent_events(fake: FakeSippet) -> None:
    async with running_daemon(fake, [FunctionHandler(_nothing, name="noop")]) as daemon:
        await fake.broadcast("note", {"n": 1})
        await settle(daemon, 1)
    assert daemon.dispatcher.seen is None
    assert all(runner.handled is None for runner in daemon.dispatcher.runners)
    assert not daemon.board.events
