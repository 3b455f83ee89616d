"""Glue between the memory change log (`meshd.state.memlog`) and the daemon's loop.

Local changes are logged in their own transaction and pushed with the events of that
commit, like messages. Replicated changes are parked until this node holds everything
their origin wrote before them (see `memlog`); a merge that parks some marks the store
(`Store.memlog_parked`), the replicator tells the daemon when its merge committed
(`merged`), and we log what is due right after, on the loop, then push those events at
once (a replicated change does not wait for the next local write or housekeeping turn
to reach watchers).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from meshd.errors import MeshError
from meshd.ipc.streams import Streams
from meshd.state import memlog
from meshd.state.store import Store

log = logging.getLogger("meshd.ipc")


class MemoryWatch:
    """Flushes parked replicated changes after the merge that parked them commits."""

    def __init__(self, store: Store, streams: Streams,
                 after_publish: Callable[[], None]) -> None:
        self.store = store
        self.streams = streams
        self.after_publish = after_publish
        self.flushed = 0
        self._scheduled = False
        self.flush()                    # what a crash left parked (its merge committed)

    def merged(self) -> None:
        """A merge committed (on the loop): if it parked replicated changes, log what is
        due once this loop turn is over (one flush for all the merges of a turn)."""
        if not self.store.memlog_parked or self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()                # (no loop: a test drives it by hand)
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        self.store.memlog_parked = False
        try:
            with self.store.write(keeps_routes=True):
                n = memlog.flush_parked(self.store)
        except MeshError as exc:        # (a full disk) the rows stay parked for next time
            log.warning("logging replicated memory changes failed: %s", exc)
            return
        if n:
            self.flushed += n
            self.streams.publish(self.store.take_events())
            self.after_publish()

    def tick(self) -> None:
        """Housekeeping: flush what stayed parked because the batch that completed its
        origin's knowledge carried no memory change (so it told nobody)."""
        with self.store.lock:
            parked = self.store.conn.execute("SELECT 1 FROM memlog_parked LIMIT 1").fetchone()
        if parked is not None:
            self.flush()
