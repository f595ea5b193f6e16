"""Loading handlers named in the configuration.

``use`` in a ``[[handlers]]`` table names the handler, tried in this order:

1. a built-in short name (``log``, ``rpc``, ``webhook``);
2. an entry point of the ``sippet_listener.handlers`` group, so installed plugins are used by
   name (``use = "slack"``);
3. ``package.module:attribute``.

The attribute may be a :class:`~listener.Handler` subclass (instantiated with its
validated settings model), a handler made with :func:`~listener.handler` (copied), or a plain
async function. Each table gets an instance of its own, so one attribute may serve several
tables under different names, and a reload never sets up or tears down a running instance.

The dispatcher's policy (``timeout``, ``concurrency``, ...) is what the table says, else what
the handler declares in code, else :class:`~listener.dispatch.dispatcher.RunnerSettings`'
default.

Every failure is a :class:`~listener.HandlerLoadError` or
:class:`~listener.ConfigError` naming the handler and the key: start-up stops with exit
code 78 and one line, never a traceback.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from listener.core.errors import ConfigError, HandlerLoadError
from listener.core.validation import format_validation_error
from listener.dispatch.dispatcher import RunnerSettings
from listener.dispatch.handler import FunctionHandler, Handler

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "LoadedHandler",
    "load_handler",
    "load_handlers",
    "loaded_instance",
]

ENTRY_POINT_GROUP = "sippet_listener.handlers"
BUILTINS: Mapping[str, str] = {
    "log": "handlers.log:LogHandler",
    "rpc": "handlers.rpc:RpcHandler",
    "webhook": "listener.webhooks.handler:WebhookHandler",
}


class _Policy(BaseModel):
    """The dispatcher's knobs for one handler, as a table or the handler's code gives them.

    None: not given here. The defaults are RunnerSettings' own, so they are written once.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    timeout: float | None = Field(default=None, gt=0)
    concurrency: int | None = Field(default=None, ge=1)
    queue_size: int | None = Field(default=None, ge=1)
    queue_bytes: int | None = Field(default=None, ge=1024)
    on_full: str | None = Field(default=None, pattern="^(wait|drop)$")


class _DispatchOptions(_Policy):
    """The keys of a ``[[handlers]]`` table that belong to the dispatcher, not the handler."""

    use: str
    name: str | None = None
    events: list[str] | None = None


_POLICY_KEYS = frozenset(_Policy.model_fields)
_DISPATCH_KEYS = frozenset(_DispatchOptions.model_fields)


@dataclass(frozen=True, slots=True)
class LoadedHandler:
    """A handler instance, how the dispatcher must feed it, and the table it came from.

    ``entry`` lets a reload keep a handler whose table did not change (no teardown, no
    setup, no lost queue); it is None for handlers built in code.
    """

    handler: Handler
    settings: RunnerSettings
    entry: Mapping[str, Any] | None = None


def load_handlers(entries: Sequence[Mapping[str, Any]]) -> list[LoadedHandler]:
    """Load every ``[[handlers]]`` entry, in order.

    Raises:
        ConfigError: a key is invalid (named as ``handlers[N].key``), or two handlers share
            a name.
        HandlerLoadError: a handler cannot be imported or built.
    """
    loaded = [load_handler(entry, f"handlers[{index}]") for index, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for index, item in enumerate(loaded):
        name = item.settings.name
        if name in seen:
            raise ConfigError(
                f"handlers[{index}].name",
                f"{name!r} is already the name of handlers[{seen[name]}]; "
                "give one of them another name",
            )
        seen[name] = index
    return loaded


def load_handler(entry: Mapping[str, Any], key: str) -> LoadedHandler:
    """Load one ``[[handlers]]`` entry; ``key`` is its place in the file, for errors."""
    try:
        options = _DispatchOptions.model_validate(entry)
    except ValidationError as exc:
        field, problem = format_validation_error(exc, _DispatchOptions)
        raise ConfigError(f"{key}.{field}", problem) from None
    target = _resolve(options.use)
    section = {name: value for name, value in entry.items() if name not in _DISPATCH_KEYS}
    handler = _build(target, section, options.use, key)
    name = options.name or handler.name or options.use
    # The instance is this table's own: it answers to the table's name (logs, outbox files).
    handler.name = name
    events = options.events if options.events is not None else handler.events
    settings = _settings(handler, name, events, options, options.use)
    return LoadedHandler(handler, settings, dict(entry))


def loaded_instance(handler: Handler) -> LoadedHandler:
    """A handler built in code (tests, harnesses), fed as it declares.

    Raises:
        HandlerLoadError: it declares a policy value the dispatcher cannot take.
    """
    name = handler.name or type(handler).__name__.lower()
    return LoadedHandler(handler, _settings(handler, name, handler.events, _Policy(), name))


def _settings(
    handler: Handler, name: str, events: Sequence[str], table: _Policy, use: str
) -> RunnerSettings:
    """The runner's settings: the table's policy over the handler's, over the defaults."""
    try:
        declared = _Policy.model_validate({key: getattr(handler, key) for key in _POLICY_KEYS})
    except ValidationError as exc:
        field, problem = format_validation_error(exc, _Policy)
        raise HandlerLoadError(
            use, f"declares {field} = {getattr(handler, field)!r}: {problem}"
        ) from None
    policy = {
        **declared.model_dump(exclude_none=True),
        **table.model_dump(include=set(_POLICY_KEYS), exclude_none=True),
    }
    return RunnerSettings(name=name, events=tuple(events), **policy)


def _resolve(use: str) -> object:
    reference = BUILTINS.get(use)
    if reference is None and ":" not in use:
        reference = _entry_point(use)
    if reference is None:
        reference = use
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise HandlerLoadError(
            use,
            "not a built-in handler (log, rpc, webhook), not an "
            f"installed {ENTRY_POINT_GROUP!r} entry point, and not "
            "'package.module:attribute'",
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise HandlerLoadError(
            use, f"cannot import {module_name}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise HandlerLoadError(
            use, f"module {module_name} has no attribute {attribute!r}"
        ) from None


def _entry_point(name: str) -> str | None:
    found = {
        str(ep.value) for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name
    }
    if len(found) > 1:
        raise HandlerLoadError(
            name,
            f"ambiguous: installed plugins define it as "
            f"{', '.join(sorted(found))}; use 'module:attribute'",
        )
    return found.pop() if found else None


def _build(target: object, section: dict[str, Any], use: str, key: str) -> Handler:
    if isinstance(target, type) and issubclass(target, Handler):
        return _instantiate(target, section, use, key)
    if isinstance(target, Handler):
        _no_settings(section, use, key)
        # A module-level handler may serve several tables: each table gets a copy.
        return copy.copy(target)
    if inspect.iscoroutinefunction(target):
        _no_settings(section, use, key)
        name = getattr(target, "__name__", use)
        return FunctionHandler(target, name=name, events=("*",))
    raise HandlerLoadError(
        use,
        f"{type(target).__name__} is not a Handler subclass, a "
        "@handler function or an async function",
    )


def _instantiate(cls: type[Handler], section: dict[str, Any], use: str, key: str) -> Handler:
    model = cls.Config
    if model is None:
        _no_settings(section, use, key)
        config: Any = None
    else:
        _check_model(model, section, use, key)
        try:
            config = model.model_validate(section)
        except ValidationError as exc:
            field, problem = format_validation_error(exc, model)
            raise ConfigError(f"{key}.{field}", problem) from None
    try:
        return cls(config)
    except ConfigError as exc:
        # The handler names keys within its own section; say where that section is.
        raise ConfigError(f"{key}.{exc.key}" if exc.key else key, exc.problem) from None
    except HandlerLoadError:
        raise
    except Exception as exc:
        raise HandlerLoadError(use, f"could not be created: {type(exc).__name__}: {exc}") from None


def _check_model(model: type[BaseModel], section: dict[str, Any], use: str, key: str) -> None:
    """Enforce what every handler promises its users, whatever its model's own settings."""
    clash = sorted(_DISPATCH_KEYS & set(model.model_fields))
    if clash:
        raise HandlerLoadError(
            use,
            f"its Config declares {', '.join(clash)}, which the dispatcher owns; rename the field",
        )
    known = {name for name, field in model.model_fields.items()} | {
        field.alias for field in model.model_fields.values() if field.alias
    }
    for name in sorted(section):
        if name not in known:
            guess = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            raise ConfigError(f"{key}.{name}", f"unknown key{hint}")


def _no_settings(section: dict[str, Any], use: str, key: str) -> None:
    if section:
        first = sorted(section)[0]
        raise ConfigError(f"{key}.{first}", f"unknown key; handler {use!r} takes no settings")
