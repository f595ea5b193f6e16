"""Peer: ``realtime`` (Supabase realtime-py), in its own venv, with the baseline's shims.

Stock, it cannot talk to a V2-only server at all (HTTP 403: it sends ``vsn=1.0.0``), so, as
in the peer baseline:

1. ``VSN`` is set to ``2.0.0``;
2. the websocket is wrapped in a V1↔V2 frame translator that also re-wraps each Sippet event
   as a Supabase broadcast envelope (``event: "broadcast"``, ``payload: {type, event,
   payload}``), because its pydantic model accepts only Supabase event types;
3. the channel is built for the bare topic ``events`` (``client.channel()`` prefixes
   ``realtime:``).

Events are counted with ``channel.on_broadcast("*", cb)``, its normal callback API.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import realtime._async.client as rt_client
from common import Recorder, driver_args, mint_token, serve
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient

_CONTROL = frozenset({"phx_join", "phx_leave", "phx_reply", "phx_error", "phx_close"})


def _to_v1(text: str | bytes) -> str:
    """A V2 frame from the server as the V1 object realtime expects."""
    join_ref, ref, topic, event, payload = json.loads(text)[:5]
    if event not in _CONTROL and topic != "phoenix":
        payload = {"type": "broadcast", "event": event, "payload": payload}
        event = "broadcast"
    return json.dumps(
        {"join_ref": join_ref, "ref": ref, "topic": topic, "event": event, "payload": payload}
    )


def _to_v2(text: str) -> str:
    """A V1 object from realtime as a V2 frame for the server."""
    message = json.loads(text)
    return json.dumps(
        [
            message.get("join_ref"),
            message.get("ref"),
            message["topic"],
            message["event"],
            message.get("payload", {}),
        ]
    )


class _Translator:
    """Wraps realtime's websocket: V2 in becomes V1 out, V1 out becomes V2 on the wire."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    async def __aiter__(self) -> Any:
        async for text in self._ws:
            yield _to_v1(text)

    async def send(self, text: str) -> None:
        await self._ws.send(_to_v2(text))


_stock_connect = rt_client.connect


async def _translating_connect(*args: Any, **kwargs: Any) -> _Translator:
    return _Translator(await _stock_connect(*args, **kwargs))


async def main() -> None:
    args = driver_args(__doc__ or "")
    # The client's own account of reconnects and refusals, in the driver's log (stderr).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    rt_client.VSN = "2.0.0"
    rt_client.connect = _translating_connect
    token = mint_token(args.base_url, args.api_key)
    recorder = Recorder()
    client = AsyncRealtimeClient(f"{args.base_url}/socket", None, params={"session_token": token})
    await client.connect()
    channel = AsyncRealtimeChannel(client, args.topic)
    client.channels[args.topic] = channel
    record = recorder.record
    channel.on_broadcast("*", lambda message: record(message["payload"]))
    await channel.subscribe()
    if not channel.is_joined:
        raise SystemExit(f"realtime did not join: {channel.state}")

    def stats() -> dict[str, Any]:
        return {"joined": channel.is_joined, "connected": client.is_connected}

    await serve(recorder, {"client": "realtime"}, stats, client.close)


if __name__ == "__main__":
    asyncio.run(main())
