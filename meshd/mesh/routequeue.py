"""What the router keeps in memory of one outbox queue (a destination and a lane): the
window of items sent and not yet acknowledged, and a bounded cache of committed items so
the hot path sends without reading them back from SQLite."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

#: Committed items kept in memory per destination and lane for sending, at most, in
#: count and in bytes (message bodies may be up to a frame); beyond this, or while the
#: destination is down, they are read back from the outbox when their turn comes.
CACHE_ITEMS = 8192
CACHE_BYTES = 16 * 1024 * 1024
NEVER = float("inf")


@dataclass(slots=True)
class RouteQueue:
    """What the router knows of one (destination, lane) outbox queue."""

    first: int           # oldest seq not known to be acknowledged: frames carry it
    sent: int            # highest seq sent since the run (re)started
    last: int            # highest seq known committed
    backoff: float
    resend_at: float = NEVER    # no progress by then: send again from the outbox
    frames: int = 0              # frames sent whose answer is awaited (approximately)
    gap_resent: bool = False     # a gap answer already caused a resend, no progress since
    cache: dict[int, list[Any]] = field(default_factory=dict)   # seq -> committed item
    cache_bytes: int = 0         # about what `cache` holds (see `item_bytes`)
    sizes: dict[int, int] = field(default_factory=dict)         # seq -> its item_bytes

    def cache_put(self, seq: int, item: list[Any]) -> None:
        size = item_bytes(item)
        if len(self.cache) < CACHE_ITEMS and self.cache_bytes + size <= CACHE_BYTES:
            self.cache[seq] = item
            self.sizes[seq] = size
            self.cache_bytes += size

    def cache_drop_through(self, through: int) -> None:
        """Forget the cached items up to `through` (acknowledged)."""
        cache = self.cache
        if not cache:
            return
        if through - self.first < 2 * len(cache) + 64:
            seqs: Any = range(self.first, through + 1)
        else:
            seqs = [s for s in cache if s <= through]
        for seq in seqs:
            if cache.pop(seq, None) is not None:
                self.cache_bytes -= self.sizes.pop(seq)


def item_bytes(item: list[Any]) -> int:
    """At least how much memory a routed item holds: its message's text (4 bytes a
    character unless ASCII) and data, or a receipt."""
    payload = item[2]
    if not isinstance(payload, dict):
        return 128
    size = 512
    for key in ("body", "subject"):
        text = payload.get(key) or ""
        size += len(text) if text.isascii() else 4 * len(text)
    data = payload.get("data")
    if data:
        size += len(msgpack.packb(data, use_bin_type=True))
    return size
