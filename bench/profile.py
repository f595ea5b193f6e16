"""Sampling profiles with py-spy, summarised as the top costs with file:line.

``py-spy record --format raw`` writes collapsed stacks: one line per distinct stack,
``frame;frame;...;frame COUNT``, each frame ``function (file:line)``. From them:

- *self*: samples whose innermost frame is this function (at this line);
- *inclusive*: samples with this function anywhere on the stack, counted once per stack.

Summaries can be limited to frames from chosen paths (``listener/``, ``handlers/``...).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RATE", "Profile", "py_spy", "record"]

# Samples per second.
RATE = 400

_FRAME = re.compile(r"^(?P<function>.*) \((?P<location>[^()]*)\)$")
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
# Innermost frames of a thread that is waiting, not working: the event loop's select, an
# idle executor thread or outbox thread (waiting for its next call), the bench driver's stdin
# reader.
_IDLE = (
    "EpollSelector.select ",
    "_worker (concurrent/futures/thread.py",
    "_Thread._serve (listener/webhooks/store.py",
    "_read_commands ",
)


def py_spy() -> str | None:
    """The py-spy executable (next to this interpreter, or on PATH), or None."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, output: Path, seconds: float, *, rate: int = RATE) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` (all threads) into ``output``; return py-spy."""
    executable = py_spy()
    if executable is None:
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    argv = [executable, "record", "--pid", str(pid), "--format", "raw", "--threads"]
    argv += ["--rate", str(rate), "--duration", str(max(1, round(seconds))), "-o", str(output)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass(frozen=True, slots=True)
class Cost:
    """One frame's share of the samples."""

    frame: str
    samples: int
    share: float


class Profile:
    """Collapsed stacks read from a py-spy raw file."""

    def __init__(self, path: Path) -> None:
        self.stacks: list[tuple[list[str], int]] = []
        for line in path.read_text().splitlines():
            match = _LINE.match(line)
            if match:
                frames = match["stack"].split(";")
                self.stacks.append((frames, int(match["count"])))
        self.total = sum(count for _, count in self.stacks)

    def only(self, thread: str) -> Profile:
        """The stacks of the threads whose name contains ``thread``, minus idle waits.

        py-spy counts a thread blocked in ``epoll_wait`` or in a queue's lock as active; a
        sample whose innermost frame is such a wait is dropped here.
        """
        subset = object.__new__(Profile)
        subset.stacks = [
            (frames, count)
            for frames, count in self.stacks
            if thread in frames[0] and not frames[-1].startswith(_IDLE)
        ]
        subset.total = sum(count for _, count in subset.stacks)
        return subset

    def top_self(self, limit: int, paths: tuple[str, ...] = ()) -> list[Cost]:
        """The frames with the most samples of their own (innermost frame).

        With ``paths``, a sample is charged to its innermost frame from those paths (so time in
        libraries is charged to the line of ours that called them).
        """
        counts: Counter[str] = Counter()
        for frames, count in self.stacks:
            frame = frames[-1]
            if paths:
                ours = [f for f in frames if _located_in(f, paths)]
                if not ours:
                    continue
                frame = ours[-1]
            counts[frame] += count
        return self._costs(counts, limit)

    def top_inclusive(self, limit: int, paths: tuple[str, ...] = ()) -> list[Cost]:
        """The frames on the most stacks (each counted once per stack)."""
        counts: Counter[str] = Counter()
        for frames, count in self.stacks:
            for frame in set(frames[1:]):
                if not paths or _located_in(frame, paths):
                    counts[_function(frame)] += count
        return self._costs(counts, limit)

    def _costs(self, counts: Counter[str], limit: int) -> list[Cost]:
        total = self.total or 1
        return [Cost(frame, n, n / total) for frame, n in counts.most_common(limit)]


def _located_in(frame: str, paths: tuple[str, ...]) -> bool:
    match = _FRAME.match(frame)
    return match is not None and match["location"].startswith(paths)


def _function(frame: str) -> str:
    """``function (file)`` without the line: inclusive time belongs to the whole function."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    return f"{match['function']} ({match['location'].rsplit(':', 1)[0]})"
