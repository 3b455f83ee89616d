"""Glue between the memory change log (`meshd.state.memlog`) and the daemon's loop.

Local changes are logged in their own transaction and pushed with the events of that
commit, like messages. Replicated changes are parked until this node holds everything
their origin wrote before them (see `memlog`); the merge that parks them tells us, from
inside its transaction, and we log what is due right after it commits, on the loop,
then push those events at once (a replicated change does not wait for the next local
write or housekeeping turn to reach watchers).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from meshd.config import Config
from meshd.errors import MeshError
from meshd.ipc.streams import Streams
from meshd.state import memlog
from meshd.state.store import Store

log = logging.getLogger("meshd.ipc")


class MemoryWatch:
    """Flushes parked replicated changes after the merge that parked them commits."""

    def __init__(self, config: Config, store: Store, streams: Streams,
                 after_publish: Callable[[], None]) -> None:
        self.store = store
        self.streams = streams
        self.after_publish = after_publish
        self.flushed = 0
        self._scheduled = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        memlog.configure(store, memlog.LogLimits(config.memory_log_max_rows,
                                                 config.memory_history_per_key),
                         notify=self._parked)
        self.flush()                    # what a crash left parked (its merge committed)

    def _parked(self) -> None:
        """Called inside the merge's transaction, in the loop's thread: flush after it."""
        if self._scheduled:
            return
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return                  # no loop (a test): flushed with the next write
        self._scheduled = True
        loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        self._scheduled = False
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
