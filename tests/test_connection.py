"""The socket's read loop: messages already received are taken in batches, in order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from listener.core import metrics
from listener.core.events import Event
from listener.realtime.connection import TURN_EVERY, Connection, EventSink, _Received
from listener.realtime.frames import Messages
from listener.realtime.session import socket_url
from listener.realtime.tokens import TokenSource
from listener.testing import FakeSippet
from tests.conftest import fast_settings


@contextlib.asynccontextmanager
async def opened_link(
    fake: FakeSippet, http: httpx.AsyncClient, on_event: EventSink, **link_settings: Any
) -> AsyncIterator[Connection]:
    """A link joined to the fake's channel with a fresh token (test intervals), closed after."""
    token = await TokenSource(http, fake.base_url, fake.api_key).mint()
    settings = fast_settings(fake.base_url, **link_settings).link
    link = Connection(socket_url(fake.base_url, token.value), settings, on_event)
    await link.open()
    try:
        yield link
    finally:
        await link.close()


async def test_messages_queued_behind_a_paused_intake_are_taken_in_order_in_batches(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    received: list[Event] = []
    release = asyncio.Event()

    def on_event(event: Event) -> asyncio.Task[bool] | None:
        received.append(event)
        # The first event holds the intake until the server has queued everything else.
        return asyncio.create_task(release.wait()) if len(received) == 1 else None

    async with opened_link(fake, http, on_event) as link:
        assert link._ws is not None
        # This websockets keeps what it received where the batch path reads it: were that
        # to change, every message would go through recv() one by one, silently slower.
        assert _Received.of(link._ws) is not None
        # And its parser is the one the runs of frames read (frames.RunProtocol).
        assert link._ws.runs
        malformed = metrics.FRAMES_MALFORMED.value
        await fake.broadcast("incoming_call", {"seq": 0})
        await fake.wait_until(lambda: len(received) == 1)
        for seq in range(1, 200):
            await fake.broadcast("incoming_call", {"seq": seq})
            if seq == 100:
                await fake.send_malformed()
        frames, batches = link._frames, link._batches
        await asyncio.sleep(0.1)  # the server's outbox reaches our socket
        release.set()
        await fake.wait_until(lambda: len(received) == 200)
        assert [event.payload["seq"] for event in received] == list(range(200))
        assert metrics.FRAMES_MALFORMED.value - malformed == 6
        # 199 events, 6 malformed frames (and heartbeat replies), read in a few batches,
        # not one await each.
        assert link._frames - frames >= 205
        assert link._batches - batches < 205 / 4


async def test_a_lone_event_is_handed_on_where_its_frame_arrives_not_by_the_read_task(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    tasks: list[asyncio.Task[Any] | None] = []

    def on_event(event: Event) -> None:
        tasks.append(asyncio.current_task())

    async with opened_link(fake, http, on_event):
        sent: list[int] = []
        for seq in range(3):
            await fake.broadcast("incoming_call", {"seq": seq})
            sent.append(seq)
            # One at a time: each arrives alone, with the read loop waiting.
            await fake.wait_until(lambda: len(tasks) == len(sent))
        # In websockets' data_received, a loop callback: the read task was never woken.
        assert tasks == [None, None, None]


async def test_the_rest_of_a_run_behind_a_held_event_waits_where_flow_control_counts_it(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    received: list[int] = []
    release = asyncio.Event()

    def on_event(event: Event) -> asyncio.Task[bool] | None:
        received.append(event.payload["seq"])
        return asyncio.create_task(release.wait()) if event.payload["seq"] == 0 else None

    async with opened_link(fake, http, on_event, max_queue=1) as link:
        assert link._ws is not None
        assert link._received is not None
        await fake.wait_until(lambda: link._received is not None and link._received.waiting)
        # Three frames in one read, as websockets' data_received hands a run on: the first
        # event's wait holds the other two back.
        link._ws.process_event(
            Messages(f'[null,null,"events","incoming_call",{{"seq":{n}}}]' for n in range(3))
        )
        assert received == [0]
        assembler = link._ws.recv_messages
        # Queued, past max_queue: websockets stops reading the socket meanwhile.
        assert len(assembler.frames.queue) == 2
        assert assembler.paused
        await fake.broadcast("incoming_call", {"seq": 3})
        release.set()
        await fake.wait_until(lambda: len(received) == 4)
        assert received == [0, 1, 2, 3]
        assert not assembler.paused


async def test_a_long_run_gives_the_loop_a_turn_every_so_many_events_in_order(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    received: list[int] = []
    # What another task (a handler's worker) finds handed on when it first gets to run.
    found: list[int] = []

    async def other_task() -> None:
        found.append(len(received))

    async with opened_link(fake, http, lambda event: received.append(event.payload["seq"])) as link:
        assert link._ws is not None
        await fake.wait_until(lambda: link._received is not None and link._received.waiting)
        count = 3 * TURN_EVERY + 5
        waiting = asyncio.create_task(other_task())
        # A drain's backlog as one read of the socket: a run of many frames.
        link._ws.process_event(
            Messages(f'[null,null,"events","call_ended",{{"seq":{n}}}]' for n in range(count))
        )
        await fake.wait_until(lambda: len(received) == count)
        await waiting
        assert found == [TURN_EVERY]
        assert received == list(range(count))


async def test_a_channel_closed_ends_the_link_once_the_events_before_it_are_handed_on(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    received: list[int] = []
    async with opened_link(fake, http, lambda event: received.append(event.payload["seq"])) as link:
        for seq in range(3):
            await fake.broadcast("incoming_call", {"seq": seq})
        await fake.close_channels()
        failure = await asyncio.wait_for(link.wait_closed(), 10)
        assert failure.reason == "channel_closed"
        assert received == [0, 1, 2]


async def test_a_failure_of_on_event_ends_the_link_with_it(
    fake: FakeSippet, http: httpx.AsyncClient
) -> None:
    received: list[int] = []

    def on_event(event: Event) -> None:
        received.append(event.payload["seq"])
        if event.payload["seq"] == 1:
            raise RuntimeError("handler bug")

    async with opened_link(fake, http, on_event) as link:
        for seq in range(3):
            await fake.broadcast("incoming_call", {"seq": seq})
        with pytest.raises(RuntimeError, match="handler bug"):
            await asyncio.wait_for(link.wait_closed(), 10)
        # Nothing after the failure is handed on.
        assert received == [0, 1]
