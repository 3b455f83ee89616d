"""The write pipeline: writes acknowledged from a journal, folded into SQLite later.

Memory sets and sends (`meshd.wire.ipc.JOURNALED`: nothing about them can fail once they
are validated and checked, so folding them later gives the same answer) go this way in
the daemon:

1. `log()` (loop thread) stamps a validated write and queues its record in `pending`; a
   send to other daemons gets its outbox seqs now (`Outbox.plan`), kept in the record's
   routes field so the fold queues exactly those;
2. `append()` writes the records of a batch to the journal (one write, with fsync
   durability one fdatasync): from here on they are acknowledged, and the routed items
   of its sends go to the router (`Outbox.release`) before any fold;
3. `hand_off()` (loop) gives the queued records to the fold thread (`folder.FoldThread`),
   which commits them in one transaction (`fold_handed_off()`); back on the loop,
   `finish_hand_off()` empties their journal segment;
4. `flush()` folds whatever is still queued, handed off or not, in the calling thread:
   every other write and every read does it first (the pipeline is attached to the
   Store), so a client reads its own acknowledged writes.

Acknowledgements of outbox items from other daemons (`ack()`) ride along: they are not
journaled (an ack lost in a crash only makes an item go again, and the destination drops
what it has) and are applied in the fold after the writes queued before them.

A journal record is `[command, args, version, hlc, routes]`; records of earlier versions
(`[command, args, version, hlc]` with the routes inside `args["_routes"]`) are read too.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from meshd.errors import StoreError
from meshd.state import db, mail, memory
from meshd.state.journal import Journal

if TYPE_CHECKING:
    from meshd.state.outbox import Outbox
    from meshd.state.store import Routed, Store

log = logging.getLogger("meshd.store")

#: Seconds between a read's attempts to fold queued writes while the disk is full.
READ_FOLD_RETRY = 1.0

#: An outbox acknowledgement: (destination, lane, seq applied through).
Ack = tuple[str, int, int]


def upgrade(rec: list[Any]) -> list[Any]:
    """A journal record in today's shape (earlier versions kept the routes in args)."""
    if len(rec) == 4:
        args = rec[1]
        routes = args.pop("_routes", None) if isinstance(args, dict) else None
        rec = [*rec, routes]
    return rec


class WritePipeline:
    def __init__(self, store: "Store", outbox: "Outbox", fsync: bool = False) -> None:
        self.store = store
        self.outbox = outbox
        self.journal: Journal | None = Journal(store.data_dir, fsync=fsync)
        self.damage: dict[str, int] = {}            # what the replay had to skip
        self.pending: list[list[Any]] = []          # logged, not handed off
        self.pending_acks: list[Ack] = []
        self.folding: list[list[Any]] | None = None   # handed to the fold thread
        self._folding_acks: list[Ack] = []
        self._folded = False
        self._folding_segment = 0
        self._staged: list[Routed] = []             # items of sends logged, not appended
        self._replay_deferred = False               # see replay
        self._read_fold_retry_at = 0.0              # see fold_for_read
        store.attach(self)

    # --- start -----------------------------------------------------------------------------

    def replay(self) -> int:
        """Fold in what a crash left in the journal. Returns how many records were folded
        in (damaged spots are logged and counted in `damage`). On a full disk they stay
        queued, and in the journal, until a fold finds room: the daemon still starts and
        serves what is committed, instead of staying down until someone frees space.
        Until then nothing is handed off, so the first fold that works is a `flush()` of
        everything, which then empties both segments: records already folded never linger
        there, where a crash would fold them again over a later delete."""
        assert self.journal is not None
        recovered = [upgrade(r) for r in self.journal.read_all()]
        self.damage = self.journal.damage_counters()
        if recovered:
            for rec in recovered:                   # (a send's version is 0)
                self.store.witness_stamp(int(rec[2]), int(rec[3]))
            self.pending = recovered
            try:
                self.flush()
            except StoreError as exc:
                if not db.out_of_space(exc):
                    raise
                log.error("%d journaled write(s) left by the last run cannot be folded into "
                          "the database yet (%s): they stay in the journal and fold once "
                          "there is room; reads are served without them until then",
                          len(recovered), exc)
                self._replay_deferred = True
                return 0
        self.journal.clear()
        return len(recovered)

    # --- logging and acknowledging -----------------------------------------------------------

    def log(self, command: str, args: dict[str, Any]) -> list[Any]:
        """Check and stamp a validated journaled write, queue it, and return its journal
        record. The caller appends the records of a batch (`append`) and only then
        acknowledges. Raises (and queues nothing) when the write would be refused."""
        store = self.store
        if command == "message.send":
            hlc = store.hlc.now()
            routes = None
            if self.outbox.routing:
                try:
                    routes, items = self.outbox.plan(args["message"], hlc)
                except sqlite3.Error as exc:
                    raise StoreError(f"database error: {exc}") from exc
                self._staged.extend(items)
            rec = [command, args, 0, hlc, routes]          # messages carry no version
        else:
            version, hlc = store.stamp()
            rec = [command, args, version, hlc, None]
        self.pending.append(rec)
        return rec

    def append(self, records: list[list[Any]]) -> None:
        """Journal the records just logged (the tail of `pending`): once this returns they
        are acknowledged, and the routed items of their sends may go out. When it raises
        they are dropped (not acknowledged; their outbox seqs stay unused, a gap the
        router and the destination skip)."""
        assert self.journal is not None
        staged, self._staged = self._staged, []
        try:
            self.journal.append(records)
        except BaseException:
            if records:
                del self.pending[-len(records):]
            raise
        self.outbox.release(staged)

    def ack(self, acks: list[Ack]) -> None:
        """Destinations applied outbox items through these seqs: the items leave the
        outbox with the next fold, after the writes queued before them (which may be what
        is acknowledged). Any read folds them first, so receipts read as stored at once;
        the caller makes sure a fold comes (`flush`) if no write brings one."""
        self.pending_acks.extend(acks)

    @property
    def acks_pending(self) -> bool:
        """Whether acks wait that were not handed to the fold thread."""
        return bool(self.pending_acks)

    # --- folding ---------------------------------------------------------------------------

    @property
    def unfolded(self) -> bool:
        """Whether acknowledged writes (or acks) are not yet in SQLite."""
        return bool(self.pending) or bool(self.pending_acks) or self.folding is not None

    def folded_version(self) -> int:
        """Our own version through which every change is in SQLite: journaled writes not
        yet folded have higher versions (stamps are handed out in order on the loop)."""
        if self.folding is not None and not self._folded:
            for rec in self.folding:
                if rec[2]:
                    return int(rec[2]) - 1
        for rec in self.pending:
            if rec[2]:
                return int(rec[2]) - 1
        return self.store.version

    def hand_off(self) -> bool:
        """Loop thread: give the queued records to the fold thread. False when a batch is
        still out or nothing is queued."""
        if (self.folding is not None or not (self.pending or self.pending_acks)
                or self.journal is None or self._replay_deferred):
            return False
        self.folding, self.pending = self.pending, []
        self._folding_acks, self.pending_acks = self.pending_acks, []
        self._folding_segment = self.journal.rotate()
        self._folded = False
        return True

    def fold_handed_off(self) -> int:
        """Fold thread: commit the handed-off batch (unless a flush already did)."""
        with self.store.lock:
            records = self.folding
            if records is None or self._folded or self.store.in_tx:
                return 0
            self._fold(records, self._folding_acks)
            self._folded = True
            return len(records)

    def finish_hand_off(self) -> bool:
        """Loop thread, after the fold thread is done: empty the batch's journal segment.
        False when the batch is not committed (the fold failed; it stays queued)."""
        if self.folding is None or not self._folded:
            return False
        assert self.journal is not None
        self.journal.clear(self._folding_segment)
        self.folding, self._folding_acks = None, []
        return True

    def fold_for_read(self) -> None:
        """Before a read: fold what is queued, so that a client reads its own acknowledged
        writes. On a full disk the read goes on from what is committed rather than fail
        too (the writes stay journaled and queued, and fold once there is room); reads
        then try again at most every READ_FOLD_RETRY seconds, not each at the cost of a
        failing transaction."""
        if not self.unfolded or time.monotonic() < self._read_fold_retry_at:
            return
        try:
            self.flush()
        except StoreError as exc:
            if not db.out_of_space(exc):
                raise
            self._read_fold_retry_at = time.monotonic() + READ_FOLD_RETRY
            log.warning("reads are served without %d acknowledged write(s) the full disk "
                        "keeps out of the database for now: %s",
                        len(self.pending) + len(self.folding or ()), exc)

    def flush(self) -> int:
        """Fold every queued record into SQLite now, in this thread."""
        if not self.unfolded:
            return 0
        with self.store.lock:
            n = 0
            if self.folding is not None and not self._folded:
                self._fold(self.folding, self._folding_acks)
                self._folded = True
                n += len(self.folding)
            if self.pending or self.pending_acks:
                records, self.pending = self.pending, []
                acks, self.pending_acks = self.pending_acks, []
                try:
                    self._fold(records, acks)
                except BaseException:
                    self.pending = records + self.pending
                    self.pending_acks = acks + self.pending_acks
                    raise
                n += len(records)
                if self.journal is not None and records:   # (deferred replay: both segments)
                    self.journal.clear(None if self._replay_deferred else self.journal.active)
                self._replay_deferred = False
            if self.folding is not None:
                self.finish_hand_off()
            return n

    def _fold(self, records: list[list[Any]], acks: list[Ack]) -> None:
        """One transaction for journaled records, then the acks; the caller holds `lock`."""
        store, outbox = self.store, self.outbox
        acked = 0
        with store.fold_transaction():
            sets: list[tuple[dict[str, Any], str, int, int]] = []
            for command, args, version, hlc, routes in records:
                if command == "message.send":
                    if sets:                        # keep the order of sets and sends
                        memory.insert_entries(store, sets)
                        sets = []
                    mail.send(store, outbox, args, hlc=hlc, routes=routes)
                else:
                    sets.append((args["entry"], store.node_id, version, hlc))
            if sets:
                memory.insert_entries(store, sets)
            for dest, lane, through in acks:
                acked += outbox.acked(dest, lane, through)
        outbox.acked_items += acked

    # --- stop ------------------------------------------------------------------------------

    def close(self) -> None:
        """Fold what is queued (what cannot be, the journal keeps for the next start)."""
        with self.store.lock:
            if self.unfolded and not self.store.in_tx:
                try:
                    self.flush()
                except StoreError:
                    pass
            if self.journal is not None:
                self.journal.close()
                self.journal = None

    def stats(self) -> dict[str, int]:
        return {"unfolded": len(self.pending) + len(self.folding or ())}
