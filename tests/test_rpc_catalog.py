"""The RPC action catalog and the local request check (pure, no I/O but reading the references)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from listener.core.errors import RpcInputError
from listener.rpc.catalog import CATALOG, CURRENT, LEGACY, PAYLOAD_KEYS, ActionSpec, check_request

REFERENCE = Path(__file__).parents[2] / "shared" / "reference"


def _camel(snake: str) -> str:
    """Return the SDK function name of an action (``end_call`` -> ``endCall``)."""
    head, *rest = snake.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _table(text: str, header: str, end: str) -> dict[str, str]:
    """Parse a reference table whose rows run the cells together.

    A row reads ``end_callendCallinput``: the action, its SDK function, then its payload keys.
    The split is where the text after a snake_case prefix starts with that prefix in camelCase.
    """
    start = text.index(header) + len(header)
    rows: dict[str, str] = {}
    for line in text[start : text.index(end, start)].strip().splitlines():
        for cut in range(1, len(line)):
            name = line[:cut]
            rest = line[cut:]
            if re.fullmatch(r"[a-z][a-z_]*", name) and rest.startswith(_camel(name)):
                keys = rest[len(_camel(name)) :]
                if re.fullmatch(r"none|\w+\??(, \w+\??)*", keys):
                    rows[name] = keys
                    break
        else:
            raise AssertionError(f"unreadable table row {line!r}")
    return rows


def _notation(text: str) -> tuple[set[str], set[str]]:
    """Split ``"a, b?"`` into (all names, required names)."""
    if text == "none":
        return set(), set()
    names = text.split(", ")
    return {n.rstrip("?") for n in names}, {n for n in names if not n.endswith("?")}


def _type_fields(body: str) -> tuple[set[str], set[str]]:
    """Return (all, required) field names of a TypeScript object type's body."""
    found = re.findall(r"^\s+(\w+)(\??):", body, re.MULTILINE)
    return {name for name, _ in found}, {name for name, optional in found if not optional}


@pytest.fixture(scope="module")
def legacy() -> str:
    path = REFERENCE / "rpc-actions-summary.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path.read_text()


@pytest.fixture(scope="module")
def current() -> str:
    path = REFERENCE / "rpc-actions-full.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path.read_text()


@pytest.fixture(scope="module")
def legacy_keys(legacy: str) -> dict[str, str]:
    return _table(legacy, "RPC actionSDK functionDomain props", "For each action")


@pytest.fixture(scope="module")
def current_keys(current: str) -> dict[str, str]:
    return _table(current, "RPC actionSDK functionPayload keys", "Action reference")


@pytest.fixture(scope="module")
def sections(current: str) -> dict[str, str]:
    """Each action's section of the full reference, by action name."""
    reference = current[current.index("Action reference") :]
    parts = re.split(r"\n(?=[a-z_]+\n\n  • SDK function: )", reference)[1:]
    return {part.split("\n", 1)[0]: part for part in parts}


@pytest.fixture(scope="module")
def examples(sections: dict[str, str]) -> dict[str, dict[str, object]]:
    """Each action's example request body from the full reference."""
    found = {}
    for name, section in sections.items():
        match = re.search(r"Example request body\n\n(\{.*?\n\})\n", section, re.DOTALL)
        assert match, name
        found[name] = json.loads(match.group(1))
    return found


def test_catalog_holds_every_action_of_both_generations(
    legacy_keys: dict[str, str], current_keys: dict[str, str]
) -> None:
    """Every action named in either reference table is in the catalog, and nothing else."""
    assert len(legacy_keys) == 38
    assert len(current_keys) == 52
    assert set(CATALOG) == set(legacy_keys) | set(current_keys)
    assert len(CATALOG) == 68
    for name, spec in CATALOG.items():
        expected = {CURRENT} if name in current_keys else set()
        expected |= {LEGACY} if name in legacy_keys else set()
        assert spec.generations == expected, name
        assert spec.name == name


def test_full_reference_sections_agree_with_its_table(
    current_keys: dict[str, str], sections: dict[str, str]
) -> None:
    """The table and the per-action sections of the full reference list the same keys."""
    assert set(sections) == set(current_keys)
    for name, section in sections.items():
        assert f"  • Payload keys: {current_keys[name]}\n" in section, name


def test_payload_keys_follow_the_current_generation_first(
    legacy_keys: dict[str, str], current_keys: dict[str, str]
) -> None:
    """Keys and required keys come from the current table, else from the legacy one."""
    for name, spec in CATALOG.items():
        keys, required = _notation(current_keys.get(name) or legacy_keys[name])
        assert spec.keys == keys, name
        assert spec.required_keys == required, name
        assert spec.keys <= set(PAYLOAD_KEYS), name


def test_input_fields_match_the_current_input_types(sections: dict[str, str]) -> None:
    """An action with an input type in the full reference has exactly its fields."""
    for name, section in sections.items():
        match = re.search(r"export type \w+Input = \{\n(.*?)\n\};", section, re.DOTALL)
        fields, required = _type_fields(match.group(1)) if match else (set(), set())
        assert CATALOG[name].input_fields == fields, name
        assert CATALOG[name].required_input == required, name


def test_input_fields_match_the_legacy_input_objects(
    legacy: str, current_keys: dict[str, str]
) -> None:
    """A legacy-only action has the fields of its legacy input object."""
    block = legacy[legacy.index("Input objects") : legacy.index("Selectable fields")]
    objects = dict(re.findall(r"^(\w+Input)\n((?:  • .*\n?)+)", block, re.MULTILINE))
    for name, spec in CATALOG.items():
        if name in current_keys:
            continue
        lines = objects.get(_camel(name)[:1].upper() + _camel(name)[1:] + "Input", "")
        found = re.findall(r"• (\w+)(\??):", lines)
        assert spec.input_fields == {f for f, _ in found}, name
        assert spec.required_input == {f for f, optional in found if not optional}, name


def test_every_example_body_passes_the_check(examples: dict[str, dict[str, object]]) -> None:
    """The reference's own example bodies are valid requests."""
    for name, body in examples.items():
        assert body["action"] == name
        check_request(name, {key: value for key, value in body.items() if key != "action"})


def test_example_bodies_hold_exactly_the_required_input(
    examples: dict[str, dict[str, object]],
) -> None:
    """The examples fill in precisely the required input fields (a cross-check of the data)."""
    for name, body in examples.items():
        given = body.get("input")
        if isinstance(given, dict):
            assert set(given) == CATALOG[name].required_input, name


def test_pure_reads_are_not_mutating() -> None:
    """Lists, gets and the three reporting actions are reads; everything else mutates."""
    reads = {name for name, spec in CATALOG.items() if not spec.mutating}
    assert reads == {name for name in CATALOG if name.startswith(("list_", "get_"))} | {
        "who_am_i",
        "organisation_wallet_summary",
        "call_codec",
    }
    for name in ("end_call", "barge_call", "create_call", "sign_in_with_password", "logout"):
        assert CATALOG[name].mutating, name
    for name in ("issue_operator_access_token", "confirm_email", "accept_call_queue_entry"):
        assert CATALOG[name].mutating, name


def test_paginated_means_the_page_key_is_taken() -> None:
    """``paginated`` follows the keys; list_calls and the current audit list take no page."""
    for spec in CATALOG.values():
        assert spec.paginated == ("page" in spec.keys)
    assert CATALOG["list_contacts"].paginated
    assert CATALOG["list_gateways"].paginated
    assert not CATALOG["list_calls"].paginated
    assert not CATALOG["list_call_ai_audit_events"].paginated


def test_actions_in_both_generations_take_the_current_shape() -> None:
    """Where the generations differ, the current one wins."""
    assert CATALOG["accept_call_queue_entry"].keys == {"identity", "fields"}
    assert CATALOG["delete_contact"].required_keys == {"input", "fields"}
    assert CATALOG["delete_contact"].required_input == {"contactId"}
    assert CATALOG["start_outbound_call"].required_keys == frozenset()
    assert CATALOG["start_outbound_call"].generations == {CURRENT, LEGACY}


def test_spec_and_catalog_are_read_only() -> None:
    """Specs are frozen and slotted; the catalog mapping cannot be changed."""
    spec = CATALOG["end_call"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.mutating = False  # type: ignore[misc]
    assert not hasattr(spec, "__dict__")
    with pytest.raises(TypeError):
        CATALOG["x"] = spec  # type: ignore[index]
    assert isinstance(spec, ActionSpec)


def test_missing_required_input_field() -> None:
    """A missing required input field is named with its path."""
    with pytest.raises(RpcInputError, match=r"^end_call: input\.callUuid is required$"):
        check_request("end_call", {"input": {}})
    with pytest.raises(RpcInputError, match=r"^end_call: input\.callUuid is required$"):
        check_request("end_call", {"input": {"callUuid": None}})
    with pytest.raises(
        RpcInputError,
        match=r"^create_call: input\.direction, input\.fromNumber and input\.toNumber "
        r"are required$",
    ):
        check_request("create_call", {"input": {"callUuid": "c-1"}})


def test_missing_required_key() -> None:
    """A missing required payload key is named; a None value counts as missing."""
    with pytest.raises(RpcInputError, match=r"^end_call: input is required$"):
        check_request("end_call", {})
    with pytest.raises(RpcInputError, match=r"^delete_contact: input and fields are required$"):
        check_request("delete_contact", {"identity": None})


def test_key_the_action_does_not_take() -> None:
    """A real payload key the action does not take is refused, with the keys it takes."""
    with pytest.raises(
        RpcInputError, match=r"^end_call: payload key 'fields' is not taken .*; it takes input$"
    ):
        check_request("end_call", {"input": {"callUuid": "c-1"}, "fields": ["id"]})
    with pytest.raises(RpcInputError, match="it takes no keys"):
        check_request("list_campaigns", {"input": {}})
    with pytest.raises(RpcInputError, match=r"'page' is not taken"):
        check_request("list_calls", {"fields": ["id"], "page": {"limit": 1}})


def test_misspelt_key_gets_a_suggestion() -> None:
    """A name that is no payload key at all is refused with the closest key."""
    with pytest.raises(
        RpcInputError,
        match=r"^sign_in_with_password: 'metadata_fields' is not a payload key "
        r"\(did you mean 'metadataFields'\?\); it takes input, fields, metadataFields$",
    ):
        check_request("sign_in_with_password", {"metadata_fields": ["token"]})


def test_unknown_action_gets_suggestions_and_the_escape_hatch() -> None:
    """An unknown action is refused with close names and how to send it anyway."""
    with pytest.raises(RpcInputError, match=r"did you mean 'list_contacts'") as caught:
        check_request("list_contact", {"fields": ["id"]})
    assert "unchecked=True" in str(caught.value)
    with pytest.raises(RpcInputError, match=r"^unknown rpc action 'xyzzy'; pass unchecked"):
        check_request("xyzzy", {})


def test_input_must_be_an_object() -> None:
    """An input that is not an object cannot hold its required fields."""
    with pytest.raises(RpcInputError, match=r"^end_call: input must be an object, not list$"):
        check_request("end_call", {"input": ["c-1"]})


def test_incomplete_check_leaves_missing_values_to_the_server() -> None:
    """``complete=False`` checks names only (what validate needs)."""
    check_request("end_call", {}, complete=False)
    check_request("list_contacts", {}, complete=False)
    with pytest.raises(RpcInputError, match="not taken"):
        check_request("end_call", {"fields": ["id"]}, complete=False)
    with pytest.raises(RpcInputError, match="unknown rpc action"):
        check_request("end_cal", {}, complete=False)


def test_input_errors_are_value_errors() -> None:
    """RpcInputError is also a ValueError, for callers that catch the builtin."""
    with pytest.raises(ValueError, match="unknown rpc action"):
        check_request("nope", {})
