"""Stable event ids: the lifecycle rule, the canonical payload form, the occurrence counter."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from listener.core.events import Event
from listener.core.ids import LIFECYCLE_EVENTS, EventIds, canonical_json, lifecycle_id
from listener.testing.traffic import call_payload

ID = re.compile(r"evt_[a-z2-7]{32}")
# Doubles hold integers exactly up to 2**53: within it, 3 and 3.0 are the same number.
EXACT = 2**53

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)
payloads = st.dictionaries(st.text(max_size=6), json_values, max_size=6)
names = st.text(min_size=1, max_size=12)
keys = st.text(min_size=1, max_size=12)


def respelled(value: Any, rng: random.Random) -> Any:
    """The same JSON value as another sender could write it: keys in another order, exact
    integers as floats and integral floats as integers."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {key: respelled(item, rng) for key, item in items}
    if isinstance(value, list):
        return [respelled(item, rng) for item in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and abs(value) <= EXACT:
        return float(value)
    if isinstance(value, float) and value.is_integer() and abs(value) <= EXACT:
        return int(value)
    return value


@given(payloads, st.randoms(use_true_random=False))
def test_key_order_and_number_spelling_do_not_change_the_canonical_form(
    payload: dict[str, Any], rng: random.Random
) -> None:
    assert canonical_json(respelled(payload, rng)) == canonical_json(payload)


@given(payloads)
def test_the_canonical_form_reads_back_to_itself(payload: dict[str, Any]) -> None:
    text = canonical_json(payload)
    assert canonical_json(orjson.loads(text)) == text
    assert canonical_json(json.loads(text)) == text


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ('{"b": 1, "a": [1.0, -0.0, 1e0, 10E-1, 2.5]}', b'{"a":[1,0,1,1,2.5],"b":1}'),
        ('{"n": 123456789012345678901234567890}', b'{"n":1.2345678901234568e+29}'),
        ('{"s": "caf\\u00e9\\n", "t": true}', b'{"s":"caf\xc3\xa9\\n","t":true}'),
    ],
)
def test_canonical_form_examples(text: str, canonical: bytes) -> None:
    """Wide integers read the same through json as through orjson (which makes them floats)."""
    assert canonical_json(json.loads(text)) == canonical
    assert canonical_json(orjson.loads(text)) == canonical


@pytest.mark.parametrize(
    ("value", "error"),
    [(float("nan"), ValueError), (float("inf"), ValueError), (10**400, ValueError)],
)
def test_numbers_json_cannot_carry_are_refused(value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        canonical_json({"x": [value]})


@pytest.mark.parametrize("value", [{"x": {1, 2}}, {"x": b"bytes"}, {"x": object()}, {1: "key"}])
def test_values_that_are_not_json_are_refused(value: object) -> None:
    with pytest.raises(TypeError):
        canonical_json(value)


@given(st.sampled_from(sorted(LIFECYCLE_EVENTS)), keys, payloads, payloads, st.floats(0, 1e9))
def test_a_lifecycle_id_is_its_name_and_call_key_only(
    name: str, key: str, extra: dict[str, Any], other: dict[str, Any], now: float
) -> None:
    """Whatever else the payload says, whichever stream hears it and when."""
    expected = lifecycle_id(name, key)
    first = {**extra, "callUuid": key}
    again = {**other, "call": {"call_uuid": key}}
    again.pop("callUuid", None)
    again.pop("call_uuid", None)
    again.pop("callId", None)
    again.pop("call_id", None)
    ids = EventIds()
    assert ids.assign(name, first, now) == expected
    assert ids.assign(name, first, now) == expected  # heard twice on one stream
    assert EventIds().assign(name, again, now + 100) == expected
    assert ID.fullmatch(expected)


@pytest.mark.parametrize("style", ["camel", "snake", "nested"])
def test_a_lifecycle_id_is_the_same_in_every_payload_spelling(style: Any) -> None:
    row = {"callUuid": "c-1", "fromNumber": "+15550100", "status": "ringing"}
    assert EventIds().assign("incoming_call", call_payload(row, style), 0.0) == lifecycle_id(
        "incoming_call", "c-1"
    )


@given(st.tuples(names, keys), st.tuples(names, keys))
def test_distinct_names_or_keys_give_distinct_lifecycle_ids(
    one: tuple[str, str], two: tuple[str, str]
) -> None:
    assert (lifecycle_id(*one) == lifecycle_id(*two)) == (one == two)


@given(names, payloads, names, payloads)
def test_distinct_events_give_distinct_ids(
    name: str, payload: dict[str, Any], other_name: str, other: dict[str, Any]
) -> None:
    """Two events differ when their names or canonical payloads do (fresh streams: n = 0)."""
    same = name == other_name and canonical_json(payload) == canonical_json(other)
    one = EventIds().assign(f"x_{name}", payload, 0.0)
    two = EventIds().assign(f"x_{other_name}", other, 0.0)
    assert (one == two) == same
    assert ID.fullmatch(one)


def test_a_lifecycle_event_without_a_call_key_is_numbered_like_any_other() -> None:
    ids = EventIds()
    first, second = (ids.assign("call_ended", {"status": "completed"}, t) for t in (0.0, 0.5))
    assert first != second
    assert lifecycle_id("call_ended", "") not in (first, second)


def test_identical_events_within_the_window_stay_distinct() -> None:
    ids = EventIds(window=2.0)
    delta = {"callUuid": "c-1", "content": "Hello?"}
    # Each repeat comes within the window of the previous one: the run goes on.
    got = [ids.assign("call_transcript_delta", delta, t) for t in (0.0, 1.5, 3.0, 4.9)]
    assert len(set(got)) == 4
    # After a silence of a whole window the numbering starts again: the documented limit.
    assert ids.assign("call_transcript_delta", delta, 6.9) == got[0]
    assert ids.assign("call_transcript_delta", delta, 7.0) == got[1]


def test_the_window_is_per_payload() -> None:
    ids = EventIds(window=2.0)
    a, b = {"content": "a"}, {"content": "b"}
    first_a = ids.assign("call_transcript_delta", a, 0.0)
    ids.assign("call_transcript_delta", b, 1.9)  # b's run keeps no run of a's alive
    assert ids.assign("call_transcript_delta", a, 2.0) == first_a
    assert ids.assign("call_transcript_delta", b, 2.0) != first_a


@given(
    st.lists(
        st.tuples(st.sampled_from(["x", "y"]), st.floats(0, 3)),
        min_size=1,
        max_size=30,
    )
)
def test_two_streams_hearing_the_same_events_give_the_same_ids(
    heard: list[tuple[str, float]],
) -> None:
    """As two sockets during a rotation do; within each stream, a repeat that comes within
    the window of the previous identical event gets a new id."""
    one, two = EventIds(window=2.0), EventIds(window=2.0)
    now = 0.0
    last: dict[str, tuple[float, str]] = {}
    for content, pause in heard:
        now += pause
        payload = {"callUuid": "c-1", "content": content}
        got = one.assign("call_transcript_delta", payload, now)
        assert two.assign("call_transcript_delta", dict(reversed(payload.items())), now) == got
        if content in last and now - last[content][0] < 2.0:
            assert got != last[content][1]
        last[content] = (now, got)


def test_a_stream_forgets_runs_that_ended() -> None:
    ids = EventIds(window=1.0)
    for index in range(1000):
        ids.assign("call_transcript_delta", {"contentIndex": index}, index * 0.01)
    ids.assign("call_transcript_delta", {"contentIndex": -1}, 100.0)
    assert len(ids._recent) == 1


@pytest.mark.parametrize(
    ("name", "key", "expected"),
    [
        ("incoming_call", "c-1", "evt_vlt46ykufe7wbjnjsdda63l6fgdqk4ru"),
        ("call_ended", 'caf\u00e9 "q"', "evt_w6bddkb4ftihc3mqxpw2y5yb6i2nbx6s"),
    ],
)
def test_lifecycle_ids_are_pinned(name: str, key: str, expected: str) -> None:
    """Stores and webhook receivers keep ids across upgrades: the bytes never change."""
    assert lifecycle_id(name, key) == expected
    assert lifecycle_id(name, key) == _reference_id(orjson.dumps(["call", name, key]))


def test_ids_of_other_events_are_pinned() -> None:
    ids = EventIds()
    payload = {"callUuid": "c-1", "content": "Hello?", "n": 1.0, "x": [2.5, -0.0, {"b": 1}]}
    assert [ids.assign("call_transcript_delta", payload, t) for t in (0.0, 0.5)] == [
        "evt_mj6y3aii6lmi2fqamo4aw3kgs3lrtmn3",
        "evt_xeehxgy5lmbqfukm53tbyw56h44xzgpi",
    ]


def _reference_id(text: bytes) -> str:
    """The id rule as first written: SHA-256, 20 bytes, ``base64.b32encode``, lower case."""
    digest = hashlib.sha256(text).digest()
    return "evt_" + base64.b32encode(digest[:20]).decode("ascii").lower()


@given(names, keys, payloads)
def test_ids_are_the_reference_encoding(name: str, key: str, payload: dict[str, Any]) -> None:
    assert lifecycle_id(name, key) == _reference_id(canonical_json(["call", name, key]))
    form = hashlib.sha256(canonical_json(["event", f"x_{name}", payload])).digest()
    assert EventIds().assign(f"x_{name}", payload, 0.0) == _reference_id(form + b"0")


def _reference_normalised(value: Any) -> Any:
    """The canonical form's number rule as first written: a walk by isinstance."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("not a JSON number")
        return int(value) if value.is_integer() and -(2**63) <= value < 2**64 else value
    if isinstance(value, int):
        if -(2**63) <= value < 2**64:
            return value
        try:
            return float(value)
        except OverflowError:
            raise ValueError("too large") from None
    if isinstance(value, dict):
        return {key: _reference_normalised(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_reference_normalised(item) for item in value]
    raise TypeError(type(value).__name__)


any_numbers = st.recursive(
    scalars | st.floats() | st.integers(min_value=-(2**70), max_value=2**70) | st.just(10**400),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=6), inner)
    ),
    max_leaves=20,
)


@given(any_numbers)
def test_the_canonical_form_is_the_reference_walk(value: Any) -> None:
    """Every value, NaN, infinities and integers beyond a double included."""
    try:
        expected: bytes | type[Exception] = orjson.dumps(
            _reference_normalised(value), option=orjson.OPT_SORT_KEYS
        )
    except (ValueError, TypeError) as exc:
        expected = ValueError if isinstance(exc, ValueError) else TypeError
    if isinstance(expected, bytes):
        assert canonical_json(value) == expected
    else:
        with pytest.raises(expected):
            canonical_json(value)


@given(st.sampled_from([*sorted(LIFECYCLE_EVENTS), "call_transcript_delta"]), payloads, keys)
def test_of_an_event_is_assign(name: str, payload: dict[str, Any], key: str) -> None:
    for heard in (payload, {**payload, "callUuid": key}):
        event = Event.create(name, heard, "events", 3.0)
        assert EventIds().of(event) == EventIds().assign(name, heard, 3.0)
