"""What every attempt sends: the event's body and its Standard Webhooks headers."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from secrets import token_hex

import orjson

from listener.core.events import Event
from listener.core.httputil import USER_AGENT
from listener.webhooks.destination import Destination

__all__ = [
    "RESERVED_HEADERS",
    "encode_body",
    "new_message_id",
    "request_headers",
    "sign_headers",
]

# Set on every request by :func:`request_headers` and the HTTP client: a destination's own
# headers may not replace them.
RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "webhook-id", "webhook-timestamp", "webhook-signature"}
)


# What orjson would write but json cannot: left to json, which refuses it.
_PASSTHROUGH = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def new_message_id() -> str:
    """Return a fresh Standard Webhooks message id (``msg_`` + 32 hex digits, random), for an
    event that has no id of its own."""
    # 128 random bits, not a UUID: 1.2 µs instead of uuid4's 3.4 µs, and the spec asks only
    # for a unique id.
    return f"msg_{token_hex(16)}"


def encode_body(msg_id: str, event: Event) -> bytes:
    """Return the request body for ``event``: the bytes that every attempt sends and signs.

    ``{"id", "type", "occurred_at", "topic", "origin", "data"}``: ``id`` equals the
    ``webhook-id`` header, ``occurred_at`` is RFC 3339 UTC, ``origin`` says whether the event
    came from the channel (``realtime``) or was rebuilt from ``list_calls`` (``reconcile``),
    ``data`` is the payload as received (a ``list_calls`` row for a rebuilt one). ASCII-only
    JSON, so that any string the channel delivered (even a lone surrogate) encodes. Floats that
    are not finite, which no frame can carry, are written as ``null``.

    Raises:
        TypeError: the payload holds something JSON cannot represent.
    """
    occurred = datetime.fromtimestamp(event.received_at, UTC).isoformat(timespec="milliseconds")
    envelope = {
        "id": msg_id,
        "type": event.name,
        "occurred_at": occurred.replace("+00:00", "Z"),
        "topic": event.topic,
        "origin": event.origin,
        "data": event.payload,
    }
    # orjson takes 0.3 µs where json takes 6.7 µs for a call event. It writes non-ASCII as
    # UTF-8 and refuses lone surrogates and integers past 64 bits: those bodies are written by
    # json, ASCII-only, as before. Types JSON does not have pass through to json and its
    # TypeError; floats may be spelt differently (1e16, not 1e+16), with the same value.
    try:
        body = orjson.dumps(envelope, option=_PASSTHROUGH)
        if body.isascii():
            return body
    except TypeError:
        pass
    return json.dumps(envelope, separators=(",", ":")).encode("ascii")


@functools.lru_cache(maxsize=64)
def _key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret, decoded as the Standard Webhooks library does."""
    # Decoding the secret took 6 % of the loop per attempt; secrets change only on reload.
    return base64.b64decode(secret.removeprefix("whsec_") + "==")


def sign_headers(
    secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Return the Standard Webhooks headers for one attempt.

    ``webhook-signature`` holds one ``v1,<base64 HMAC-SHA256>`` per secret, space-separated,
    each over ``{msg_id}.{timestamp}.{body}``. The result is secret material: never log it.

    Args:
        secrets: valid ``whsec_`` secrets (the configuration checks them).
        msg_id: the message id, the same on every attempt.
        timestamp: the attempt time, whole seconds since the epoch.
        body: the exact bytes sent.
    """
    # The library's Webhook.sign, without its datetime and str round trips: 3 µs instead of 8.
    signed = f"{msg_id}.{timestamp}.".encode() + body
    signatures = " ".join(
        "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()
        for secret in secrets
    )
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }


def request_headers(destination: Destination, msg_id: str, body: bytes) -> dict[str, str]:
    """Return the headers of an attempt starting now; the destination's may replace
    ``user-agent``, never the signature."""
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **destination.headers,
        **sign_headers(destination.secrets, msg_id, int(time.time()), body),
    }
