"""pydantic's errors as the one line a config error prints: a dotted key and a problem."""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["format_validation_error"]


def format_validation_error(exc: ValidationError, model: type[BaseModel]) -> tuple[str, str]:
    """Turn pydantic's first error into ``(dotted key, one-line problem)``.

    List positions read as TOML users count them: ``handlers[1].rules[0].action``.
    """
    errors = exc.errors()
    # A misspelt key shows up twice: as unknown, and as its real name missing. The unknown
    # one, with its "did you mean", is the useful report.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = list(error["loc"])
    key = _dotted(loc)
    if error["type"] == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        return key, f"unknown key{hint}"
    message = error["msg"]
    if error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    return key, message[0].lower() + message[1:]


def _dotted(loc: list[int | str]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key


def _known_keys(model: type[BaseModel], loc: list[int | str]) -> list[str]:
    """The field names valid at ``loc`` inside ``model`` (looking through lists)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        current = _model_inside(field.annotation) if field is not None else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_inside(annotation: Any) -> Any:
    """``Model`` for ``Model``, ``list[Model]``, ``Model | None`` and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_inside(argument)
        if found is not None:
            return found
    return None
