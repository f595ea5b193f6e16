"""sd_notify against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from listener.service.systemd import Notifier


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on ``sock`` (delivery over AF_UNIX is synchronous)."""
    received = []
    while True:
        try:
            received.append(sock.recv(4096))
        except BlockingIOError:
            return received


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound socket playing systemd's part, named by ``$NOTIFY_SOCKET``."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def notifier() -> Iterator[Notifier]:
    """``Notifier.from_environment()``, closed after the test."""
    notifier = Notifier.from_environment()
    yield notifier
    notifier.close()


@pytest.mark.usefixtures("manager")
def test_enabled_with_notify_socket(notifier: Notifier) -> None:
    """A path in $NOTIFY_SOCKET gives a live notifier."""
    assert notifier.enabled
    assert "enabled=True" in repr(notifier)


def test_ready_with_status(manager: socket.socket, notifier: Notifier) -> None:
    """READY=1 and STATUS= travel in one datagram."""
    notifier.ready("connected, joined events")
    assert drain(manager) == [b"READY=1\nSTATUS=connected, joined events"]


def test_ready_alone(manager: socket.socket, notifier: Notifier) -> None:
    """READY=1 without a status is the whole datagram."""
    notifier.ready()
    assert drain(manager) == [b"READY=1"]


def test_status(manager: socket.socket, notifier: Notifier) -> None:
    """A status containing a newline cannot inject another assignment."""
    notifier.status("reconnecting (attempt 4)\nREADY=1")
    assert drain(manager) == [b"STATUS=reconnecting (attempt 4) READY=1"]


def test_reloading_carries_monotonic_usec(manager: socket.socket, notifier: Notifier) -> None:
    """RELOADING=1 comes with the current CLOCK_MONOTONIC in microseconds."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [datagram] = drain(manager)
    first, second = datagram.split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping(manager: socket.socket, notifier: Notifier) -> None:
    """STOPPING=1 is sent as is."""
    notifier.stopping()
    assert drain(manager) == [b"STOPPING=1"]


def test_watchdog(manager: socket.socket, notifier: Notifier) -> None:
    """WATCHDOG=1 is sent as is, once per call."""
    notifier.watchdog()
    notifier.watchdog()
    assert drain(manager) == [b"WATCHDOG=1", b"WATCHDOG=1"]


def test_notify_sends_arbitrary_assignments(manager: socket.socket, notifier: Notifier) -> None:
    """notify() joins assignments with newlines and reports success."""
    assert notifier.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=draining")
    assert drain(manager) == [b"EXTEND_TIMEOUT_USEC=5000000\nSTATUS=draining"]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leading @ names a socket in the abstract namespace."""
    name = f"sippet-listener-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        notifier = Notifier.from_environment()
        try:
            notifier.ready("up")
            notifier.stopping()
        finally:
            notifier.close()
        assert drain(sock) == [b"READY=1\nSTATUS=up", b"STOPPING=1"]


@pytest.mark.parametrize("value", [None, ""])
def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """Outside systemd every call does nothing and raises nothing."""
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    monkeypatch.setenv("WATCHDOG_USEC", "90000000")
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    notifier.ready("up")
    notifier.status("x")
    notifier.reloading()
    notifier.stopping()
    notifier.watchdog()
    assert not notifier.notify("READY=1")
    assert notifier.watchdog_interval() is None
    notifier.close()


def test_vanished_socket_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket that disappears makes sends fail quietly: one warning, no exception."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    path.unlink()
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = Notifier.from_environment()
    try:
        with capture_logs() as logs:
            assert not notifier.notify("READY=1")
            notifier.ready()
            notifier.watchdog()
            notifier.stopping()
    finally:
        notifier.close()
    assert [entry["event"] for entry in logs] == ["sd_notify failed"]
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["socket"] == str(path)


@pytest.mark.timeout(10)
def test_full_queue_never_blocks(manager: socket.socket, notifier: Notifier) -> None:
    """A manager that stops reading makes sends fail (EAGAIN), never wait."""
    with capture_logs() as logs:
        results = [notifier.notify("WATCHDOG=1") for _ in range(10_000)]
    assert results[0]
    assert not results[-1]
    assert len(logs) == 1


def test_unsupported_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """An address that is neither a path nor @abstract disables the notifier, with a warning."""
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with capture_logs() as logs:
        notifier = Notifier.from_environment()
        notifier.ready()
    assert not notifier.enabled
    assert [entry["event"] for entry in logs] == ["sd_notify failed"]
    notifier.close()


def test_socket_creation_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """If no socket can be created the notifier is a no-op, with a warning."""

    def refuse(*args: object) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(socket, "socket", refuse)
    with capture_logs() as logs:
        notifier = Notifier("/run/systemd/notify")
    assert not notifier.enabled
    assert logs[0]["error"] == "[Errno 24] Too many open files"


def test_close(manager: socket.socket, notifier: Notifier) -> None:
    """After close() sends do nothing; closing twice is fine."""
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    assert not notifier.notify("READY=1")
    notifier.ready()
    assert drain(manager) == []


@pytest.mark.usefixtures("manager")
@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("90000000", None, 90.0),
        ("90000000", "self", 90.0),
        ("30000000", "other", None),
        (None, None, None),
        ("", None, None),
        ("soon", None, None),
        ("0", None, None),
        ("-5", None, None),
        ("1500000", None, 1.5),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch,
    notifier: Notifier,
    usec: str | None,
    pid: str | None,
    expected: float | None,
) -> None:
    """WATCHDOG_USEC in seconds, only when WATCHDOG_PID (if set) is this process."""
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert notifier.watchdog_interval() == expected
