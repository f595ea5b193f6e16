"""Loading handlers from config: every way to name one, every way it can fail."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from handlers.log import LogHandler
from listener.core.errors import ConfigError, HandlerLoadError
from listener.dispatch.handler import FunctionHandler
from listener.dispatch.loader import load_handler, load_handlers
from listener.testing import FakeSippet, running_daemon, settle
from tests.sample_handlers import Greeter


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
