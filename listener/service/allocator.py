"""glibc's malloc, told to keep giving large blocks back to the system.

glibc serves a block of 128 KiB or more with its own ``mmap`` and unmaps it when freed, but
each time it frees one it raises that threshold to the block's size (up to 32 MiB) and its
trim threshold to twice that. After one large event (Sippet's AI audits run to several MB; the
soak sends a 2 MB malformed frame every 42 s), every later block up to that size is carved out
of the heap, and the heap's top is given back only beyond twice it: the soak's daemon kept
about 7 MiB free at its top (glibc's ``keepcost``), its RSS moving by 3 to 7 MiB with the
large frames. A fixed threshold turns the adjustment off; 128 KiB is glibc's own default, the
adjustment's starting point, so small blocks are served as before. What it bought, in
``python -m bench --soak --duration 300 --heap`` runs minutes apart on the shared machine: the
glibc heap 15.5 MiB instead of 23.9, RSS at the end 63.1 MiB instead of 70.2 and 69.8, its
growth over the second half +0.8 instead of +2.5 and -0.4 (bench/README.md, "The soak").
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["MMAP_THRESHOLD", "release_large_blocks"]

MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter (glibc's malloc.h)
# The user's own tuning of that threshold wins (another tunable does not count).
_OWN_SETTING = "MALLOC_MMAP_THRESHOLD_"
_OWN_TUNABLE = "glibc.malloc.mmap_threshold"


def release_large_blocks() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process; return whether
    it was set (False: not glibc, or tuned through the environment already)."""
    tuned = _OWN_SETTING in os.environ or _OWN_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or tuned:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
