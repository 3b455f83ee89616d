"""Journaled writes, driven from the event loop: answering a batch of memory sets and
sends from the journal, and deciding when they are folded into SQLite.

The pipeline itself (`meshd.state.pipeline`) has no clock and no loop; this module gives it
both: a fold thread (`meshd.state.folder`), a short timer so that one lone write does not
wake that thread, and folding on the loop when a local subscriber waits for a message or
the thread falls far behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, Callable

from meshd.config import Config
from meshd.errors import MeshError
from meshd.state.folder import FoldThread
from meshd.state.pipeline import WritePipeline
from meshd.wire.ipc import OK, encode_error, encode_reply

log = logging.getLogger("meshd.ipc")

#: A request to run: (client ident, req_id, command, validated args, batch group or None).
Work = tuple[bytes, int, str, dict[str, Any], "int | None"]


class JournaledWrites:
    """One per IPC server. `folded(changed)` is told on the loop after writes reached
    SQLite (the server then pushes their events and tells replication)."""

    def __init__(self, config: Config, pipeline: WritePipeline, counters: Counter[str],
                 folded: Callable[[bool], None],
                 wanted_here: Callable[[list[list[Any]]], bool]) -> None:
        self.config = config
        self.pipeline = pipeline
        self.counters = counters
        self._folded_cb = folded
        self._wanted_here = wanted_here
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._folder: FoldThread | None = None

    def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._folder = FoldThread(
            self.pipeline, lambda error: loop.call_soon_threadsafe(self._folded, error),
            self.config.checkpoint_interval)
        self._folder.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._folder is not None:
            self._folder.stop()             # the pipeline folds the rest when it closes
            self._folder = None

    @property
    def running(self) -> bool:
        return self._folder is not None

    def run(self, work: list[Work]) -> list[bytes]:
        """A small batch of memory sets and sends: one journal append, then the answers.
        The writes reach SQLite moments later, and before any read or other write; a
        send whose recipient is unknown is refused before it is logged."""
        records: list[Any] = []
        out: list[bytes] = []
        for _, req_id, command, args, _ in work:
            try:
                records.append(self.pipeline.log(command, args))
            except MeshError as exc:
                self.counters[f"error.{exc.code}"] += 1
                out.append(encode_error(req_id, exc.code, str(exc)))
                continue
            key = "message" if command == "message.send" else "entry"
            answer = {f"{key}_id": args[key][f"{key}_id"]}
            out.append(encode_reply(req_id, OK, answer))
            self.counters[f"ok.{command}"] += 1
        try:
            self.pipeline.append(records)
        except OSError as exc:
            log.error("journal append failed, %d write(s) not applied: %s", len(records), exc)
            self.counters["error.store_error"] += len(work)
            return [encode_error(w[1], "store_error", f"journal write failed: {exc}")
                    for w in work]
        return out

    def schedule(self, new: int) -> None:
        """After `new` records were journaled: hand them to the fold thread at once when
        enough are queued, else after a short delay (so one lone write does not wake the
        thread; sends routed from the journal do not wait for their fold); fold on the
        loop when the thread falls far behind (backpressure) or a local subscriber waits
        for one of the records just logged (`wanted_here`: a message's recipient, or a
        memory watch)."""
        assert self._loop is not None
        pending = self.pipeline.pending
        if len(pending) >= self.config.journal_flush_max:
            self.flush()
        elif new and self._wanted_here(pending[-new:]):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_soon(self.flush)  # type: ignore[assignment]
        elif len(pending) >= self.config.journal_handoff:
            self._hand_off()
        elif self._timer is None:
            self._timer = self._loop.call_later(self.config.journal_flush_delay, self._expired)

    def _hand_off(self) -> None:
        if self._folder is not None and self.pipeline.hand_off():
            self._folder.kick()

    def _expired(self) -> None:
        self._timer = None
        self._hand_off()

    def _folded(self, error: BaseException | None) -> None:
        """On the loop, after the fold thread committed a batch (or failed to)."""
        if error is not None:
            log.error("folding journaled writes into the store failed (kept, retried): %s",
                      error)
            self.counters["fold_errors"] += 1
            if self._loop is not None and self._folder is not None:
                self._loop.call_later(1.0, self._folder.kick)
            return
        self.pipeline.finish_hand_off()
        self._folded_cb(True)
        if (self.pipeline.pending or self.pipeline.pending_acks) and self._timer is None:
            self._hand_off()

    def flush(self) -> None:
        """Fold everything queued now, on the loop."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        try:
            self._folded_cb(bool(self.pipeline.flush()))
        except MeshError as exc:            # stays queued (and journaled); retried later
            log.error("folding journaled writes into the store failed: %s", exc)
            if self._loop is not None:
                self._timer = self._loop.call_later(1.0, self.flush)

    def stats(self) -> dict[str, Any]:
        folder = self._folder
        return {"folded": folder.folded if folder else 0,
                "checkpoints": folder.checkpoints if folder else 0,
                "checkpoint_seconds": round(folder.checkpoint_seconds, 6) if folder else 0.0,
                **self.pipeline.stats()}
