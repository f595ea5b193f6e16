"""The rpc handler: rules checked at load, RPC calls sent over real HTTP to the fake Sippet."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from handlers.rpc import RpcConfig, RpcHandler, RulesFailed
from listener.core.errors import ConfigError, RpcActionError, RpcError
from listener.core.events import Event
from listener.core.templating import TemplateError
from listener.core.validation import format_validation_error
from listener.dispatch.handler import Context
from listener.rpc.client import RpcClient
from listener.testing import FakeSippet

BLOCKED = "+15550000000"
BLOCK_LIST: dict[str, Any] = {
    "on": "incoming_call",
    "when": {"fromNumber": [BLOCKED, "+15559999999"]},
    "action": "end_call",
    "input": {"callUuid": "{call_key}"},
}


def make_handler(*rules: dict[str, Any]) -> RpcHandler:
    """Validate rules as the loader does, and build the handler."""
    return RpcHandler(RpcConfig.model_validate({"rules": list(rules)}))


def make_event(payload: dict[str, Any], name: str = "incoming_call") -> Event:
    return Event.create(name, payload, "events", 1700000000.0)


@pytest.fixture
async def rpc(fake: FakeSippet) -> AsyncIterator[RpcClient]:
    async with RpcClient(
        fake.base_url, fake.api_key, timeout=5.0, backoff_initial=0.001, backoff_max=0.01
    ) as client:
        yield client


async def run(handler: RpcHandler, rpc: RpcClient, event: Event, tmp_path: Path) -> None:
    """Handle one event as the dispatcher would, matches() first."""
    ctx = Context(rpc=rpc, config=handler.config, name="rpc", state_dir=tmp_path)
    if handler.matches(event):
        await handler.handle(event, ctx.for_event(event))


def bodies(fake: FakeSippet) -> list[Any]:
    return [request.body for request in fake.rpc_requests]


def config_error(rules: list[dict[str, Any]]) -> tuple[tuple[Any, ...], ConfigError]:
    """The first error's pydantic location, and the ConfigError the loader makes of it."""
    with pytest.raises(ValidationError) as caught:
        RpcConfig.model_validate({"rules": rules})
    key, problem = format_validation_error(caught.value, RpcConfig)
    return caught.value.errors()[0]["loc"], ConfigError(f"handlers[0].{key}", problem)


@pytest.mark.parametrize(
    "payload",
    [
        {"callUuid": "c-1", "fromNumber": BLOCKED},
        {"call_uuid": "c-1", "from_number": BLOCKED},
        {"call": {"callUuid": "c-1", "fromNumber": BLOCKED}},
        {"call": {"uuid": "c-1", "from_number": BLOCKED}},
    ],
)
async def test_block_list_ends_the_call_in_every_spelling(
    fake: FakeSippet, rpc: RpcClient, tmp_path: Path, payload: dict[str, Any]
) -> None:
    """A blocked caller's call is ended, whichever spelling the payload uses."""
    handler = make_handler(BLOCK_LIST)
    with capture_logs() as logs:
        await run(handler, rpc, make_event(payload), tmp_path)
    assert bodies(fake) == [{"action": "end_call", "input": {"callUuid": "c-1"}}]
    assert fake.rpc_requests[0].path == "/rpc/public/run"
    fired = [entry for entry in logs if entry["event"] == "rpc rule fired"]
    assert [(entry["rule"], entry["action"]) for entry in fired] == [(0, "end_call")]


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("incoming_call", {"callUuid": "c-1", "fromNumber": "+15551234567"}),
        ("incoming_call", {"callUuid": "c-1"}),
        ("incoming_call", {"callUuid": "c-1", "fromNumber": [BLOCKED]}),
        ("call_ended", {"callUuid": "c-1", "fromNumber": BLOCKED}),
    ],
)
async def test_non_matching_events_send_nothing(
    fake: FakeSippet, rpc: RpcClient, tmp_path: Path, name: str, payload: dict[str, Any]
) -> None:
    """Another caller, no caller, or another event: matches() is False and nothing is sent."""
    handler = make_handler(BLOCK_LIST)
    event = make_event(payload, name)
    assert not handler.matches(event)
    ctx = Context(rpc=rpc, config=handler.config, name="rpc", state_dir=tmp_path)
    await handler.handle(event, ctx.for_event(event))
    assert fake.rpc_requests == []


def test_events_are_the_union_of_the_rules_globs() -> None:
    """The handler subscribes only to what its rules listen for, in order, once each."""
    handler = make_handler(
        BLOCK_LIST,
        {**BLOCK_LIST, "on": ["call_*", "incoming_call"]},
        {**BLOCK_LIST, "on": "call_*"},
    )
    assert handler.events == ("incoming_call", "call_*")
    assert type(handler).events == ("*",)
    assert handler.name == "rpc"


@pytest.mark.parametrize(
    ("when", "payload", "expected"),
    [
        ({"direction": "inbound"}, {"direction": "inbound"}, True),
        ({"direction": "inbound"}, {"direction": "outbound"}, False),
        ({"attempt": 1}, {"attempt": 1.0}, True),
        ({"attempt": 1}, {"attempt": True}, False),
        ({"attempt": 1}, {"attempt": "1"}, False),
        ({"vip": True}, {"vip": 1}, False),
        ({"vip": True}, {"vip": True}, True),
        ({"vip": [False, True]}, {"vip": True}, True),
        ({"call": {"direction": "inbound"}}, {"call": {"direction": "inbound"}}, True),
        ({"call.direction": "inbound"}, {"call": {"direction": "outbound"}}, False),
        ({"event": "incoming_*"}, {}, False),
        ({"event": "incoming_call"}, {}, True),
        ({"direction": "inbound", "to_number": "+1"}, {"direction": "inbound"}, False),
    ],
)
def test_when_conditions(when: dict[str, Any], payload: dict[str, Any], expected: bool) -> None:
    """Every condition must hold; a list is any of; equality is JSON's; missing never holds."""
    handler = make_handler({**BLOCK_LIST, "when": when})
    assert handler.matches(make_event(payload)) is expected


async def test_rules_run_in_order_and_stop_ends_the_evaluation(
    fake: FakeSippet, rpc: RpcClient, tmp_path: Path
) -> None:
    """Matching rules fire in order; a matched ``stop`` rule skips the rest."""
    flag = {"on": "*", "action": "flag_call_for_review", "identity": "{call_key}"}
    handler = make_handler(flag, {**BLOCK_LIST, "stop": True}, flag)
    await run(handler, rpc, make_event({"callUuid": "c-1", "fromNumber": BLOCKED}), tmp_path)
    assert [body["action"] for body in bodies(fake)] == ["flag_call_for_review", "end_call"]
    await run(handler, rpc, make_event({"callUuid": "c-2", "fromNumber": "+1"}), tmp_path)
    assert [body["action"] for body in bodies(fake)[2:]] == ["flag_call_for_review"] * 2


async def test_every_payload_key_is_templated_and_sent_by_wire_name(
    fake: FakeSippet, rpc: RpcClient, tmp_path: Path
) -> None:
    """All seven payload keys are rendered; metadata_fields goes out as metadataFields."""
    rule = {
        "on": "incoming_call",
        "action": "future_action",
        "unchecked": True,
        "identity": "{call_key}",
        "input": {"number": "{fromNumber}", "attempt": "{attempt}", "note": "try {attempt}"},
        "fields": ["id", {"legs": ["{leg_field}"]}],
        "filter": {"fromNumber": {"eq": "{from_number}"}},
        "sort": "-{sort_key}",
        "page": {"limit": "{attempt}"},
        "metadata_fields": ["traceId"],
    }
    payload = {
        "call": {"uuid": "c-1"},
        "fromNumber": "+1",
        "attempt": 2,
        "legField": "id",
        "sortKey": "insertedAt",
    }
    await run(make_handler(rule), rpc, make_event(payload), tmp_path)
    assert bodies(fake) == [
        {
            "action": "future_action",
            "identity": "c-1",
            "input": {"number": "+1", "attempt": 2, "note": "try 2"},
            "fields": ["id", {"legs": ["id"]}],
            "filter": {"fromNumber": {"eq": "+1"}},
            "sort": "-insertedAt",
            "page": {"limit": 2},
            "metadataFields": ["traceId"],
        }
    ]


async def test_a_missing_field_fails_its_rule_and_the_others_still_run(
    fake: FakeSippet, rpc: RpcClient, tmp_path: Path
) -> None:
    """The template error is logged with the rule, later rules run, then RulesFailed."""
    broken = {"on": "incoming_call", "action": "end_call", "input": {"callUuid": "{legUuid}"}}
    handler = make_handler(broken, BLOCK_LIST)
    with capture_logs() as logs, pytest.raises(RulesFailed) as caught:
        await run(handler, rpc, make_event({"callUuid": "c-1", "fromNumber": BLOCKED}), tmp_path)
    assert bodies(fake) == [{"action": "end_call", "input": {"callUuid": "c-1"}}]
    [failure] = caught.value.failures
    assert (failure.index, failure.action) == (0, "end_call")
    assert isinstance(failure.error, TemplateError)
    assert caught.value.__cause__ is failure.error
    message = (
        "input.callUuid: event incoming_call has no field 'legUuid'"
        " (also tried leg_uuid, call.legUuid, call.leg_uuid)"
    )
    assert str(caught.value) == f"rpc rules failed for incoming_call: rule 0 (end_call): {message}"
    rules = [entry for entry in logs if "rule" in entry]
    lines = [(entry["event"], entry["rule"], entry["log_level"]) for entry in rules]
    assert lines == [("rpc rule failed", 0, "warning"), ("rpc rule fired", 1, "info")]
    assert rules[0]["error"] == message


async def test_an_action_error_envelope_is_reported(
    fake: FakeSippet, rpc: RpcClient, tmp_path: Path
) -> None:
    """``{"success": false}`` fails the rule with Sippet's message; the next rule still runs."""
    fake.script_rpc(
        body={
            "success": False,
            "errors": [{"type": "not_found", "message": "call %{id} not found", "vars": {"id": 7}}],
        }
    )
    handler = make_handler(BLOCK_LIST, BLOCK_LIST)
    with pytest.raises(RulesFailed) as caught:
        await run(handler, rpc, make_event({"callUuid": "c-1", "fromNumber": BLOCKED}), tmp_path)
    assert len(fake.rpc_requests) == 2
    [failure] = caught.value.failures
    assert isinstance(failure.error, RpcActionError)
    assert str(failure.error) == "rpc end_call failed: not_found: call 7 not found"
    assert "rule 0 (end_call): rpc end_call failed: not_found" in str(caught.value)


async def test_every_failure_is_summarised(
    fake: FakeSippet, rpc: RpcClient, tmp_path: Path
) -> None:
    """Two failing rules give one error listing both, in rule order."""
    fake.script_rpc(status=400, body={"error": "bad"})
    fake.script_rpc(status=400, body={"error": "bad"})
    handler = make_handler(BLOCK_LIST, {**BLOCK_LIST, "action": "barge_call"})
    with pytest.raises(RulesFailed) as caught:
        await run(handler, rpc, make_event({"callUuid": "c-1", "fromNumber": BLOCKED}), tmp_path)
    assert [(f.index, f.action) for f in caught.value.failures] == [
        (0, "end_call"),
        (1, "barge_call"),
    ]
    assert all(isinstance(f.error, RpcError) for f in caught.value.failures)
    assert str(caught.value) == (
        "rpc rules failed for incoming_call: rule 0 (end_call): rpc end_call failed: HTTP 400;"
        " rule 1 (barge_call): rpc barge_call failed: HTTP 400"
    )


@pytest.mark.parametrize(("retry_unsafe", "sent"), [(False, 1), (True, 2)])
async def test_retry_unsafe_is_passed_to_the_client(
    fake: FakeSippet, rpc: RpcClient, tmp_path: Path, retry_unsafe: bool, sent: int
) -> None:
    """A mutating action is resent after a 503 only when the rule says it is safe."""
    fake.script_rpc(status=503, body={}, headers={"retry-after": "0"})
    handler = make_handler({**BLOCK_LIST, "retry_unsafe": retry_unsafe})
    event = make_event({"callUuid": "c-1", "fromNumber": BLOCKED})
    if retry_unsafe:
        await run(handler, rpc, event, tmp_path)
    else:
        with pytest.raises(RulesFailed, match="HTTP 503"):
            await run(handler, rpc, event, tmp_path)
    assert len(fake.rpc_requests) == sent


async def test_a_null_required_field_is_refused_before_sending(
    fake: FakeSippet, rpc: RpcClient, tmp_path: Path
) -> None:
    """A template that renders null for a required input field fails locally."""
    handler = make_handler({**BLOCK_LIST, "input": {"callUuid": "{legUuid}"}})
    event = make_event({"callUuid": "c-1", "fromNumber": BLOCKED, "legUuid": None})
    with pytest.raises(RulesFailed, match=r"end_call: input\.callUuid is required"):
        await run(handler, rpc, event, tmp_path)
    assert fake.rpc_requests == []


@pytest.mark.parametrize(
    ("change", "loc", "message"),
    [
        (
            {"action": "end_cal"},
            ("rules", 0, "action"),
            "handlers[0].rules[0].action: unknown rpc action 'end_cal' (did you mean 'end_call'?);"
            " set unchecked = true to send it anyway",
        ),
        (
            {"input": {"call_uuid": "{call_key}"}},
            ("rules", 0, "input", "callUuid"),
            "handlers[0].rules[0].input.callUuid: required by end_call",
        ),
        (
            {"input": None},
            ("rules", 0, "input"),
            "handlers[0].rules[0].input: required by end_call",
        ),
        (
            {"fields": ["id"]},
            ("rules", 0, "fields"),
            "handlers[0].rules[0].fields: end_call does not take fields; it takes input",
        ),
        (
            {"input": {"callUuid": "{call_key"}},
            ("rules", 0, "input", "callUuid"),
            "handlers[0].rules[0].input.callUuid: unbalanced brace in '{call_key';"
            " write {{ or }} for a literal brace",
        ),
        (
            {"input": {"callUuid": "x", "meta": {"at": "{}"}}},
            ("rules", 0, "input", "meta", "at"),
            "handlers[0].rules[0].input.meta.at: empty placeholder {};"
            " write {{}} for literal braces",
        ),
        (
            {"actoin": "end_call"},
            ("rules", 0, "actoin"),
            "handlers[0].rules[0].actoin: unknown key; did you mean 'action'?",
        ),
        (
            {"when": {"from number": "+1"}},
            ("rules", 0, "when", "from number"),
            "handlers[0].rules[0].when.from number: bad path 'from number':"
            " names may hold letters, digits, '_' and '-' only",
        ),
        (
            {"when": {"call": {"": 1}}},
            ("rules", 0, "when", "call", ""),
            "handlers[0].rules[0].when.call.: bad path 'call.': empty name",
        ),
        (
            {"when": {"event": {"x": 1}}},
            ("rules", 0, "when", "event", "x"),
            "handlers[0].rules[0].when.event.x: bad path 'event.x': event has no fields;"
            " write payload.event.x for a field",
        ),
        ({"when": {"tags": []}}, ("rules", 0, "when", "tags"), None),
        ({"when": {"tags": [["a"]]}}, ("rules", 0, "when", "tags"), None),
        (
            {"on": []},
            ("rules", 0, "on"),
            "handlers[0].rules[0].on: give at least one event-name glob",
        ),
        (
            {"on": ["a", ""]},
            ("rules", 0, "on"),
            "handlers[0].rules[0].on: an event-name glob is empty",
        ),
        ({"action": ""}, ("rules", 0, "action"), None),
    ],
)
def test_config_errors_are_located_at_the_key(
    change: dict[str, Any], loc: tuple[Any, ...], message: str | None
) -> None:
    """Every load-time check is a pydantic error at the offending key."""
    rule = {key: value for key, value in {**BLOCK_LIST, **change}.items() if value is not None}
    error_loc, error = config_error([rule])
    assert error_loc == loc
    if message is not None:
        assert str(error) == message


def test_an_empty_rule_list_is_refused() -> None:
    """At least one rule is required."""
    assert config_error([])[0] == ("rules",)
    with pytest.raises(ValidationError):
        RpcConfig.model_validate({})


def test_the_second_rule_is_located_too() -> None:
    """Locations carry the rule's index."""
    loc, _ = config_error([BLOCK_LIST, {**BLOCK_LIST, "action": "end_calls"}])
    assert loc == ("rules", 1, "action")


def test_required_keys_of_other_actions_are_checked() -> None:
    """who_am_i needs fields; flag_call_for_review needs identity."""
    assert config_error([{"on": "*", "action": "who_am_i"}])[0] == ("rules", 0, "fields")
    assert config_error([{"on": "*", "action": "flag_call_for_review"}])[0] == (
        "rules",
        0,
        "identity",
    )


async def test_unchecked_sends_an_action_the_catalog_does_not_know(
    fake: FakeSippet, rpc: RpcClient, tmp_path: Path
) -> None:
    """``unchecked = true`` skips the catalog at load and at send time."""
    handler = make_handler({"on": "incoming_call", "action": "end_cal", "unchecked": True})
    await run(handler, rpc, make_event({"callUuid": "c-1"}), tmp_path)
    assert bodies(fake) == [{"action": "end_cal"}]
