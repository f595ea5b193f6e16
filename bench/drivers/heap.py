"""What a process's memory is made of, for the soak's heap dumps (``bench.soak --heap``).

Three layers, so that a growing RSS can be put on one of them: the objects Python holds (live
objects by type; with ``tracemalloc`` on, the bytes traced and their tracebacks), pymalloc's
arenas (``sys._debugmallocstats``), and glibc's heap beneath them (``mallinfo2``: what malloc
holds from the system, and how much of it is free but not returned). Standard library only.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import re
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

__all__ = ["dump", "malloc_trim"]

_MALLINFO2 = (
    "arena",  # bytes malloc took from the system with brk (all arenas)
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",  # bytes in mmap'd chunks
    "usmblks",
    "fsmblks",
    "uordblks",  # bytes in use
    "fordblks",  # bytes free, still held
    "keepcost",  # releasable at the top of the heap
)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2]


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _libc()


def _mallinfo() -> dict[str, int]:
    function = getattr(_LIBC, "mallinfo2", None)
    if function is None:
        return {}
    function.restype = _Mallinfo2
    info = function()
    return {name: int(getattr(info, name)) for name in _MALLINFO2}


def malloc_trim() -> None:
    """Give glibc's free pages back to the system (a no-op without glibc)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _pymalloc() -> dict[str, int]:
    """The totals of ``sys._debugmallocstats`` (it writes to C's stderr: taken from fd 2)."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    found: dict[str, int] = {}
    for label, pattern in (
        ("arenas", r"# arenas allocated current\s*=\s*([\d,]+)"),
        ("allocated_blocks", r"# bytes in allocated blocks\s*=\s*([\d,]+)"),
        ("available_blocks", r"# bytes in available blocks\s*=\s*([\d,]+)"),
        ("total", r"Total\s*=\s*([\d,]+)"),
    ):
        match = re.search(pattern, text)
        if match:
            found[label] = int(match.group(1).replace(",", ""))
    return found


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def dump(directory: Path, index: int, extra: dict[str, Any]) -> None:
    """Write ``heap-<index>.json`` (and ``heap-<index>.pickle`` when tracing) in ``directory``."""
    if tracemalloc.is_tracing():
        tracemalloc.take_snapshot().dump(str(directory / f"heap-{index}.pickle"))
    # What the cyclic GC had not yet collected: found unreachable now, and the generations'
    # counts and totals before this collection.
    before = {"counts": gc.get_count(), "stats": gc.get_stats()}
    rss_before = _rss_kib()
    unreachable = gc.collect()
    types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    record: dict[str, Any] = {
        "rss_kib": rss_before,
        "gc": {**before, "unreachable": unreachable},
        "mallinfo2": _mallinfo(),
        "pymalloc": _pymalloc(),
        "types": dict(types),
        **extra,
    }
    if tracemalloc.is_tracing():
        record["traced"] = tracemalloc.get_traced_memory()[0]
    with contextlib.suppress(OSError):
        (directory / f"heap-{index}.json").write_text(json.dumps(record))
