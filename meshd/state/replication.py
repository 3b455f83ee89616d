"""Replication at the store level: what this node knows, what a peer lacks, and a merge
that gives the same visible state whatever the order, duplication or grouping of records.

- Knowledge is a version vector: for each origin, the highest version up to which this
  node holds every change of that origin (or what superseded it). `digest()` returns it.
  Which claims of a peer may advance it is the replicator's call (`meshd.mesh.replicator`);
  `forget_beyond()` takes back knowledge found to be false.
- `export(origin, after)` lists that origin's records above `after`, oldest first, with
  the version the batch is complete through; records superseded here are not shipped
  (whatever superseded them is shipped under its own origin).
- `apply()` merges records: a session record replaces the row only if its (hlc, origin) is
  greater (last writer wins); a memory entry is added unless a deletion covers it; a
  deletion removes the entries it covers, including ones that arrive later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

from meshd.state import memory

if TYPE_CHECKING:
    from meshd.state.outbox import Outbox
    from meshd.state.store import Store

_SESSION_COLS = ("session_id, agent_name, agent_type, status, started_at, last_ping, human_user, "
                 "location, capabilities, current_task, metadata, host, deleted, origin, version, "
                 "hlc")
_ENTRY_COLS = ("entry_id, key, type, value, session_id, timestamp, ttl, tags, metadata, origin, "
               "version, hlc")


def _pack(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def _unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False)


def known(store: "Store", origin: str) -> int:
    if origin == store.node_id:
        return store.folded_version()
    row = store.conn.execute("SELECT known FROM origins WHERE origin = ?", (origin,)).fetchone()
    return int(row[0]) if row else 0


def origin_count(store: "Store") -> int:
    """How many other origins this node has knowledge of (each is a digest entry)."""
    return int(store.conn.execute("SELECT count(*) FROM origins").fetchone()[0])


def forget_beyond(store: "Store", origin: str, version: int) -> None:
    """Lower our knowledge of `origin` to `version` (inside the caller's write
    transaction): what it claimed beyond was never really held, so it is pulled again."""
    store.conn.execute("UPDATE origins SET known = ? WHERE origin = ? AND known > ?",
                       (version, origin, version))


def digest(store: "Store") -> dict[str, int]:
    """origin -> version through which this node has all of that origin's changes."""
    out = {o: int(k) for o, k in store.conn.execute("SELECT origin, known FROM origins")}
    out[store.node_id] = store.folded_version()
    return out


def export(store: "Store", origin: str, after: int, limit: int = 1000
           ) -> tuple[list[dict[str, Any]], int]:
    """Up to `limit` records of `origin` above version `after`, and the version this answer
    is complete through (the receiver may advance its knowledge to it). Records held
    beyond our knowledge (past a gap, or forged) are not shipped: the answer could not
    claim them, and a receiver drops a batch holding records it does not claim."""
    c = store.conn
    complete = known(store, origin)
    rows: list[tuple[int, dict[str, Any]]] = []
    for r in c.execute(f"SELECT {_SESSION_COLS} FROM sessions WHERE origin = ? AND version > ? "
                       "AND version <= ? ORDER BY version LIMIT ?",
                       (origin, after, complete, limit)):
        rows.append((r[14], {
            "kind": "session", "session_id": r[0], "agent_name": r[1], "agent_type": r[2],
            "status": r[3], "started_at": r[4], "last_ping": r[5], "human_user": r[6],
            "location": r[7], "capabilities": _unpack(r[8]), "current_task": r[9],
            "metadata": _unpack(r[10]), "host": r[11], "deleted": bool(r[12]), "origin": r[13],
            "version": r[14], "hlc": r[15]}))
    for r in c.execute(f"SELECT {_ENTRY_COLS} FROM memory WHERE origin = ? AND version > ? "
                       "AND version <= ? ORDER BY version LIMIT ?",
                       (origin, after, complete, limit)):
        rows.append((r[10], {
            "kind": "entry", "entry_id": r[0], "key": r[1], "type": r[2], "value": _unpack(r[3]),
            "session_id": r[4], "timestamp": r[5], "ttl": r[6], "tags": _unpack(r[7]),
            "metadata": _unpack(r[8]), "origin": r[9], "version": r[10], "hlc": r[11]}))
    for r in c.execute("SELECT key, session_id, origin, version, hlc FROM deletions "
                       "WHERE origin = ? AND version > ? AND version <= ? ORDER BY version "
                       "LIMIT ?", (origin, after, complete, limit)):
        rows.append((r[3], {"kind": "deletion", "key": r[0], "session_id": r[1], "origin": r[2],
                            "version": r[3], "hlc": r[4]}))
    rows.sort(key=lambda x: x[0])
    if len(rows) > limit:
        rows = rows[:limit]
    if rows and (len(rows) == limit):
        through = rows[-1][0]
    else:
        through = complete
    return [r for _, r in rows], through


def apply(store: "Store", outbox: "Outbox", origin: str, after: int, through: int,
          records: list[dict[str, Any]]) -> int:
    """Merge validated records of `origin` (inside the caller's write transaction).
    Returns how many changed the visible state. Knowledge of `origin` advances to
    `through` only if it reached `after`, so a gap is never papered over."""
    changed = 0
    run: list[dict[str, Any]] = []          # consecutive entries, merged together
    for rec in records:
        store.hlc.witness(rec["hlc"])
        kind = rec["kind"]
        if kind == "entry":
            run.append(rec)
            continue
        if run:
            changed += _merge_entries(store, run)
            run = []
        if kind == "session":
            changed += _merge_session(store, outbox, rec)
        elif kind == "deletion":
            changed += _merge_deletion(store, rec)
    if run:
        changed += _merge_entries(store, run)
    if origin != store.node_id and known(store, origin) >= after and through > after:
        store.conn.execute("INSERT INTO origins VALUES (?, ?) ON CONFLICT (origin) DO UPDATE "
                           "SET known = MAX(known, excluded.known)", (origin, through))
    return changed


def _merge_session(store: "Store", outbox: "Outbox", r: dict[str, Any]) -> int:
    row = store.conn.execute("SELECT hlc, origin, host, deleted FROM sessions "
                             "WHERE session_id = ?", (r["session_id"],)).fetchone()
    if row is not None and (row[0], row[1]) >= (r["hlc"], r["origin"]):
        return 0
    if row is None and r["version"] <= known(store, r["origin"]):
        return 0        # we held it or what superseded it: a collected tombstone
    store.conn.execute(
        f"INSERT OR REPLACE INTO sessions ({_SESSION_COLS}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (r["session_id"], r["agent_name"], r["agent_type"], r["status"], r["started_at"],
         r["last_ping"], r["human_user"], r["location"], _pack(r["capabilities"]),
         r["current_task"], _pack(r["metadata"]), r["host"], int(r["deleted"]), r["origin"],
         r["version"], r["hlc"]))
    store.conn.execute("DELETE FROM session_caps WHERE session_id = ?", (r["session_id"],))
    me = store.node_id
    if (row is not None and row[2] == me and not row[3] and not r["deleted"]
            and r["host"] is not None and r["host"] != me):
        outbox.session_moved(r["session_id"], r["host"])    # unread ones follow
    if not r["deleted"]:
        if row is None or row[3]:        # newly known here: what waited for it goes to it
            outbox.release_waiting(r["session_id"], r["host"])
        store.conn.executemany("INSERT OR IGNORE INTO session_caps VALUES (?, ?)",
                               [(cap, r["session_id"]) for cap in r["capabilities"]])
    return 1


def _covered(store: "Store", r: dict[str, Any]) -> bool:
    return store.conn.execute(
        "SELECT 1 FROM deletions WHERE (key IS NULL OR key = ?) "
        "AND (session_id IS NULL OR session_id = ?) AND hlc >= ? LIMIT 1",
        (r["key"], r["session_id"], r["hlc"])).fetchone() is not None


def _merge_entries(store: "Store", run: list[dict[str, Any]]) -> int:
    """Entries in a row (a catch-up chunk is mostly these), less those a deletion covers:
    when no deletion is as recent as the oldest of them (the usual case) none can be, and
    none is looked up."""
    oldest = min(r["hlc"] for r in run)
    if store.conn.execute("SELECT 1 FROM deletions WHERE hlc >= ? LIMIT 1",
                          (oldest,)).fetchone() is not None:
        run = [r for r in run if not _covered(store, r)]
    return memory.insert_entries(store, [(r, r["origin"], r["version"], r["hlc"]) for r in run])


def _merge_deletion(store: "Store", r: dict[str, Any]) -> int:
    cur = store.conn.execute("INSERT OR IGNORE INTO deletions (origin, version, hlc, key, "
                             "session_id) VALUES (?, ?, ?, ?, ?)",
                             (r["origin"], r["version"], r["hlc"], r["key"], r["session_id"]))
    if cur.rowcount == 0:
        return 0
    return 1 if memory.remove_covered(store, r["key"], r["session_id"], r["hlc"]) else 0


def _held_by_all(rows: list[tuple[str, int]], digests: list[dict[str, int]]
                 ) -> list[tuple[str, int]]:
    """The (origin, version) pairs that every version vector covers."""
    return [(o, v) for o, v in rows if all(d.get(o, 0) >= v for d in digests)]


def collect_deletions(store: "Store", before_hlc: int, digests: list[dict[str, int]]) -> int:
    """Drop deletion records older than `before_hlc` that every given version vector
    (one per other member) holds: each member has then removed what they cover, so
    nothing they covered can be shipped back."""
    rows = store.conn.execute("SELECT origin, version FROM deletions WHERE hlc < ?",
                              (before_hlc,)).fetchall()
    gone = _held_by_all(rows, digests)
    store.conn.executemany("DELETE FROM deletions WHERE origin = ? AND version = ?", gone)
    return len(gone)


def collect_sessions(store: "Store", before_hlc: int, digests: list[dict[str, int]]) -> int:
    """Drop session tombstones older than `before_hlc` that every given version vector
    holds. A member whose vector covers a tombstone's (origin, version) holds that
    tombstone or a newer write of the session (a row holds only the latest write), so it
    has no older copy left to ship back; a stale copy that still arrives (a late frame) is
    refused by `_merge_session`, since our vector covers it. A later register of the same
    id is newer than the tombstone and replicates like any new session."""
    rows = store.conn.execute("SELECT origin, version FROM sessions WHERE deleted = 1 "
                              "AND hlc < ?", (before_hlc,)).fetchall()
    gone = _held_by_all(rows, digests)
    for origin, version in gone:
        sid = store.conn.execute("DELETE FROM sessions WHERE origin = ? AND version = ? "
                                 "AND deleted = 1 RETURNING session_id",
                                 (origin, version)).fetchone()
        if sid is not None:
            store.conn.execute("DELETE FROM session_caps WHERE session_id = ?", (sid[0],))
    return len(gone)
