"""A lean HTTP/1.1 client for webhook delivery: asyncio streams, keep-alive, by hand.

Webhook delivery is the one hot HTTP path of the daemon (thousands of small POSTs a second
while a backlog drains). Measured on the 2-core reference machine against the same loopback
receiver, httpx spends about 2 ms of CPU per request (400-700 requests/s), httpcore alone about
1 ms, and h11 driven directly about 0.2 ms. h11 was then this module's parser; the request
and the answer are now written and read here instead: h11 took ~46 µs of CPU per exchange
(serialising with validation, parsing with its state machine, one more read per answer), this
~6.5 µs. End to end (``python -m bench.endtoend``, side by side, two runs) the daemon went from
2,168 and 2,164 to 2,754 and 3,046 deliveries/s, from 468 and 463 to 367 and 299 µs of CPU per
delivery, as attempts got shorter and so did the hand-offs waiting on them. httpx stays for
everything else (token minting, RPC); this module does only what delivery needs: POST,
keep-alive, TLS, a bounded answer, no redirects, no proxies.

What is read, strictly: a status line ``HTTP/1.x NNN reason``; header lines ``name: value``
(names are tokens; no obsolete line folding); 1xx answers skipped; the body framed by
``Transfer-Encoding: chunked``, else ``Content-Length`` (one value, however many times it is
repeated), else by the connection closing (204 and 304 have none). A connection is kept only
after an HTTP/1.1 answer without ``Connection: close`` whose body was read to its end.
Anything else is a ``protocol`` error. What is written: our request line and headers, each
name a token and each value free of control characters (else a ``request`` error).
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from listener.core.errors import ListenerError

__all__ = ["Http1Error", "Http1Pool", "Reply"]

_READ_SIZE = 65536
_MAX_IDLE_PER_ORIGIN = 64
Origin = tuple[str, str, int]
_Kind = Literal["connection", "protocol", "request"]
# RFC 9110: a field name is a token; a value has no control characters but tab.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_CRLF = b"\r\n"


class Http1Error(ListenerError):
    """The request failed below HTTP.

    Attributes:
        kind: ``connection`` (refused, reset, closed before answering), ``protocol`` (the
            answer is not HTTP/1.1) or ``request`` (ours cannot be sent: a bad URL or header).
    """

    def __init__(self, message: str, kind: _Kind = "connection") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer: its status, its headers (names in lower case) and the start of its body."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""


class _Stale(Exception):
    """A kept-alive connection turned out closed before any answer: safe to retry once."""


class _Malformed(Exception):
    """The answer is not HTTP/1.1 as this module reads it."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        # Between two exchanges that each ended cleanly, with keep-alive.
        self.idle = True

    @property
    def reusable(self) -> bool:
        return self.idle and not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.idle = False
        self.writer.close()


@functools.lru_cache(maxsize=256)
def _split(url: str) -> tuple[Origin, bytes]:
    """The origin of ``url`` and the start of every request to it (request line, host)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Http1Error(f"not an http(s) URL: {parts.scheme}://...", "request")
    origin = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]
    if _BAD_TARGET.search(target) or _BAD_VALUE.search(host):
        raise Http1Error("invalid request: a space or control character in the URL", "request")
    return origin, _encode(f"POST {target} HTTP/1.1\r\nhost: {host}\r\n")


def _encode(text: str) -> bytes:
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise Http1Error("invalid request: not ASCII", "request") from None


def _header_lines(headers: Mapping[str, str]) -> str:
    lines = []
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name.encode("latin-1", "replace")) or _BAD_VALUE.search(value):
            raise Http1Error(f"invalid request: header {name!r}", "request")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


def _parse_head(raw: bytes) -> tuple[int, dict[str, str], bool, str | None, str | None]:
    """Status line and headers; returns (status, headers, HTTP/1.1, content-length,
    transfer-encoding), headers named in lower case, the last of repeated ones kept (the
    framing headers' repeats are checked)."""
    lines = raw[: -len(_CRLF) * 2].split(_CRLF)
    status_line = lines[0]
    if not status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) or len(status_line) < 12:
        raise _Malformed(f"not an HTTP/1.1 status line: {status_line[:40]!r}")
    code = status_line[9:12]
    if not code.isdigit() or status_line[12:13] not in (b"", b" "):
        raise _Malformed(f"not an HTTP/1.1 status line: {status_line[:40]!r}")
    headers: dict[str, str] = {}
    lengths: set[str] = set()
    codings: list[str] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise _Malformed(f"not a header line: {line[:40]!r}")
        key = name.decode("latin-1").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key == "content-length":
            lengths.update(part.strip() for part in text.split(","))
        elif key == "transfer-encoding":
            codings.append(text)
        headers[key] = text
    if len(lengths) > 1:
        raise _Malformed("conflicting content-length")
    length = lengths.pop() if lengths else None
    coding = ", ".join(codings) if codings else None
    return int(code), headers, status_line[7:8] == b"1", length, coding


class Http1Pool:
    """Keep-alive connections per origin; any number of concurrent requests.

    Args:
        connect_timeout: seconds a TCP + TLS connect may take.
        ssl_context: for https origins (default: the system's trust store).
        user_agent: the ``user-agent`` header, unless a request sets one.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = "",
    ) -> None:
        self._connect_timeout = connect_timeout
        self._ssl = ssl_context
        self._user_agent = user_agent
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        max_answer: int = 65536,
        keep: int = 0,
    ) -> Reply:
        """POST ``body`` to ``url``; return the answer's status, headers and first ``keep``
        bytes of its body.

        The answer body is read up to ``max_answer`` bytes, the rest of it dropped (a longer
        one closes the connection instead of being read). Bound the call with
        ``asyncio.timeout``: a cancelled request closes its connection.

        Raises:
            Http1Error: connection failure or malformed answer.
            TimeoutError: the connect took longer than ``connect_timeout``.
        """
        origin, start = _split(url)
        extra = headers
        if self._user_agent and "user-agent" not in headers:
            extra = {"user-agent": self._user_agent, **headers}
        request = (
            start + _encode(f"content-length: {len(body)}\r\n{_header_lines(extra)}\r\n") + body
        )
        for _ in range(2):
            connection, reused = await self._acquire(origin)
            try:
                reply = await self._exchange(connection, request, max_answer, keep)
            except _Stale:
                connection.close()
                if reused:
                    continue
                raise Http1Error("connection closed before any answer") from None
            except BaseException:
                connection.close()
                raise
            self._release(origin, connection)
            return reply
        raise Http1Error("connection closed before any answer")

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    async def _acquire(self, origin: Origin) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable:
                return connection, True
            connection.close()
        scheme, host, port = origin
        context = None
        if scheme == "https":
            if self._ssl is None:
                # Made once, at the first https:// connection: one per connection loaded
                # the system's CA certificates each time, 20 ms of the event loop.
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context else None,
                    limit=_READ_SIZE,
                )
        except OSError as exc:
            raise Http1Error(f"cannot connect: {exc.strerror or type(exc).__name__}") from None
        return _Connection(reader, writer), False

    def _release(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if self._closed or not connection.reusable or len(idle) >= _MAX_IDLE_PER_ORIGIN:
            connection.close()
        else:
            idle.append(connection)

    @staticmethod
    async def _exchange(
        connection: _Connection, request: bytes, max_answer: int, keep: int
    ) -> Reply:
        reader = connection.reader
        connection.idle = False
        answered = False
        try:
            connection.writer.write(request)
            await connection.writer.drain()
            while True:
                try:
                    head = await reader.readuntil(_CRLF * 2)
                except asyncio.IncompleteReadError as exc:
                    if not (answered or exc.partial):
                        raise _Stale from None
                    raise _Malformed("connection closed mid-answer") from None
                answered = True
                status, reply_headers, http11, length, coding = _parse_head(head)
                # 1xx are interim answers (100 Continue, 103 Early Hints): the real one follows.
                if not 100 <= status < 200:
                    break
                if status == 101:
                    raise _Malformed("101 Switching Protocols to a POST")
            kept, complete = await _read_body(reader, status, length, coding, max_answer, keep)
        except asyncio.LimitOverrunError:
            raise Http1Error("Malformed: an answer line longer than 64 KiB", "protocol") from None
        except _Malformed as exc:
            raise Http1Error(f"Malformed: {exc}", "protocol") from None
        except ConnectionError as exc:
            if not answered:
                raise _Stale from None
            raise Http1Error(f"{type(exc).__name__}: {exc}", "connection") from None
        if not complete:
            # Not worth reading into memory: give up the connection instead.
            connection.close()
        elif http11 and "close" not in reply_headers.get("connection", "").lower():
            connection.idle = True
        return Reply(status, reply_headers, kept)


async def _read_body(
    reader: asyncio.StreamReader,
    status: int,
    length: str | None,
    coding: str | None,
    max_answer: int,
    keep: int,
) -> tuple[bytes, bool]:
    """Read an answer's body, at most ``max_answer`` bytes of it; return its first ``keep``
    bytes and whether it was read to its end (then the connection may be kept)."""
    if status in (204, 304):
        return b"", True
    if coding is not None:
        if coding.lower() != "chunked":
            raise _Malformed(f"unsupported transfer-encoding {coding!r}")
        return await _read_chunked(reader, max_answer, keep)
    if length is not None:
        if not length.isdigit():
            raise _Malformed(f"invalid content-length {length!r}")
        size = int(length)
        try:
            if size > max_answer:
                return await reader.readexactly(min(keep, size)), False
            data = await reader.readexactly(size) if size else b""
        except asyncio.IncompleteReadError:
            raise _Malformed("connection closed mid-answer") from None
        return data[:keep], True
    # Delimited by the connection closing: never kept.
    kept, received = b"", 0
    while chunk := await reader.read(_READ_SIZE):
        received += len(chunk)
        if len(kept) < keep:
            kept += chunk[: keep - len(kept)]
        if received > max_answer:
            break
    return kept, False


async def _read_chunked(
    reader: asyncio.StreamReader, max_answer: int, keep: int
) -> tuple[bytes, bool]:
    kept, received = b"", 0
    try:
        while True:
            line = await reader.readuntil(_CRLF)
            size_text = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _Malformed(f"invalid chunk size {size_text[:20]!r}") from None
            if size == 0:
                # Trailers, up to the empty line.
                while await reader.readuntil(_CRLF) != _CRLF:
                    pass
                return kept, True
            received += size
            if received > max_answer:
                if len(kept) < keep:
                    kept += await reader.readexactly(min(size, keep - len(kept)))
                return kept, False
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != _CRLF:
                raise _Malformed("a chunk does not end with CRLF")
            if len(kept) < keep:
                kept += chunk[: min(size, keep - len(kept))]
    except asyncio.IncompleteReadError:
        raise _Malformed("connection closed mid-answer") from None
