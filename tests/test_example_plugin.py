"""The example plugin (examples/sippet-listener-example), found the way users find plugins.

``scripts/test`` installs it into the project's virtualenv, so these tests see its real entry
points: nothing here is mocked. Its own test suite (``cd examples/sippet-listener-example &&
pytest``) covers its behaviour in detail; this file proves discovery and one run end to end.
"""

from __future__ import annotations

import asyncio
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from listener.core.errors import ConfigError
from listener.dispatch.handler import FunctionHandler
from listener.dispatch.loader import ENTRY_POINT_GROUP, load_handler
from listener.testing import FakeSippet, running_daemon, settle

try:
    import sippet_listener_example as example
except ImportError:
    pytest.fail(
        "the example plugin is not installed in this environment: ./scripts/test installs it "
        "(pip install -e examples/sippet-listener-example)",
        pytrace=False,
    )

CALLER = "+442071838750"


def run_bodies(fake: FakeSippet) -> list[Any]:
    return [request.body for request in fake.rpc_requests if request.path == "/rpc/public/run"]


def test_the_entry_points_come_from_the_example_distribution() -> None:
    """Installing the example registers both handlers in the group the loader reads."""
    found = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert found["missed_calls"].value == "sippet_listener_example.missed:MissedCalls"
    assert found["call_summary"].value == "sippet_listener_example.summary:call_summary"
    for name in ("missed_calls", "call_summary"):
        dist = found[name].dist
        assert dist is not None
        assert dist.name == "sippet-listener-example"


def test_use_by_name_loads_the_example_handlers() -> None:
    """``use = "missed_calls"`` resolves through the entry point to the example's class."""
    loaded = load_handler(
        {"use": "missed_calls", "statuses": ["busy"], "timeout": 5}, "handlers[0]"
    )
    assert type(loaded.handler) is example.MissedCalls
    assert loaded.handler.config.statuses == ["busy"]
    assert (loaded.settings.name, loaded.settings.events, loaded.settings.timeout) == (
        "missed_calls",
        ("call_ended",),
        5.0,
    )
    summary = load_handler({"use": "call_summary"}, "handlers[1]")
    # The table's own copy of the decorated function, with the policy it declares.
    assert isinstance(summary.handler, FunctionHandler)
    assert isinstance(example.call_summary, FunctionHandler)
    assert summary.handler is not example.call_summary
    assert summary.handler.function is example.call_summary.function
    assert (summary.settings.name, summary.settings.on_full) == ("call_summary", "drop")


def test_a_misspelt_plugin_setting_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_handler({"use": "missed_calls", "statuse": ["busy"]}, "handlers[2]")
    assert str(caught.value) == "handlers[2].statuse: unknown key; did you mean 'statuses'?"


async def test_check_config_finds_the_plugin_in_a_fresh_process(tmp_path: Path) -> None:
    """The command, in an interpreter of its own, loads both handlers by name."""
    config = tmp_path / "config.toml"
    config.write_text(
        '[[handlers]]\nuse = "missed_calls"\n[[handlers]]\nuse = "call_summary"\n',
        encoding="utf-8",
    )
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "listener.service.cli", "check-config", "--config", str(config)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SIPPET_SECRET_KEY": "sk_test_x1"},
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert (process.returncode, err) == (0, b"")
    assert out.decode() == f"{config}: ok (handlers: missed_calls, call_summary)\n"


async def test_a_missed_call_becomes_one_contact_end_to_end(fake: FakeSippet) -> None:
    """Real daemon, real socket, real HTTP: lookup, create, and a repeat delivery ignored."""
    missed = {"call": {"call_uuid": "c-9", "from_number": CALLER, "status": "no_answer"}}
    async with running_daemon(fake, [{"use": "missed_calls"}]) as daemon:
        # Scripted only now: setup() has had its (default) validation reply.
        fake.script_rpc(body={"success": True, "data": []})
        fake.script_rpc(body={"success": True, "data": {"id": "contact-1"}})
        await fake.broadcast("call_answered", {"callUuid": "c-8", "fromNumber": CALLER})
        await fake.broadcast("call_ended", missed)
        await fake.broadcast("call_ended", missed)
        await settle(daemon, events=3)
    assert [request.path for request in fake.rpc_requests] == [
        "/rpc/public/validate",
        "/rpc/public/run",
        "/rpc/public/run",
    ]
    assert run_bodies(fake) == [
        {"action": "list_contacts", "fields": ["id"], "filter": {"phoneE164": {"eq": CALLER}}},
        {
            "action": "create_contact",
            "input": {
                "fullName": f"Missed call {CALLER}",
                "phoneE164": CALLER,
                "metadata": {"source": "missed-call"},
            },
            "fields": ["id"],
        },
    ]
    assert fake.rpc_requests[1].headers["x-api-key"] == fake.api_key
