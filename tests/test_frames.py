"""The server's frames read in runs give what stock websockets gives, byte for byte.

Each stream below is written by a server on loopback that does the handshake with websockets'
own sans-I/O server (permessage-deflate negotiated or not) and then writes chosen bytes, in
chosen pieces: each piece is written once the client has received the one before, so every
split is a real TCP read. The same stream is read by stock websockets (``recv()``, one
message at a time) and by the daemon's path (``RunProtocol`` and ``_Received``); the messages,
the close frames each side sent and received, and what the client wrote back (pongs, its
close) must be the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from listener.realtime.connection import _CountingConnection, _Received
from listener.realtime.frames import Messages, RunProtocol

# A script writes its pieces with the server protocol the handshake negotiated.
Script = Callable[[ServerProtocol], Sequence[bytes]]


def _raw(head: int, payload: bytes, *, second: int | None = None) -> bytes:
    """A server frame as bytes, whatever its bits (``second``: the length byte as given)."""
    if second is not None:
        return bytes([head, second]) + payload
    if len(payload) < 126:
        return bytes([head, len(payload)]) + payload
    if len(payload) < 65536:
        return bytes([head, 126]) + struct.pack("!H", len(payload)) + payload
    return bytes([head, 127]) + struct.pack("!Q", len(payload)) + payload


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _sent(server: ServerProtocol) -> bytes:
    return b"".join(server.data_to_send())


def _texts(server: ServerProtocol, count: int, start: int = 0) -> bytes:
    for seq in range(start, start + count):
        server.send_text(f'[null,null,"events","incoming_call",{{"seq":{seq}}}]'.encode())
    return _sent(server)


def _close(server: ServerProtocol, code: int = 1000) -> bytes:
    server.send_close(code, "bye")
    return _sent(server)


class _StockClient(ClientConnection):
    received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.changed.set()
        super().data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.changed = asyncio.Event()
        super().connection_made(transport)


class _RunClient(_CountingConnection):
    """The daemon's connection, counting the runs it was handed."""

    run_count = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.changed.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.changed = asyncio.Event()
        super().connection_made(transport)

    def process_event(self, event: Any) -> None:
        if type(event) is Messages:
            self.run_count += 1
        super().process_event(event)


@dataclass
class Outcome:
    messages: list[str | bytes] = field(default_factory=list)
    close_sent: Close | None = None
    close_rcvd: Close | None = None
    # What the client wrote back, as the server parsed it: (opcode, payload).
    client_frames: list[tuple[Opcode, bytes]] = field(default_factory=list)
    runs: int = 0
    # With a small max_queue and nothing read: how many messages were held when reading
    # paused.
    held: int | None = None


class RawServer:
    """Plays one script per connection, pieces split where the script says."""

    def __init__(self) -> None:
        self.script: Script = lambda server: []
        self.deflate = False
        # With permessage-deflate: a new decoder per message (the server's choice).
        self.no_context_takeover = False
        self.client: Any = None
        self.client_frames: list[tuple[Opcode, bytes]] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        factory = ServerPerMessageDeflateFactory(
            server_no_context_takeover=self.no_context_takeover
        )
        extensions = [factory] if self.deflate else None
        protocol = ServerProtocol(extensions=extensions)
        with contextlib.suppress(ConnectionError):
            protocol.receive_data(await reader.readuntil(b"\r\n\r\n"))
            [request] = protocol.events_received()
            assert isinstance(request, Request)
            protocol.send_response(protocol.accept(request))
            response = _sent(protocol)
            writer.write(response)
            # The client is made by now (it sent the request).
            client = self.client
            written = len(response)
            for piece in self.script(protocol):
                writer.write(piece)
                await writer.drain()
                written += len(piece)
                while client.received < written:
                    client.changed.clear()
                    await client.changed.wait()
            # Read the client's answers until its close frame, then end the TCP connection.
            while data := await reader.read(65536):
                protocol.receive_data(data)
                for frame in protocol.events_received():
                    assert isinstance(frame, Frame)
                    self.client_frames.append((frame.opcode, bytes(frame.data)))
                if any(opcode is Opcode.CLOSE for opcode, _ in self.client_frames):
                    break
        writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    server = RawServer()
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield server


async def _play(
    server: RawServer,
    script: Script,
    *,
    runs: bool,
    deflate: bool,
    max_size: int = 2**22,
    max_queue: int | None = None,
) -> Outcome:
    server.script, server.deflate, server.client_frames = script, deflate, []
    made: list[_StockClient | _RunClient] = []

    def factory(*args: Any, **kwargs: Any) -> ClientConnection:
        made.append((_RunClient if runs else _StockClient)(*args, **kwargs))
        server.client = made[0]
        return made[0]

    outcome = Outcome()
    async with asyncio.timeout(10):
        ws = await websockets.connect(
            f"ws://127.0.0.1:{server.port}/",
            create_connection=factory,  # type: ignore[arg-type]
            compression="deflate" if deflate else None,
            max_size=max_size,
            max_queue=max_queue,
            ping_interval=None,
        )
        if max_queue is not None:
            while not ws.recv_messages.paused:
                made[0].changed.clear()
                await made[0].changed.wait()
            outcome.held = len(ws.recv_messages.frames)
        if runs:
            assert isinstance(ws, _RunClient)
            assert ws.runs
            assert type(ws.protocol) is RunProtocol
            received = _Received.of(ws)
            assert received is not None
            with contextlib.suppress(ConnectionClosed):
                while True:
                    outcome.messages.extend(await received.next())
                    received.done()
            outcome.runs = ws.run_count
        else:
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    outcome.messages.append(message)
        await ws.wait_closed()
    outcome.close_sent, outcome.close_rcvd = ws.protocol.close_sent, ws.protocol.close_rcvd
    outcome.client_frames = server.client_frames
    return outcome


async def _same(server: RawServer, script: Script, **options: Any) -> Outcome:
    """Play ``script`` through both paths; assert they agree; return the runs' outcome."""
    options.setdefault("deflate", False)
    stock = await _play(server, script, runs=False, **options)
    ours = await _play(server, script, runs=True, **options)
    assert ours.messages == stock.messages
    assert ours.held == stock.held
    assert (ours.close_sent, ours.close_rcvd) == (stock.close_sent, stock.close_rcvd)
    assert ours.client_frames == stock.client_frames
    return ours


@pytest.mark.parametrize(
    ("deflate", "no_context_takeover"),
    [(False, False), (True, False), (True, True)],
    ids=["plain", "deflate", "deflate-no-context-takeover"],
)
async def test_many_frames_in_one_read_and_split_at_every_byte_match_stock(
    raw: RawServer, deflate: bool, no_context_takeover: bool
) -> None:
    raw.no_context_takeover = no_context_takeover
    noise = random.Random(7).randbytes(3000)

    def at_once(server: ServerProtocol) -> list[bytes]:
        # 7- and 16-bit lengths, text and binary, over 2,044 bytes compressed (websockets
        # inflates those in two calls).
        server.send_binary(b"\x00\x01binary")
        server.send_text(("x" * 300).encode())
        server.send_text(noise.hex().encode())
        server.send_binary(noise)
        texts = _texts(server, 300)
        return [_sent(server) + texts + _close(server)]

    outcome = await _same(raw, at_once, deflate=deflate)
    assert len(outcome.messages) == 304
    assert noise in outcome.messages
    assert outcome.close_rcvd == Close(1000, "bye")
    # The bulk came in runs, not frame by frame (a read holds up to 256 KiB).
    assert 1 <= outcome.runs <= 3

    for size in (1, 61, 131):
        # Every split point: a read of one byte each, and reads that end at every offset
        # of a frame in turn (61 and 131 are prime, the frames 15 to 220 bytes long).
        def pieces(server: ServerProtocol, size: int = size) -> list[bytes]:
            texts = _texts(server, 40)
            server.send_text(("y" * 200).encode())
            server.send_binary(b"\x02")
            data = texts + _sent(server) + _close(server)
            return _pieces(data, size)

        outcome = await _same(raw, pieces, deflate=deflate)
        assert len(outcome.messages) == 42
        # Byte by byte, every frame is incomplete when its first byte arrives: websockets
        # reads it. In larger reads, the complete frames come in runs.
        assert (outcome.runs > 0) == (size > 1)


async def test_control_frames_fragments_and_a_close_amid_runs_match_stock(
    raw: RawServer,
) -> None:
    for deflate in (False, True):
        # In one read, in reads of 61 bytes, and byte by byte.
        for size in (1 << 20, 61, 1):

            def script(server: ServerProtocol, size: int = size) -> list[bytes]:
                return _pieces(_interleave(server), size)

            outcome = await _same(raw, script, deflate=deflate)
            assert "frag-mented" in outcome.messages
            assert len(outcome.messages) == 16
            assert (Opcode.PONG, b"are you there") in outcome.client_frames
            assert (Opcode.PONG, b"inside") in outcome.client_frames
            assert outcome.close_rcvd == Close(1000, "bye")
            assert (outcome.runs > 0) == (size > 1)


def _interleave(server: ServerProtocol) -> bytes:
    first = _texts(server, 5)
    server.send_ping(b"are you there")
    server.send_pong(b"unsolicited")
    pings = _sent(server)
    middle = _texts(server, 5, start=5)
    server.send_text(b"frag-", fin=False)
    server.send_ping(b"inside")
    server.send_continuation(b"ment", fin=False)
    server.send_continuation(b"ed", fin=True)
    fragments = _sent(server)
    tail = _texts(server, 5, start=10) + _close(server)
    # Frames after the close are not read (websockets discards them).
    return first + pings + middle + fragments + tail + _raw(0x81, b"never")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_raw(0x83, b"bad opcode"), 1002),
        (_raw(0xA1, b"rsv2"), 1002),
        (_raw(0x91, b"rsv3"), 1002),
        (_raw(0xC1, b"rsv1 without deflate"), 1002),
        (_raw(0x81, b"mask" + b"masked", second=0x80 | 6), 1002),
        (_raw(0x89, b"p" * 126), 1002),  # a control frame over 125 bytes
        (_raw(0x80, b"continuation of nothing"), 1002),
        (_raw(0x81, b"x" * 2000), 1009),  # over max_size, 16-bit length
        (_raw(0x82, b"z" * 70000), 1009),  # over max_size, 64-bit length
    ],
    ids=["opcode", "rsv2", "rsv3", "rsv1", "masked", "long-ping", "cont", "big16", "big64"],
)
async def test_a_bad_frame_after_good_ones_fails_as_stock_does(
    raw: RawServer, frame: bytes, code: int
) -> None:
    def script(server: ServerProtocol) -> list[bytes]:
        return [_texts(server, 3) + frame + _texts(server, 2, start=3)]

    outcome = await _same(raw, script, max_size=1000)
    assert outcome.messages == [
        f'[null,null,"events","incoming_call",{{"seq":{seq}}}]' for seq in range(3)
    ]
    assert outcome.close_sent is not None
    assert outcome.close_sent.code == code


async def test_compressed_errors_and_a_2_mb_frame_match_stock(raw: RawServer) -> None:
    def corrupt(server: ServerProtocol) -> list[bytes]:
        # The bad frame in a read of its own too, while the parser waits between frames.
        return [_texts(server, 3), _texts(server, 1, 3) + _raw(0xC1, b"\xff\xfe not deflate")]

    outcome = await _same(raw, corrupt, deflate=True)
    assert outcome.close_sent == Close(1002, "decompression failed")
    assert len(outcome.messages) == 4

    def bomb(server: ServerProtocol) -> list[bytes]:
        # A few compressed bytes that inflate past max_size.
        texts = _texts(server, 2)
        server.send_text(b"a" * 5000)
        return [texts, _sent(server) + _close(server)]

    outcome = await _same(raw, bomb, deflate=True, max_size=1000)
    assert outcome.close_sent is not None
    assert outcome.close_sent.code == 1009
    assert len(outcome.messages) == 2

    big = b"[" + b"7," * 1_000_000 + b"7]"

    def two_mb(server: ServerProtocol) -> list[bytes]:
        texts = _texts(server, 2)
        server.send_text(big)
        data = texts + _sent(server) + _texts(server, 2, start=2) + _close(server)
        return [data[:70000], data[70000:]]

    for deflate in (False, True):
        outcome = await _same(raw, two_mb, deflate=deflate)
        assert big.decode() in outcome.messages
        assert len(outcome.messages) == 5


async def test_a_text_frame_that_is_not_utf8_is_kept_as_bytes_where_stock_fails_1007(
    raw: RawServer,
) -> None:
    def script(server: ServerProtocol) -> list[bytes]:
        # No close: stock fails the connection (a close in the same read would come first).
        return [_texts(server, 2) + _raw(0x81, b"\xff\xfe") + _texts(server, 1, 2)]

    def closed(server: ServerProtocol) -> list[bytes]:
        return [*script(server), _close(server)]

    stock = await _play(raw, script, runs=False, deflate=False)
    assert stock.close_sent is not None
    assert stock.close_sent.code == 1007
    ours = await _play(raw, closed, runs=True, deflate=False)
    assert ours.messages[2] == b"\xff\xfe"
    assert len(ours.messages) == 4
    assert ours.close_rcvd == Close(1000, "bye")


async def test_reading_pauses_past_max_queue_messages_as_stock_does(raw: RawServer) -> None:
    def script(server: ServerProtocol) -> list[bytes]:
        return [_texts(server, 100) + _close(server)]

    # Nothing is read until the transport has paused: one read brought all 100.
    outcome = await _same(raw, script, max_queue=4)
    assert outcome.held == 100
    assert outcome.runs == 1
    assert len(outcome.messages) == 100


def test_a_protocol_other_than_websockets_own_or_logging_frames_keeps_its_own_parser() -> None:
    class Other(ClientProtocol):
        pass

    other = Other(parse_uri("ws://127.0.0.1/"))
    assert not RunProtocol.adopt(other)
    assert type(other) is Other
    logged = logging.getLogger("tests.frames.debug")
    logged.setLevel(logging.DEBUG)
    # With frames logged at DEBUG level, websockets parses (and logs) every one.
    assert not RunProtocol.adopt(ClientProtocol(parse_uri("ws://127.0.0.1/"), logger=logged))
    stock = ClientProtocol(parse_uri("ws://127.0.0.1/"))
    assert RunProtocol.adopt(stock)
    assert type(stock) is RunProtocol
