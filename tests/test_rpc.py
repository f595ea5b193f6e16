"""The RPC client against the fake Sippet on loopback (and a mute server for read timeouts)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from listener.core.errors import RpcActionError, RpcError, RpcInputError
from listener.core.metrics import REGISTRY
from listener.rpc.client import RpcClient, ValidationResult
from listener.testing import FakeSippet
from listener.testing.receiver import WebhookReceiver

KEY = "sk_test_secret"
REFERENCE = Path(__file__).parents[2] / "shared" / "reference"
OK = {"success": True, "data": None}


def _client(base_url: str, key: str = KEY, **options: Any) -> RpcClient:
    """A client whose backoff is tiny, so that retry tests stay fast."""
    settings: dict[str, Any] = {
        "timeout": 5.0,
        "max_attempts": 3,
        "backoff_initial": 0.001,
        "backoff_max": 0.01,
    }
    settings.update(options)
    return RpcClient(base_url, key, **settings)


def _calls(action: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "sippet_listener_rpc_calls_total", {"action": action, "outcome": outcome}
    )
    return value or 0.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeSippet]:
    async with FakeSippet(api_key=KEY) as server:
        yield server


@pytest.fixture
async def client(fake: FakeSippet) -> AsyncIterator[RpcClient]:
    async with _client(fake.base_url) as rpc_client:
        yield rpc_client


def _current_examples() -> list[dict[str, Any]]:
    """Every example request body of the full (current) reference."""
    path = REFERENCE / "rpc-actions-full.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    text = path.read_text()
    bodies = re.findall(r"Example request body\n\n(\{.*?\n\})\n", text, re.DOTALL)
    return [json.loads(body) for body in bodies]


async def _send_like(rpc_client: RpcClient, body: dict[str, Any]) -> None:
    """Run the request that should produce *body*, passing its keys as keyword arguments."""
    wire_to_python = {"metadataFields": "metadata_fields"}
    options = {wire_to_python.get(k, k): v for k, v in body.items() if k != "action"}
    await rpc_client.run(body["action"], **options)


async def test_current_example_bodies_are_sent_exactly(fake: FakeSippet, client: RpcClient) -> None:
    """Each of the 52 example bodies of the current reference goes out exactly, key order too,
    all at once through one client."""
    examples = _current_examples()
    assert len(examples) == 52
    await asyncio.gather(*(_send_like(client, body) for body in examples))
    sent = {r.body["action"]: r.body for r in fake.rpc_requests}
    assert len(sent) == len(fake.rpc_requests) == 52
    for body in examples:
        assert sent[body["action"]] == body
        assert list(sent[body["action"]]) == list(body)
    assert {r.path for r in fake.rpc_requests} == {"/rpc/public/run"}


@pytest.mark.parametrize(
    "body",
    [
        # The "Run an action" curl example of the full reference.
        {"action": "list_contacts", "fields": ["id", "fullName"], "page": {"limit": 20}},
        # Legacy-only actions, shaped by the summary's keys and input objects.
        {"action": "list_gateways", "fields": ["id", "name"], "page": {"limit": 50, "offset": 0}},
        {"action": "accept_team_invitation", "input": {"token": "t-1", "fullName": "Ada"}},
        {
            "action": "sign_in_with_password",
            "input": {"email": "ada@example.com", "password": "pw"},
            "fields": ["id", "email"],
            "metadataFields": ["token"],
        },
        {"action": "revoke_sip_access", "input": {"callUuid": "c-1", "reason": "done"}},
        {"action": "logout"},
    ],
)
async def test_bodies_of_both_generations(
    fake: FakeSippet, client: RpcClient, body: dict[str, Any]
) -> None:
    """Bodies carry the action and exactly the keys given, camelCase on the wire."""
    await _send_like(client, body)
    (request,) = fake.rpc_requests
    assert request.body == body
    assert list(request.body) == list(body)


async def test_headers(fake: FakeSippet, client: RpcClient) -> None:
    """Every request carries the key, a JSON content type and our user agent."""
    await client.run("who_am_i", fields=["id"])
    headers = fake.rpc_requests[0].headers
    assert headers["x-api-key"] == KEY
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("sippet-listener/")


async def test_run_returns_data(fake: FakeSippet, client: RpcClient) -> None:
    """A success envelope gives back its data, and the call is counted as ok."""
    before = _calls("who_am_i", "ok")
    fake.script_rpc(body={"success": True, "data": {"id": "u-1", "fullName": "Ada"}})
    assert await client.run("who_am_i", fields=["id", "fullName"]) == {
        "id": "u-1",
        "fullName": "Ada",
    }
    assert _calls("who_am_i", "ok") == before + 1


async def test_error_envelope_raises_action_error(fake: FakeSippet, client: RpcClient) -> None:
    """``success: false`` becomes RpcActionError with every AshRpcError field, message filled."""
    error = {
        "type": "invalid_changes",
        "message": "Invalid value for field %{field}",
        "shortMessage": "Invalid changes",
        "vars": {"field": "email"},
        "fields": ["email"],
        "path": ["user", "email"],
        "details": {"suggestion": "Provide a valid email address"},
    }
    second = {"type": "required", "message": "is required", "shortMessage": "Required field"}
    fake.script_rpc(body={"success": False, "errors": [error, second]})
    before = _calls("create_contact", "error")
    with pytest.raises(RpcActionError) as caught:
        await client.run("create_contact", input={"fullName": "Ada", "email": "nope"})
    exc = caught.value
    assert exc.action == "create_contact"
    assert exc.type == "invalid_changes"
    assert exc.message == "Invalid value for field email"
    assert exc.short_message == "Invalid changes"
    assert exc.fields == ["email"]
    assert exc.path == ["user", "email"]
    assert exc.details == {"suggestion": "Provide a valid email address"}
    assert exc.errors == [error, second]
    assert str(exc) == (
        "rpc create_contact failed: invalid_changes: Invalid value for field email (+1 more)"
    )
    assert _calls("create_contact", "error") == before + 1
    assert len(fake.rpc_requests) == 1


async def test_missing_required_input_fails_before_sending(
    fake: FakeSippet, client: RpcClient
) -> None:
    """A catalog violation raises locally and nothing reaches the server."""
    with pytest.raises(RpcInputError, match=r"^end_call: input\.callUuid is required$"):
        await client.run("end_call", input={})
    with pytest.raises(RpcInputError, match="did you mean 'end_call'"):
        await client.run("end_cal", input={"callUuid": "c-1"})
    with pytest.raises(RpcInputError, match="not taken"):
        await client.run("end_call", input={"callUuid": "c-1"}, fields=["id"])
    with pytest.raises(RpcInputError, match=r"^who_am_i: fields must be a list of names"):
        await client.run("who_am_i", fields="id")
    assert fake.rpc_requests == []


async def test_unchecked_sends_unknown_actions(fake: FakeSippet, client: RpcClient) -> None:
    """The escape hatch sends an action the catalog does not know, as given."""
    await client.run("list_widgets", fields=["id"], page={"limit": 5}, unchecked=True)
    assert fake.rpc_requests[0].body == {
        "action": "list_widgets",
        "fields": ["id"],
        "page": {"limit": 5},
    }


async def test_mutating_action_is_not_retried_after_503(
    fake: FakeSippet, client: RpcClient
) -> None:
    """end_call may have happened: a 503 is raised, not resent."""
    fake.script_rpc(status=503, body={"error": "unavailable"}, headers={"retry-after": "0"})
    before = _calls("end_call", "failed")
    with pytest.raises(RpcError, match=r"^rpc end_call failed: HTTP 503$"):
        await client.run("end_call", input={"callUuid": "c-1"})
    assert len(fake.rpc_requests) == 1
    assert _calls("end_call", "failed") == before + 1


async def test_mutating_action_is_retried_when_the_caller_says_so(
    fake: FakeSippet, client: RpcClient
) -> None:
    """retry_unsafe=True resends a mutating action after a 503."""
    fake.script_rpc(status=503, body={"error": "unavailable"})
    fake.script_rpc(body={"success": True, "data": {"ended": True}})
    result = await client.run("end_call", input={"callUuid": "c-1"}, retry_unsafe=True)
    assert result == {"ended": True}
    assert len(fake.rpc_requests) == 2
    assert fake.rpc_requests[0].body == fake.rpc_requests[1].body


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_read_action_is_retried(fake: FakeSippet, client: RpcClient, status: int) -> None:
    """A read is resent after a retryable status, and the retry is logged without secrets."""
    fake.script_rpc(status=status, body={"error": "busy"}, headers={"retry-after": "0"})
    fake.script_rpc(body={"success": True, "data": [{"id": "c-1"}]})
    with capture_logs() as logs:
        assert await client.run("list_calls", fields=["id"]) == [{"id": "c-1"}]
    assert len(fake.rpc_requests) == 2
    retries = [entry for entry in logs if entry["event"] == "rpc retry"]
    assert [(e["action"], e["attempt"], e["reason"]) for e in retries] == [
        ("list_calls", 1, f"HTTP {status}")
    ]
    assert KEY not in repr(logs)


async def test_retry_after_is_honoured_up_to_its_cap(fake: FakeSippet) -> None:
    """A Retry-After (seconds or HTTP date) sets the wait instead of the tiny backoff, capped at
    four times backoff_max."""
    later = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    fake.script_rpc(status=503, body={}, headers={"retry-after": "120"})
    fake.script_rpc(status=429, body={}, headers={"retry-after": later})
    async with _client(fake.base_url, backoff_max=0.05) as rpc_client:
        started = time.monotonic()
        await rpc_client.run("list_contacts", fields=["id"])
        elapsed = time.monotonic() - started
    assert len(fake.rpc_requests) == 3
    assert 0.4 <= elapsed < 0.9


async def test_retry_after_is_honoured_on_every_retryable_status(fake: FakeSippet) -> None:
    """One rule for all of them: a 502 that asks for a wait gets it (up to the cap)."""
    fake.script_rpc(status=502, body={}, headers={"retry-after": "120"})
    async with _client(fake.base_url, backoff_max=0.05) as rpc_client:
        started = time.monotonic()
        await rpc_client.run("list_contacts", fields=["id"])
        elapsed = time.monotonic() - started
    assert len(fake.rpc_requests) == 2
    assert 0.2 <= elapsed < 0.6


async def test_retries_stop_after_max_attempts(fake: FakeSippet, client: RpcClient) -> None:
    """When every attempt fails the caller sees the last error."""
    for _ in range(3):
        fake.script_rpc(status=502, body={})
    with pytest.raises(RpcError, match=r"^rpc list_contacts failed: HTTP 502$"):
        await client.run("list_contacts", fields=["id"])
    assert len(fake.rpc_requests) == 3


async def test_other_statuses_are_not_retried(fake: FakeSippet, client: RpcClient) -> None:
    """A 500 or a 404 is an answer: raised at once, even for a read."""
    fake.script_rpc(status=500, body={"error": "boom"})
    with pytest.raises(RpcError, match=r"^rpc list_contacts failed: HTTP 500$"):
        await client.run("list_contacts", fields=["id"])
    assert len(fake.rpc_requests) == 1


async def test_reply_that_is_no_envelope(fake: FakeSippet, client: RpcClient) -> None:
    """JSON that is not ``{"success": bool, ...}`` is refused."""
    fake.script_rpc(body=["not", "an", "envelope"])
    with pytest.raises(RpcError, match="not an rpc envelope"):
        await client.run("who_am_i", fields=["id"])


async def test_reply_that_is_not_json() -> None:
    """A 200 that is not JSON is refused, with its status (a real server on loopback that
    answers every POST with an empty body; the caller's client is left open)."""
    async with WebhookReceiver() as server, httpx.AsyncClient() as http:
        base_url = server.url.removesuffix("/hook")
        async with RpcClient(base_url, KEY, http=http) as rpc_client:
            with pytest.raises(RpcError, match=r"^rpc who_am_i failed: HTTP 200: .* not JSON$"):
                await rpc_client.run("who_am_i", fields=["id"])
        assert not http.is_closed
        assert server.requests[0].path == "/rpc/public/run"


async def test_refused_key(fake: FakeSippet) -> None:
    """401 raises at once, says the key was refused, and never shows the key."""
    wrong = "sk_wrong_key_123"
    async with _client(fake.base_url, key=wrong) as rpc_client:
        with capture_logs() as logs, pytest.raises(RpcError) as caught:
            await rpc_client.run("list_contacts", fields=["id"])
    message = str(caught.value)
    assert message == "rpc list_contacts refused: HTTP 401: the api key was not accepted"
    assert wrong not in message
    assert KEY not in message
    assert wrong not in repr(logs)
    assert wrong not in repr(rpc_client)
    assert len(fake.rpc_requests) == 1


async def test_connect_errors_are_retried_even_for_mutating_actions() -> None:
    """Nothing was sent when the connection failed, so end_call is tried every time."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with _client(f"http://127.0.0.1:{port}") as rpc_client:
        with capture_logs() as logs, pytest.raises(RpcError) as caught:
            await rpc_client.run("end_call", input={"callUuid": "c-1"})
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert str(caught.value).startswith("rpc end_call failed: ConnectError")
    assert [e["attempt"] for e in logs if e["event"] == "rpc retry"] == [1, 2]


@pytest.fixture
async def mute_server() -> AsyncIterator[tuple[str, list[int]]]:
    """A server that reads requests and never answers; yields its URL and connection count."""
    connections: list[int] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", connections


async def test_read_timeouts_are_retried_for_reads_only(
    mute_server: tuple[str, list[int]],
) -> None:
    """A read timeout means the request may have arrived: only reads are resent."""
    url, connections = mute_server
    async with _client(url, timeout=0.05) as rpc_client:
        with pytest.raises(RpcError, match=r"^rpc end_call failed: ReadTimeout") as caught:
            await rpc_client.run("end_call", input={"callUuid": "c-1"})
        assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
        assert len(connections) == 1
        with pytest.raises(RpcError, match=r"^rpc list_calls failed: ReadTimeout"):
            await rpc_client.run("list_calls", fields=["id"])
        assert len(connections) == 4


async def test_validate(fake: FakeSippet, client: RpcClient) -> None:
    """validate posts to /validate; a rejection is an answer, not an error."""
    example = {
        "action": "create_contact",
        "input": {"fullName": "Ada Lovelace", "phoneE164": "+15555550123"},
    }
    result = await client.validate(
        "create_contact", input={"fullName": "Ada Lovelace", "phoneE164": "+15555550123"}
    )
    assert result == ValidationResult(ok=True, errors=[])
    assert fake.rpc_requests[0].path == "/rpc/public/validate"
    assert fake.rpc_requests[0].body == example

    error: dict[str, object] = {
        "type": "required",
        "message": "is required",
        "shortMessage": "Required field",
        "vars": {"field": "callUuid"},
        "fields": ["callUuid"],
        "path": [],
    }
    fake.script_rpc(body={"success": False, "errors": [error]})
    # Missing input is Sippet's to judge here, so the request goes out.
    result = await client.validate("end_call", input={})
    assert result == ValidationResult(ok=False, errors=[error])
    assert fake.rpc_requests[1].body == {"action": "end_call", "input": {}}
    with pytest.raises(RpcInputError, match="unknown rpc action"):
        await client.validate("end_cal")
    assert len(fake.rpc_requests) == 2


def _page(items: list[int], has_more: bool, **extra: Any) -> dict[str, Any]:
    results = [{"id": i} for i in items]
    return {"success": True, "data": {"results": results, "hasMore": has_more, **extra}}


async def test_pages_offset(fake: FakeSippet, client: RpcClient) -> None:
    """Offset paging advances by the items received until hasMore is false."""
    fake.script_rpc(body=_page([1, 2], True, limit=2, offset=0, type="offset"))
    fake.script_rpc(body=_page([3, 4], True, limit=2, offset=2, type="offset"))
    fake.script_rpc(body=_page([5], False, limit=2, offset=4, type="offset"))
    items = [item async for item in client.pages("list_contacts", fields=["id"], page_size=2)]
    assert items == [{"id": i} for i in range(1, 6)]
    assert [r.body["page"] for r in fake.rpc_requests] == [
        {"limit": 2, "offset": 0},
        {"limit": 2, "offset": 2},
        {"limit": 2, "offset": 4},
    ]
    assert fake.rpc_requests[0].body == {
        "action": "list_contacts",
        "fields": ["id"],
        "page": {"limit": 2, "offset": 0},
    }


async def test_pages_keyset(fake: FakeSippet, client: RpcClient) -> None:
    """Keyset paging follows nextPage until hasMore is false."""
    keyset = {"limit": 2, "before": None, "previousPage": "p", "type": "keyset"}
    fake.script_rpc(body=_page([1, 2], True, after=None, nextPage="k2", **keyset))
    fake.script_rpc(body=_page([3, 4], True, after="k2", nextPage="k4", **keyset))
    fake.script_rpc(body=_page([5], False, after="k4", nextPage="k5", **keyset))
    pages = client.pages(
        "list_conversations", fields=["id"], sort="-insertedAt", page_size=2, keyset=True
    )
    items = [item async for item in pages]
    assert items == [{"id": i} for i in range(1, 6)]
    assert [r.body["page"] for r in fake.rpc_requests] == [
        {"limit": 2},
        {"limit": 2, "after": "k2"},
        {"limit": 2, "after": "k4"},
    ]
    assert all(r.body["sort"] == "-insertedAt" for r in fake.rpc_requests)


async def test_pages_of_an_action_without_page(fake: FakeSippet, client: RpcClient) -> None:
    """list_calls takes no page: it is run once and its list yielded."""
    fake.script_rpc(body={"success": True, "data": [{"id": "a"}, {"id": "b"}]})
    items = [item async for item in client.pages("list_calls", fields=["id"], keyset=True)]
    assert items == [{"id": "a"}, {"id": "b"}]
    assert fake.rpc_requests[0].body == {"action": "list_calls", "fields": ["id"]}


async def test_pages_that_cannot_continue(fake: FakeSippet, client: RpcClient) -> None:
    """A page claiming more without a way to get it raises instead of looping."""
    fake.script_rpc(body=_page([1], True, limit=1, type="keyset"))
    with pytest.raises(RpcError, match="gives no new nextPage"):
        async for _ in client.pages("list_contacts", fields=["id"], page_size=1, keyset=True):
            pass
    fake.script_rpc(body=_page([], True, limit=1, offset=0, type="offset"))
    with pytest.raises(RpcError, match="an empty page says it has more"):
        async for _ in client.pages("list_contacts", fields=["id"], page_size=1):
            pass
    with pytest.raises(RpcInputError, match="page_size must be at least 1"):
        async for _ in client.pages("list_contacts", fields=["id"], page_size=0):
            pass


async def test_pages_reply_of_the_wrong_shape(fake: FakeSippet, client: RpcClient) -> None:
    """A page reply that is not a list or page of objects raises."""
    fake.script_rpc(body=OK)
    with pytest.raises(RpcError, match="not a page"):
        async for _ in client.pages("list_contacts", fields=["id"]):
            pass
    fake.script_rpc(body={"success": True, "data": ["a"]})
    with pytest.raises(RpcError, match="not a list of objects"):
        async for _ in client.pages("list_calls", fields=["id"]):
            pass


async def test_injected_client_is_left_open(fake: FakeSippet) -> None:
    """The caller's httpx client is used and not closed; an owned one is closed."""
    async with httpx.AsyncClient() as http:
        async with RpcClient(fake.base_url, KEY, http=http) as rpc_client:
            await rpc_client.run("who_am_i", fields=["id"])
        assert not http.is_closed
    owned = RpcClient(fake.base_url, KEY)
    await owned.aclose()
    with pytest.raises(RuntimeError, match="client has been closed"):
        await owned.run("who_am_i", fields=["id"])


def test_max_attempts_must_be_positive() -> None:
    """Zero attempts is a configuration mistake."""
    with pytest.raises(ValueError, match="max_attempts"):
        RpcClient("http://sippet.test", KEY, max_attempts=0)
