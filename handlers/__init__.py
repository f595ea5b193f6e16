"""Built-in handlers shipped with sippet-listener, usable by short name in ``use = "..."``."""

from __future__ import annotations

from handlers.log import LogHandler
from handlers.rpc import RpcHandler

__all__ = ["LogHandler", "RpcHandler"]
