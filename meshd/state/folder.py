"""The fold thread: commits journaled writes to SQLite off the event loop, and checkpoints
the WAL between folds.

SQLite releases the GIL while it works, so while this thread commits one batch the loop
goes on receiving, validating, journaling and answering the next: under load the two
overlap instead of taking turns. There is one such thread per daemon, whatever the
number of clients or peers. It only runs `WritePipeline.fold_handed_off()` and, every
`checkpoint_interval`, `Store.checkpoint()` (copying the WAL back into the database, which
would otherwise pause the loop); everything else (handing batches off, emptying journal
segments, publishing events) stays on the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from meshd.state.pipeline import WritePipeline

log = logging.getLogger("meshd.fold")

#: Called in the fold thread after each attempt, with the error or None; it must only
#: hand the news to the loop (e.g. `loop.call_soon_threadsafe`).
Done = Callable[[BaseException | None], None]


class FoldThread:
    def __init__(self, pipeline: WritePipeline, done: Done, checkpoint_interval: float = 1.0
                 ) -> None:
        self.pipeline = pipeline
        self.store = pipeline.store
        self.done = done
        self.checkpoint_interval = checkpoint_interval
        self.folded = 0
        self.checkpoints = 0
        self.checkpoint_seconds = 0.0     # spent in checkpoints that worked (for metrics)
        self.checkpoint_failures = 0      # in a row, until one works again
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="meshd-fold", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        """A batch was handed off (WritePipeline.hand_off)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, then end. What is still queued is folded by
        `WritePipeline.close()` (or, after a crash, from the journal on the next start)."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        next_checkpoint = time.monotonic() + self.checkpoint_interval
        while True:
            woken = self._wake.wait(max(0.0, next_checkpoint - time.monotonic()))
            if self._stopping:
                return
            if time.monotonic() >= next_checkpoint:
                self._checkpoint()
                next_checkpoint = time.monotonic() + self.checkpoint_interval
            if not woken:
                continue
            self._wake.clear()
            error: BaseException | None = None
            try:
                self.folded += self.pipeline.fold_handed_off()
            except Exception as exc:          # reported to the loop, which retries later
                error = exc
            try:
                self.done(error)
            except RuntimeError:              # the loop is closed: we are shutting down
                return

    def _checkpoint(self) -> None:
        """A failure is said once, not every interval (a full disk fails them all until
        space is freed), and so is the recovery."""
        started = time.monotonic()
        try:
            self.store.checkpoint()
        except Exception as exc:              # keep folding; try again next time
            if not self.checkpoint_failures:
                log.warning("checkpoint failed (retried every %gs, said again once it "
                            "works): %s", self.checkpoint_interval, exc)
            self.checkpoint_failures += 1
            return
        self.checkpoint_seconds += time.monotonic() - started
        self.checkpoints += 1
        if self.checkpoint_failures:
            log.info("checkpoints work again, after %d failed", self.checkpoint_failures)
            self.checkpoint_failures = 0
