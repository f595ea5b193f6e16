"""What every attempt sends: the event's body and its Standard Webhooks headers."""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

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


def new_message_id() -> str:
    """Return a fresh Standard Webhooks message id (``msg_`` + 32 hex digits), for an event
    that has no id of its own."""
    return f"msg_{uuid.uuid4().hex}"


def encode_body(msg_id: str, event: Event) -> bytes:
    """Return the request body for ``event``: the bytes that every attempt sends and signs.

    ``{"id", "type", "occurred_at", "topic", "origin", "data"}``: ``id`` equals the
    ``webhook-id`` header, ``occurred_at`` is RFC 3339 UTC, ``origin`` says whether the event
    came from the channel (``realtime``) or was rebuilt from ``list_calls`` (``reconcile``),
    ``data`` is the payload as received (a ``list_calls`` row for a rebuilt one). ASCII-only
    JSON, so that any string the channel delivered (even a lone surrogate) encodes.

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
    return json.dumps(envelope, separators=(",", ":")).encode("ascii")


@functools.lru_cache(maxsize=64)
def _signer(secret: str) -> Webhook:
    # Decoding the secret took 6 % of the loop per attempt; secrets change only on reload.
    return Webhook(secret)


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
    when = datetime.fromtimestamp(timestamp, UTC)
    text = body.decode()
    signatures = " ".join(_signer(secret).sign(msg_id, when, text) for secret in secrets)
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
