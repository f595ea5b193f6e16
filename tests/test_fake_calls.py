"""The fake Sippet's call model, over real HTTP and sockets: the table, list_calls as Ash
answers it, outages, and reconciliation of an outage against it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from listener.calls.reconcile import diff, list_calls_request
from listener.calls.state import CallState
from listener.rpc.client import RpcClient
from listener.testing import FakeSippet
from listener.testing.traffic import simulate_calls
from tests.conftest import RunSession

Body = dict[str, Any]


async def list_calls(http: httpx.AsyncClient, fake: FakeSippet, **request: Any) -> Body:
    """POST a list_calls request to the fake's RPC endpoint; return the envelope."""
    answer = await http.post(
        f"{fake.base_url}/rpc/public/run",
        json={"action": "list_calls", **request},
        headers={"x-api-key": fake.api_key},
    )
    assert answer.status_code == 200
    body: Body = answer.json()
    return body


async def uuids(http: httpx.AsyncClient, fake: FakeSippet, **request: Any) -> list[str]:
    body = await list_calls(http, fake, fields=["callUuid"], **request)
    assert body["success"], body
    return [row["callUuid"] for row in body["data"]]


async def three_calls(fake: FakeSippet) -> None:
    """a: answered and ended; b: ringing; c: ended unanswered."""
    for key in "abc":
        await fake.call_event("incoming_call", key, fromNumber=f"+1555010{'abc'.index(key)}")
    await fake.call_event("call_answered", "a")
    await fake.call_event("call_ended", "a", durationSeconds=42)
    await fake.call_event("call_ended", "c")


async def test_call_events_change_the_table_and_reach_the_socket(
    fake: FakeSippet, run_session: RunSession
) -> None:
    async with run_session() as (_, events):
        await fake.call_event("incoming_call", "c-1", fromNumber="+15550100")
        await fake.call_event("call_answered", "c-1", style="snake")
        await fake.call_event("call_ended", "c-1", style="nested")
        received = await events.wait_for(3)
    row = fake.calls.rows["c-1"]
    assert (row["status"], row["fromNumber"]) == ("completed", "+15550100")
    assert row["startedAt"] <= row["answeredAt"] <= row["endedAt"]
    assert isinstance(row["durationSeconds"], int)
    assert [(e.name, e.call_key) for e in received] == [
        ("incoming_call", "c-1"),
        ("call_answered", "c-1"),
        ("call_ended", "c-1"),
    ]
    assert received[0].payload["status"] == "ringing"
    assert received[1].payload["answered_at"] == row["answeredAt"]
    assert received[2].payload["call"]["status"] == "completed"


async def test_an_unanswered_call_ends_with_no_answer_and_no_duration(fake: FakeSippet) -> None:
    await fake.call_event("call_ended", "c-1")  # a call not seen before is added first
    row = fake.calls.rows["c-1"]
    assert (row["status"], row["durationSeconds"], row["answeredAt"]) == ("no_answer", 0, None)
    with pytest.raises(ValueError, match="not a call event"):
        await fake.call_event("call_transcript_delta", "c-1")


async def test_list_calls_selects_fields(fake: FakeSippet, http: httpx.AsyncClient) -> None:
    await three_calls(fake)
    body = await list_calls(http, fake, fields=["callUuid", "status", "recordingStatus"])
    assert body == {
        "success": True,
        "data": [
            {"callUuid": "a", "status": "completed", "recordingStatus": None},
            {"callUuid": "b", "status": "ringing", "recordingStatus": None},
            {"callUuid": "c", "status": "no_answer", "recordingStatus": None},
        ],
    }


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"callUuid": {"eq": "b"}}, ["b"]),
        ({"callUuid": "b"}, ["b"]),  # a bare value is equality
        ({"status": {"notEq": "ringing"}}, ["a", "c"]),
        ({"callUuid": {"in": ["a", "c", "zz"]}}, ["a", "c"]),
        ({"endedAt": {"isNil": True}}, ["b"]),
        ({"answeredAt": {"isNil": False}}, ["a"]),
        ({"durationSeconds": {"greaterThan": 0}}, ["a"]),
        ({"durationSeconds": {"greaterThanOrEqual": 0}}, ["a", "c"]),  # nil matches nothing
        ({"durationSeconds": {"lessThan": 42}}, ["c"]),
        ({"durationSeconds": {"lessThanOrEqual": 42, "greaterThan": 0}}, ["a"]),
        ({"and": [{"status": {"notEq": "ringing"}}, {"durationSeconds": {"eq": 0}}]}, ["c"]),
        ({"or": [{"callUuid": {"eq": "a"}}, {"endedAt": {"isNil": True}}]}, ["a", "b"]),
        ({"not": {"callUuid": {"eq": "a"}}}, ["b", "c"]),
        ({"startedAt": {"greaterThanOrEqual": "2000-01-01T00:00:00Z"}}, ["a", "b", "c"]),
        ({"startedAt": {"lessThan": "2000-01-01T01:00:00+01:00"}}, []),
        ({"fromNumber": {"eq": None}}, []),
    ],
)
async def test_list_calls_filters_as_ash_does(
    fake: FakeSippet, http: httpx.AsyncClient, spec: Body, expected: list[str]
) -> None:
    await three_calls(fake)
    assert await uuids(http, fake, filter=spec) == expected


async def test_times_compare_as_instants_whatever_the_offset(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    await fake.call_event("incoming_call", "c-1", startedAt="2026-03-01T12:00:00Z")
    spec = {"startedAt": {"eq": "2026-03-01T13:00:00.000+01:00"}}
    assert await uuids(http, fake, filter=spec) == ["c-1"]
    assert await uuids(http, fake, filter={"startedAt": {"greaterThan": "2026-03-01T12:00"}}) == []


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("callUuid", ["a", "b", "c"]),
        ("-callUuid", ["c", "b", "a"]),
        ("endedAt,callUuid", ["a", "c", "b"]),  # ascending: nils last
        ("-durationSeconds", ["b", "a", "c"]),  # descending: nils first
        ("--durationSeconds", ["a", "c", "b"]),
        ("++endedAt", ["b", "a", "c"]),
        ("status,-callUuid", ["a", "c", "b"]),
        ("insertedAt,callUuid", ["a", "b", "c"]),  # sortable, as every Ash timestamp
    ],
)
async def test_list_calls_sorts(
    fake: FakeSippet, http: httpx.AsyncClient, sort: str, expected: list[str]
) -> None:
    await three_calls(fake)
    assert await uuids(http, fake, sort=sort) == expected


@pytest.mark.parametrize(
    ("request_keys", "kind", "fields"),
    [
        ({"filter": {"callerId": {"eq": "x"}}}, "no_such_field", ["callerId"]),
        ({"filter": {"or": [{"status": {"like": "x"}}]}}, "no_such_operator", ["status"]),
        ({"filter": {"startedAt": {"greaterThan": "yesterday"}}}, "invalid_filter_value", []),
        ({"filter": {"durationSeconds": {"in": 3}}}, "invalid_filter_value", []),
        ({"filter": {"and": {"status": {"eq": "x"}}}}, "invalid_filter", []),
        ({"sort": "-callerId"}, "no_such_field", ["callerId"]),
        ({"fields": ["callUuid", "callerId"]}, "no_such_field", ["callerId"]),
        ({"fields": []}, "required", ["fields"]),
        ({"fields": ["insertedAt"]}, "no_such_field", ["insertedAt"]),  # not selectable
    ],
)
async def test_list_calls_refuses_what_ash_refuses(
    fake: FakeSippet, http: httpx.AsyncClient, request_keys: Body, kind: str, fields: list[str]
) -> None:
    """Even with no row to read: Ash checks the request before running it."""
    body = await list_calls(http, fake, **{"fields": ["callUuid"], **request_keys})
    assert body["success"] is False
    (error,) = body["errors"]
    assert error["type"] == kind
    assert set(error) == {"type", "message", "shortMessage", "vars", "fields", "path"}
    if fields:
        assert error["fields"] == fields


async def test_a_scripted_reply_wins_over_the_table(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    await three_calls(fake)
    fake.script_rpc(body={"success": True, "data": []}, action="list_calls")
    assert (await list_calls(http, fake, fields=["id"]))["data"] == []
    assert len((await list_calls(http, fake, fields=["id"]))["data"]) == 3


async def test_an_outage_drops_sockets_and_refuses_upgrades_while_calls_go_on(
    fake: FakeSippet, http: httpx.AsyncClient, run_session: RunSession
) -> None:
    async with run_session() as (session, _):
        answer = await http.post(f"{fake.base_url}/_fake/outage", json={"seconds": 0.5})
        until = answer.json()["until"]
        await fake.wait_until(lambda: fake.joined_sockets == 0)
        assert await fake.call_event("incoming_call", "during") == 0
        minted = await http.post(
            f"{fake.base_url}/api/realtime/session", headers={"x-api-key": fake.api_key}
        )
        url = fake.base_url.replace("http", "ws") + "/socket/websocket"
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{url}?session_token={minted.json()['token']}&vsn=2.0.0")
        assert refused.value.response.status_code == 503
        async with asyncio.timeout(10):
            await fake.wait_until(lambda: fake.joined_sockets == 1)
            await session.joined.wait()
        assert time.time() >= until
    assert fake.calls.rows["during"]["status"] == "ringing"
    assert any(u.status == 503 for u in fake.upgrades)


async def test_the_calls_missed_in_an_outage_are_rebuilt_from_list_calls(
    fake: FakeSippet, run_session: RunSession
) -> None:
    """The pieces the next round wires in, end to end over loopback: the map follows the
    channel, an outage loses events, and list_calls then gives back exactly what was lost."""
    state = CallState()
    async with run_session() as (session, events):
        await fake.call_event("incoming_call", "before")
        await fake.call_event("incoming_call", "answered-in-gap")
        for event in await events.wait_for(2):
            state.merge(event.name, event.payload, "realtime", event.received_at)
        gap_began = time.time()
        await fake.outage(0.3)
        await fake.wait_until(lambda: fake.joined_sockets == 0)
        await fake.call_event("call_answered", "answered-in-gap")
        await fake.call_event("call_ended", "answered-in-gap")
        await fake.call_event("incoming_call", "born-in-gap")
        await fake.call_event("call_ended", "born-in-gap")
        async with asyncio.timeout(10):
            await fake.wait_until(lambda: fake.joined_sockets == 1)
            await session.joined.wait()
        assert len(events.events) == 2  # the channel gave nothing back
    await fake.call_event("incoming_call", "unrelated", startedAt="2020-01-01T00:00:00Z")
    request = list_calls_request(state, since=gap_began, now=time.time(), margin=5)
    async with RpcClient(fake.base_url, fake.api_key) as rpc:
        rows = await rpc.run("list_calls", **request)
    result = diff(state, rows)
    assert [(m.payload["callUuid"], m.name) for m in result.missed] == [
        ("answered-in-gap", "call_answered"),
        ("answered-in-gap", "call_ended"),
        ("born-in-gap", "incoming_call"),
        ("born-in-gap", "call_ended"),
    ]
    assert (result.malformed, result.unknown_status) == (0, 0)


async def test_simulated_traffic_keeps_the_table(fake: FakeSippet, http: httpx.AsyncClient) -> None:
    traffic = asyncio.create_task(simulate_calls(fake, calls_per_second=20, speed=50, seed=7))
    await asyncio.sleep(0.4)
    traffic.cancel()
    await asyncio.wait({traffic})
    body = await list_calls(http, fake, fields=["callUuid", "status", "fromNumber"])
    rows = body["data"]
    assert rows
    assert len(rows) == len(fake.calls.rows)
    assert {row["status"] for row in rows} <= {"ringing", "answered", "completed", "no_answer"}
    assert all(row["fromNumber"] for row in rows)
