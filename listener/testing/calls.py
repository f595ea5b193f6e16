"""The fake Sippet's calls: a table of Call rows, and ``list_calls`` answered from it.

Each simulated call event changes the table as it would change Sippet's (``incoming_call``
adds a ringing call, ``call_answered`` answers it, ``call_ended`` ends it with its duration),
and ``list_calls`` answers from the table the way Ash answers a read action: an Ash filter
(``eq``, ``notEq``, ``in``, ``greaterThan``, ``greaterThanOrEqual``, ``lessThan``,
``lessThanOrEqual``, ``isNil``, combined with ``and``, ``or`` and ``not``), field selection
and ``sort``, all in camelCase. A request naming an unknown field or operator is refused as
Ash refuses it, with ``{"success": false, "errors": [...]}`` (HTTP 200).

Comparisons follow SQL: a field that is nil matches no comparison, only ``isNil``. Time
fields compare as instants, whatever the offset or precision of either side.
"""

from __future__ import annotations

import operator
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Literal

from listener.calls.state import format_time

__all__ = ["CALL_FIELDS", "CallTable", "PayloadStyle", "call_payload"]

PayloadStyle = Literal["camel", "snake", "nested"]

#: The Call resource's selectable fields (the ``list_calls`` reference).
CALL_FIELDS: Final = (
    "id",
    "direction",
    "fromNumber",
    "toNumber",
    "sipUsername",
    "status",
    "callUuid",
    "callSource",
    "startedAt",
    "answeredAt",
    "mediaQualifiedAt",
    "callerSpokeAt",
    "endedAt",
    "durationSeconds",
    "recordingStatus",
    "recordingUri",
    "recordingUploadedAt",
    "recordingError",
    "recordingMetadata",
    "conversationId",
    "flaggedAt",
    "flaggedByUserId",
    "currentHandler",
    "currentHandlerType",
    "currentHandlerId",
    "currentHandlerName",
    "currentOperatorMemberUuid",
    "currentOperatorName",
    "currentAiAgentId",
    "currentAiAgentName",
    "contactId",
    "contactFullName",
    "billingCostCents",
    "billingCostCurrency",
    "platformAiBillingCostCents",
    "platformAiInputTokens",
    "platformAiOutputTokens",
    "platformAiTotalTokens",
)
_SELECTABLE: Final = frozenset(CALL_FIELDS)
# Filters and sorts may also use the timestamps every Ash resource has: the reference's own
# list_calls example sorts by insertedAt.
_KNOWN: Final = _SELECTABLE | {"insertedAt", "updatedAt"}
# What a row holds from the start: the REST Call attributes, with the call's id and answer
# time; the other fields read as nil until a test sets them.
_MODELLED: Final = (
    "id",
    "callUuid",
    "direction",
    "fromNumber",
    "toNumber",
    "sipUsername",
    "callSource",
    "status",
    "startedAt",
    "answeredAt",
    "endedAt",
    "durationSeconds",
    "conversationId",
)
_TIMES: Final = frozenset(name for name in _KNOWN if name.endswith("At"))
_NUMBERS: Final = frozenset(
    {
        "durationSeconds",
        "billingCostCents",
        "platformAiBillingCostCents",
        "platformAiInputTokens",
        "platformAiOutputTokens",
        "platformAiTotalTokens",
    }
)
_OPERATORS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "eq": operator.eq,
    "notEq": operator.ne,
    "greaterThan": operator.gt,
    "greaterThanOrEqual": operator.ge,
    "lessThan": operator.lt,
    "lessThanOrEqual": operator.le,
}
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SORT = re.compile(r"(\+\+|--|\+|-)?(\w+)")

Predicate = Callable[[dict[str, Any]], bool]


def call_payload(fields: dict[str, Any], style: PayloadStyle) -> dict[str, Any]:
    """Spell a camelCase call payload the way ``style`` says: as it is, in snake_case, or in
    snake_case nested under ``call`` (the realtime spelling is not documented)."""
    if style == "camel":
        return fields
    snake = {_CAMEL_HUMP.sub("_", name).lower(): value for name, value in fields.items()}
    if style == "snake":
        return snake
    return {"call": snake, "occurredAt": fields.get("startedAt") or format_time(time.time())}


class _AshError(Exception):
    """A request Ash would refuse; :meth:`error` is the ``AshRpcError`` it would answer."""

    def __init__(self, kind: str, message: str, field: str | None = None, **values: Any) -> None:
        super().__init__(message)
        self.kind, self.message, self.field, self.values = kind, message, field, values

    def error(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "message": self.message,
            "shortMessage": self.kind.replace("_", " "),
            "vars": self.values if self.field is None else {"field": self.field, **self.values},
            "fields": [] if self.field is None else [self.field],
            "path": [],
        }


def _no_such_field(name: object) -> _AshError:
    return _AshError("no_such_field", "No such field %{field}", str(name))


def _invalid(field: str, value: Any) -> _AshError:
    return _AshError(
        "invalid_filter_value", "Invalid value %{value} for %{field}", field, value=value
    )


def _cast(field: str, value: Any) -> Any:
    """Turn a filter operand, or a row's value, into what the field compares as."""
    if value is None:
        return None
    if field in _TIMES:
        try:
            when = datetime.fromisoformat(str(value))
        except ValueError:
            raise _invalid(field, value) from None
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    if field in _NUMBERS and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise _invalid(field, value)
    return value


def _comparison(field: str, name: str, operand: Any) -> Predicate:
    """Compile one ``{field: {operator: operand}}``."""
    if name == "isNil":
        if not isinstance(operand, bool):
            raise _invalid(field, operand)
        return lambda row: (row.get(field) is None) == operand
    if name == "in":
        if not isinstance(operand, list):
            raise _invalid(field, operand)
        wanted = [_cast(field, item) for item in operand]
        return lambda row: row.get(field) is not None and _cast(field, row[field]) in wanted
    test = _OPERATORS.get(name)
    if test is None:
        raise _AshError("no_such_operator", "No such operator %{operator}", field, operator=name)
    against = _cast(field, operand)
    if against is None:
        return lambda row: False
    return lambda row: row.get(field) is not None and test(_cast(field, row[field]), against)


def _compiled(spec: Any) -> Predicate:
    """Compile an Ash filter into a row predicate, refusing it whole as Ash does (before any
    row is read) when it names an unknown field or operator.

    Raises:
        _AshError: what Ash would answer.
    """
    if not isinstance(spec, dict):
        raise _AshError("invalid_filter", "a filter is an object")
    parts: list[Predicate] = []
    for key, value in spec.items():
        if key in ("and", "or"):
            if not isinstance(value, list):
                raise _AshError("invalid_filter", f"{key} takes a list of filters")
            inner = [_compiled(item) for item in value]
            parts.append(_all_of(inner) if key == "and" else _any_of(inner))
        elif key == "not":
            parts.append(_none_of([_compiled(value)]))
        elif key not in _KNOWN:
            raise _no_such_field(key)
        else:
            # A bare value means equality, as in Ash.
            operators = value if isinstance(value, dict) else {"eq": value}
            parts.extend(_comparison(key, op, operand) for op, operand in operators.items())
    return _all_of(parts)


def _all_of(parts: list[Predicate]) -> Predicate:
    return lambda row: all(part(row) for part in parts)


def _any_of(parts: list[Predicate]) -> Predicate:
    return lambda row: any(part(row) for part in parts)


def _none_of(parts: list[Predicate]) -> Predicate:
    return lambda row: not any(part(row) for part in parts)


def _sorted(rows: list[dict[str, Any]], spec: Any) -> list[dict[str, Any]]:
    """Sort rows by an Ash sort string (``startedAt``, ``-endedAt,++status``)."""
    if not isinstance(spec, str):
        raise _AshError("invalid_sort", "sort is a string")
    # Stable sorts, last key first, leave the rows ordered by the first key, then the next.
    for part in reversed(spec.split(",")):
        rows = _sorted_by(rows, part.strip())
    return rows


def _sorted_by(rows: list[dict[str, Any]], part: str) -> list[dict[str, Any]]:
    """Sort by one key: ascending puts nils last and descending first, unless ``++``
    (ascending, nils first) or ``--`` (descending, nils last) says otherwise."""
    match = _SORT.fullmatch(part)
    if match is None or match[2] not in _KNOWN:
        raise _no_such_field(part if match is None else match[2])
    prefix, field = match[1] or "", match[2]
    present = [row for row in rows if row.get(field) is not None]
    absent = [row for row in rows if row.get(field) is None]
    present.sort(key=lambda row: _cast(field, row[field]), reverse=prefix in ("-", "--"))
    return absent + present if prefix in ("-", "++") else present + absent


class CallTable:
    """The calls the fake Sippet knows, by ``callUuid``, as camelCase Call rows."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def apply(self, event: str, call_uuid: str, now: float, **fields: Any) -> dict[str, Any]:
        """Change the table as call event ``event`` of ``call_uuid`` at ``now`` would.

        ``incoming_call`` adds a ringing call, ``call_answered`` answers it, ``call_ended``
        ends it (``completed`` if it was answered, else ``no_answer``, with its duration); a
        call that is not in the table yet is added first. ``fields`` (camelCase) are set
        last, so a test can say anything else (``fromNumber``, ``status``, ...).

        Returns:
            The row (the table's own: read it, do not keep it).

        Raises:
            ValueError: ``event`` is not a call event.
        """
        row = self.rows.get(call_uuid)
        if row is None:
            row = self.rows[call_uuid] = {
                **dict.fromkeys(_MODELLED),
                "id": str(uuid.uuid4()),
                "callUuid": call_uuid,
                "direction": "inbound",
                "status": "ringing",
                "startedAt": format_time(now),
                "insertedAt": format_time(now),
            }
        if event == "call_answered":
            row.update(status="answered", answeredAt=format_time(now))
        elif event == "call_ended":
            answered = _cast("answeredAt", row["answeredAt"])
            row.update(
                status="no_answer" if answered is None else "completed",
                endedAt=format_time(now),
                durationSeconds=0 if answered is None else round(now - answered.timestamp()),
            )
        elif event != "incoming_call":
            raise ValueError(f"{event} is not a call event")
        row.update(fields)
        return row

    def list_calls(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer a ``list_calls`` request body as Sippet's RPC API would."""
        try:
            fields = request.get("fields")
            if not isinstance(fields, list) or not fields:
                raise _AshError("required", "fields is required", "fields")
            for name in fields:
                if name not in _SELECTABLE:
                    raise _no_such_field(name)
            spec, sort = request.get("filter"), request.get("sort")
            keep = None if spec is None else _compiled(spec)
            rows = [row for row in self.rows.values() if keep is None or keep(row)]
            if sort is not None:
                rows = _sorted(rows, sort)
        except _AshError as exc:
            return {"success": False, "errors": [exc.error()]}
        return {"success": True, "data": [{name: row.get(name) for name in fields} for row in rows]}
