"""sd_notify(3) without libsystemd: tell the service manager how the daemon is doing.

The protocol is one datagram per notification, ``KEY=VALUE`` lines, sent to the ``AF_UNIX``
socket named by ``$NOTIFY_SOCKET`` (a path, or a Linux abstract socket when it starts with
``@``). systemd calls it stable and meant to be re-implemented. Outside systemd (no
``$NOTIFY_SOCKET``) every method does nothing, so callers never branch on "am I a service?".

Contract: no method raises into the daemon and none blocks. The socket is non-blocking; a
failed send (manager gone, socket removed, queue full) is logged as a warning once per
:class:`Notifier` and otherwise ignored: a missed notification must never take the daemon down.
"""

from __future__ import annotations

import os
import socket
import time

import structlog

__all__ = ["Notifier"]

_log = structlog.get_logger(__name__)


class Notifier:
    """One ``$NOTIFY_SOCKET`` client, open for the life of the process.

    Args:
        address: the value of ``$NOTIFY_SOCKET``; ``None`` (or empty) for a no-op notifier.
    """

    def __init__(self, address: str | None = None) -> None:
        self.address = address or None
        self._target: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if self.address is None:
            return
        if self.address.startswith("@"):
            # sd_notify(3): "@" names a socket in the abstract namespace, i.e. a leading NUL.
            self._target = b"\0" + os.fsencode(self.address[1:])
        elif self.address.startswith("/"):
            self._target = self.address
        else:
            self._warn(f"unsupported NOTIFY_SOCKET address {self.address!r}")
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as exc:
            self._warn(str(exc))
            return
        sock.setblocking(False)
        self._sock = sock

    @classmethod
    def from_environment(cls) -> Notifier:
        """The notifier systemd asked for: ``$NOTIFY_SOCKET``, or a no-op one if unset."""
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere (false outside systemd and after :meth:`close`)."""
        return self._sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram.

        Returns:
            Whether the datagram was sent. Failures are logged once, never raised.
        """
        if self._sock is None or self._target is None:
            return False
        # A newline would start a new assignment: keep each value on its line.
        lines = (line.replace("\n", " ") for line in assignments)
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            self._sock.sendto(data, self._target)
        except OSError as exc:
            self._warn(str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """Startup (or a reload) finished: ``READY=1``, with an optional ``STATUS=`` line."""
        if status is None:
            self.notify("READY=1")
        else:
            self.notify("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        """Set the one-line state shown by ``systemctl status``."""
        self.notify(f"STATUS={text}")

    def reloading(self) -> None:
        """A reload began; send :meth:`ready` when it is over, whatever its outcome.

        ``MONOTONIC_USEC`` goes in the same datagram: systemd 253+ requires it to match the
        reload to the request (without it, ``systemctl reload`` of a ``Type=notify-reload``
        service waits for its timeout). Older managers ignore it.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self) -> None:
        """Shutdown began (sent before draining)."""
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """Keep-alive: send only while the daemon is actually healthy."""
        self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or ``None`` when no watchdog applies to us.

        Read from ``$WATCHDOG_USEC``; if ``$WATCHDOG_PID`` is set it must be this process's
        pid (otherwise the watchdog is meant for another process). ``None`` as well when this
        notifier is a no-op. Call :meth:`watchdog` every half of the returned interval.
        """
        if not self.enabled:
            return None
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and pid.strip() != str(os.getpid()):
            return None
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 1_000_000 if usec > 0 else None

    def close(self) -> None:
        """Close the socket; later notifications do nothing. Safe to call twice."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _warn(self, error: str) -> None:
        """Log the first failure only: a dead manager must not flood the journal."""
        if not self._warned:
            self._warned = True
            _log.warning("sd_notify failed", socket=self.address, error=error)

    def __repr__(self) -> str:
        return f"Notifier({self.address!r}, enabled={self.enabled})"
