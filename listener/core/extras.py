"""structlog and httpx, imported without the optional extras the daemon never uses.

When they are installed, ``import structlog`` loads rich (with pygments) for
``structlog.dev``'s console tracebacks and greenlet for the deprecated
``structlog.threadlocal``, and ``import httpx`` loads click (and rich) for the ``httpx``
command line, which lives in its own process. The daemon renders its own lines
(:mod:`listener.core.pretty`, JSON) and runs on asyncio, so none of it is ever called; but
uvicorn's dependencies bring click into ``pip install sippet-listener``, and a development or
shared environment brings the rest. Each library takes an ``ImportError`` of these as "not
installed", so they are hidden for the length of the two imports and visible again after:
a plugin (or uvicorn, with ``metrics_listen``) that imports them later gets them.
``python -m bench.imports`` measures it, see bench/README.md.
"""

from __future__ import annotations

import sys

__all__ = ["HIDDEN"]

# Idle RSS of `sippet-listener run` (bench/README.md, "Idle RSS, issue #14 item 3"): -1.0 MiB with
# `pip install sippet-listener` (click), -5.8 MiB with the dev extras (rich, pygments, click,
# greenlet).
HIDDEN = ("rich", "click", "greenlet")

_hidden = [name for name in HIDDEN if name not in sys.modules]
for _name in _hidden:
    # A None entry makes `import name` raise ImportError (the import system's own rule).
    sys.modules[_name] = None  # type: ignore[assignment]
try:
    import httpx  # noqa: F401
    import structlog  # noqa: F401
finally:
    for _name in _hidden:
        if sys.modules.get(_name, sys) is None:
            del sys.modules[_name]
