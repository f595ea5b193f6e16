"""What the status page tells of the link's last hour: when it was lost and found again.

:class:`LinkLog` stands between the session and the reconciler as the session's
:class:`~listener.realtime.session.LinkWatch`: it passes every call on unchanged and keeps
the gaps, at most an hour's worth and :data:`MAX_GAPS` of them, so a flapping link cannot grow it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from listener.realtime.session import LinkWatch

__all__ = ["HOUR", "MAX_GAPS", "Gap", "LinkLog"]

HOUR = 3600.0
MAX_GAPS = 1000


@dataclass(frozen=True, slots=True)
class Gap:
    """A time no socket was joined and healthy; ``end`` is None while it lasts."""

    start: float
    end: float | None


class LinkLog:
    """Records gaps (wall-clock seconds) and passes them on to ``watch``."""

    def __init__(self, watch: LinkWatch) -> None:
        self._watch = watch
        self._gaps: deque[Gap] = deque(maxlen=MAX_GAPS)
        self.joined_at: float | None = None

    def lost(self, at: float) -> None:
        if not self._gaps or self._gaps[-1].end is not None:
            self._gaps.append(Gap(at, None))
        self._watch.lost(at)

    def joined(self, at: float) -> None:
        if self._gaps and self._gaps[-1].end is None:
            self._gaps[-1] = Gap(self._gaps[-1].start, at)
        self.joined_at = at
        self._watch.joined(at)

    def gaps(self, now: float) -> list[Gap]:
        """The gaps that ended, or go on, within the hour before ``now``, oldest first."""
        return [gap for gap in self._gaps if gap.end is None or gap.end >= now - HOUR]
