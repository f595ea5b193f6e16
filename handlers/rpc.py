"""The ``rpc`` handler: declarative rules that run Sippet RPC actions when events arrive.

::

    [[handlers]]
    use = "rpc"
    [[handlers.rules]]
    on = "incoming_call"                        # an event-name glob, or a list of globs
    when = { fromNumber = ["+15550000000"] }   # every condition must hold
    action = "end_call"
    input = { callUuid = "{call_key}" }

A rule *matches* an event when the event's name matches one of its ``on`` globs and every
``when`` condition holds. A condition's key is a field path (see :mod:`listener.core.templating`:
camelCase and snake_case spellings and a nested ``call`` object are all tried; a nested TOML
table such as ``when = { call = { direction = "inbound" } }`` means ``call.direction``). A list
of values holds when the field equals any of them, a single value when it equals that one.
A missing field never holds. Equality is JSON equality: ``true`` does not equal ``1``.

The payload keys (``input``, ``identity``, ``fields``, ``filter``, ``sort``, ``page``,
``metadata_fields``) are templates, filled in from the event. Everything is checked when the
config is loaded, not at the first event: template syntax, ``when`` paths, and, unless
``unchecked = true``, that the action is in :data:`~listener.rpc.catalog.CATALOG`, that it takes
each payload key given, and that every key and ``input`` field it requires is present.
Problems are pydantic errors located at the offending key (``rules.0.input.callUuid``), so
the loader reports them like any other config error.

Error handling, per event: rules run in order, one RPC call at a time. A rule whose template
cannot be filled in (:class:`~listener.core.templating.TemplateError`) or whose call fails
(:class:`~listener.RpcError`, including ``{"success": false}``) is logged with its index
and action, and the remaining rules still run: one rule's failure must not cancel another's
independent action. When every rule has had its turn, :class:`RulesFailed` is raised if any
failed, so the dispatcher counts the event as failed. Any other exception is a bug and
propagates at once. A rule with ``stop = true`` that matched ends the evaluation, whether its
call succeeded or not: a blocked call must not go on to the rules meant for wanted ones.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from listener import (
    CATALOG,
    MISSING,
    PAYLOAD_KEYS,
    Context,
    Event,
    FieldPath,
    Handler,
    ListenerError,
    Location,
    RpcError,
    Template,
    TemplateError,
    compile_template,
)

__all__ = ["RpcConfig", "RpcHandler", "Rule", "RuleFailure", "RulesFailed"]

_Scalar: TypeAlias = str | int | float | bool

# Config name of each payload key, in the catalog's order, by wire name.
_CONFIG_NAMES = {key: "metadata_fields" if key == "metadataFields" else key for key in PAYLOAD_KEYS}


def _invalid(location: Location, problem: str, value: Any) -> ValidationError:
    """A pydantic error at ``location``; pydantic prefixes the rule's own location."""
    # The problem goes in as context, so braces quoted from a template stay literal.
    error = PydanticCustomError("rpc_rule", "{problem}", {"problem": problem})
    return ValidationError.from_exception_data(
        "Rule", [InitErrorDetails(type=error, loc=location, input=value)]
    )


class Rule(BaseModel):
    """One ``[[handlers.rules]]`` table: when an event matches, run one action.

    Attributes:
        on: an event-name glob or a list of them (``incoming_call``, ``call_*``).
        when: conditions on event fields, all of which must hold (see the module docstring).
        action: the action's wire name (``end_call``).
        input, identity, fields, filter, sort, page, metadata_fields: the payload keys, as
            templates; only those given are sent.
        retry_unsafe: also retry a mutating action after a failure that may have reached Sippet.
        unchecked: skip the catalog checks, for actions newer than the catalog.
        stop: evaluate no later rule once this one matched.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    on: str | list[str]
    when: dict[str, Any] = {}
    action: str = Field(min_length=1)
    input: dict[str, Any] | None = None
    identity: Any = None
    fields: list[Any] | None = None
    filter: dict[str, Any] | None = None
    sort: str | None = None
    page: dict[str, Any] | None = None
    metadata_fields: list[str] | None = None
    retry_unsafe: bool = False
    unchecked: bool = False
    stop: bool = False

    _names: re.Pattern[str] = PrivateAttr()
    _conditions: tuple[tuple[FieldPath, tuple[_Scalar, ...]], ...] = PrivateAttr()
    _payload: dict[str, Template] = PrivateAttr()

    @model_validator(mode="after")
    def _compile(self) -> Self:
        """Check the rule against the catalog and compile its globs, conditions and templates."""
        self._names = _compile_globs(self.globs)
        self._conditions = tuple(_conditions(self.when, ("when",)))
        if not self.unchecked:
            self._check_action()
        self._payload = {}
        for name, value in self._given().items():
            try:
                self._payload[name] = compile_template(value, (name,))
            except TemplateError as exc:
                raise _invalid(exc.location, exc.problem, value) from None
        return self

    @property
    def globs(self) -> tuple[str, ...]:
        """The ``on`` globs, as a tuple."""
        return (self.on,) if isinstance(self.on, str) else tuple(self.on)

    def applies(self, event: Event) -> bool:
        """Whether ``event`` matches the rule's globs and conditions. Renders nothing."""
        if not self._names.match(event.name):
            return False
        return all(_holds(path.find(event), wanted) for path, wanted in self._conditions)

    def render(self, event: Event) -> dict[str, Any]:
        """Return the payload keys filled in from ``event``, as keyword arguments of
        :meth:`~listener.rpc.client.RpcClient.run`.

        Raises:
            TemplateError: a template names a field the event lacks.
        """
        return {name: template.render(event) for name, template in self._payload.items()}

    def _given(self) -> dict[str, Any]:
        """The payload keys this rule sets, by config name."""
        given = {name: getattr(self, name) for name in _CONFIG_NAMES.values()}
        return {name: value for name, value in given.items() if value is not None}

    def _check_action(self) -> None:
        """Check the action and the payload keys against the catalog."""
        spec = CATALOG.get(self.action)
        if spec is None:
            raise _invalid(("action",), _unknown_action(self.action), self.action)
        taken = [_CONFIG_NAMES[key] for key in PAYLOAD_KEYS if key in spec.keys]
        given = self._given()
        for name in given:
            if name not in taken:
                takes = f"it takes {', '.join(taken)}" if taken else "it takes no payload keys"
                raise _invalid((name,), f"{self.action} does not take {name}; {takes}", given[name])
        for key in PAYLOAD_KEYS:
            name = _CONFIG_NAMES[key]
            if key in spec.required_keys and name not in given:
                raise _invalid((name,), f"required by {self.action}", None)
        missing = sorted(spec.required_input - set(self.input or {}))
        if missing:
            raise _invalid(("input", missing[0]), f"required by {self.action}", self.input)


def _unknown_action(action: str) -> str:
    """Say that ``action`` is not in the catalog, with close names and the escape hatch."""
    close = difflib.get_close_matches(action, CATALOG, n=3)
    hint = f" (did you mean {' or '.join(repr(name) for name in close)}?)" if close else ""
    return f"unknown rpc action {action!r}{hint}; set unchecked = true to send it anyway"


def _compile_globs(globs: Sequence[str]) -> re.Pattern[str]:
    """One case-sensitive pattern matching any of the event-name globs."""
    if not globs:
        raise _invalid(("on",), "give at least one event-name glob", [])
    if not all(globs):
        raise _invalid(("on",), "an event-name glob is empty", list(globs))
    return re.compile("|".join(f"(?:{fnmatch.translate(glob)})" for glob in globs))


def _conditions(
    when: dict[str, Any], location: Location, prefix: str = ""
) -> Iterator[tuple[FieldPath, tuple[_Scalar, ...]]]:
    """Yield each ``when`` condition as (path, accepted values); nested tables are dotted."""
    for key, value in when.items():
        here = (*location, key)
        if isinstance(value, dict):
            yield from _conditions(value, here, f"{prefix}{key}.")
            continue
        try:
            path = FieldPath(prefix + key)
        except TemplateError as exc:
            raise _invalid(here, exc.problem, key) from None
        yield path, _accepted(value, here)


def _accepted(value: Any, location: Location) -> tuple[_Scalar, ...]:
    """The values a condition accepts: one scalar, or a non-empty list of them."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise _invalid(location, "an empty list never matches", value)
    for item in values:
        if not isinstance(item, str | int | float | bool):
            problem = "must be a string, number or boolean, or a list of them"
            raise _invalid(location, problem, value)
    return tuple(values)


def _holds(actual: Any, wanted: tuple[_Scalar, ...]) -> bool:
    """Whether a field's value equals one of the accepted values (JSON equality)."""
    if actual is MISSING:
        return False
    # Python says True == 1; a TOML true must not match a payload's 1.
    if isinstance(actual, bool):
        return any(item is actual for item in wanted)
    return any(item == actual and not isinstance(item, bool) for item in wanted)


class RpcConfig(BaseModel):
    """The ``rpc`` handler's settings: its rules, evaluated in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class RuleFailure:
    """One rule that failed for an event.

    Attributes:
        index: the rule's position in ``rules``, from 0.
        action: the rule's action.
        error: why: the template could not be filled in, or the call failed.
    """

    index: int
    action: str
    error: RpcError | TemplateError


class RulesFailed(ListenerError):
    """Rules failed for one event after every matching rule had its turn.

    ``failures`` lists them in rule order; the first one's error is the ``__cause__``.
    """

    def __init__(self, event: str, failures: Sequence[RuleFailure]) -> None:
        details = "; ".join(
            f"rule {failure.index} ({failure.action}): {failure.error}" for failure in failures
        )
        super().__init__(f"rpc rules failed for {event}: {details}")
        self.event = event
        self.failures = tuple(failures)


class RpcHandler(Handler[RpcConfig]):
    """Run RPC actions for events, as declared by rules; see the module docstring.

    Subscribes to the union of the rules' ``on`` globs, in rule order.
    """

    name = "rpc"

    def __init__(self, config: RpcConfig) -> None:
        super().__init__(config)
        self.events = tuple(dict.fromkeys(glob for rule in config.rules for glob in rule.globs))

    def matches(self, event: Event) -> bool:
        """Whether any rule applies to ``event``; no template is rendered."""
        return any(rule.applies(event) for rule in self.config.rules)

    async def handle(self, event: Event, ctx: Context[RpcConfig]) -> None:
        """Run the action of every rule that applies to ``event``, in order.

        Raises:
            RulesFailed: one or more rules failed; the others ran.
        """
        failures: list[RuleFailure] = []
        for index, rule in enumerate(self.config.rules):
            if not rule.applies(event):
                continue
            failure = await _fire(index, rule, event, ctx)
            if failure is not None:
                failures.append(failure)
            if rule.stop:
                break
        if failures:
            raise RulesFailed(event.name, failures) from failures[0].error


async def _fire(
    index: int, rule: Rule, event: Event, ctx: Context[RpcConfig]
) -> RuleFailure | None:
    """Run one rule's action; log the outcome and return the failure, if any."""
    try:
        await ctx.rpc.run(
            rule.action,
            **rule.render(event),
            retry_unsafe=rule.retry_unsafe,
            unchecked=rule.unchecked,
        )
    except (RpcError, TemplateError) as exc:
        ctx.log.warning("rpc rule failed", rule=index, action=rule.action, error=str(exc))
        return RuleFailure(index, rule.action, exc)
    ctx.log.info("rpc rule fired", rule=index, action=rule.action)
    return None
