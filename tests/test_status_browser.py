"""The status page in a real browser: Debian's Chromium, headless, driven by Playwright,
against ``sippet-listener run`` in its own process, the fake Sippet and a webhook receiver on
loopback. Never skipped: ``scripts/test`` installs Chromium where it is missing.

One browser for the session and one daemon for the module keep it to a few seconds.
``SIPPET_UPDATE_SCREENSHOT=1`` also writes the README's screenshot, docs/status-page.png.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

from listener.testing import FakeSippet
from listener.testing.receiver import WebhookReceiver
from tests.test_service import ServiceProcess

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's own browser download is not reachable: it drives Debian's, told to stay quiet.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SECRET = "whsec_" + base64.b64encode(b"\x05" * 32).decode()
ADMIN = "browser-admin-token-0123456789"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "status-page.png"


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: ./scripts/test installs it (apt-get install chromium)")
    return CHROMIUM


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@dataclass
class Stack:
    fake: FakeSippet
    receiver: WebhookReceiver
    service: ServiceProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service.port}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    directory = tmp_path_factory.mktemp("status-page")
    token = directory / "admin.token"
    token.write_text(ADMIN)
    async with FakeSippet(api_key="sk_test_browser") as fake, WebhookReceiver() as receiver:
        service = ServiceProcess(directory, fake)
        service.write_config(
            handlers=(
                '[[handlers]]\nuse = "log"\n'
                '[[handlers]]\nuse = "webhook"\nname = "crm"\n'
                f'url = "{receiver.url}"\nsecret = "{SECRET}"\n'
                "retry_schedule = [0, 0.05]\nmax_probe_interval = 0.2\n"
            ),
            extra=f'admin_token_file = "{token}"\n',
        )
        await service.start()
        try:
            await service.message("READY=1")
            yield Stack(fake, receiver, service)
        finally:
            await service.stop()
    assert ADMIN not in service.log.read_text()


async def _open(browser: Browser, stack: Stack) -> tuple[Page, list[str]]:
    """A fresh page on the status page, live; and the console errors it reports."""
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(stack.url + "/")
    await expect(page.locator("#live")).to_have_text("(live)")
    return page, errors


async def test_the_page_loads_without_console_errors_and_calls_come_and_go_live(
    browser: Browser, stack: Stack, tmp_path: Path
) -> None:
    page, errors = await _open(browser, stack)
    await expect(page.locator("#headline")).to_have_text("joined and healthy")
    calls = page.locator("#t-calls tr", has_text="+4420 → +4430")
    await stack.fake.call_event("incoming_call", "c-live-1", fromNumber="+4420", toNumber="+4430")
    await expect(calls).to_have_count(1, timeout=1000)
    await expect(page.locator("#t-events tr", has_text="incoming_call").first).to_be_visible()
    await stack.fake.call_event("call_answered", "c-live-1")
    await expect(calls.locator("td").first).to_have_text("answered", timeout=1000)
    await stack.fake.call_event("call_ended", "c-live-1")
    await expect(calls).to_have_count(0, timeout=1000)
    await expect(page.locator("#t-ended tr", has_text="+4420 → +4430")).to_have_count(1)
    await page.locator("#filter").fill("call_answered")
    await expect(page.locator("#t-events tr:visible")).to_have_count(1)
    await page.locator("#filter").fill("")

    await stack.fake.call_event("incoming_call", "c-live-2", fromNumber="+4421", toNumber="+4430")
    await stack.fake.call_event("call_answered", "c-live-2")
    await expect(page.locator("#t-calls tr", has_text="+4421")).to_contain_text("answered")
    shot = tmp_path / "status-page.png"
    await page.screenshot(path=str(shot))
    await stack.fake.call_event("call_ended", "c-live-2")
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG")
    assert 10_000 < len(data) < 400_000
    if os.environ.get("SIPPET_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    assert errors == []
    await page.close()


async def test_a_caller_name_with_markup_shows_as_text(browser: Browser, stack: Stack) -> None:
    page, errors = await _open(browser, stack)
    evil = "<script>window.pwned=1</script><img src=x onerror=window.pwned=2>"
    await stack.fake.call_event(
        "incoming_call", "c-evil-1", fromNumber=evil, toNumber="+1", callerName=evil
    )
    row = page.locator("#t-calls tr", has_text="window.pwned=1")
    await expect(row).to_have_count(1, timeout=1000)
    assert await row.locator("td").nth(1).text_content() == f"{evil} → +1"
    assert await page.locator("#t-calls img, #t-events img, #t-calls script").count() == 0
    summary = page.locator("#t-events tr", has_text="c-evil-1").first.locator("td").last
    assert '"fromNumber":"<script>window.pwned=1</script>' in (await summary.text_content() or "")
    assert await page.evaluate("window.pwned") is None
    # Reloaded, the server-rendered rows carry the same text, escaped.
    await page.reload()
    await expect(page.locator("#t-calls tr", has_text="window.pwned=1")).to_have_count(1)
    assert await page.evaluate("window.pwned") is None
    assert errors == []
    await stack.fake.call_event("call_ended", "c-evil-1")
    await page.close()


async def test_a_receiver_outage_shows_the_destination_unhealthy_then_recovered(
    browser: Browser, stack: Stack
) -> None:
    page, errors = await _open(browser, stack)
    health = page.locator("#t-destinations tr", has_text="crm").locator("td").nth(1)
    await expect(health).to_have_text("healthy")
    await stack.receiver.down()
    try:
        await stack.fake.call_event("incoming_call", "c-outage-1")
        await expect(health).to_contain_text("unhealthy for", timeout=5000)
        await expect(page.locator("#headline")).to_contain_text("crm")
    finally:
        await stack.receiver.up()
    await expect(health).to_have_text("healthy", timeout=5000)
    await expect(page.locator("#headline")).to_have_text("joined and healthy")
    await stack.fake.call_event("call_ended", "c-outage-1")
    assert errors == []
    await page.close()


async def test_replay_resends_a_dead_letter_only_with_the_admin_token_and_its_csrf_token(
    browser: Browser, stack: Stack
) -> None:
    receiver = stack.receiver
    receiver.respond_with(400, when=lambda body: b"c-dead-1" in body)

    def for_the_call() -> list[str]:
        return [r.headers["webhook-id"] for r in receiver.requests if b"c-dead-1" in r.body]

    await stack.fake.call_event("incoming_call", "c-dead-1")
    await receiver.wait_until(lambda _: len(for_the_call()) == 2)
    (msg_id,) = set(for_the_call())
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(stack.url + "/")
    dead = page.locator("#t-dead tr", has_text=msg_id)
    await expect(dead).to_have_count(1, timeout=5000)
    # Read-only until signed in: no button, and the action itself is refused.
    assert await page.locator("#t-dead button[data-action=replay]").count() == 0
    action = {"action": "replay", "destination": "crm", "msg_id": msg_id}
    anonymous = await context.request.post(stack.url + "/api/action", data=action)
    assert anonymous.status == 401

    await dead.locator("button[data-action=timeline]").click()
    await expect(page.locator("#t-timeline tr")).to_have_count(2)
    await expect(page.locator("#t-timeline tr").first.locator("td").nth(2)).to_have_text("400")
    await expect(page.locator("#timeline-where")).to_contain_text("crm: dead")

    await page.locator("input[name=token]").fill(ADMIN)
    await page.locator("form[action='/login'] button").click()
    replay = page.locator(f'#t-dead button[data-action=replay][data-msg="{msg_id}"]')
    await expect(replay).to_be_visible()
    # Signed in, the browser sends the cookie with any request: without the page's CSRF
    # token, a forged one is still refused and nothing is sent.
    forged = await context.request.post(
        stack.url + "/api/action",
        data=json.dumps(action),
        headers={"content-type": "application/json"},
    )
    assert forged.status == 403
    assert "CSRF" in (await forged.json())["message"]
    assert len(for_the_call()) == 2

    receiver.respond_with(200)
    await replay.click()
    await expect(page.locator("#notice")).to_have_text("crm: 1 dead letters replayed")
    await receiver.wait_until(lambda _: len(for_the_call()) == 3)
    assert for_the_call()[2] == msg_id
    await expect(dead).to_have_count(0, timeout=5000)
    await context.close()
    logged = [
        line for line in stack.service.log_lines() if "status page action" in str(line["event"])
    ]
    assert [(line["event"], line.get("action")) for line in logged][-2:] == [
        ("status page action refused", None),
        ("status page action", "replay"),
    ]
    assert logged[-1]["msg_id"] == msg_id
