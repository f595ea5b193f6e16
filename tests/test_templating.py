"""Templates: pure compile and render, no I/O."""

from __future__ import annotations

import contextlib
import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listener.core.events import Event
from listener.core.templating import MISSING, FieldPath, TemplateError, compile_template

PAYLOAD: dict[str, Any] = {
    "callUuid": "c-1",
    "fromNumber": "+15550000000",
    "count": 3,
    "ratio": 0.5,
    "flag": True,
    "nothing": None,
    "tags": ["vip", "new"],
    "legs": [{"id": "l-0", "to_number": "+15551111111"}, {"id": "l-1"}],
    "agent": {"name": "Ada", "skill_level": 2},
    "event": "payload's own event field",
}


def event(payload: dict[str, Any] | None = None, name: str = "incoming_call") -> Event:
    return Event.create(name, PAYLOAD if payload is None else payload, "events", 1700000000.25)


def render(template: Any, payload: dict[str, Any] | None = None) -> Any:
    return compile_template(template, ("input", "x")).render(event(payload))


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{count}", 3),
        ("{ratio}", 0.5),
        ("{flag}", True),
        ("{nothing}", None),
        ("{tags}", ["vip", "new"]),
        ("{agent}", {"name": "Ada", "skill_level": 2}),
        ("{call_key}", "c-1"),
        ("{event}", "incoming_call"),
        ("{topic}", "events"),
        ("{received_at}", 1700000000.25),
        ("{payload.event}", "payload's own event field"),
    ],
)
def test_a_lone_placeholder_keeps_the_value_type(template: str, expected: Any) -> None:
    """A string that is exactly one placeholder renders as the raw value."""
    assert render(template) == expected
    assert type(render(template)) is type(expected)


def test_payload_is_the_whole_payload() -> None:
    """``{payload}`` is the payload object itself."""
    assert render("{payload}") is PAYLOAD


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("call {call_key} from {fromNumber}", "call c-1 from +15550000000"),
        ("n={count} r={ratio} f={flag} z={nothing}", "n=3 r=0.5 f=true z=null"),
        ("tags: {tags}", 'tags: ["vip","new"]'),
        ("agent: {agent}", 'agent: {"name":"Ada","skill_level":2}'),
        (" {call_key}", " c-1"),
        ("{call_key}{count}", "c-13"),
    ],
)
def test_embedded_placeholders_become_text(template: str, expected: str) -> None:
    """Inside a longer string, strings go in as they are and anything else as compact JSON."""
    assert render(template) == expected


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{call_key}}", "{call_key}"),
        ("{{{call_key}}}", "{c-1}"),
        ("a }} b {{", "a } b {"),
        ("{{}}", "{}"),
        ("no placeholders", "no placeholders"),
        ("", ""),
    ],
)
def test_doubled_braces_are_literal(template: str, expected: str) -> None:
    """``{{`` and ``}}`` are literal braces, as in str.format."""
    assert render(template) == expected


def test_structures_are_rendered_recursively() -> None:
    """Objects and lists are walked; scalars pass through; keys stay literal."""
    template = {
        "callUuid": "{call_key}",
        "{count}": ["{count}", "n{count}", 7, False, None, 1.5],
        "metadata": {"agent": "{agent.name}"},
    }
    assert render(template) == {
        "callUuid": "c-1",
        "{count}": [3, "n3", 7, False, None, 1.5],
        "metadata": {"agent": "Ada"},
    }


def test_each_render_returns_fresh_objects() -> None:
    """Containers written in the template are rebuilt: mutating one render spares the next."""
    template = compile_template({"a": ["x"]})
    first = template.render(event())
    first["a"].append("y")
    assert template.render(event()) == {"a": ["x"]}


@pytest.mark.parametrize(
    "payload",
    [
        {"fromNumber": "+1555"},
        {"from_number": "+1555"},
        {"call": {"fromNumber": "+1555"}},
        {"call": {"from_number": "+1555"}},
    ],
)
@pytest.mark.parametrize("path", ["fromNumber", "from_number"])
def test_every_spelling_is_found(payload: dict[str, Any], path: str) -> None:
    """camelCase, snake_case, at the top level or in a nested call object."""
    assert render(f"{{{path}}}", payload) == "+1555"


def test_the_exact_spelling_wins_over_its_twin_and_the_top_level_over_call() -> None:
    """Lookup order: exact name, twin, then the same inside ``call``."""
    payload = {"from_number": "twin", "call": {"fromNumber": "nested"}}
    assert render("{fromNumber}", payload) == "twin"
    assert render("{fromNumber}", {**payload, "fromNumber": "exact"}) == "exact"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("agent.name", "Ada"),
        ("agent.skillLevel", 2),
        ("legs.0.id", "l-0"),
        ("legs.1.id", "l-1"),
        ("legs.0.toNumber", "+15551111111"),
        ("tags.1", "new"),
        ("call.uuid", "u-9"),
    ],
)
def test_dotted_paths_and_indices(path: str, expected: Any) -> None:
    """Dots walk into objects (twins tried at every level) and digits index lists."""
    payload = {**PAYLOAD, "call": {"uuid": "u-9"}}
    assert render(f"{{{path}}}", payload) == expected


def test_missing_field_names_the_location_event_and_spellings() -> None:
    """The message says where the template is, which event, and every spelling tried."""
    with pytest.raises(TemplateError) as caught:
        compile_template("{callUuid}", ("input", "callUuid")).render(event({}))
    assert str(caught.value) == (
        "input.callUuid: event incoming_call has no field 'callUuid'"
        " (also tried call_uuid, call.callUuid, call.call_uuid)"
    )
    assert caught.value.location == ("input", "callUuid")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{agent.full_name}", "has no field 'agent.full_name' (also tried agent.fullName)"),
        ("{legs.5.id}", "has no field 'legs.5.id' (legs is a list of 2)"),
        ("{legs.first}", "has no field 'legs.first' (legs is a list of 2)"),
        ("{count.x}", "has no field 'count.x' (count is a number)"),
        ("{fromNumber.x}", "has no field 'fromNumber.x' (fromNumber is a string)"),
        ("{nothing.x}", "has no field 'nothing.x' (nothing is null)"),
        ("{agent.name.x}", "has no field 'agent.name.x' (agent.name is a string)"),
        ("{mystery.deep}", "(also tried call.mystery.deep)"),
        ("text {missing}", "has no field 'missing' (also tried call.missing)"),
    ],
)
def test_missing_nested_fields_say_where_the_walk_stopped(template: str, message: str) -> None:
    """A miss deep in a path says which part was found and why it could not be followed."""
    with pytest.raises(TemplateError, match=r"^input\.x: event incoming_call ") as caught:
        render(template)
    assert message in str(caught.value)


def test_missing_call_key() -> None:
    """An event without a call key cannot fill ``{call_key}``."""
    with pytest.raises(TemplateError, match=r"^input\.x: event incoming_call has no call key$"):
        render("{call_key}", {"fromNumber": "+1555"})


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{call_key", "unbalanced brace in '{call_key'"),
        ("call_key}", "unbalanced brace in 'call_key}'"),
        ("{a{b}}", "unbalanced brace"),
        ("}{", "unbalanced brace"),
        ("{}", "empty placeholder {}"),
        ("{a b}", "bad path 'a b': names may hold letters, digits, '_' and '-' only"),
        ("{ call_key }", "bad path ' call_key '"),
        ("{a..b}", "bad path 'a..b': empty name"),
        ("{.a}", "bad path '.a': empty name"),
        ("{__class__.__init__}", None),
        ("{event.x}", "bad path 'event.x': event has no fields; write payload.event.x"),
        ("{call_key.0}", "bad path 'call_key.0': call_key has no fields"),
    ],
)
def test_syntax_errors_are_found_at_compile_time(template: str, problem: str | None) -> None:
    """Brace and path errors name the location; dunder names are plain (missing) fields."""
    if problem is None:
        with pytest.raises(TemplateError, match=r"has no field '__class__\.__init__'"):
            render(template)
        return
    with pytest.raises(TemplateError) as caught:
        compile_template({"input": {"callUuid": template}})
    assert str(caught.value).startswith(f"input.callUuid: {problem}")
    assert caught.value.location == ("input", "callUuid")


@pytest.mark.parametrize(
    ("value", "location", "problem"),
    [
        ({"when": datetime.date(2025, 1, 2)}, ("when",), "a date is not a JSON value; quote it"),
        ([float("nan")], (0,), "nan is not a JSON number"),
        ({"x": {1: "a"}}, ("x",), "object key 1 is not a string"),
    ],
)
def test_non_json_values_are_refused(
    value: Any, location: tuple[str | int, ...], problem: str
) -> None:
    """TOML dates, non-finite floats and non-string keys have no JSON form."""
    with pytest.raises(TemplateError) as caught:
        compile_template(value)
    assert (caught.value.location, caught.value.problem) == (location, problem)


def test_field_path_find_returns_missing_instead_of_raising() -> None:
    """``find`` is the cheap lookup used by ``when`` conditions."""
    assert FieldPath("from_number").find(event()) == "+15550000000"
    assert FieldPath("absent").find(event()) is MISSING
    assert FieldPath("call_key").find(event({})) is MISSING
    assert FieldPath("nothing").find(event()) is None
    assert repr(FieldPath("a.b")) == "FieldPath('a.b')"
    assert repr(MISSING) == "MISSING"


def test_field_path_errors_have_no_location() -> None:
    """A bare path error carries only its problem."""
    with pytest.raises(TemplateError) as caught:
        FieldPath("a b")
    assert caught.value.location == ()
    assert str(caught.value) == caught.value.problem


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
TEMPLATE_TEXT = st.text(alphabet=st.sampled_from("{}._-0 aAbB_call.uuid$%"), max_size=24)


@given(text=TEMPLATE_TEXT | st.text(max_size=24), payload=st.dictionaries(st.text(), JSON))
def test_arbitrary_templates_raise_only_template_errors(text: str, payload: Any) -> None:
    """Whatever the template and payload, compiling and rendering either work or raise
    TemplateError: nothing is evaluated, nothing else escapes."""
    with contextlib.suppress(TemplateError):
        compile_template(text).render(event(payload))


@given(payload=st.dictionaries(st.text(max_size=8), JSON, max_size=4), key=st.text(max_size=8))
def test_lone_placeholders_return_the_payload_value_itself(payload: Any, key: str) -> None:
    """When the exact name exists, ``{name}`` renders its value unchanged."""
    try:
        template = compile_template(f"{{{key}}}")
    except TemplateError:
        return
    if key in payload and key not in {"call_key", "event", "topic", "received_at", "payload"}:
        assert template.render(event(payload)) == payload[key]
