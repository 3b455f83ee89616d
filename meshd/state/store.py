"""The Store: one SQLite database, its node identity, its clocks, and transactions.

Writers go through `write()` (one transaction, BEGIN IMMEDIATE) and, inside it,
`savepoint()` per request, so the daemon can apply a whole batch of client requests in
one commit (group commit) while a failing request undoes only itself. Every change to a
replicated row takes a `stamp()`: the next version of this node's counter and a fresh
HLC stamp. In shared mode (the SDK's directory mode, several processes on one file) the
counters are re-read at the start of every write transaction.

A write's effects beyond SQLite are kept with its transaction and dropped if it rolls
back: stream events (`events`), outbox items for the router (`routed`) and whether a
merge parked replicated memory changes (`memlog_parked`: the daemon logs them after the
commit, see `meshd.state.memlog`). Writes
acknowledged before they reach SQLite belong to the daemon's write pipeline
(`meshd.state.pipeline`), which attaches itself here so that every other write and
every read folds them in first: the Store knows it only through the `Folds` protocol.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import msgpack

from meshd.errors import StoreError
from meshd.state import db
from meshd.state.hlc import HLC

log = logging.getLogger("meshd.store")

#: A stream event produced by a write: (session_id or None for the node-wide log, seq, message)
Event = tuple[str | None, int, dict[str, Any]]

#: An outbox item a write committed: (destination node, lane, [seq, kind, payload]), so
#: the router can send it without reading it back from SQLite.
Routed = tuple[str, int, list[Any]]


@dataclass(frozen=True, slots=True)
class LogLimits:
    """How much of the past the store keeps of memory changes (the daemon's from `Config`):
    the bound is the store's, so every table module that writes those logs obeys it."""

    max_rows: int = 100_000          # events in the memory change log; the oldest are trimmed
    history_per_key: int = 50        # versions kept per key (0: no history)


class Folds(Protocol):
    """What the Store asks of the write pipeline attached to it (see `attach`)."""

    @property
    def unfolded(self) -> bool: ...

    def flush(self) -> int: ...

    def fold_for_read(self) -> None: ...

    def folded_version(self) -> int: ...

    def close(self) -> None: ...


class Store:
    """The node's durable state. Not thread-safe by itself: `lock` serialises users that
    share one Store across threads (the SDK, and the daemon's loop and fold thread; see
    `meshd.state.pipeline`). Every use of `conn` holds it."""

    def __init__(self, data_dir: str | Path, *, durability: str = "process", shared: bool = False,
                 stale_after: float = 300.0, wall: Callable[[], float] = time.time,
                 exclusive: bool = False, log_limits: LogLimits = LogLimits()) -> None:
        self.data_dir = Path(data_dir)
        self.log_limits = log_limits
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
        self._pipeline: Folds | None = None
        self._events_lock = threading.Lock()
        # In a mesh, the node ids of the daemons known to be up (this one included);
        # sessions hosted anywhere else read OFFLINE. None: no mesh, hosts do not matter.
        self.up_hosts: frozenset[str] | None = None
        self.hlc = HLC(0, wall)
        self.version = 0
        self.events: list[Event] = []
        self.routed: list[Routed] = []  # outbox items of committed writes (meshd.state.outbox)
        self.memlog_parked = False      # a merge parked replicated memory changes (memlog)
        # Moves on with every write that may change a session (see `write`): caches of
        # where sessions are hosted are valid while it stays.
        self.sessions_gen = 0
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

    def witness_stamp(self, version: int, hlc: int) -> None:
        """A stamp this node gave before (a replayed journal record): never give it again."""
        self.version = max(self.version, version)
        self.hlc.witness(hlc)

    def now(self) -> float:
        return self.wall()

    # --- transactions ----------------------------------------------------------------------

    def attach(self, pipeline: Folds) -> None:
        """Writes acknowledged before they reach SQLite are folded in first by every
        write and read (and when the store closes)."""
        self._pipeline = pipeline

    def set_up_hosts(self, up: frozenset[str] | None) -> None:
        """The daemons known to be up (the membership's view): sessions hosted anywhere
        else read OFFLINE."""
        self.up_hosts = up

    @property
    def in_tx(self) -> bool:
        return self._in_tx

    def folded_version(self) -> int:
        """Our own version through which every change is in SQLite (journaled writes not
        yet folded have higher versions)."""
        return self.version if self._pipeline is None else self._pipeline.folded_version()

    def fold_for_read(self) -> None:
        if self._pipeline is not None:
            self._pipeline.fold_for_read()

    @contextmanager
    def fold_transaction(self) -> Iterator[None]:
        """One transaction for writes the pipeline acknowledged earlier; the caller holds
        `lock`. Unlike `write`, it folds nothing first and loads no counters: it is safe
        while the loop thread logs more writes (records carry their stamps), and its
        events are dropped if it rolls back."""
        with self._events_lock:
            mark = (len(self.events), len(self.routed))
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot begin a transaction: {exc}") from exc
            self._in_tx = True
            try:
                yield
                if (self.version, self.hlc.last) != self._persisted:
                    self._save_counters()
                self.conn.execute("COMMIT")
            except BaseException as exc:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                del self.events[mark[0]:]
                del self.routed[mark[1]:]
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"database error: {exc}") from exc
                raise
            finally:
                self._in_tx = False

    @contextmanager
    def write(self, keeps_routes: bool = False) -> Iterator[None]:
        """One write transaction; commits on success, rolls back (counters too) on error.
        `keeps_routes`: the caller changes no session, so caches of where sessions are
        hosted stay valid (`sessions_gen` does not move)."""
        with self.lock:
            if self._in_tx:
                yield
                return
            if not keeps_routes:
                self.sessions_gen += 1
            if self._pipeline is not None and self._pipeline.unfolded:
                self._pipeline.flush()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot begin a transaction: {exc}") from exc
            self._in_tx = True
            saved = (self.version, self.hlc.last, len(self.events), len(self.routed))
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
                    self.sessions_gen += 1

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
        self._drop_effects(saved)

    def _drop_effects(self, saved: tuple[int, int, int, int]) -> None:
        """Forget the events and outbox items of a rolled-back write: an item that was
        never committed must never be sent (its seq will be given again)."""
        del self.events[saved[2]:]
        del self.routed[saved[3]:]

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside write(): undo only this block when it raises."""
        saved = (self.version, self.hlc.last, len(self.events), len(self.routed))
        self.conn.execute("SAVEPOINT req")
        try:
            yield
        except BaseException as exc:
            self.conn.execute("ROLLBACK TO req")
            self.conn.execute("RELEASE req")
            self.version = saved[0]
            self._drop_effects(saved)
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
        if not self.routed or not self._events_lock.acquire(blocking=False):
            return []
        try:
            routed, self.routed = self.routed, []
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
            if self._pipeline is not None and not self._in_tx:
                self._pipeline.close()   # (what it cannot fold, its journal keeps)
                self._pipeline = None
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

