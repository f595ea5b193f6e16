"""The limit: a bare websockets + json receive loop, about 30 lines, no reconnect.

It connects with ``?session_token=…&vsn=2.0.0``, joins ``events``, heartbeats every 30 s,
counts every non-``phx_*`` event on the topic and skips frames it cannot decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import websockets
from common import Recorder, driver_args, heartbeat, mint_token, serve, socket_url


async def _receive(
    ws: websockets.ClientConnection, topic: str, recorder: Recorder, joined: asyncio.Event
) -> None:
    record = recorder.record
    async for raw in ws:
        try:
            _join_ref, ref, frame_topic, event, payload = json.loads(raw)[:5]
        except (ValueError, TypeError):
            continue
        if frame_topic != topic:
            continue
        if event == "phx_reply" and ref == "1":
            joined.set()
        elif not event.startswith("phx_"):
            record(payload)


async def main() -> None:
    args = driver_args(__doc__ or "")
    token = mint_token(args.base_url, args.api_key)
    recorder = Recorder()
    url = socket_url(args.base_url, {"session_token": token, "vsn": "2.0.0"})
    async with websockets.connect(url, max_size=None) as ws:
        joined = asyncio.Event()
        receiver = asyncio.create_task(_receive(ws, args.topic, recorder, joined))
        beating = asyncio.create_task(heartbeat(ws))
        await ws.send(json.dumps(["1", "1", args.topic, "phx_join", {}]))
        async with asyncio.timeout(10):
            await joined.wait()
        await serve(recorder, {"client": "bare websockets loop"})
        for task in (receiver, beating):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


if __name__ == "__main__":
    asyncio.run(main())
