"""Shared memory: an entry per set, range deletions, TTL, and indexed reads.

Every `set` adds an immutable entry. A `delete`/`clear` writes a deletion record that
removes the covered entries with an hlc at or below its own (and rejects such entries if
they arrive later from a peer). An entry with a ttl expires at physical(hlc) + ttl, the
same instant on every node; reads hide it at once and `purge_expired` removes it.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import msgpack

from meshd.errors import NotFound
from meshd.state import memlog
from meshd.state.hlc import physical_ms
from meshd.state.paging import page_sql
from meshd.wire.schema import MemoryType

if TYPE_CHECKING:
    from meshd.state.store import Store

_COLS = "m.entry_id, m.type, m.key, m.value, m.session_id, m.timestamp, m.ttl, m.tags, m.metadata"
_LIVE = "(m.expires_ms IS NULL OR m.expires_ms > ?)"
_NEWEST = "ORDER BY m.hlc DESC, m.entry_id DESC"


def _pack(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def _unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False)


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"entry_id": r[0], "type": r[1], "key": r[2], "value": _unpack(r[3]),
            "session_id": r[4], "timestamp": r[5], "ttl": r[6], "tags": _unpack(r[7]),
            "metadata": _unpack(r[8])}


def _now_ms(store: "Store") -> int:
    return int(store.now() * 1000)


def _query(store: "Store", where: str, params: tuple[Any, ...], tail: str = _NEWEST,
           join: str = "") -> list[dict[str, Any]]:
    sql = f"SELECT {_COLS} FROM memory m {join} WHERE {_LIVE} AND {where} {tail}"
    return [_row(r) for r in store.conn.execute(sql, (_now_ms(store), *params))]


#: Idempotent on entry_id: local sets (folded) and replicated entries (merged) alike.
INSERT_ENTRY = ("INSERT OR IGNORE INTO memory (entry_id, key, type, value, session_id, timestamp,"
                " ttl, expires_ms, tags, metadata, origin, version, hlc)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
# Only for an entry this very insert stored: a retried set (same entry_id, new stamp) is
# skipped by the insert above and must not leave a tag row behind.
INSERT_TAG_IF_STORED = ("INSERT OR IGNORE INTO memory_tags SELECT ?, hlc, entry_id FROM memory"
                        " WHERE entry_id = ? AND hlc = ?")
_EMPTY_LIST, _EMPTY_MAP = _pack([]), _pack({})


def entry_row(e: dict[str, Any], origin: str, version: int, hlc: int) -> tuple[Any, ...]:
    """The INSERT_ENTRY parameters of entry `e` stamped (origin, version, hlc)."""
    expires = None if e["ttl"] is None else physical_ms(hlc) + int(e["ttl"] * 1000)
    tags, meta = e["tags"], e["metadata"]
    return (e["entry_id"], e["key"], e["type"], _pack(e["value"]), e["session_id"],
            e["timestamp"], e["ttl"], expires, _pack(tags) if tags else _EMPTY_LIST,
            _pack(meta) if meta else _EMPTY_MAP, origin, version, hlc)


def set_entry(store: "Store", a: dict[str, Any]) -> dict[str, Any]:
    """Add an entry. Idempotent on entry_id, so a client may safely retry a set.

    The answer is only the id: the client already holds the entry it sent, and echoing a
    large value back would cost both sides on every set."""
    e = a["entry"]
    version, hlc = store.stamp()
    if not insert_entries(store, [(e, store.node_id, version, hlc)]):
        store.version -= 1              # a retry of a set we already stored
    return {"entry_id": e["entry_id"]}


def insert_entries(store: "Store", stamped: list[tuple[dict[str, Any], str, int, int]]) -> int:
    """Store entries, each with its stamp (origin, version, hlc), in two statements: the one
    way an entry gets into the table, for a local set, a fold of journaled sets and a
    merge of replicated ones alike. Idempotent on entry_id: an entry already stored (a
    replay, a client's retry, a record received twice) is skipped, and so are its tags
    (an entry id already held with another stamp keeps its own). How many were stored."""
    new = _not_stored(store, stamped)
    rows, tags = [], []
    for e, origin, version, hlc in stamped:
        rows.append(entry_row(e, origin, version, hlc))
        if e["tags"]:
            tags.extend((t, e["entry_id"], hlc) for t in set(e["tags"]))
    before = store.conn.total_changes
    store.conn.executemany(INSERT_ENTRY, rows)
    stored = store.conn.total_changes - before
    if tags and stored:
        store.conn.executemany(INSERT_TAG_IF_STORED, tags)
    if stored != len(new):          # (another entry held one's (origin, version): rare)
        new = [s for s in new if store.conn.execute(
            "SELECT 1 FROM memory WHERE entry_id = ? AND origin = ? AND version = ?",
            (s[0]["entry_id"], s[1], s[2])).fetchone() is not None]
    memlog.record(store, [
        memlog.Change("put", memlog.op_of(e["entry_id"]), e["key"], origin, hlc, e["entry_id"],
                      e["tags"], memlog.public_entry(e), version)
        for e, origin, version, hlc in new])
    return stored


def _not_stored(store: "Store", stamped: list[tuple[dict[str, Any], str, int, int]]
                ) -> list[tuple[dict[str, Any], str, int, int]]:
    """The entries an INSERT OR IGNORE of `stamped` will store: those whose id is not held
    yet, each id once. Asked before the insert, so that exactly the entries stored get
    their change event (a replay or a retry gets none)."""
    ids = list({e["entry_id"] for e, *_ in stamped})
    held: set[str] = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        held.update(r[0] for r in store.conn.execute(
            f"SELECT entry_id FROM memory WHERE entry_id IN ({','.join('?' * len(chunk))})",
            chunk))
    out = []
    for s in stamped:
        eid = s[0]["entry_id"]
        if eid not in held:
            held.add(eid)
            out.append(s)
    return out


def get(store: "Store", a: dict[str, Any]) -> dict[str, Any] | None:
    rows = _query(store, "m.key = ?", (a["key"],), _NEWEST + " LIMIT 1")
    return rows[0] if rows else None


def get_all(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    return _query(store, "m.key = ?", (a["key"],), _NEWEST + page_sql(a))


def _glob(pattern: str) -> str:
    """fnmatch's `[!x]` is GLOB's `[^x]`; the rest (`*`, `?`, `[...]`) is the same."""
    return pattern.replace("[!", "[^")


def search(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    return _query(store, "m.key GLOB ?", (_glob(a["pattern"]),), _NEWEST + page_sql(a))


def by_tags(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    tags = list(dict.fromkeys(a["tags"]))
    if not tags:
        return []
    marks = ",".join("?" * len(tags))
    having = f"HAVING COUNT(*) = {len(tags)}" if a["match_all"] else ""
    where = (f"m.entry_id IN (SELECT entry_id FROM memory_tags WHERE tag IN ({marks}) "
             f"GROUP BY entry_id {having})")
    return _query(store, where, tuple(tags), _NEWEST + page_sql(a))


def by_session(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    return _query(store, "m.session_id = ?", (a["session_id"],), _NEWEST + page_sql(a))


def _delete(store: "Store", key: str | None, session_id: str | None) -> int:
    version, hlc = store.stamp()
    store.conn.execute("INSERT INTO deletions (origin, version, hlc, key, session_id) "
                       "VALUES (?, ?, ?, ?, ?)", (store.node_id, version, hlc, key, session_id))
    return remove_covered(store, key, session_id, hlc, store.node_id, version)


def remove_covered(store: "Store", key: str | None, session_id: str | None, hlc: int,
                   origin: str | None = None, version: int | None = None) -> int:
    """Remove the live entries a deletion covers; returns how many were visible. Each key
    that lost entries gets a `delete` event stamped with the deletion (`origin`, `version`;
    looked up among the deletions when not given)."""
    where, params = ["hlc <= ?"], [hlc]
    if key is not None:
        where.append("key = ?")
        params.append(key)
    if session_id is not None:
        where.append("session_id = ?")
        params.append(session_id)
    cond = " AND ".join(where)
    gone = store.conn.execute(f"SELECT entry_id, tags, hlc, key FROM memory WHERE {cond}",
                              params).fetchall()
    _drop_tags(store, [(r[0], r[1], r[2]) for r in gone])
    live = store.conn.execute(
        f"SELECT COUNT(*) FROM memory WHERE {cond} AND (expires_ms IS NULL OR expires_ms > ?)",
        (*params, _now_ms(store))).fetchone()[0]
    store.conn.execute(f"DELETE FROM memory WHERE {cond}", params)
    if gone:
        if origin is None or version is None:
            row = store.conn.execute(
                "SELECT origin, version FROM deletions WHERE hlc = ? AND key IS ? "
                "AND session_id IS ? LIMIT 1", (hlc, key, session_id)).fetchone()
            origin, version = (row[0], row[1]) if row else (store.node_id, 0)
        by_key: dict[str, set[str]] = {}
        for _, tags, _, k in gone:
            by_key.setdefault(k, set()).update(_unpack(tags))
        memlog.record(store, [memlog.Change("delete", "delete", k, origin, hlc, None,
                                            sorted(t), None, version)
                              for k, t in sorted(by_key.items())])
    return int(live)


def delete(store: "Store", a: dict[str, Any]) -> int:
    return _delete(store, a["key"], a["session_id"])


def clear(store: "Store", a: dict[str, Any]) -> int:
    return _delete(store, None, a["session_id"])


def stats(store: "Store", a: dict[str, Any] | None = None) -> dict[str, Any]:
    now = _now_ms(store)
    live = f"FROM memory m WHERE {_LIVE}"
    c = store.conn
    by_type = {t.value: 0 for t in MemoryType}
    for t, n in c.execute(f"SELECT type, COUNT(*) {live} GROUP BY type", (now,)):
        by_type[t] = n
    return {
        "total_entries": sum(by_type.values()),
        "by_type": by_type,
        "unique_keys": c.execute(f"SELECT COUNT(DISTINCT key) {live}", (now,)).fetchone()[0],
        "unique_sessions": c.execute(f"SELECT COUNT(DISTINCT session_id) {live}",
                                     (now,)).fetchone()[0],
        "unique_tags": c.execute(
            f"SELECT COUNT(DISTINCT t.tag) FROM memory_tags t JOIN memory m USING (entry_id) "
            f"WHERE {_LIVE}", (now,)).fetchone()[0],
    }


def purge_expired(store: "Store", limit: int = 10_000) -> int:
    """Drop entries whose ttl has passed. No tombstone is needed: every node computes the
    same expiry instant from the entry itself. The newest version of a key that expires
    gets an `expire` event (an older one, under a newer version, changed nothing seen)."""
    now = _now_ms(store)
    rows = store.conn.execute(
        "SELECT entry_id, tags, hlc, key, origin FROM memory WHERE expires_ms IS NOT NULL "
        "AND expires_ms <= ? LIMIT ?", (now, limit)).fetchall()
    if rows:
        _drop_tags(store, [(r[0], r[1], r[2]) for r in rows])
        store.conn.executemany("DELETE FROM memory WHERE entry_id = ?", [(r[0],) for r in rows])
        newest: dict[str, tuple[Any, ...]] = {}
        for r in rows:
            if r[3] not in newest or (r[2], r[0]) > (newest[r[3]][2], newest[r[3]][0]):
                newest[r[3]] = r
        changes = []
        for key, (eid, tags, hlc, _, origin) in sorted(newest.items()):
            if store.conn.execute(
                    "SELECT 1 FROM memory WHERE key = ? AND (hlc > ? OR (hlc = ? AND entry_id > ?))"
                    " LIMIT 1", (key, hlc, hlc, eid)).fetchone() is None:
                changes.append(memlog.Change("expire", "expire", key, origin, hlc, eid,
                                             _unpack(tags)))
        if changes:
            memlog.append(store, changes)      # this node's own observation: at once
    return len(rows)


def touch(store: "Store", a: dict[str, Any]) -> dict[str, Any]:
    """Renew the TTL of the key's newest live entry without the client resending it: a new
    version with the same value, type, session, tags and metadata, a fresh stamp and
    timestamp, and `ttl` (None: the entry's own TTL length, counted again from now; an
    entry without one stays without). It replicates like any entry; older versions expire
    under it without a trace. Idempotent on `entry_id` (a retried touch returns the
    version the first one made). NotFound when the key has no live entry."""
    eid = a.get("entry_id") or f"{memlog.TOUCH_PREFIX}{uuid.uuid4()}"
    done = store.conn.execute(f"SELECT {_COLS} FROM memory m WHERE m.entry_id = ?",
                              (eid,)).fetchone()
    if done is not None:
        return _row(done)
    cur = get(store, {"key": a["key"]})
    if cur is None:
        raise NotFound(f"no live entry for key {a['key']!r} to touch")
    e = {**cur, "entry_id": eid, "timestamp": memlog.now_iso(store),
         "ttl": cur["ttl"] if a.get("ttl") is None else a["ttl"]}
    version, hlc = store.stamp()
    insert_entries(store, [(e, store.node_id, version, hlc)])
    return e


def history(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    """The last versions of a key as this node saw them, newest first (memlog.history)."""
    per_key = memlog.limits(store).history_per_key
    limit = per_key if a.get("limit") is None else min(a["limit"], max(per_key, 1))
    return memlog.history(store, a["key"], limit)


def _drop_tags(store: "Store", rows: list[tuple[str, bytes, int]]) -> None:
    """Remove the tag index rows of entries given as (entry_id, packed tags, hlc)."""
    store.conn.executemany("DELETE FROM memory_tags WHERE tag = ? AND hlc = ? AND entry_id = ?",
                           [(t, hlc, eid) for eid, tags, hlc in rows for t in set(_unpack(tags))])
