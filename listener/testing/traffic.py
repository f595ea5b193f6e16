"""Simulated call traffic for the demo and for tests: realistic call lifecycles.

Each call rings (``incoming_call``), is usually answered (``call_answered``) and always ends
(``call_ended``); some carry transcript events, which the daemon passes on like any other. An
``end_call`` RPC for a live call ends it at once, as Sippet would. Callers take turns from a
fixed list, so a given number calls regularly (the demo blocks one of them).
Payloads mirror Sippet's ``Call`` resource, in camelCase, snake_case or nested under ``call``,
because the realtime field spelling is not documented.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from listener.testing.server import FakeSippet, RecordedRpc

__all__ = ["CALLERS", "PayloadStyle", "call_payload", "simulate_calls"]

PayloadStyle = Literal["camel", "snake", "nested"]
CALLERS = ("+15550100", "+15550000000", "+442071838750", "+15550101", "+4915112345678")
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


class _Calls:
    """The live calls of one simulation, so that an ``end_call`` RPC can end one."""

    def __init__(
        self, fake: FakeSippet, style: PayloadStyle, speed: float, rng: random.Random
    ) -> None:
        self.fake, self.style, self.speed, self.rng = fake, style, speed, rng
        self.live: dict[str, tuple[asyncio.Task[None], dict[str, Any]]] = {}
        self.started = 0
        self._ending: set[asyncio.Task[None]] = set()

    def start(self) -> asyncio.Task[None]:
        caller = CALLERS[self.started % len(CALLERS)]
        self.started += 1
        call: dict[str, Any] = {
            "callUuid": str(uuid.uuid4()),
            "direction": "inbound",
            "fromNumber": caller,
            "toNumber": "+15557654321",
            "sipUsername": None,
            "callSource": "pstn",
            "status": "ringing",
            "startedAt": _now(),
            "conversationId": str(uuid.uuid4()),
        }
        task = asyncio.create_task(self._lifecycle(call))
        self.live[call["callUuid"]] = (task, call)
        task.add_done_callback(lambda _: self.live.pop(call["callUuid"], None))
        return task

    def on_rpc(self, request: RecordedRpc) -> None:
        body = request.body if isinstance(request.body, dict) else {}
        call_uuid = (body.get("input") or {}).get("callUuid")
        if body.get("action") != "end_call" or call_uuid not in self.live:
            return
        task, call = self.live.pop(call_uuid)
        task.cancel()
        call.update(status="completed", endedAt=_now(), durationSeconds=0, endedBy="api")
        ending = asyncio.get_running_loop().create_task(self._send("call_ended", call))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    async def _send(self, name: str, fields: dict[str, Any]) -> None:
        await self.fake.broadcast(name, call_payload(dict(fields), self.style))

    async def _pause(self, low: float, high: float) -> None:
        await asyncio.sleep(self.rng.uniform(low, high) / self.speed)

    async def _lifecycle(self, call: dict[str, Any]) -> None:
        rng = self.rng
        await self._send("incoming_call", call)
        await self._pause(0.5, 2.0)
        answered = rng.random() < 0.8
        if answered:
            call.update(status="answered", sipUsername=f"operator{rng.randint(1, 9)}")
            await self._send("call_answered", call)
            for index in range(rng.randint(0, 2)):
                await self._pause(0.3, 1.0)
                await self._send(
                    "call_transcript_delta",
                    {
                        "callUuid": call["callUuid"],
                        "speaker": "caller",
                        "contentIndex": index,
                        "content": rng.choice(("Hello?", "I need help with my order.", "Thanks!")),
                    },
                )
        await self._pause(1.0, 4.0)
        self.live.pop(call["callUuid"], None)
        call.update(
            status="completed" if answered else "no_answer",
            endedAt=_now(),
            durationSeconds=rng.randint(3, 600) if answered else 0,
        )
        await self._send("call_ended", call)


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
    calls = _Calls(fake, style, speed, rng)
    fake.rpc_listeners.append(calls.on_rpc)
    try:
        while True:
            calls.start()
            await asyncio.sleep(rng.expovariate(calls_per_second))
    finally:
        fake.rpc_listeners.remove(calls.on_rpc)
        tasks = [task for task, _ in calls.live.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
