"""The daemon's malloc tuning, in a fresh process each (glibc's thresholds are per process)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc >= 2.33 only",
)

# A large block freed (an 8 MiB event), then four of 1 MiB allocated and freed: how much of the
# heap glibc keeps, free, at its top afterwards (mallinfo2's keepcost), in KiB.
_PROBE = """
import ctypes, json, sys
from listener.service.allocator import release_large_blocks

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "abcdefghij"]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
tuned = release_large_blocks() if sys.argv[1] == "tuned" else False
big = bytearray(8 << 20)
del big
blocks = [bytearray(1 << 20) for _ in range(4)]
del blocks
print(json.dumps({"tuned": tuned, "kept_kib": libc.mallinfo2().j >> 10}))
"""


def _probe(mode: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, check=True, text=True
    ).stdout
    answer: dict[str, int] = json.loads(out)
    return answer


def test_large_blocks_freed_are_given_back_instead_of_kept_at_the_heaps_top() -> None:
    untuned, tuned = _probe("untuned"), _probe("tuned")
    # glibc's own behaviour, which the tuning is for: the 8 MiB block lifted the thresholds,
    # the 1 MiB blocks came from the heap and stayed there, free.
    assert untuned["kept_kib"] >= 4 * 1024 - 64, untuned
    assert tuned == {"tuned": True, "kept_kib": tuned["kept_kib"]}
    assert tuned["kept_kib"] < 1024, tuned


def test_the_users_own_malloc_tuning_is_left_alone() -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    code = "from listener.service.allocator import release_large_blocks as r; print(r())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, check=True, text=True
    )
    assert out.stdout.strip() == "False"
