"""The end-to-end references: a minimal, non-durable, signed forwarding loop (~100 lines).

It reads the same socket as the daemon (``websockets`` + ``orjson``, joins ``events``,
heartbeats every 30 s, never reconnects) and POSTs each event to the webhook URL, signed per
Standard Webhooks, over 8 keep-alive HTTP/1.1 connections: the event goes on an in-memory
queue that 8 sender tasks take from, one connection each. Each sender builds the body the
daemon sends (``{"id", "type", "occurred_at", "topic", "data"}``, orjson) and signs it
(``v1,`` + base64 HMAC-SHA256 over ``{id}.{timestamp}.{body}``). Nothing is stored and
nothing retried: an event queued or in flight when the process dies, or answered with an
error, is lost. Two styles (option ``style``):

- ``h11`` (the reference of the targets): the loop as one writes it with the usual
  libraries, each called directly: ``h11`` for HTTP/1.1 (one ``h11.Connection`` per socket,
  as ``listener.webhooks.http1`` drove it until it wrote its requests by hand) and the
  ``standardwebhooks`` library's ``Webhook.sign`` (as ``listener.webhooks.signing`` does).
- ``raw`` (the limit): the request written by hand and the answer's status line, headers
  and body (``Content-Length`` or chunked) read by hand; the signature with ``hmac`` and
  ``base64`` from the standard library. The least Python can do per event.

Options (JSON): ``url`` (http only), ``secret`` (``whsec_...``), ``style`` (``h11``),
``connections`` (8).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import h11
import orjson
import websockets
from common import Recorder, driver_args, heartbeat, mint_token, serve, socket_url
from standardwebhooks.webhooks import Webhook

Queued = tuple[str, dict[str, Any], float]


async def _receive(
    ws: websockets.ClientConnection,
    topic: str,
    queue: asyncio.Queue[Queued],
    joined: asyncio.Event,
) -> None:
    put = queue.put_nowait
    async for raw in ws:
        try:
            _join_ref, ref, frame_topic, event, payload = orjson.loads(raw)[:5]
        except (ValueError, TypeError):
            continue
        if frame_topic != topic:
            continue
        if event == "phx_reply" and ref == "1":
            joined.set()
        elif not event.startswith("phx_"):
            put((event, payload, time.time()))


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 answer; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at >= 0:
        length = int(lower[at + 15 : lower.index(b"\r\n", at)])
        if length:
            await reader.readexactly(length)
    elif b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


def _body(msg_id: str, event: str, payload: dict[str, Any], topic: str, received: float) -> bytes:
    occurred = datetime.fromtimestamp(received, UTC).isoformat(timespec="milliseconds")
    return orjson.dumps(
        {
            "id": msg_id,
            "type": event,
            "occurred_at": occurred.replace("+00:00", "Z"),
            "topic": topic,
            "data": payload,
        }
    )


async def _send_raw(
    url: str, secret: str, topic: str, queue: asyncio.Queue[Queued], stats: dict[str, int]
) -> None:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    start = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
        "content-type: application/json\r\n"
    ).encode()
    while True:
        event, payload, received = await queue.get()
        msg_id = f"msg_{uuid.uuid4().hex}"
        body = _body(msg_id, event, payload, topic, received)
        timestamp = str(int(time.time()))
        signed = f"{msg_id}.{timestamp}.".encode() + body
        signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        request = (
            start
            + (
                f"content-length: {len(body)}\r\nwebhook-id: {msg_id}\r\n"
                f"webhook-timestamp: {timestamp}\r\nwebhook-signature: v1,{signature}\r\n\r\n"
            ).encode()
            + body
        )
        try:
            writer.write(request)
            status = await _read_answer(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            # The receiver closed a kept-alive connection: reconnect and send it again.
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status = await _read_answer(reader)
        stats["delivered" if 200 <= status < 300 else "failed"] += 1


async def _exchange(
    connection: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: h11.Request,
    body: bytes,
) -> int:
    writer.write(
        connection.send(request)
        + connection.send(h11.Data(data=body))
        + connection.send(h11.EndOfMessage())
    )
    status = 0
    while True:
        answer = connection.next_event()
        if answer is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed")
            connection.receive_data(data)
        elif isinstance(answer, h11.Response):
            status = answer.status_code
        elif isinstance(answer, h11.EndOfMessage):
            connection.start_next_cycle()
            return status


async def _send_h11(
    url: str, secret: str, topic: str, queue: asyncio.Queue[Queued], stats: dict[str, int]
) -> None:
    signer = Webhook(secret)
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    connection = h11.Connection(h11.CLIENT)
    while True:
        event, payload, received = await queue.get()
        msg_id = f"msg_{uuid.uuid4().hex}"
        body = _body(msg_id, event, payload, topic, received)
        timestamp = int(time.time())
        signature = signer.sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body.decode())
        request = h11.Request(
            method="POST",
            target=parts.path or "/",
            headers=[
                ("host", parts.netloc),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("webhook-id", msg_id),
                ("webhook-timestamp", str(timestamp)),
                ("webhook-signature", signature),
            ],
        )
        try:
            status = await _exchange(connection, reader, writer, request, body)
        except (ConnectionError, h11.RemoteProtocolError):
            # The receiver closed a kept-alive connection: reconnect and send it again.
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
            connection = h11.Connection(h11.CLIENT)
            status = await _exchange(connection, reader, writer, request, body)
        stats["delivered" if 200 <= status < 300 else "failed"] += 1


async def main() -> None:
    args = driver_args(__doc__ or "")
    options: dict[str, Any] = json.loads(args.options)
    send = {"raw": _send_raw, "h11": _send_h11}[options.get("style", "h11")]
    token = mint_token(args.base_url, args.api_key)
    url = socket_url(args.base_url, {"session_token": token, "vsn": "2.0.0"})
    queue: asyncio.Queue[Queued] = asyncio.Queue()
    stats = {"delivered": 0, "failed": 0}
    async with websockets.connect(url, max_size=None) as ws:
        joined = asyncio.Event()
        tasks = [
            asyncio.create_task(send(options["url"], options["secret"], args.topic, queue, stats))
            for _ in range(int(options.get("connections", 8)))
        ]
        tasks.append(asyncio.create_task(_receive(ws, args.topic, queue, joined)))
        tasks.append(asyncio.create_task(heartbeat(ws)))
        await ws.send(json.dumps(["1", "1", args.topic, "phx_join", {}]))
        async with asyncio.timeout(10):
            await joined.wait()
        # The receiver counts; the recorder only serves the command loop.
        await serve(Recorder(), {"client": "forward loop"}, lambda: dict(stats))
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


if __name__ == "__main__":
    asyncio.run(main())
