"""The example handlers, run by the real daemon against the fake Sippet on loopback."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from sippet_listener_example import MissedCalls, call_summary
from structlog.testing import capture_logs

from listener import ConfigError, HandlerLoadError
from listener.testing import FakeSippet, running_daemon, settle

CALLER = "+15550100"
MISSED = {"callUuid": "c-1", "direction": "inbound", "fromNumber": CALLER, "status": "no_answer"}
LOOKUP = {
    "action": "list_contacts",
    "fields": ["id"],
    "filter": {"phoneE164": {"eq": CALLER}},
}
CREATE = {
    "action": "create_contact",
    "input": {
        "fullName": f"Missed call {CALLER}",
        "phoneE164": CALLER,
        "metadata": {"source": "missed-call"},
    },
    "fields": ["id"],
}


def runs(fake: FakeSippet) -> list[Any]:
    """The bodies of the actions run, in order (setup's /rpc/public/validate left out)."""
    return [request.body for request in fake.rpc_requests if request.path == "/rpc/public/run"]


def no_contact(fake: FakeSippet) -> None:
    """Script Sippet's replies for a caller it does not know: no match, then the new contact.

    Script once the daemon runs: replies are served first in, first out, to any request, and
    setup() sends one (a validation) before the daemon joins.
    """
    fake.script_rpc(body={"success": True, "data": []})
    fake.script_rpc(body={"success": True, "data": {"id": "contact-1"}})


@pytest.mark.parametrize(
    "payload",
    [
        MISSED,
        {"call_uuid": "c-1", "direction": "inbound", "from_number": CALLER, "status": "no_answer"},
        {"call": {"uuid": "c-1", "from_number": CALLER, "status": "NO-ANSWER"}},
    ],
    ids=["camel", "snake", "nested"],
)
async def test_an_unknown_missed_caller_becomes_a_contact(
    fake_sippet: FakeSippet, payload: dict[str, Any]
) -> None:
    handler = MissedCalls()
    async with running_daemon(fake_sippet, [handler]) as daemon:
        no_contact(fake_sippet)
        await fake_sippet.broadcast("call_ended", payload)
        await settle(daemon, events=1)
    assert runs(fake_sippet) == [LOOKUP, CREATE]
    assert handler.status() == "contacts created: 1"


async def test_a_known_caller_is_left_alone(fake_sippet: FakeSippet) -> None:
    async with running_daemon(fake_sippet, [MissedCalls()]) as daemon:
        fake_sippet.script_rpc(body={"success": True, "data": [{"id": "contact-7"}]})
        await fake_sippet.broadcast("call_ended", MISSED)
        await settle(daemon, events=1)
    assert runs(fake_sippet) == [LOOKUP]


async def test_a_repeated_delivery_creates_nothing_twice(fake_sippet: FakeSippet) -> None:
    async with running_daemon(fake_sippet, [MissedCalls()]) as daemon:
        no_contact(fake_sippet)
        await fake_sippet.broadcast("call_ended", MISSED)
        await fake_sippet.broadcast("call_ended", MISSED)
        await settle(daemon, events=2)
    assert runs(fake_sippet) == [LOOKUP, CREATE]


async def test_two_missed_calls_from_one_number_are_followed_up_in_turn(
    fake_sippet: FakeSippet,
) -> None:
    async with running_daemon(fake_sippet, [MissedCalls()]) as daemon:
        no_contact(fake_sippet)
        fake_sippet.script_rpc(body={"success": True, "data": [{"id": "contact-1"}]})
        await fake_sippet.broadcast("call_ended", MISSED)
        await fake_sippet.broadcast("call_ended", {**MISSED, "callUuid": "c-2"})
        await settle(daemon, events=2)
    # The second lookup waited for the first contact to exist, and found it.
    assert runs(fake_sippet) == [LOOKUP, CREATE, LOOKUP]


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("call_ended", {"status": "completed"}),
        ("call_ended", {"direction": "outbound"}),
        ("call_ended", {"fromNumber": "anonymous"}),
        ("call_ended", {"fromNumber": None}),
        ("call_answered", {}),
    ],
)
async def test_answered_outbound_and_withheld_calls_send_nothing(
    fake_sippet: FakeSippet, name: str, changes: dict[str, Any]
) -> None:
    async with running_daemon(fake_sippet, [MissedCalls()]) as daemon:
        await fake_sippet.broadcast(name, {**MISSED, **changes})
        await settle(daemon, events=1)
    assert runs(fake_sippet) == []


async def test_settings_come_from_the_handlers_table(fake_sippet: FakeSippet) -> None:
    table = {"use": "missed_calls", "statuses": ["busy"], "full_name": "Call back {number}"}
    async with running_daemon(fake_sippet, [table]) as daemon:
        no_contact(fake_sippet)
        await fake_sippet.broadcast("call_ended", {**MISSED, "status": "busy"})
        await settle(daemon, events=1)
    assert runs(fake_sippet)[1]["input"]["fullName"] == f"Call back {CALLER}"


async def test_a_misspelt_setting_is_named(fake_sippet: FakeSippet) -> None:
    with pytest.raises(ConfigError) as caught:
        async with running_daemon(fake_sippet, [{"use": "missed_calls", "statuse": ["busy"]}]):
            pass
    assert caught.value.key == "handlers[0].statuse"
    assert "did you mean 'statuses'" in caught.value.problem


async def test_a_failed_follow_up_asks_for_a_call_back(fake_sippet: FakeSippet) -> None:
    handler = MissedCalls()
    with capture_logs() as logs:
        async with running_daemon(fake_sippet, [handler]) as daemon:
            fake_sippet.script_rpc(body={"success": True, "data": []})
            fake_sippet.script_rpc(
                body={"success": False, "errors": [{"type": "invalid", "message": "no"}]}
            )
            await fake_sippet.broadcast("call_ended", MISSED)
            await settle(daemon, events=1)
            assert handler.status() == "contacts created: 0, failed: 1"
    [call_back] = [
        entry for entry in logs if entry["event"] == "call the missed caller back by hand"
    ]
    assert (call_back["caller"], call_back["call_key"]) == (CALLER, "c-1")
    [stopped] = [entry for entry in logs if entry["event"] == "missed-call follow-up stopped"]
    assert (stopped["contacts_created"], stopped["failed"]) == (0, 1)


async def test_the_table_overrides_the_declared_timeout(fake_sippet: FakeSippet) -> None:
    async with running_daemon(
        fake_sippet, [MissedCalls(), {"use": "missed_calls", "name": "b", "timeout": 3}]
    ) as daemon:
        declared, configured = (runner.settings.timeout for runner in daemon.dispatcher.runners)
    assert (declared, configured) == (MissedCalls.timeout, 3.0)


async def test_start_up_stops_when_sippet_rejects_the_contact(fake_sippet: FakeSippet) -> None:
    fake_sippet.script_rpc(
        body={"success": False, "errors": [{"type": "invalid", "message": "bad metadata"}]}
    )
    with pytest.raises(HandlerLoadError, match=r"setup failed: .*bad metadata"):
        async with running_daemon(fake_sippet, [MissedCalls()]):
            pass
    assert fake_sippet.rpc_requests[0].path == "/rpc/public/validate"
    assert fake_sippet.joins == 0
    # Nothing may leak from the aborted start: collect now, so a leaked socket warns here.
    gc.collect()


async def test_call_summary_logs_one_line_per_call(fake_sippet: FakeSippet) -> None:
    with capture_logs() as logs:
        async with running_daemon(fake_sippet, [call_summary]) as daemon:
            await fake_sippet.broadcast("call_ended", {**MISSED, "duration_seconds": 0})
            await fake_sippet.broadcast("call_ended", {"status": "completed"})  # no call: skipped
            await settle(daemon, events=2)
    summaries = [entry for entry in logs if entry["event"] == "call summary"]
    assert summaries == [
        {
            "event": "call summary",
            "log_level": "info",
            "handler": "call_summary",
            "event_name": "call_ended",
            "call_key": "c-1",
            "status": "no_answer",
            "direction": "inbound",
            "duration_seconds": 0,
        }
    ]
