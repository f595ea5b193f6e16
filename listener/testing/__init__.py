"""Test kit: a fake Sippet server speaking the real protocols on loopback.

Shipped in the package so plugin authors can test their handlers the way the daemon itself is
tested; the pytest plugin (``listener.testing.pytest_plugin``) gives them a ``fake_sippet``
fixture.
"""

from __future__ import annotations

from listener.testing.harness import running_daemon, settle
from listener.testing.server import Behaviour, FakeSippet, RecordedRpc, Upgrade

__all__ = ["Behaviour", "FakeSippet", "RecordedRpc", "Upgrade", "running_daemon", "settle"]
