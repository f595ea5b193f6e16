"""Safe templates: JSON-like values filled in from an event, with no code anywhere.

A template is any JSON-like value (a string, number, boolean, list or object, as read from the
config file) whose strings may hold placeholders::

    {"callUuid": "{call_key}", "note": "blocked {fromNumber} on {event}", "count": 3}

Syntax of a string:

* ``{path}`` is a placeholder. A string that is *exactly* one placeholder renders as the raw
  value, keeping its type (a number stays a number, an object stays an object). Placeholders
  inside a longer string are replaced by their text: strings as they are, anything else as
  compact JSON (``true``, ``null``, ``{"a":1}``).
* ``{{`` and ``}}`` are literal braces. Any other brace is a syntax error.

Paths: ``call_key``, ``event`` (the event name), ``topic`` and ``received_at`` name the event's
own attributes; ``payload`` is the whole payload. Anything else names a payload field: a name
(``fromNumber``), a dotted path into objects (``call.uuid``), or a list index (``legs.0``).
``payload.event`` reaches a payload field whose name is reserved.

Sippet does not document the spelling of its realtime fields (``fromNumber`` or
``from_number``, at the top level or inside a ``call`` object), so a name is looked up as
written, then as its camelCase/snake_case twin, and for the first segment of a path, then
the same two spellings inside the payload's ``call`` object. The first spelling present wins.

Nothing is ever evaluated: paths are plain lookups in dicts and lists, never attribute access,
``str.format`` or ``eval``. Templates are compiled once, at load, by :func:`compile_template`;
:meth:`Template.render` then costs one dict lookup per path segment. Compiling and rendering
raise :class:`TemplateError` and nothing else; any other exception is a bug.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from listener.core.errors import ListenerError

if TYPE_CHECKING:
    # Only for annotations: events.py builds Event.field on this module, not the reverse.
    from listener.core.events import Event

__all__ = [
    "MISSING",
    "FieldPath",
    "Location",
    "Template",
    "TemplateError",
    "compile_template",
    "field_spellings",
]

#: Where a value sits inside a templated value: ``("input", "callUuid")``, ``("fields", 0)``.
Location: TypeAlias = tuple[str | int, ...]

_EVENT_ATTRIBUTES: Final = frozenset({"call_key", "event", "topic", "received_at"})
_PAYLOAD: Final = "payload"
_NAME = re.compile(r"[\w-]+")
# Longer digit strings are names: no list is that long, and int() refuses huge ones.
_INDEX = re.compile(r"[0-9]{1,9}")
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SNAKE_JOINT = re.compile(r"(?<=[a-z0-9])_([a-z0-9])")
# Every character of a string belongs to exactly one token, so scanning cannot skip text.
_TOKEN = re.compile(
    r"(?P<open>\{\{)|(?P<close>\}\})|\{(?P<path>[^{}]*)\}|(?P<lone>[{}])|(?P<text>[^{}]+)"
)


class _Missing:
    """The type of :data:`MISSING`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: What :meth:`FieldPath.find` returns when the event has no such field.
MISSING: Final = _Missing()


class TemplateError(ListenerError, ValueError):
    """A template could not be compiled (bad syntax) or rendered (a field is missing).

    Attributes:
        location: where the offending string sits in the templated value; empty when the
            error concerns a bare path.
        problem: the message without the location.
    """

    def __init__(self, location: Location, problem: str) -> None:
        super().__init__(f"{_dotted(location)}: {problem}" if location else problem)
        self.location = location
        self.problem = problem


def _dotted(location: Location) -> str:
    """Write a location as config keys are written: ``input.callUuid``, ``fields.0``."""
    return ".".join(str(part) for part in location)


def _twin(name: str) -> str | None:
    """Return the camelCase/snake_case twin of ``name``, or None when it has none."""
    if "_" in name:
        twin = _SNAKE_JOINT.sub(lambda match: match[1].upper(), name)
    else:
        twin = _CAMEL_HUMP.sub("_", name).lower()
    return twin if twin != name else None


def field_spellings(name: str) -> tuple[str, ...]:
    """Return the spellings of a field name, in lookup order."""
    twin = _twin(name)
    return (name,) if twin is None else (name, twin)


def _kind(value: Any) -> str:
    """Name a JSON value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


class _Step:
    """One path segment after the first: the spellings to try, or a list index."""

    __slots__ = ("index", "name", "spellings")

    def __init__(self, name: str) -> None:
        self.name = name
        self.spellings = field_spellings(name)
        self.index = int(name) if _INDEX.fullmatch(name) else None

    def take(self, value: Any) -> tuple[Any, str]:
        """Return the value under this segment and the spelling found, or (MISSING, "")."""
        if isinstance(value, dict):
            for spelling in self.spellings:
                if spelling in value:
                    return value[spelling], spelling
        elif isinstance(value, list) and self.index is not None and self.index < len(value):
            return value[self.index], self.name
        return MISSING, ""


class FieldPath:
    """A parsed path (``call_key``, ``fromNumber``, ``call.uuid``, ``legs.0``).

    Parse once with ``FieldPath(text)``; :meth:`find` and :meth:`get` then look it up in any
    number of events, as described in the module docstring.

    Raises:
        TemplateError: the text is not a valid path (empty name, a character other than a
            letter, digit, ``_`` or ``-``, or a segment after an event attribute).
    """

    __slots__ = ("_attribute", "_fields", "_one", "text")

    def __init__(self, text: str) -> None:
        names = text.split(".")
        for name in names:
            if not _NAME.fullmatch(name):
                raise TemplateError((), _bad_path(text, name))
        self.text = text
        root = names[0]
        if root in _EVENT_ATTRIBUTES and len(names) > 1:
            raise TemplateError(
                (), f"bad path {text!r}: {root} has no fields; write payload.{text} for a field"
            )
        self._attribute = root if root in _EVENT_ATTRIBUTES or root == _PAYLOAD else None
        fields = names[1:] if self._attribute is not None else names
        self._fields = tuple(_Step(name) for name in fields)
        # A lone field name (the common path): its spellings, for find's short cut.
        one = self._fields[0] if self._attribute is None and len(self._fields) == 1 else None
        self._one = one.spellings if one is not None and one.index is None else None

    def __repr__(self) -> str:
        return f"FieldPath({self.text!r})"

    def find(self, event: Event) -> Any:
        """Return the value at this path in ``event``, or :data:`MISSING`."""
        spellings, payload = self._one, event.payload
        if spellings is None or not isinstance(payload, dict):
            return self._walk(event)[0]
        # _walk's lookup of a lone name, without the spellings it found: a miss cost 0.7 µs
        # there (it builds the nested spelling's name), 0.2 µs here.
        for spelling in spellings:
            if spelling in payload:
                return payload[spelling]
        nested = payload.get("call")
        if isinstance(nested, dict):
            for spelling in spellings:
                if spelling in nested:
                    return nested[spelling]
        return MISSING

    def get(self, event: Event, location: Location = ()) -> Any:
        """Return the value at this path in ``event``.

        Raises:
            TemplateError: the event has no such field; the message names ``location``, the
                event and every spelling tried.
        """
        value, found, parent = self._walk(event)
        if value is MISSING:
            raise TemplateError(location, self._explain(event, found, parent))
        return value

    def _walk(self, event: Event) -> tuple[Any, list[str], Any]:
        """Look the path up.

        Returns:
            The value (or MISSING), the spellings found on the way, and the deepest value
            reached: on a miss, the field at position ``len(found)`` is absent from it.
        """
        if self._attribute is not None and self._attribute != _PAYLOAD:
            return _event_attribute(event, self._attribute), [], None
        value: Any = event.payload
        found: list[str] = []
        for position, step in enumerate(self._fields):
            child, spelling = _take_first(value, step) if position == 0 else step.take(value)
            if child is MISSING:
                return MISSING, found, value
            found.append(spelling)
            value = child
        return value, found, value

    def _explain(self, event: Event, found: list[str], parent: Any) -> str:
        """Say why the path is missing from ``event``; ``found`` and ``parent`` as from _walk."""
        if self._attribute == "call_key":
            return f"event {event.name} has no call key"
        wanted = ".".join(step.name for step in self._fields)
        missing = f"event {event.name} has no field {wanted!r}"
        failed = len(found)
        if failed == 0:
            tried = _first_spellings(self._fields[0])
        elif isinstance(parent, dict):
            tried = [f"{'.'.join(found)}.{spelling}" for spelling in self._fields[failed].spellings]
        else:
            return f"{missing} ({_shape(found, parent)})"
        rest = "".join(f".{step.name}" for step in self._fields[failed + 1 :])
        others = [path + rest for path in tried if path + rest != wanted]
        return f"{missing} (also tried {', '.join(others)})" if others else missing


def _bad_path(text: str, name: str) -> str:
    """Say what is wrong with one name of a path."""
    if not name:
        return f"bad path {text!r}: empty name"
    return f"bad path {text!r}: names may hold letters, digits, '_' and '-' only"


def _event_attribute(event: Event, attribute: str) -> Any:
    """Return one of the event's own attributes, or MISSING for an absent call key."""
    if attribute == "call_key":
        return MISSING if event.call_key is None else event.call_key
    if attribute == "event":
        return event.name
    return event.topic if attribute == "topic" else event.received_at


def _take_first(payload: dict[str, Any], step: _Step) -> tuple[Any, str]:
    """Look up a path's first field: in the payload, then in its nested ``call`` object."""
    value, spelling = step.take(payload)
    if value is not MISSING:
        return value, spelling
    value, spelling = step.take(payload.get("call"))
    return value, f"call.{spelling}"


def _first_spellings(step: _Step) -> list[str]:
    """Every spelling tried for a path's first field, in lookup order."""
    return [*step.spellings, *(f"call.{spelling}" for spelling in step.spellings)]


def _shape(found: list[str], value: Any) -> str:
    """Say why a value cannot be looked into, for a missing-field message."""
    where = ".".join(found)
    if isinstance(value, list):
        return f"{where} is a list of {len(value)}"
    return f"{where} is {_kind(value)}"


def _text(value: Any) -> str:
    """The text of a value placed inside a longer string."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Template(ABC):
    """A compiled template. Make one with :func:`compile_template`; it is immutable."""

    __slots__ = ()

    @abstractmethod
    def render(self, event: Event) -> Any:
        """Return the value filled in from ``event``.

        Objects and lists written in the template are built afresh on each call; a value taken
        from the event by a lone placeholder is the event's own, read-only like its payload.

        Raises:
            TemplateError: a placeholder names a field the event lacks.
        """


class _Constant(Template):
    """A scalar or a string without placeholders."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def render(self, event: Event) -> Any:
        return self.value


class _Field(Template):
    """A string that is exactly one placeholder: the raw value."""

    __slots__ = ("location", "path")

    def __init__(self, path: FieldPath, location: Location) -> None:
        self.path = path
        self.location = location

    def render(self, event: Event) -> Any:
        return self.path.get(event, self.location)


class _Text(Template):
    """A string mixing literal text and placeholders."""

    __slots__ = ("location", "parts")

    def __init__(self, parts: Sequence[str | FieldPath], location: Location) -> None:
        self.parts = tuple(parts)
        self.location = location

    def render(self, event: Event) -> str:
        return "".join(
            part if isinstance(part, str) else _text(part.get(event, self.location))
            for part in self.parts
        )


class _Object(Template):
    """A JSON object; keys are literal."""

    __slots__ = ("items",)

    def __init__(self, items: Sequence[tuple[str, Template]]) -> None:
        self.items = tuple(items)

    def render(self, event: Event) -> dict[str, Any]:
        return {key: template.render(event) for key, template in self.items}


class _List(Template):
    """A JSON list."""

    __slots__ = ("items",)

    def __init__(self, items: Sequence[Template]) -> None:
        self.items = tuple(items)

    def render(self, event: Event) -> list[Any]:
        return [template.render(event) for template in self.items]


def compile_template(value: Any, location: Location = ()) -> Template:
    """Compile a JSON-like value into a :class:`Template`.

    Args:
        value: a string, number, boolean, None, list or str-keyed dict, nested freely.
        location: where ``value`` sits in the config (``("input", "callUuid")``); it prefixes
            every error message, at compile time and when rendering.

    Raises:
        TemplateError: a string has a brace error or a bad path, a dict key is not a string,
            a number is not finite, or a value is not JSON (a TOML date, say).
    """
    if isinstance(value, str):
        return _compile_string(value, location)
    if isinstance(value, dict):
        return _Object([_compile_item(key, item, location) for key, item in value.items()])
    if isinstance(value, list | tuple):
        return _List([compile_template(item, (*location, i)) for i, item in enumerate(value)])
    if isinstance(value, float) and not math.isfinite(value):
        raise TemplateError(location, f"{value} is not a JSON number")
    if value is None or isinstance(value, bool | int | float):
        return _Constant(value)
    raise TemplateError(location, f"a {type(value).__name__} is not a JSON value; quote it")


def _compile_item(key: Any, value: Any, location: Location) -> tuple[str, Template]:
    """Compile one member of an object."""
    if not isinstance(key, str):
        raise TemplateError(location, f"object key {key!r} is not a string")
    return key, compile_template(value, (*location, key))


def _compile_string(text: str, location: Location) -> Template:
    """Compile one string into a constant, a raw placeholder or a text template."""
    parts: list[str | FieldPath] = []
    for token in _TOKEN.finditer(text):
        kind = token.lastgroup
        if kind == "lone":
            raise TemplateError(
                location, f"unbalanced brace in {text!r}; write {{{{ or }}}} for a literal brace"
            )
        if kind == "path":
            parts.append(_placeholder(token["path"], location))
            continue
        piece = "{" if kind == "open" else "}" if kind == "close" else token[0]
        if parts and isinstance(parts[-1], str):
            parts[-1] += piece
        else:
            parts.append(piece)
    if len(parts) == 1 and isinstance(parts[0], FieldPath):
        return _Field(parts[0], location)
    if all(isinstance(part, str) for part in parts):
        return _Constant("".join(part for part in parts if isinstance(part, str)))
    return _Text(parts, location)


def _placeholder(path: str, location: Location) -> FieldPath:
    """Parse the path of one placeholder, naming ``location`` on error."""
    if not path:
        raise TemplateError(location, "empty placeholder {}; write {{}} for literal braces")
    try:
        return FieldPath(path)
    except TemplateError as exc:
        raise TemplateError(location, exc.problem) from None
