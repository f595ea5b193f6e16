"""Handlers from config and code: every way to name one, every way it can fail, the policy
it declares, and what the daemon calls on it (setup, teardown, the error hook)."""

from __future__ import annotations

import asyncio
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

from handlers.log import LogConfig, LogHandler
from listener import Context, Event, Handler, handler
from listener.core import metrics
from listener.core.errors import ConfigError, HandlerLoadError
from listener.dispatch.dispatcher import RunnerSettings
from listener.dispatch.handler import FunctionHandler
from listener.dispatch.loader import load_handler, load_handlers
from listener.testing import FakeSippet, running_daemon, settle
from tests import sample_handlers
from tests.sample_handlers import Greeter

DEFAULTS = RunnerSettings(name="defaults")


def test_builtins_by_short_name() -> None:
    loaded = load_handler({"use": "log", "level": "debug", "timeout": 3}, "handlers[0]")
    assert isinstance(loaded.handler, LogHandler)
    assert loaded.handler.config.level == "debug"
    assert (loaded.settings.name, loaded.settings.events, loaded.settings.timeout) == (
        "log",
        ("*",),
        3.0,
    )


def test_module_attribute_class_function_and_decorated() -> None:
    greeter, plain, tagged = load_handlers(
        [
            {"use": "tests.sample_handlers:Greeter", "greeting": "hi", "events": ["call_*"]},
            {"use": "tests.sample_handlers:plain", "concurrency": 2},
            {"use": "tests.sample_handlers:tagged", "on_full": "drop"},
        ]
    )
    assert isinstance(greeter.handler, Greeter)
    assert greeter.handler.config.greeting == "hi"
    assert greeter.settings.events == ("call_*",)
    assert isinstance(plain.handler, FunctionHandler)
    assert (plain.settings.name, plain.settings.events, plain.settings.concurrency) == (
        "plain",
        ("*",),
        2,
    )
    assert (tagged.settings.name, tagged.settings.events, tagged.settings.on_full) == (
        "tagged-calls",
        ("call_*",),
        "drop",
    )
    # Declared by the decorator; the table only changed on_full.
    assert (tagged.settings.timeout, tagged.settings.queue_size) == (4.0, 50)


def test_a_handler_without_a_type_parameter_still_loads_by_its_config() -> None:
    loaded = load_handler({"use": "tests.sample_handlers:Greeter", "greeting": "yo"}, "h[0]")
    assert Greeter.Config is not None
    assert isinstance(loaded.handler.config, Greeter.Config)


def test_the_type_parameter_is_the_settings_model() -> None:
    class Settings(BaseModel):
        level: int = 1

    class Typed(Handler[Settings]):
        pass

    class Bare(Handler[None]):
        pass

    class Child(Typed):
        pass

    assert (Typed.Config, Bare.Config, Child.Config, LogHandler.Config) == (
        Settings,
        None,
        Settings,
        LogConfig,
    )
    with pytest.raises(TypeError, match=r"Config is .* but Handler"):

        class Contradicts(Handler[Settings]):
            Config = LogConfig

    with pytest.raises(TypeError, match="takes a pydantic model or None"):

        class NotAModel(Handler[int]):  # type: ignore[type-var]
            pass


def test_the_table_overrides_the_policy_declared_in_code() -> None:
    declared = load_handler(
        {"use": "tests.sample_handlers:Declared", "concurrency": 4}, "handlers[0]"
    ).settings
    assert (declared.timeout, declared.concurrency, declared.on_full) == (2.5, 4, "drop")
    # Declared nowhere: the dispatcher's defaults.
    assert (declared.queue_size, declared.queue_bytes) == (
        DEFAULTS.queue_size,
        DEFAULTS.queue_bytes,
    )
    log = load_handler({"use": "log"}, "handlers[1]").settings
    assert log == RunnerSettings(name="log", events=("*",))


def test_a_bad_declared_policy_names_the_handler() -> None:
    with pytest.raises(HandlerLoadError) as caught:
        load_handler({"use": "tests.sample_handlers:BadPolicy"}, "handlers[0]")
    assert str(caught.value) == (
        "handler 'tests.sample_handlers:BadPolicy': declares concurrency = 0: "
        "input should be greater than or equal to 1"
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"use": "nope"}, "not a built-in handler"),
        ({"use": "no_such_module:Thing"}, "cannot import no_such_module: ModuleNotFoundError"),
        ({"use": "tests.sample_handlers:Missing"}, "has no attribute 'Missing'"),
        ({"use": "tests.sample_handlers:NotAHandler"}, "int is not a Handler subclass"),
    ],
)
def test_load_failures_name_the_handler(entry: dict[str, object], message: str) -> None:
    with pytest.raises(HandlerLoadError, match=message) as caught:
        load_handler(entry, "handlers[0]")
    assert caught.value.handler == entry["use"]


@pytest.mark.parametrize(
    ("entries", "key", "problem"),
    [
        (
            [{"use": "log", "levle": "info"}],
            "handlers[0].levle",
            "unknown key; did you mean 'level'?",
        ),
        ([{"use": "tests.sample_handlers:Greeter"}], "handlers[0].greeting", "field required"),
        (
            [{"use": "log"}, {"use": "tests.sample_handlers:plain", "color": 1}],
            "handlers[1].color",
            "unknown key; handler 'tests.sample_handlers:plain' takes no settings",
        ),
        ([{"use": "log", "timeout": -1}], "handlers[0].timeout", "input should be greater than 0"),
        ([{"use": "log", "on_full": "block"}], "handlers[0].on_full", "string should match"),
        ([{"events": ["*"]}], "handlers[0].use", "field required"),
        ([{"use": "log"}, {"use": "log"}], "handlers[1].name", "'log' is already the name"),
    ],
)
def test_config_errors_name_the_key(
    entries: list[dict[str, object]], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_handlers(entries)
    assert caught.value.key == key
    assert caught.value.problem.startswith(problem)


def test_plugin_configs_are_held_to_the_same_rules() -> None:
    # Lenient.Config does not forbid extras itself; the loader still refuses a typo.
    with pytest.raises(ConfigError) as caught:
        load_handler({"use": "tests.sample_handlers:Lenient", "greting": "yo"}, "handlers[0]")
    assert (caught.value.key, caught.value.problem) == (
        "handlers[0].greting",
        "unknown key; did you mean 'greeting'?",
    )
    with pytest.raises(HandlerLoadError, match="declares timeout, which the dispatcher"):
        load_handler({"use": "tests.sample_handlers:Shadowing"}, "handlers[0]")


async def test_setup_failure_stops_start_up_naming_the_handler(fake: FakeSippet) -> None:
    with pytest.raises(HandlerLoadError, match=r"broken-setup.*setup failed: OSError"):
        async with running_daemon(fake, [{"use": "tests.sample_handlers:BrokenSetup"}]):
            pass
    assert fake.mints == 0, "nothing should connect when a handler cannot start"


async def test_run_exits_78_on_a_bad_handler_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[handlers]]\nuse = "no_such_module:Thing"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "listener.service.cli",
        "run",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        env={"SIPPET_SECRET_KEY": "sk_test_123456", "PATH": "/usr/bin:/bin"},
    )
    _, err = await process.communicate()
    assert process.returncode == 78
    text = err.decode()
    assert "handler 'no_such_module:Thing': cannot import no_such_module" in text
    assert "Traceback" not in text


async def test_log_handler_shows_chosen_fields_in_any_spelling(fake: FakeSippet) -> None:
    with capture_logs() as logs:
        async with running_daemon(
            fake, [{"use": "log", "payload": False, "fields": ["fromNumber", "status"]}]
        ) as daemon:
            await fake.broadcast(
                "incoming_call", {"call": {"from_number": "+1555", "status": "ringing"}}
            )
            await settle(daemon, 1)
    [line] = [entry for entry in logs if entry["event"] == "event received"]
    assert (line["fromNumber"], line["status"], line["event_name"]) == (
        "+1555",
        "ringing",
        "incoming_call",
    )
    assert "payload" not in line


def tagged_lines(logs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return sorted(
        (line["handler"], line["event_name"]) for line in logs if line["event"] == "tagged"
    )


async def test_two_tables_using_one_decorated_function_are_two_handlers(fake: FakeSippet) -> None:
    use = "tests.sample_handlers:tagged"
    tables: list[dict[str, Any]] = [{"use": use, "name": "a"}, {"use": use, "name": "b"}]
    with capture_logs() as logs:
        async with running_daemon(fake, tables) as daemon:
            first, second = (item.handler for item in daemon.handlers)
            assert first is not second
            assert (first.name, second.name) == ("a", "b")
            await fake.broadcast("call_started", {"callUuid": "c-1"})
            await settle(daemon, 1)
            assert tagged_lines(logs) == [("a", "call_started"), ("b", "call_started")]

            # b's table changes: b is a new copy; a keeps running as it was.
            changed = [tables[0], {**tables[1], "events": ["call_ended"]}]
            assert await daemon.reload(lambda: (daemon.settings, load_handlers(changed)))
            kept, fresh = (item.handler for item in daemon.handlers)
            assert kept is first
            assert fresh not in (first, second)
            assert (kept.name, fresh.name) == ("a", "b")
            logs.clear()
            await fake.broadcast("call_ended", {"callUuid": "c-1"})
            await settle(daemon, 2)
            assert tagged_lines(logs) == [("a", "call_ended"), ("b", "call_ended")]
    # The module's own object served no table.
    assert sample_handlers.tagged.name == "tagged-calls"


class Tidy(Handler[None]):
    name = "tidy"

    def __init__(self) -> None:
        super().__init__()
        self.torn_down: list[str] = []

    async def teardown(self, ctx: Context[None]) -> None:
        self.torn_down.append(ctx.name)


async def test_teardown_gets_the_context(fake: FakeSippet) -> None:
    tidy = Tidy()
    async with running_daemon(fake, [tidy]):
        assert tidy.torn_down == []
    assert tidy.torn_down == ["tidy"]


async def test_a_teardown_without_context_still_runs_and_is_deprecated_once(
    fake: FakeSippet,
) -> None:
    closed: list[str] = []
    with pytest.warns(DeprecationWarning, match=r"Old\.teardown\(self\) is deprecated") as caught:

        class Old(Handler[None]):
            name = "old"

            async def teardown(self) -> None:  # type: ignore[override]
                closed.append(self.name)

    # The warning points at the plugin's class statement, not at the handler API.
    assert [warning.filename for warning in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Older(Old):
            name = "older"

        async with running_daemon(fake, [Old(), Older()]):
            pass
    assert closed == ["old", "older"]


def outcome(name: str, result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "sippet_listener_handler_events_total", {"handler": name, "outcome": result}
    )
    return value or 0.0


class Fragile(Handler[None]):
    """Fails on ``boom``, hangs on ``hang``, and its hook itself breaks on ``worse``."""

    name = "fragile"
    timeout = 0.2

    def __init__(self) -> None:
        super().__init__()
        self.told: list[tuple[str, str, bool, float]] = []

    async def handle(self, event: Event, ctx: Context[None]) -> None:
        if event.name == "hang":
            await asyncio.Event().wait()
        if event.name in ("boom", "worse"):
            raise RuntimeError(event.name)

    async def on_error(self, event: Event, error: Exception, ctx: Context[None]) -> None:
        counted = outcome(ctx.name, "timeout" if isinstance(error, TimeoutError) else "error")
        self.told.append((event.name, type(error).__name__, ctx.event is event, counted))
        ctx.log.info("hook ran")
        if event.name == "worse":
            raise ValueError("the alerting service is down too")


async def test_the_error_hook_hears_of_failures_and_timeouts(fake: FakeSippet) -> None:
    fragile = Fragile()
    errors, timeouts = outcome("fragile", "error"), outcome("fragile", "timeout")
    with capture_logs() as logs:
        async with running_daemon(fake, [fragile]) as daemon:
            for name in ("ok", "boom", "hang", "worse", "ok"):
                await fake.broadcast(name, {"callUuid": "c-1"})
            await settle(daemon, 5)
    # Told after the failure was counted, with the event's own context.
    assert fragile.told == [
        ("boom", "RuntimeError", True, errors + 1),
        ("hang", "TimeoutError", True, timeouts + 1),
        ("worse", "RuntimeError", True, errors + 2),
    ]
    messages = [
        (line["event"], line.get("event_name"))
        for line in logs
        if line["event"] != "event received"
    ]
    assert ("handler failed", "boom") in messages
    assert messages.index(("handler failed", "boom")) < messages.index(("hook ran", "boom"))
    [broken] = [line for line in logs if line["event"] == "handler error hook failed"]
    assert (broken["event_name"], broken["error"]) == (
        "worse",
        "ValueError: the alerting service is down too",
    )
    # The broken hook stopped nothing: the last event was handled.
    assert outcome("fragile", "ok") >= 2


async def test_a_function_handler_takes_its_hook_from_the_decorator(fake: FakeSippet) -> None:
    told: list[str] = []

    async def hook(event: Event, error: Exception, ctx: Context[None]) -> None:
        told.append(f"{ctx.name}: {event.name}: {error}")

    @handler(name="brittle", on_error=hook)
    async def brittle(event: Event, ctx: Context[None]) -> None:
        raise LookupError(event.payload["missing"])

    async with running_daemon(fake, [brittle]) as daemon:
        await fake.broadcast("incoming_call", {"missing": "no such contact"})
        await settle(daemon, 1)
    assert told == ["brittle: incoming_call: no such contact"]
    with pytest.raises(TypeError, match="on_error hook of handler 'x' must be an async"):
        handler(name="x", on_error=lambda *_: None)(brittle.function)  # type: ignore[arg-type,attr-defined]
