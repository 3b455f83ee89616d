"""Memory change events: a durable, bounded, node-local log of every change of a memory
entry as this node sees it, and each key's recent versions.

Why a log in SQLite rather than events kept in memory: a watcher must be able to resume
from its cursor after a reconnect or a daemon restart with nothing missed and nothing
twice, so each event is appended in the very transaction that makes the change (a
rolled-back change leaves no event; a replayed journal record that is already stored
adds none, since `memory.insert_entries` logs only what it stored).

Kinds of events (`kind`, with the history's `op`):

- `put` (op `set` or `touch`): an entry was stored here: a local set (folded from the
  journal), a touch, or an entry replicated from another node;
- `delete` (op `delete`): a deletion, local or replicated, removed entries of a key (one
  event per key, with the deletion's origin and HLC and the removed entries' tags);
- `expire` (op `expire`): this node's purge found the newest version of a key past its
  TTL (counted from the entry's HLC, the same instant on every node). Older versions
  that expire under a newer one change nothing visible and log nothing.

Order: local changes are logged at once. A replicated change is logged once this node
holds every earlier change of its origin (its version is within the origin's known
version): until then it is parked (`memlog_parked`, in the same transaction), and
`flush_parked` logs what became due, oldest version first, so that each origin's events
come in its own HLC order even when replication delivers a later batch before a gap is
filled.

Bounds: `LogLimits.max_rows` rows at most (the oldest are trimmed and meta
'memlog_trimmed' remembers through which seq: a watcher asking for less gets a `gap`
event), `LogLimits.history_per_key` versions per key in `memory_history`, and the parked
rows as many as the log.

Cursors are the log's own `seq` (AUTOINCREMENT: never reused, even once trimmed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable

import msgpack

from meshd.state.store import LogLimits  # noqa: F401  (the Store holds each store's bounds)

if TYPE_CHECKING:
    from meshd.state.store import Store

#: The key under which memory events travel in `Store.events` (session ids are printable,
#: so this one can never be a session's).
STREAM_KEY = "\x00memory"
#: Entry ids of the versions `memory.touch` adds start with this (the history's op).
TOUCH_PREFIX = "touch:"
KINDS = ("put", "delete", "expire")
_TRIMMED = "memlog_trimmed"
_EMPTY = msgpack.packb([], use_bin_type=True)
_ENTRY_COLS = "m.entry_id, m.type, m.key, m.value, m.session_id, m.timestamp, m.ttl, m.tags, m.metadata"


@dataclass(slots=True)
class Change:
    """One change to log: what `memory` tells us, before it has a seq."""

    kind: str
    op: str
    key: str
    origin: str
    hlc: int
    entry_id: str | None
    tags: list[str]
    entry: dict[str, Any] | None = None      # put: the entry as stored (for the live push)
    version: int = 0                         # the change's version at its origin


def limits(store: "Store") -> LogLimits:
    """The store's bounds (`Store(log_limits=...)`)."""
    return store.log_limits


def op_of(entry_id: str) -> str:
    return "touch" if entry_id.startswith(TOUCH_PREFIX) else "set"


def _pack(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True) if v else _EMPTY


def _unpack(b: bytes | None) -> Any:
    return [] if not b else msgpack.unpackb(b, raw=False)


def _entry(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"entry_id": r[0], "type": r[1], "key": r[2], "value": msgpack.unpackb(r[3], raw=False),
            "session_id": r[4], "timestamp": r[5], "ttl": r[6], "tags": _unpack(r[7]),
            "metadata": msgpack.unpackb(r[8], raw=False)}


def public_entry(e: dict[str, Any]) -> dict[str, Any]:
    """The API's fields of an entry record (a replicated record carries more)."""
    return {"entry_id": e["entry_id"], "type": e["type"], "key": e["key"], "value": e["value"],
            "session_id": e["session_id"], "timestamp": e["timestamp"], "ttl": e["ttl"],
            "tags": e["tags"], "metadata": e["metadata"]}


def message(kind: str, op: str, key: str, origin: str, hlc: int, tags: list[str],
            entry: dict[str, Any] | None) -> dict[str, Any]:
    """An event as the local API pushes it (its cursor is the frame's `seq`)."""
    return {"kind": kind, "op": op, "key": key, "origin": origin, "hlc": hlc, "tags": tags,
            "entry": entry}


# --- writing ---------------------------------------------------------------------------------

def record(store: "Store", changes: list[Change]) -> None:
    """Log changes (inside the caller's write transaction): local ones at once, replicated
    ones parked until their origin's earlier changes are all here."""
    if not changes:
        return
    me = store.node_id
    local = [c for c in changes if c.origin == me]
    remote = [c for c in changes if c.origin != me]
    if local:
        append(store, local)
    if remote:
        store.conn.executemany(
            "INSERT OR IGNORE INTO memlog_parked (origin, version, kind, op, key, hlc, entry_id,"
            " tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(c.origin, c.version, c.kind, c.op, c.key, c.hlc, c.entry_id, _pack(c.tags))
             for c in remote])
        store.memlog_parked = True      # the daemon calls flush_parked after the commit


def flush_parked(store: "Store", force: bool = False) -> int:
    """Log the parked changes whose origin this node now holds through their version,
    oldest version first (inside the caller's write transaction); with `force`, or past
    the bound, all of them. How many were logged."""
    c = store.conn
    origins = [r[0] for r in c.execute("SELECT DISTINCT origin FROM memlog_parked")]
    if not origins:
        return 0
    over = c.execute("SELECT COUNT(*) FROM memlog_parked").fetchone()[0] > limits(store).max_rows
    due: list[tuple[Any, ...]] = []
    for origin in origins:
        row = c.execute("SELECT known FROM origins WHERE origin = ?", (origin,)).fetchone()
        known = int(row[0]) if row else 0       # (replication.known, without its import)
        rows = c.execute(
            "SELECT origin, version, kind, op, key, hlc, entry_id, tags FROM memlog_parked "
            "WHERE origin = ? AND (? OR version <= ?) ORDER BY version, key",
            (origin, force or over or origin == store.node_id, known)).fetchall()
        due.extend(rows)
    if not due:
        return 0
    c.executemany("DELETE FROM memlog_parked WHERE origin = ? AND version = ? AND key = ?",
                  [(r[0], r[1], r[4]) for r in due])
    changes: list[Change] = []
    for origin, version, kind, op, key, hlc, entry_id, tags in due:
        entry = None
        if kind == "put":
            row = c.execute(f"SELECT {_ENTRY_COLS} FROM memory m WHERE m.entry_id = ?",
                            (entry_id,)).fetchone()
            if row is None:
                continue        # removed before its turn: its delete (or expire) says so
            entry = _entry(row)
        changes.append(Change(kind, op, key, origin, hlc, entry_id, _unpack(tags), entry,
                              version))
    # Several origins: in HLC order between them (each one's own order is kept).
    changes.sort(key=lambda ch: (ch.hlc, ch.origin, ch.version))
    append(store, changes)
    return len(changes)


def append(store: "Store", changes: list[Change]) -> None:
    """Log changes now, in this order (inside the caller's write transaction), with their
    history rows; trim the log to its bound; queue their live events."""
    c = store.conn
    row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'memlog'").fetchone()
    first = (int(row[0]) if row else 0) + 1
    c.executemany("INSERT INTO memlog (kind, op, key, origin, hlc, entry_id, tags) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?)",
                  [(ch.kind, ch.op, ch.key, ch.origin, ch.hlc, ch.entry_id, _pack(ch.tags))
                   for ch in changes])
    last = first + len(changes) - 1
    lim = limits(store)
    if lim.history_per_key > 0:
        c.executemany("INSERT OR IGNORE INTO memory_history (key, seq, op, origin, hlc, entry_id)"
                      " VALUES (?, ?, ?, ?, ?, ?)",
                      [(ch.key, first + i, ch.op, ch.origin, ch.hlc, ch.entry_id)
                       for i, ch in enumerate(changes)])
        c.executemany(
            "DELETE FROM memory_history WHERE key = ? AND seq <= (SELECT seq FROM "
            "memory_history WHERE key = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            [(k, k, lim.history_per_key) for k in {ch.key for ch in changes}])
    trimmed = trimmed_through(store)
    if last - trimmed > lim.max_rows:
        through = last - lim.max_rows
        c.execute("DELETE FROM memlog WHERE seq <= ?", (through,))
        c.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (_TRIMMED, through))
    if not store.shared:        # (directory mode has no live push: nobody takes events)
        store.events.extend(
            (STREAM_KEY, first + i,
             message(ch.kind, ch.op, ch.key, ch.origin, ch.hlc, ch.tags, ch.entry))
            for i, ch in enumerate(changes))


# --- reading ---------------------------------------------------------------------------------

def head(store: "Store") -> int:
    """The cursor of the newest event (0 when none was ever logged)."""
    row = store.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'memlog'").fetchone()
    return int(row[0]) if row else 0


def trimmed_through(store: "Store") -> int:
    """Events at or below this cursor were trimmed."""
    row = store.conn.execute("SELECT v FROM meta WHERE k = ?", (_TRIMMED,)).fetchone()
    return int(row[0]) if row and isinstance(row[0], int) else 0


def matches(prefix: str | None, tags: frozenset[str] | None, key: str,
            event_tags: Iterable[str]) -> bool:
    """Whether a watcher with this filter wants an event: the key starts with `prefix`,
    and (with `tags`) the entry carries at least one of them."""
    if prefix is not None and not key.startswith(prefix):
        return False
    return not tags or not tags.isdisjoint(event_tags)


def after(store: "Store", cursor: int, limit: int, prefix: str | None = None,
          tags: frozenset[str] | None = None, scan: int = 4096
          ) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """Events after `cursor` that the filter wants, oldest first, at most `limit`, looking
    at `scan` rows at most; and the cursor through which rows were looked at (the caller
    may move past filtered-out rows up to it). A cursor below what was trimmed gives a
    `gap` event first (its cursor is the trimmed-through one): then the watcher re-reads
    what it needs, and the events after the gap follow."""
    c = store.conn
    trimmed = trimmed_through(store)
    if cursor < trimmed:
        return [(trimmed, message("gap", "gap", "", store.node_id, 0, [], None))], trimmed
    sql = ("SELECT l.seq, l.kind, l.op, l.key, l.origin, l.hlc, l.entry_id, l.tags FROM memlog l "
           "WHERE l.seq > ?")
    params: list[Any] = [cursor]
    if prefix:
        sql += " AND substr(l.key, 1, ?) = ?"
        params += [len(prefix), prefix]
    sql += " ORDER BY l.seq LIMIT ?"
    rows = c.execute(sql, (*params, scan)).fetchall()
    out: list[tuple[int, dict[str, Any]]] = []
    through, stopped = cursor, False
    for seq, kind, op, key, origin, hlc, entry_id, packed in rows:
        t = _unpack(packed)
        if matches(prefix, tags, key, t):
            if len(out) >= limit:
                stopped = True
                break
            entry = None
            if kind == "put":
                r = c.execute(f"SELECT {_ENTRY_COLS} FROM memory m WHERE m.entry_id = ?",
                              (entry_id,)).fetchone()
                entry = None if r is None else _entry(r)
            out.append((seq, message(kind, op, key, origin, hlc, t, entry)))
        through = seq
    if not stopped and len(rows) < scan:
        through = max(through, head(store))     # every row after the cursor was looked at
    return out, through


def history(store: "Store", key: str, limit: int) -> list[dict[str, Any]]:
    """The last `limit` versions of `key` as this node saw them, newest first: each
    change's op, origin, HLC and cursor, with the entry while this node still holds it."""
    c = store.conn
    rows = c.execute(
        f"SELECT h.seq, h.op, h.origin, h.hlc, h.entry_id, {_ENTRY_COLS} FROM memory_history h "
        f"LEFT JOIN memory m ON m.entry_id = h.entry_id WHERE h.key = ? "
        f"ORDER BY h.seq DESC LIMIT ?", (key, limit)).fetchall()
    return [{"cursor": r[0], "op": r[1], "key": key, "origin": r[2], "hlc": r[3],
             "entry_id": r[4], "entry": None if r[5] is None else _entry(r[5:])} for r in rows]


def now_iso(store: "Store") -> str:
    """The store's clock as the ISO 8601 text entries carry."""
    return datetime.fromtimestamp(store.now(), tz=timezone.utc).isoformat()
