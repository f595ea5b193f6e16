"""Simulated call traffic for the demo and for tests: realistic call lifecycles.

Each call rings (``incoming_call``), is usually answered (``call_answered``) and always ends
(``call_ended``); some carry transcript events, which the daemon passes on like any other. An
``end_call`` RPC for a live call ends it at once, as Sippet would. Callers take turns from a
fixed list, so a given number calls regularly (the demo blocks one of them).
Call events go through :meth:`FakeSippet.call_event`, so the fake's call table (and its
``list_calls``) follows the traffic; their payloads are the call's row, in camelCase, snake_case
or nested under ``call``, because the realtime field spelling is not documented.
"""

from __future__ import annotations

import asyncio
import random
import uuid

from listener.testing.calls import PayloadStyle, call_payload
from listener.testing.server import FakeSippet, RecordedRpc

__all__ = ["CALLERS", "PayloadStyle", "call_payload", "simulate_calls"]

CALLERS = ("+15550100", "+15550000000", "+442071838750", "+15550101", "+4915112345678")


class _Calls:
    """The live calls of one simulation, so that an ``end_call`` RPC can end one."""

    def __init__(
        self, fake: FakeSippet, style: PayloadStyle, speed: float, rng: random.Random
    ) -> None:
        self.fake, self.style, self.speed, self.rng = fake, style, speed, rng
        self.live: dict[str, asyncio.Task[None]] = {}
        self.started = 0
        self._ending: set[asyncio.Task[int]] = set()

    def start(self) -> asyncio.Task[None]:
        caller = CALLERS[self.started % len(CALLERS)]
        self.started += 1
        call_uuid = str(uuid.uuid4())
        task = asyncio.create_task(self._lifecycle(call_uuid, caller))
        self.live[call_uuid] = task
        task.add_done_callback(lambda _: self.live.pop(call_uuid, None))
        return task

    def on_rpc(self, request: RecordedRpc) -> None:
        body = request.body if isinstance(request.body, dict) else {}
        call_uuid = (body.get("input") or {}).get("callUuid")
        if body.get("action") != "end_call" or call_uuid not in self.live:
            return
        self.live.pop(call_uuid).cancel()
        ending = asyncio.get_running_loop().create_task(
            self.fake.call_event(
                "call_ended",
                call_uuid,
                style=self.style,
                status="completed",
                durationSeconds=0,
                endedBy="api",
            )
        )
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    async def _pause(self, low: float, high: float) -> None:
        await asyncio.sleep(self.rng.uniform(low, high) / self.speed)

    async def _lifecycle(self, call_uuid: str, caller: str) -> None:
        rng, fake, style = self.rng, self.fake, self.style
        await fake.call_event(
            "incoming_call",
            call_uuid,
            style=style,
            fromNumber=caller,
            toNumber="+15557654321",
            callSource="pstn",
            conversationId=str(uuid.uuid4()),
        )
        await self._pause(0.5, 2.0)
        answered = rng.random() < 0.8
        if answered:
            operator = f"operator{rng.randint(1, 9)}"
            await fake.call_event("call_answered", call_uuid, style=style, sipUsername=operator)
            for index in range(rng.randint(0, 2)):
                await self._pause(0.3, 1.0)
                delta = {
                    "callUuid": call_uuid,
                    "speaker": "caller",
                    "contentIndex": index,
                    "content": rng.choice(("Hello?", "I need help with my order.", "Thanks!")),
                }
                await fake.broadcast("call_transcript_delta", call_payload(delta, style))
        await self._pause(1.0, 4.0)
        self.live.pop(call_uuid, None)
        # Sped-up calls are short: a duration in the range of real calls reads better.
        duration = rng.randint(3, 600) if answered else 0
        await fake.call_event("call_ended", call_uuid, style=style, durationSeconds=duration)


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
        tasks = list(calls.live.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
