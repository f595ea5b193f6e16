"""The fake Sippet itself: its HTTP control API, its refusals, and the plugin fixture."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from listener.testing import FakeSippet
from tests.conftest import RunSession


async def test_control_api_drives_the_server(
    fake: FakeSippet, http: httpx.AsyncClient, run_session: RunSession
) -> None:
    control = f"{fake.base_url}/_fake"
    async with run_session() as (session, events):
        answer = await http.post(
            f"{control}/broadcast", json={"event": "incoming_call", "payload": {"callUuid": "c"}}
        )
        assert answer.json() == {"receivers": 1}
        assert (await events.wait_for(1))[0].call_key == "c"
        assert (await http.post(f"{control}/malformed")).json()["sent"] > 0
        changed = await http.post(f"{control}/behaviour", json={"answer_heartbeats": False})
        assert changed.json()["answer_heartbeats"] is False
        refused = await http.post(f"{control}/behaviour", json={"no_such_switch": 1})
        assert refused.status_code == 400
        await http.post(f"{control}/behaviour", json={"answer_heartbeats": True})
        await http.post(f"{control}/drop")
        await fake.wait_until(lambda: fake.joins >= 2)
        await session.joined.wait()
        stats = (await http.get(f"{control}/stats")).json()
    assert stats["joins"] == 2
    assert stats["sent_events"] == 1


async def test_the_socket_speaks_v2_frames_written_out_by_hand(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    # A bare websocket client and literal frames: neither side uses the daemon's codec.
    minted = await http.post(
        f"{fake.base_url}/api/realtime/session", headers={"x-api-key": fake.api_key}
    )
    query = f"session_token={minted.json()['token']}&vsn=2.0.0"
    url = fake.base_url.replace("http", "ws") + f"/socket/websocket?{query}"
    ok = '{"status":"ok","response":{}}'
    async with websockets.connect(url) as ws, asyncio.timeout(10):
        await ws.send('["1","1","events","phx_join",{}]')
        assert await ws.recv() == f'["1","1","events","phx_reply",{ok}]'
        await fake.broadcast("incoming_call", {"callUuid": "c-1", "name": "Zoë"})
        assert (
            await ws.recv()
            == '[null,null,"events","incoming_call",{"callUuid":"c-1","name":"Zoë"}]'
        )
        await ws.send('[null,"2","phoenix","heartbeat",{}]')
        assert await ws.recv() == f'[null,"2","phoenix","phx_reply",{ok}]'
        await ws.send('["1","3","events","phx_leave",{}]')
        assert await ws.recv() == f'["1","3","events","phx_reply",{ok}]'
        assert await ws.recv() == '["1","1","events","phx_close",{}]'


@pytest.mark.parametrize("query", ["session_token=unknown&vsn=2.0.0", "session_token=x"])
async def test_unknown_tokens_and_v1_clients_are_refused_with_403(
    fake: FakeSippet, query: str
) -> None:
    url = fake.base_url.replace("http", "ws") + f"/socket/websocket?{query}"
    with pytest.raises(InvalidStatus) as caught:
        await websockets.connect(url)
    assert caught.value.response.status_code == 403


async def test_plugin_fixture_serves_a_fresh_fake(
    fake_sippet: FakeSippet, http: httpx.AsyncClient
) -> None:
    minted = await http.post(
        f"{fake_sippet.base_url}/api/realtime/session", headers={"x-api-key": fake_sippet.api_key}
    )
    assert minted.status_code == 200
    assert set(minted.json()) == {"token", "expires_at", "ttl_seconds"}
    assert fake_sippet.mints == 1


async def test_scripted_replies_can_target_one_action(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    fake.script_rpc(body={"success": True, "data": "for end_call"}, action="end_call")
    fake.script_rpc(body={"success": True, "data": "for anything"})
    headers = {"x-api-key": fake.api_key}
    run = f"{fake.base_url}/rpc/public/run"
    first = await http.post(run, json={"action": "list_calls"}, headers=headers)
    second = await http.post(run, json={"action": "end_call"}, headers=headers)
    assert (first.json()["data"], second.json()["data"]) == ("for anything", "for end_call")
