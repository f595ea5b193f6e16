"""The server's frames, read in runs: websockets' client protocol with a cheaper common case.

websockets parses each frame with generators (``Frame.parse``, a ``read_exact`` per header
part), builds a ``Frame`` (twice when it is compressed), checks it and hands it on one by
one. Almost every frame the server sends is the same simple kind: a whole text or binary
message, unmasked, its length in 7 or 16 bits, compressed or not by the negotiated
permessage-deflate. :class:`RunProtocol` reads every complete frame of that kind waiting at
the start of the buffer in one loop, slicing the buffer directly, and hands their messages
on as one :class:`Messages` event; anything else (control frames, fragments, 64-bit lengths,
a frame over ``max_size``, bad bits, a frame not yet complete) is left to websockets' own
parser, which then also decides every error and its close code. No I/O here: the asyncio
connection puts a run's messages where ``recv()`` would find them (``connection.py``).

Figures (callgrind, 5,000 of the bench's call events as the fake server sends them,
compressed, fed 64 KiB at a time): websockets' parser 33,800 instructions a frame; the runs
9,100 a frame, the message decoded to ``str`` included (zlib's inflate is 3,500 of it; a
``Frame`` built per message would add 3,200, so the messages go on as ``str``). Uncompressed
(197 bytes a frame, as Phoenix sends by default): 27,000 -> 6,000.
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Event, Protocol

__all__ = ["Messages", "RunProtocol"]

# What permessage-deflate drops from each compressed message and puts back to inflate it.
_EMPTY_BLOCK = b"\x00\x00\xff\xff"
# Below this many compressed bytes websockets inflates the message with the block appended
# in one call; at or above it in two (permessage_deflate.py): that case goes through it.
_ONE_CALL = 2044
_FRAME_FIELDS = ("opcode", "data", "fin", "rsv1", "rsv2", "rsv3")


# What this relies on in websockets' parser, by the names its code uses: receive_data only
# feeds the reader and steps the parser; the parser's loop sizes each frame by these limits
# and hands it to recv_frame inside its error handler.
_RECEIVE_DATA_USES = ("reader", "feed_data", "next", "parser")
_PARSE_USES = {"at_eof", "current_size", "max_message_size", "max_fragment_size", "recv_frame"}
_PARSER_AS_READ = Protocol.receive_data.__code__.co_names == _RECEIVE_DATA_USES and (
    _PARSE_USES.issubset(Protocol.parse.__code__.co_names)
)


class Messages(list[str | bytes]):
    """The messages of a run of simple data frames, in order: one event for them all.

    A text message that is not UTF-8 is kept as bytes (``recv()`` would fail the connection
    with 1007); the reader treats it as malformed.
    """

    __slots__ = ()


class RunProtocol(ClientProtocol):
    """websockets' :class:`~websockets.client.ClientProtocol` that reads runs of simple frames.

    Made from the protocol websockets built (:meth:`adopt`), once it is known to hold the
    internals this reads; otherwise that protocol is left as it is.
    """

    # Whether websockets' parser waits at the start of a frame: only then may frames be
    # taken from the front of the buffer. Set after each frame websockets hands on.
    _between_frames = False
    # The negotiated extensions as this reads them: None for none, the permessage-deflate
    # instance, or False for anything else (every frame then goes through websockets).
    _deflate: PerMessageDeflate | bool | None = False
    _checked = False
    # What every run reads, fixed once the connection is open (see _settle).
    _limit: int | None = None
    _cap = sys.maxsize
    _header_mask = 0xFF
    _decoder: Any = None

    @classmethod
    def adopt(cls, protocol: ClientProtocol) -> bool:
        """Give ``protocol`` this class's frame path if it has what it reads; say whether."""
        # Another websockets may have moved these; then its own path serves.
        fits = (
            _PARSER_AS_READ
            and type(protocol) is ClientProtocol
            # websockets logs each frame it parses at DEBUG level: with that on, it parses all.
            and protocol.debug is False
            and isinstance(getattr(getattr(protocol, "reader", None), "buffer", None), bytearray)
            and isinstance(getattr(protocol, "events", None), list)
            and all(
                hasattr(protocol, name)
                for name in ("current_size", "max_message_size", "max_fragment_size", "parser")
            )
            and tuple(field.name for field in dataclasses.fields(Frame)) == _FRAME_FIELDS
        )
        if fits:
            protocol.__class__ = cls
        return fits

    def receive_data(self, data: bytes | bytearray) -> None:
        if not self._between_frames or self.state is not OPEN:
            super().receive_data(data)
            return
        self.reader.feed_data(data)
        try:
            self._take()
        except Exception as exc:
            # The parser waits at a frame's start, inside the handler that maps each error to
            # its close code (1002, 1009, ...): let it handle this one as its own.
            self.parser.throw(exc)
            return
        if self.reader.buffer:
            # A frame websockets must read, or one not yet complete: its parser goes on.
            self._between_frames = False
            next(self.parser)

    def recv_frame(self, frame: Frame) -> None:
        super().recv_frame(frame)
        # websockets' parser has just read a whole frame (it calls this inside its error
        # handler, so anything raised here is handled as its own would be).
        if self.state is OPEN:
            self._take()
            # With the buffer empty, the parser waits at the next frame's start.
            self._between_frames = not self.reader.buffer

    def _take(self) -> None:
        """Read every complete simple frame at the start of the buffer: one event for all."""
        if not self._checked:
            self._settle()
        deflate = self._deflate
        if deflate is False or self.current_size is not None:
            return
        if isinstance(deflate, PerMessageDeflate) and deflate.decode_cont_data:
            return
        limit, cap, header_mask, decoder = self._limit, self._cap, self._header_mask, self._decoder
        buffer = self.reader.buffer
        size = len(buffer)
        run = Messages()
        append = run.append
        at = 0
        try:
            while size - at >= 2:
                head = buffer[at]
                length = buffer[at + 1]
                # A whole text or binary message; a masked frame (length byte >= 128), a
                # 64-bit length, or one not complete yet is websockets' to read.
                if head & header_mask not in (0x81, 0x82):
                    break
                if length < 126:
                    start = at + 2
                elif length == 126 and size - at >= 4:
                    length = buffer[at + 2] << 8 | buffer[at + 3]
                    start = at + 4
                else:
                    break
                end = start + length
                if end > size or length > cap:
                    break
                data: bytes | bytearray = buffer[start:end]
                at = end
                if head & 0x40:
                    if decoder is not None and length < _ONE_CALL:
                        data = decoder.decompress(data + _EMPTY_BLOCK, cap)
                        if decoder.unconsumed_tail:
                            raise PayloadTooBig(None, cap)
                    else:
                        data = _inflate(deflate, head & 0x0F, data, limit)  # type: ignore[arg-type]
                if head & 0x0F == 1:
                    try:
                        append(data.decode())
                        continue
                    except UnicodeDecodeError:
                        pass
                append(bytes(data))
        except zlib.error as exc:
            raise ProtocolError("decompression failed") from exc
        finally:
            if at:
                del buffer[:at]
            if run:
                cast("list[Event | Messages]", self.events).append(run)

    def _settle(self) -> None:
        """Read once, at the first run (the connection open, its extensions negotiated), what
        every run needs and nothing changes: a lone frame is a run of its own, and this was
        a dozen reads and tests each (a lone event, no call store: 159,700 -> 155,400
        instructions, bench.instructions --rate 200 --events 2000 --no-store, one run, whose
        noise is a few thousand)."""
        self._checked = True
        deflate = self._deflate = _deflate(self.extensions)
        limit = self.max_message_size
        if self.max_fragment_size is not None:
            limit = self.max_fragment_size if limit is None else min(limit, self.max_fragment_size)
        self._limit = limit
        self._cap = sys.maxsize if limit is None else limit
        if isinstance(deflate, PerMessageDeflate):
            # RSV1 (compressed) may be set; FIN must be, RSV2 and RSV3 must not.
            self._header_mask = 0xBF
            # The common case inflated here (per-message decoders and two-call inflates in
            # _inflate): a call less per frame, 10,500 -> 9,100 instructions a frame. With
            # context takeover websockets keeps one decoder for the connection.
            self._decoder = None if deflate.remote_no_context_takeover else deflate.decoder


def _deflate(extensions: list[Any]) -> PerMessageDeflate | bool | None:
    if not extensions:
        return None
    if len(extensions) == 1 and type(extensions[0]) is PerMessageDeflate:
        deflate = extensions[0]
        names = ["decode_cont_data", "remote_no_context_takeover", "decode"]
        if not getattr(deflate, "remote_no_context_takeover", True):
            # The loop inflates with the connection's own decoder (see _take).
            names.append("decoder")
        if all(hasattr(deflate, name) for name in names):
            return deflate
    return False


def _inflate(
    deflate: PerMessageDeflate, opcode: int, data: bytes | bytearray, limit: int | None
) -> bytes:
    """One whole compressed message, by websockets' own ``PerMessageDeflate.decode``."""
    frame = Frame(Opcode(opcode), data, True, True, False, False)
    return bytes(deflate.decode(frame, max_size=limit).data)
