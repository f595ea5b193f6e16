"""The lean HTTP/1.1 client, against raw servers on loopback that misbehave on purpose."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trustme

from listener.webhooks.http1 import Http1Error, Http1Pool

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class RawServer:
    """Answers each request with ``answer(n)`` bytes; may close after answering."""

    def __init__(self, answer: Callable[[int], bytes], close_after: bool = False) -> None:
        # An empty answer means: say nothing, keep the connection open.
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                writer.write(self.answer(len(self.requests)))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            await self.server.wait_closed()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=ssl_context)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if ssl_context else 'http'}://localhost:{port}/hook?x=1"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., RawServer]]:
    """Make raw servers for a test; all are closed after it."""
    made: list[RawServer] = []

    def make(answer: Callable[[int], bytes], close_after: bool = False) -> RawServer:
        made.append(RawServer(answer, close_after))
        return made[-1]

    yield make
    for server in made:
        await server.stop()


@pytest.fixture
async def pool() -> AsyncIterator[Http1Pool]:
    client = Http1Pool(user_agent="sippet-listener/test")
    yield client
    await client.aclose()


async def test_keeps_connections_alive(pool: Http1Pool, serve: Callable[..., RawServer]) -> None:
    server = serve(lambda _: OK)
    url = await server.start()
    for _ in range(5):
        reply = await pool.post(url, b"{}", {"content-type": "application/json"})
        assert reply.status == 200
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /hook?x=1 HTTP/1.1\r\n")
    assert b"user-agent: sippet-listener/test" in first
    assert first.endswith(b"\r\n\r\n{}")


async def test_a_connection_the_server_closed_is_retried_on_a_fresh_one(
    pool: Http1Pool, serve: Callable[..., RawServer]
) -> None:
    server = serve(lambda _: OK, close_after=True)
    url = await server.start()
    assert (await pool.post(url, b"a", {})).status == 200
    # The idle connection is dead now; the pool notices and reconnects.
    assert (await pool.post(url, b"b", {})).status == 200
    assert server.connections == 2


async def test_headers_and_the_start_of_the_body_are_returned_large_bodies_not_read(
    pool: Http1Pool, serve: Callable[..., RawServer]
) -> None:
    big = b"x" * 200_000
    server = serve(
        lambda n: (
            b"HTTP/1.1 429 Too Many\r\nretry-after: 7\r\ncontent-length: "
            + str(len(big)).encode()
            + b"\r\n\r\n"
            + big
        )
    )
    url = await server.start()
    reply = await pool.post(url, b"{}", {}, max_answer=1000, keep=10)
    assert (reply.status, reply.headers["retry-after"], reply.body) == (429, "7", b"x" * 10)
    assert (await pool.post(url, b"{}", {}, max_answer=1000)).body == b""


async def test_refused_and_garbage_answers_raise_http1_error(
    pool: Http1Pool, serve: Callable[..., RawServer]
) -> None:
    with pytest.raises(Http1Error, match="cannot connect") as refused:
        await pool.post("http://127.0.0.1:9/x", b"", {})
    server = serve(lambda _: b"SMTP ready\r\n\r\n")
    url = await server.start()
    with pytest.raises(Http1Error) as garbage:
        await pool.post(url, b"{}", {})
    with pytest.raises(Http1Error, match="not an http") as ours:
        await pool.post("ftp://example.com/", b"", {})
    kinds = [caught.value.kind for caught in (refused, garbage, ours)]
    assert kinds == ["connection", "protocol", "request"]


async def test_a_cancelled_request_drops_its_connection(
    pool: Http1Pool, serve: Callable[..., RawServer]
) -> None:
    server = serve(lambda n: b"" if n == 1 else OK)
    url = await server.start()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await pool.post(url, b"{}", {})
    # The half-used connection was dropped, not reused for the next request.
    assert (await pool.post(url, b"{}", {})).status == 200
    assert server.connections == 2


async def test_https_with_a_trusted_certificate(serve: Callable[..., RawServer]) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    server = serve(lambda _: OK)
    url = await server.start(server_context)
    trusting = Http1Pool(ssl_context=client_context)
    try:
        assert (await trusting.post(url, b"{}", {})).status == 200
    finally:
        await trusting.aclose()
    distrusting = Http1Pool()
    try:
        with pytest.raises((Http1Error, ssl.SSLError)):
            await distrusting.post(url, b"{}", {})
    finally:
        await distrusting.aclose()


async def test_https_connections_share_the_trust_the_first_one_loaded(
    serve: Callable[..., RawServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default context is the system's trust store, read from $SSL_CERT_FILE when set:
    # the pool loads it once, so that a second connection finds the first one's trust
    # (made again per connection, it read the file again, 20 ms of the loop each time).
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    closing = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
    server = serve(lambda _: closing)
    url = await server.start(server_context)
    pool = Http1Pool()
    try:
        assert (await pool.post(url, b"{}", {})).status == 200
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "absent.pem"))
        assert (await pool.post(url, b"{}", {})).status == 200
    finally:
        await pool.aclose()
    assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "close_after", "body", "kept_alive"),
    [
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"2;x=1\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n",
            False,
            b"ok!!!",
            True,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\ntrailer: 1\r\n\r\n",
            False,
            b"",
            True,
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            False,
            b"ok",
            True,
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", False, b"", True),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            False,
            b"ok",
            False,
        ),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", False, b"ok", False),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", True, b"until the end", False),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok",
            False,
            b"ok",
            True,
        ),
    ],
    ids=[
        "chunked",
        "chunked-trailers",
        "interim-1xx",
        "204",
        "connection-close",
        "http-1.0",
        "until-close",
        "repeated-length",
    ],
)
async def test_answers_are_framed_as_http_1_1_says(
    pool: Http1Pool,
    serve: Callable[..., RawServer],
    answer: bytes,
    close_after: bool,
    body: bytes,
    kept_alive: bool,
) -> None:
    server = serve(lambda _: answer, close_after)
    url = await server.start()
    first = await pool.post(url, b"{}", {}, keep=100)
    assert (first.status in (200, 201, 204), first.body) == (True, body)
    await pool.post(url, b"{}", {}, keep=100)
    assert server.connections == (1 if kept_alive else 2)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ncontent-length: two\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
    ],
    ids=["conflicting-length", "bad-length", "gzip-coding", "bad-chunk", "folded", "101", "h2"],
)
async def test_malformed_answers_are_protocol_errors(
    pool: Http1Pool, serve: Callable[..., RawServer], answer: bytes
) -> None:
    server = serve(lambda _: answer)
    url = await server.start()
    with pytest.raises(Http1Error) as caught:
        await pool.post(url, b"{}", {})
    assert caught.value.kind == "protocol"


async def test_a_request_that_cannot_be_written_is_a_request_error(
    pool: Http1Pool, serve: Callable[..., RawServer]
) -> None:
    server = serve(lambda _: OK)
    url = await server.start()
    for headers in ({"x-bad": "a\r\nx-injected: 1"}, {"bad name": "1"}, {"x-name": "é"}):
        with pytest.raises(Http1Error) as caught:
            await pool.post(url, b"{}", headers)
        assert caught.value.kind == "request"
    with pytest.raises(Http1Error) as caught:
        await pool.post(url.replace("/hook", "/a b"), b"{}", {})
    assert caught.value.kind == "request"
    assert server.requests == []
