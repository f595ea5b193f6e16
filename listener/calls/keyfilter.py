"""A Bloom filter of call keys: which calls the map let go of, in 12 bits each.

The call map keeps ended calls in memory for a short while only (see
:meth:`CallState.evict <listener.calls.state.CallState.evict>`); the store keeps them for
``calls.retain_ended``. An event of a call the map does not hold is either of a new call (the
common case: every call's first event) or a late one of a call let go of, which must be read
back from the store so that it never reopens the call nor is handled twice. The filter tells
the two apart without I/O: "no" is certain, "maybe" (every call let go of, and about 1 % of
the others while it holds no more than its capacity) costs a read of the store.

Python's ``hash`` of a string is salted per process, so a filter lives and dies with its
process; it is rebuilt from the store at start and after each prune.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = ["KeyFilter"]

# Bits per key at capacity, and bits tested per key: a false "maybe" for 1.1 % of the keys
# not added, (1 - e^(-3/12))^3.
_BITS_PER_KEY: Final = 12
_SMALLEST: Final = 1 << 20  # 128 KiB: 87,000 keys


class KeyFilter:
    """Keys added are always found; others are found rarely (see the module docstring).

    Args:
        capacity: how many keys it holds before its false "maybe"s grow past 1 %.
    """

    __slots__ = ("_bits", "_mask", "capacity", "count")

    def __init__(self, capacity: int = 0) -> None:
        size = _SMALLEST
        while size < capacity * _BITS_PER_KEY:
            size <<= 1
        self._bits = bytearray(size >> 3)
        self._mask = size - 1
        #: How many keys it holds at most before it should be rebuilt bigger.
        self.capacity = size // _BITS_PER_KEY
        #: How many keys were added (a key added twice counts twice).
        self.count = 0

    @classmethod
    def of(cls, keys: Iterable[str]) -> KeyFilter:
        """A filter holding ``keys``, sized for twice as many."""
        keys = list(keys)
        made = cls(2 * len(keys))
        made.update(keys)
        return made

    def add(self, key: str) -> None:
        """Remember ``key``."""
        self.update((key,))

    def update(self, keys: Iterable[str]) -> None:
        """Remember each of ``keys``.

        Many at a time (the calls let go of after a batch, a store's ended calls): the three
        positions unrolled and the attributes read once, instead of a call of ``add`` per
        key. Letting go of calls after a batch went from 2,090 to 1,670 instructions per
        event of the drain stream (bench/README.md, "The call map's cost on the hot path,
        second pass").
        """
        bits, mask = self._bits, self._mask
        added = 0
        for key in keys:
            # Three positions from one 64-bit hash (double hashing); the step is odd, so the
            # three differ. The same positions as __contains__ tests.
            at = hash(key)
            step = ((at >> 32) & mask) | 1
            bit = at & mask
            bits[bit >> 3] |= 1 << (bit & 7)
            bit = (bit + step) & mask
            bits[bit >> 3] |= 1 << (bit & 7)
            bit = (bit + step) & mask
            bits[bit >> 3] |= 1 << (bit & 7)
            added += 1
        self.count += added

    def __contains__(self, key: object) -> bool:
        # Unrolled: asked of every new call's first event, and the loop of add() took a
        # third more (most answers are a "no" at the first or second bit).
        # Positions and steps taken under the mask first: (at + k * step) & mask, in ints
        # of one 30-bit digit, where the 64-bit hash's sums and shifts made a new int each.
        bits, mask = self._bits, self._mask
        at = hash(key)
        bit = at & mask
        if not bits[bit >> 3] & (1 << (bit & 7)):
            return False
        step = ((at >> 32) & mask) | 1
        bit = (bit + step) & mask
        if not bits[bit >> 3] & (1 << (bit & 7)):
            return False
        bit = (bit + step) & mask
        return bool(bits[bit >> 3] & (1 << (bit & 7)))

    @property
    def full(self) -> bool:
        """Whether it holds more keys than its capacity (time to rebuild it bigger)."""
        return self.count > self.capacity
