"""The Store: one SQLite database, its node identity, its clocks, and transactions.

Writers go through `write()` (one transaction, BEGIN IMMEDIATE) and, inside it,
`savepoint()` per request, so the daemon can apply a whole batch of client requests in
one commit (group commit) while a failing request undoes only itself. Every change to a
replicated row takes a `stamp()`: the next version of this node's counter and a fresh
HLC stamp. In shared mode (the SDK's directory mode, several processes on one file) the
counters are re-read at the start of every write transaction.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack

from meshd.errors import StoreError
from meshd.state import commands, db
from meshd.state.hlc import HLC
from meshd.state.journal import Journal
from meshd.wire import ipc as ipc_commands

log = logging.getLogger("meshd.store")

#: Seconds between a read's attempts to fold queued writes while the disk is full.
READ_FOLD_RETRY = 1.0

#: Writes that may be acknowledged from the journal: nothing about them can fail once
#: they are validated and checked, so folding them later gives the same answer.
#: Writes acknowledged from the journal (declared with each command in the wire layer).
JOURNALED = ipc_commands.JOURNALED

#: A record in `pending` that is not journaled: outbox acks to apply with the next fold.
ROUTE_ACKED = "route.acked"

#: A stream event produced by a write: (session_id or None for the node-wide log, seq, message)
Event = tuple[str | None, int, dict[str, Any]]

#: An outbox item a write committed: (destination node, lane, [seq, kind, payload]), so
#: the router can send it without reading it back from SQLite.
Routed = tuple[str, int, list[Any]]


class Store:
    """The node's durable state. Not thread-safe by itself: `lock` serialises users that
    share one Store across threads (the SDK, and the daemon's loop and fold thread; see
    `hand_off`). Every use of `conn` holds it."""

    def __init__(self, data_dir: str | Path, *, durability: str = "process", shared: bool = False,
                 stale_after: float = 300.0, wall: Callable[[], float] = time.time,
                 exclusive: bool = False) -> None:
        self.data_dir = Path(data_dir)
        self.shared = shared
        self.stale_after = stale_after
        self.wall = wall
        self.lock = threading.RLock()
        self.pid = os.getpid()          # a forked child must open its own connection
        # Directory mode: never beside a running daemon (db.lock_shared).
        self._lock_fd = db.lock_shared(self.data_dir) if shared else None
        try:
            self.conn = db.connect(self.data_dir, durability, exclusive=exclusive)
        except BaseException:
            self._unlock()
            raise
        # Blind writes (memory sets) go through a journal when the daemon asks for one.
        self.journal: Journal | None = None
        self.journal_damage: dict[str, int] = {}        # what the replay had to skip
        self._read_fold_retry_at = 0.0                  # see fold_for_read
        self._replay_deferred = False                   # see enable_journal
        self.pending: list[list[Any]] = []
        self.folding: list[list[Any]] | None = None    # handed to the fold thread
        self._folded = False
        self._folding_segment = 0
        self._events_lock = threading.Lock()
        # In a mesh, the node ids of the daemons known to be up (this one included);
        # sessions hosted anywhere else read OFFLINE. None: no mesh, hosts do not matter.
        self.up_hosts: frozenset[str] | None = None
        self.hlc = HLC(0, wall)
        self.version = 0
        self.events: list[Event] = []
        # Outbox items of committed writes, for the router (None: nobody routes, keep none).
        self.routed: list[Routed] | None = None
        # With a router (`enable_routing`): the outbox seq counters, the host cache
        # (session id, or None for "any", -> the other daemons hosting it; every write
        # empties it), the items of sends being journaled, and those journaled (loop only).
        self.outbox_seqs: dict[tuple[str, int], int] | None = None
        self.route_hosts: dict[str | None, tuple[str, ...]] | None = None
        self.staged: list[Routed] = []
        self.journaled_routes: list[Routed] = []
        self.on_routed: Callable[[], None] = lambda: None
        self.route_acked = 0            # outbox items acknowledged (and deleted)
        self._in_tx = False
        self._loaded = False
        self._persisted = (0, 0)       # the counters as last committed to meta
        try:
            self.node_id = self._load_identity()
        except BaseException:
            self.conn.close()
            self._unlock()
            raise

    # --- identity and counters --------------------------------------------------------------

    def _load_identity(self) -> str:
        with self.write():
            row = self.conn.execute("SELECT v FROM meta WHERE k='node_id'").fetchone()
            if row is None:
                node_id = uuid.uuid4().hex
                self.conn.execute("INSERT INTO meta(k, v) VALUES ('node_id', ?)", (node_id,))
            else:
                node_id = row[0]
        return node_id

    def _load_counters(self) -> None:
        rows = dict(self.conn.execute(
            "SELECT k, v FROM meta WHERE k IN ('version', 'clock')").fetchall())
        self.version = max(self.version, int(rows.get("version", 0)))
        self.hlc.last = max(self.hlc.last, int(rows.get("clock", 0)))
        self._persisted = (int(rows.get("version", 0)), int(rows.get("clock", 0)))
        self._loaded = True

    def _save_counters(self) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta(k, v) VALUES ('version', ?), ('clock', ?)",
                          (self.version, self.hlc.last))
        self._persisted = (self.version, self.hlc.last)

    def stamp(self) -> tuple[int, int]:
        """The (version, hlc) for the next change made by this node."""
        self.version += 1
        return self.version, self.hlc.now()

    def now(self) -> float:
        return self.wall()

    # --- transactions ----------------------------------------------------------------------

    # --- the journal ---------------------------------------------------------------------

    def enable_journal(self, fsync: bool) -> int:
        """Log blind writes before SQLite (daemon only); folds in what a crash left behind.
        Returns how many records were folded in (damaged spots are logged and counted in
        `journal_damage`). On a full disk they stay queued, and in the journal, until a
        fold finds room: the daemon still starts and serves what is committed, instead
        of staying down until someone frees space. Until then nothing is handed off, so
        the first fold that works is a `flush()` of everything, which then empties both
        segments: records already folded never linger there, where a crash would fold
        them again over a later delete."""
        self.journal = Journal(self.data_dir, fsync=fsync)
        recovered = self.journal.read_all()
        self.journal_damage = self.journal.damage_counters()
        if recovered:
            for rec in recovered:
                self.version = max(self.version, int(rec[2]))   # messages log version 0
                self.hlc.witness(int(rec[3]))
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

    def enable_routing(self, on_routed: Callable[[], None]) -> None:
        """A router sends this node's outbox: keep it the items of committed writes, and
        give journaled sends their outbox seqs at once (see `messages.plan`), telling
        `on_routed` when they are journaled."""
        self.routed = []
        self.outbox_seqs = {}
        self.on_routed = on_routed

    def journaled(self, ok: bool) -> None:
        """The IPC server appended the logged writes to the journal (or failed to): their
        routed items may go out now (or never: their seqs stay unused, a gap the router
        and the destination skip)."""
        staged, self.staged = self.staged, []
        if ok and staged:
            self.journaled_routes.extend(staged)
            self.on_routed()

    def log_write(self, command: str, args: dict[str, Any]) -> list[Any]:
        """Check and stamp a validated journaled write (see JOURNALED), queue it, and return
        its journal record. The caller appends the records of a batch and only then
        acknowledges. Raises (and queues nothing) when the write would be refused."""
        if command == "message.send":
            rec = [command, args, 0, self.hlc.now()]     # messages carry no version
            if self.outbox_seqs is not None:
                from meshd.state import messages
                try:
                    self.staged.extend(messages.plan(self, args, rec[3]))
                except sqlite3.Error as exc:
                    raise StoreError(f"database error: {exc}") from exc
        else:
            version, hlc = self.stamp()
            rec = [command, args, version, hlc]
        self.pending.append(rec)
        return rec

    # Folding in the background (the daemon): the loop thread logs writes into `pending`,
    # then `hand_off()` moves them to `folding` and rotates the journal; the fold thread
    # commits them with `fold_handed_off()`; back on the loop, `finish_hand_off()` empties
    # their journal segment. `flush()` (every read and other write) folds whatever is
    # still queued, handed off or not, in the calling thread, under `lock`.

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
        return self.version

    @property
    def unfolded(self) -> bool:
        """Whether journaled writes are not yet in SQLite (queued or handed off)."""
        return bool(self.pending) or self.folding is not None

    def hand_off(self) -> bool:
        """Loop thread: give the queued records to the fold thread. False when a batch is
        still out or nothing is queued."""
        if (self.folding is not None or not self.pending or self.journal is None
                or self._replay_deferred):
            return False
        self.folding, self.pending = self.pending, []
        self._folding_segment = self.journal.rotate()
        self._folded = False
        return True

    def fold_handed_off(self) -> int:
        """Fold thread: commit the handed-off batch (unless a flush already did)."""
        with self.lock:
            records = self.folding
            if records is None or self._folded or self._in_tx:
                return 0
            self._fold(records)
            self._folded = True
            return len(records)

    def finish_hand_off(self) -> bool:
        """Loop thread, after the fold thread is done: empty the batch's journal segment.
        False when the batch is not committed (the fold failed; it stays queued)."""
        if self.folding is None or not self._folded:
            return False
        assert self.journal is not None
        self.journal.clear(self._folding_segment)
        self.folding = None
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
        """Fold every queued journal record into SQLite now, in this thread. Every read
        (`fold_for_read`) and every other write calls this first."""
        if not self.unfolded:
            return 0
        with self.lock:
            n = 0
            if self.folding is not None and not self._folded:
                self._fold(self.folding)
                self._folded = True
                n += len(self.folding)
            if self.pending:
                records, self.pending = self.pending, []
                try:
                    self._fold(records)
                except BaseException:
                    self.pending = records + self.pending
                    raise
                n += len(records)
                if self.journal is not None:     # (a deferred replay: both held only these)
                    self.journal.clear(None if self._replay_deferred else self.journal.active)
                self._replay_deferred = False
            if self.folding is not None:
                self.finish_hand_off()
            return n

    def _fold(self, records: list[list[Any]]) -> None:
        """One transaction for journaled records; the caller holds `lock`. Safe while the
        loop thread logs more writes: it does not touch the counters the loop advances
        (records carry their stamps), and its events are dropped if it rolls back."""
        from meshd.state import memory, messages
        with self._events_lock:
            mark, rmark = len(self.events), self._routed_mark()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot begin a transaction: {exc}") from exc
            self._in_tx = True
            try:
                sets: list[tuple[dict[str, Any], int, int]] = []
                acked = 0
                for command, args, version, hlc in records:
                    if command == "message.send":
                        if sets:                    # keep the order of sets and sends
                            memory.set_entries(self, sets)
                            sets = []
                        messages.send(self, args, hlc=hlc)
                    elif command == ROUTE_ACKED:
                        for dest, lane, through in args:
                            acked += messages.outbox_acked(self, dest, lane, through)
                    else:
                        sets.append((args, version, hlc))
                if sets:
                    memory.set_entries(self, sets)
                if (self.version, self.hlc.last) != self._persisted:
                    self._save_counters()
                self.conn.execute("COMMIT")
                self.route_acked += acked
            except BaseException as exc:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                del self.events[mark:]
                self._drop_routed(rmark)
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"database error: {exc}") from exc
                raise
            finally:
                self._in_tx = False

    # --- transactions ----------------------------------------------------------------------

    def ack_routed(self, acks: list[tuple[str, int, int]]) -> bool:
        """Destinations applied outbox items through these seqs ([(dest, lane, through)]):
        delete them. With a journal the acks go with the next fold, after the writes
        queued before them (which may be what is acknowledged), and True says so: the
        caller makes sure a fold comes (`flush`). Any read folds them first, so receipts
        read as stored at once. Not journaled: an ack lost in a crash only makes the
        item go again, and the destination drops what it has."""
        if self.journal is not None:
            self.pending.append([ROUTE_ACKED, acks, 0, 0])
            return True
        from meshd.state import messages
        n = 0
        with self.write(keeps_routes=True):
            for dest, lane, through in acks:
                n += messages.outbox_acked(self, dest, lane, through)
        self.route_acked += n
        return False

    def acks_pending(self) -> bool:
        """Whether acks wait in `pending` (not yet handed to the fold thread)."""
        return any(r[0] == ROUTE_ACKED for r in self.pending)

    @contextmanager
    def write(self, keeps_routes: bool = False) -> Iterator[None]:
        """One write transaction; commits on success, rolls back (counters too) on error.
        `keeps_routes`: the caller changes no session, so the host cache stays."""
        with self.lock:
            if self._in_tx:
                yield
                return
            if not keeps_routes:
                self.route_hosts = None
            if self.unfolded:
                self.flush()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot begin a transaction: {exc}") from exc
            self._in_tx = True
            saved = (self.version, self.hlc.last, len(self.events), self._routed_mark())
            saved_persisted = self._persisted
            try:
                if self.shared or not self._loaded:
                    self._load_counters()
                yield
                persisted = self._persisted
                if (self.version, self.hlc.last) != persisted:
                    self._save_counters()
                self.conn.execute("COMMIT")
            except BaseException as exc:
                if self._persisted != saved_persisted:
                    self._persisted = saved_persisted
                self._rollback(saved)
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"database error: {exc}") from exc
                raise
            finally:
                self._in_tx = False
                if not keeps_routes:
                    self.route_hosts = None

    def get_meta(self, key: str, default: Any = None) -> Any:
        """A small node-local setting (not replicated), e.g. the last known peers."""
        with self.read(fold=False):
            row = self.conn.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        if row is None or not isinstance(row[0], bytes):
            return default
        try:
            return msgpack.unpackb(row[0], raw=False)
        except Exception:
            return default

    def set_meta(self, key: str, value: Any) -> None:
        with self.write():
            self.conn.execute("INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)",
                              (key, msgpack.packb(value, use_bin_type=True)))

    def _rollback(self, saved: tuple[int, int, int, int]) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self.version, self.hlc.last = saved[0], max(self.hlc.last, saved[1])
        del self.events[saved[2]:]
        self._drop_routed(saved[3])

    def _routed_mark(self) -> int:
        return len(self.routed) if self.routed is not None else 0

    def _drop_routed(self, mark: int) -> None:
        """Forget the outbox items of a rolled-back write: their seqs will be given again,
        and an item that was never committed must never be sent."""
        if self.routed is not None:
            del self.routed[mark:]

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside write(): undo only this block when it raises."""
        saved = (self.version, self.hlc.last, len(self.events), self._routed_mark())
        self.conn.execute("SAVEPOINT req")
        try:
            yield
        except BaseException as exc:
            self.conn.execute("ROLLBACK TO req")
            self.conn.execute("RELEASE req")
            self.version = saved[0]
            del self.events[saved[2]:]
            self._drop_routed(saved[3])
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"database error: {exc}") from exc
            raise
        else:
            self.conn.execute("RELEASE req")

    @contextmanager
    def read(self, fold: bool = True) -> Iterator[None]:
        """A consistent snapshot for a group of reads (no lock on other writers). With
        `fold=False`, journaled writes not yet folded are left out (replication reads what
        is committed and ships the rest later, rather than folding on the loop)."""
        with self.lock:
            if self._in_tx:
                yield
                return
            if fold:
                self.fold_for_read()
            self.conn.execute("BEGIN")
            self._in_tx = True
            try:
                yield
            finally:
                self._in_tx = False
                try:
                    self.conn.execute("COMMIT")
                except sqlite3.Error:
                    pass

    def execute(self, command: str, args: dict[str, Any]) -> Any:
        """Run one validated command in its own transaction (the SDK's directory mode)."""
        if command in commands.READ_ONLY:
            with self.read():
                return commands.run(self, command, args)
        with self.write():
            return commands.run(self, command, args)

    def take_events(self) -> list[Event]:
        """The events of committed writes. Never waits: while the fold thread is inside a
        transaction its events are not final, and the caller gets them after it."""
        if not self._events_lock.acquire(blocking=False):
            return []
        try:
            events, self.events = self.events, []
        finally:
            self._events_lock.release()
        return events

    def take_routed(self) -> list[Routed]:
        """The outbox items of committed writes (see `routed`); like `take_events`, never
        waits for a fold in progress."""
        routed, self.journaled_routes = self.journaled_routes, []
        if self.routed is None or not self._events_lock.acquire(blocking=False):
            return routed
        try:
            if self.routed:
                routed += self.routed
                self.routed = []
        finally:
            self._events_lock.release()
        return routed

    def checkpoint(self) -> None:
        """Fold the WAL into the database (the daemon's store does not do it by itself).
        Under the lock, on the one connection: under bulk writes this holds the loop for
        as long as the copy and sync take (tens of ms, up to ~200 ms). A second connection
        could copy beside the loop, but only without EXCLUSIVE locking, which is what keeps
        every other writer out of the daemon's database (tried, and reverted: 248cba1)."""
        with self.lock:
            if not self._in_tx:
                db.checkpoint(self.conn, self.data_dir)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        with self.lock:
            if self.unfolded and not self._in_tx:
                try:
                    self.flush()
                except StoreError:
                    pass                 # the journal keeps them for the next start
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            if not self._in_tx:
                try:
                    db.checkpoint(self.conn, self.data_dir, truncate=True)
                except sqlite3.Error:
                    pass
            try:
                self.conn.close()
            except sqlite3.Error:
                pass
            self._unlock()

