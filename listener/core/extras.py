"""httpx and structlog, imported without the optional extras the daemon never uses.

When it is installed, ``import httpx`` loads click (and through it rich) for the ``httpx``
command line, which lives in its own process, and ``import structlog`` loads greenlet for
``structlog.threadlocal``. The daemon runs on asyncio and never calls either; but uvicorn's
dependencies bring click into ``pip install sippet-listener``. Each library takes an
``ImportError`` of these as "not installed", so they are hidden for the length of the two
imports and visible again after: a plugin (or uvicorn, with ``metrics_listen``) that imports
them later gets them. rich is not hidden: structlog decides once, at its import, whether its
console renderer's tracebacks use it, and a plugin author's own ``structlog.dev`` would lose
them for good. ``python -m bench.imports`` measures it, see bench/README.md.
"""

from __future__ import annotations

import sys

__all__ = ["HIDDEN"]

# Idle RSS of `sippet-listener run` (bench/README.md, "Idle RSS, issue #14 item 3"): -1.0 MiB with
# `pip install sippet-listener` (click). Hiding rich as well was -4.8 MiB more where it is
# installed (the dev extras), at the cost above.
HIDDEN = ("click", "greenlet")

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
