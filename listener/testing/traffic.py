"""Simulated call traffic for the demo and for tests: realistic call lifecycles.

Each call rings (``incoming_call``), is usually answered (``call_answered``) and always ends
(``call_ended``); some carry transcript events, which the daemon passes on like any other.
Payloads mirror Sippet's ``Call`` resource, in camelCase, snake_case or nested under ``call``,
because the realtime field spelling is not documented.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from listener.testing.server import FakeSippet

__all__ = ["PayloadStyle", "call_payload", "simulate_calls"]

PayloadStyle = Literal["camel", "snake", "nested"]
_NUMBERS = ("+15550100", "+15550101", "+442071838750", "+15550000000", "+4915112345678")
_SNAKE = {
    "callUuid": "call_uuid",
    "fromNumber": "from_number",
    "toNumber": "to_number",
    "sipUsername": "sip_username",
    "callSource": "call_source",
    "startedAt": "started_at",
    "endedAt": "ended_at",
    "durationSeconds": "duration_seconds",
    "conversationId": "conversation_id",
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def call_payload(fields: dict[str, Any], style: PayloadStyle) -> dict[str, Any]:
    """Spell a camelCase call payload the way ``style`` says."""
    if style == "camel":
        return fields
    snake = {_SNAKE.get(name, name): value for name, value in fields.items()}
    if style == "snake":
        return snake
    return {"call": snake, "occurredAt": fields.get("startedAt") or _now()}


async def _one_call(
    fake: FakeSippet, style: PayloadStyle, speed: float, rng: random.Random
) -> None:
    call: dict[str, Any] = {
        "callUuid": str(uuid.uuid4()),
        "direction": "inbound",
        "fromNumber": rng.choice(_NUMBERS),
        "toNumber": "+15557654321",
        "sipUsername": None,
        "callSource": "pstn",
        "status": "ringing",
        "startedAt": _now(),
        "conversationId": str(uuid.uuid4()),
    }
    await fake.broadcast("incoming_call", call_payload(dict(call), style))
    await asyncio.sleep(rng.uniform(0.5, 2.0) / speed)
    answered = rng.random() < 0.8
    if answered:
        call.update(status="answered", sipUsername=f"operator{rng.randint(1, 9)}")
        await fake.broadcast("call_answered", call_payload(dict(call), style))
        for index in range(rng.randint(0, 2)):
            await asyncio.sleep(rng.uniform(0.3, 1.0) / speed)
            await fake.broadcast(
                "call_transcript_delta",
                call_payload(
                    {
                        "callUuid": call["callUuid"],
                        "speaker": "caller",
                        "contentIndex": index,
                        "content": rng.choice(("Hello?", "I need help with my order.", "Thanks!")),
                    },
                    style,
                ),
            )
    await asyncio.sleep(rng.uniform(1.0, 4.0) / speed)
    call.update(
        status="completed" if answered else "no_answer",
        endedAt=_now(),
        durationSeconds=rng.randint(3, 600) if answered else 0,
    )
    await fake.broadcast("call_ended", call_payload(dict(call), style))


async def simulate_calls(
    fake: FakeSippet,
    *,
    calls_per_second: float = 0.5,
    style: PayloadStyle = "camel",
    speed: float = 1.0,
    seed: int | None = None,
) -> None:
    """Start calls at ``calls_per_second`` until cancelled; ``speed`` > 1 shortens calls."""
    rng = random.Random(seed)
    calls: set[asyncio.Task[None]] = set()
    try:
        while True:
            task = asyncio.create_task(_one_call(fake, style, speed, rng))
            calls.add(task)
            task.add_done_callback(calls.discard)
            await asyncio.sleep(rng.expovariate(calls_per_second))
    finally:
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.wait(calls)
