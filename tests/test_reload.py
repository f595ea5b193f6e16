"""``sippet-listener reload`` (the units' ``ExecReload=``): the daemon validates, the command
reports its verdict, and neither the command nor ``check-config`` needs readable credentials
to fail with one line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from listener.testing import FakeSippet
from tests.test_service import ServiceProcess

CLI = (sys.executable, "-m", "listener.service.cli")


@pytest.fixture
def hidden_credentials(tmp_path: Path) -> Iterator[Path]:
    """A credentials directory nobody may look into, as ``ExecReload=`` sees
    ``/run/credentials`` on systemd 252.

    Root reads through any mode, so as root the directory is made unreachable another way: a
    path component too long to look up fails like a forbidden one (an OSError that is not
    "no such file").
    """
    if os.geteuid() == 0:
        yield tmp_path / ("x" * 300) / "credentials"
        return
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "sippet-secret-key").write_text("sk_never_read")
    credentials.chmod(0o000)
    yield credentials
    credentials.chmod(0o700)


@pytest.fixture
async def service(tmp_path: Path, fake: FakeSippet) -> AsyncIterator[ServiceProcess]:
    process = ServiceProcess(tmp_path, fake)
    process.write_config()
    yield process
    await process.stop()


async def reload(service: ServiceProcess, **env: str) -> tuple[int, str, str]:
    assert service.process is not None
    environment = {k: v for k, v in os.environ.items() if k != "SIPPET_SECRET_KEY"}
    child = await asyncio.create_subprocess_exec(
        *CLI,
        "reload",
        "--pid",
        str(service.process.pid),
        "--config",
        str(service.config),
        "--timeout",
        "20",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**environment, **env},
    )
    out, err = await child.communicate()
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_reload_applies_a_valid_config_without_the_secret_and_keeps_the_socket(
    service: ServiceProcess, fake: FakeSippet, hidden_credentials: Path
) -> None:
    credentials = hidden_credentials
    await service.start()
    await service.message("READY=1")
    service.write_config(
        handlers='[[handlers]]\nuse = "log"\n[[handlers]]\nuse = "log"\nname = "second"\n'
    )
    code, out, err = await reload(service, CREDENTIALS_DIRECTORY=str(credentials))
    assert (code, out, err) == (0, "reloaded\n", "")
    assert "second" in await service.message("READY=1")
    assert (fake.mints, fake.joins) == (1, 1), "the reload dropped the socket"


async def test_reload_of_an_invalid_config_fails_with_the_reason_and_changes_nothing(
    service: ServiceProcess, fake: FakeSippet
) -> None:
    await service.start()
    await service.message("READY=1")
    service.write_config(handlers='[[handlers]]\nuse = "log"\nlevle = "debug"\n')
    code, out, err = await reload(service)
    assert code == 78
    assert out == ""
    assert err == (
        "sippet-listener: reload refused: handlers[0].levle: unknown key; did you mean 'level'?\n"
    )
    await fake.broadcast("incoming_call", {"callUuid": "c-1"})
    await service.poll("/metrics", lambda r: 'handler="log",outcome="ok"} 1.0' in r.text)
    # The next good file applies: a refusal leaves nothing stuck.
    service.write_config()
    assert (await reload(service))[0] == 0
    assert (fake.mints, fake.joins) == (1, 1)


async def test_reload_of_a_process_that_is_gone_says_so(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[service]\nstate_dir = "{tmp_path}"\n')
    child = await asyncio.create_subprocess_exec(
        *CLI,
        "reload",
        "--pid",
        "999999999",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await child.communicate()
    assert child.returncode == 1
    assert err.decode() == "sippet-listener: reload: no process 999999999\n"


def test_check_config_names_an_unreadable_credential_in_one_line(
    hidden_credentials: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[sippet]\nbase_url = "http://127.0.0.1:9"\n')
    env = {k: v for k, v in os.environ.items() if k != "SIPPET_SECRET_KEY"}
    done = subprocess.run(
        [*CLI, "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**env, "CREDENTIALS_DIRECTORY": str(hidden_credentials)},
        check=False,
    )
    assert done.returncode == 78
    prefix = (
        "sippet-listener: configuration error: sippet.api_key_file: cannot read "
        f"{hidden_credentials / 'sippet-secret-key'}: "
    )
    assert done.stderr.startswith(prefix), done.stderr
    assert done.stderr.count("\n") == 1
