"""Hybrid logical clock: wall-clock milliseconds in the high 48 bits, a counter in the low 16.

Stamps only grow, even when the wall clock steps back, and a stamp received from a peer
pushes ours past it, so "newer" means the same thing on every node.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
#: A remote stamp further than this ahead of our wall clock is not believed (a peer with a
#: broken clock must not drag every node's clock into the future).
MAX_DRIFT_MS = 60_000


def physical_ms(stamp: int) -> int:
    return stamp >> COUNTER_BITS


def stamp_at(epoch_seconds: float) -> int:
    """The lowest stamp of a wall-clock instant (for "older than" comparisons)."""
    return int(epoch_seconds * 1000) << COUNTER_BITS


def to_iso(stamp: int) -> str:
    return ms_to_iso(physical_ms(stamp))


def ms_to_iso(ms: int | float) -> str:
    return datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc).isoformat()


def now_iso() -> str:
    return datetime.now(tz=timezone.utc).isoformat()


class HLC:
    """A hybrid logical clock; not thread-safe (the store serialises writers)."""

    __slots__ = ("last", "_wall")

    def __init__(self, last: int = 0, wall: Callable[[], float] = time.time) -> None:
        self.last = last
        self._wall = wall

    def now(self) -> int:
        """A fresh stamp, greater than every stamp issued or witnessed before."""
        wall = int(self._wall() * 1000) << COUNTER_BITS
        self.last = wall if wall > self.last else self.last + 1
        return self.last

    def witness(self, remote: int) -> bool:
        """Move past a peer's stamp; False (and no change) if it is too far in the future."""
        wall_ms = int(self._wall() * 1000)
        if physical_ms(remote) > wall_ms + MAX_DRIFT_MS:
            return False
        if remote > self.last:
            self.last = remote
        return True
