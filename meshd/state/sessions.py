"""The session registry table: register, ping, status, queries and stats.

A session's effective status is OFFLINE when it was unregistered, when it has not pinged
for `stale_after` seconds, or, in a mesh, when the daemon hosting it is not known to be up
(`Store.up_hosts`, kept by the membership: this node and the members alive or suspect). It is computed on read, so it needs no timer, the same record
reads the same on every node that agrees on membership, and a session comes back by
itself when its host does.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from typing import TYPE_CHECKING, Any

import msgpack

from meshd.errors import InvalidArgument
from meshd.state.hlc import ms_to_iso
from meshd.state.paging import page_slice

if TYPE_CHECKING:
    from meshd.state.store import Store

_COLS = ("session_id, agent_name, agent_type, status, started_at, last_ping, human_user, "
         "location, capabilities, current_task, metadata, host")
_HOSTNAME = socket.gethostname()


def _pack(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def _unpack(b: bytes) -> Any:
    return msgpack.unpackb(b, raw=False)


#: SQL for the effective status, with three parameters: the staleness cutoff, whether the
#: hosts are known (a mesh), and the hosts that are up (a JSON list).
_EFFECTIVE = ("CASE WHEN status != 'offline' AND (last_ping < ? OR (? AND host NOT IN "
              "(SELECT value FROM json_each(?)))) THEN 'offline' ELSE status END")


def _row(store: "Store", r: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "session_id": r[0], "agent_name": r[1], "agent_type": r[2], "status": r[12],
        "started_at": r[4], "last_ping": ms_to_iso(r[5] * 1000), "human_user": r[6],
        "location": r[7], "capabilities": _unpack(r[8]), "current_task": r[9],
        "metadata": _unpack(r[10]), "host": r[11],
    }


def _select(store: "Store", where: str = "", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    cutoff = store.now() - store.stale_after
    sql = (f"SELECT {_COLS}, {_EFFECTIVE} AS eff FROM sessions "
           f"WHERE deleted = 0 {where} ORDER BY started_at, session_id")
    up = store.up_hosts
    hosts = (cutoff, up is not None, json.dumps(sorted(up or ())))
    return [_row(store, r) for r in store.conn.execute(sql, (*hosts, *params))]


def register(store: "Store", a: dict[str, Any]) -> dict[str, Any]:
    """Add or replace a session, hosted by this node."""
    version, hlc = store.stamp()
    now = store.now()
    caps = a["capabilities"]
    store.conn.execute(
        f"INSERT OR REPLACE INTO sessions ({_COLS}, deleted, origin, version, hlc) "
        "VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?, NULL, ?, ?, 0, ?, ?, ?)",
        (a["session_id"], a["agent_name"], a["agent_type"], ms_to_iso(now * 1000), now,
         a["human_user"], a["location"] or _HOSTNAME, _pack(caps), _pack(a["metadata"]),
         store.node_id, store.node_id, version, hlc))
    store.conn.execute("DELETE FROM session_caps WHERE session_id = ?", (a["session_id"],))
    store.conn.executemany("INSERT OR IGNORE INTO session_caps VALUES (?, ?)",
                           [(c, a["session_id"]) for c in caps])
    return get(store, {"session_id": a["session_id"]})  # type: ignore[return-value]


def import_session(store: "Store", a: dict[str, Any]) -> bool:
    """Keep a session as another store had it (its status and times), hosted here:
    added when unknown (or forgotten), replaced only by a later last_ping, so importing
    the same record twice changes nothing. True when it changed something."""
    s = a["session"]
    last_ping, started = _epoch(s["last_ping"]), _epoch(s["started_at"])
    if max(last_ping, started) > store.now() + 86400:
        raise InvalidArgument(f"session {s['session_id']}: its times are in the future "
                              f"({s['last_ping']}); it would never go stale")
    row = store.conn.execute("SELECT last_ping, deleted FROM sessions WHERE session_id = ?",
                             (s["session_id"],)).fetchone()
    if row is not None and not row[1] and row[0] >= last_ping:
        return False
    version, hlc = store.stamp()
    caps = s["capabilities"]
    store.conn.execute(
        f"INSERT OR REPLACE INTO sessions ({_COLS}, deleted, origin, version, hlc) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
        (s["session_id"], s["agent_name"], s["agent_type"], s["status"],
         ms_to_iso(started * 1000),
         last_ping, s["human_user"], s["location"] or _HOSTNAME, _pack(caps),
         s["current_task"], _pack(s["metadata"]), store.node_id, store.node_id, version, hlc))
    store.conn.execute("DELETE FROM session_caps WHERE session_id = ?", (s["session_id"],))
    store.conn.executemany("INSERT OR IGNORE INTO session_caps VALUES (?, ?)",
                           [(c, s["session_id"]) for c in caps])
    return True


def _epoch(iso: str) -> float:
    """Seconds since the epoch of an ISO 8601 time (validated); no zone means local time."""
    from datetime import datetime
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidArgument(f"{iso!r} is not a usable time: {exc}") from None


def get(store: "Store", a: dict[str, Any]) -> dict[str, Any] | None:
    rows = _select(store, "AND session_id = ?", (a["session_id"],))
    return rows[0] if rows else None


def exists(store: "Store", session_id: str) -> bool:
    return store.conn.execute("SELECT 1 FROM sessions WHERE session_id = ? AND deleted = 0",
                              (session_id,)).fetchone() is not None


def _update(store: "Store", session_id: str, sets: str, params: tuple[Any, ...]) -> bool:
    version, hlc = store.stamp()
    cur = store.conn.execute(
        f"UPDATE sessions SET {sets}, origin = ?, version = ?, hlc = ? "
        "WHERE session_id = ? AND deleted = 0",
        (*params, store.node_id, version, hlc, session_id))
    if cur.rowcount == 0:
        store.version -= 1          # nothing changed: give the version back
        return False
    return True


def unregister(store: "Store", a: dict[str, Any]) -> bool:
    return _update(store, a["session_id"], "status = 'offline'", ())


def ping(store: "Store", a: dict[str, Any]) -> bool:
    return _update(store, a["session_id"], "last_ping = ?", (store.now(),))


def due_for_keepalive(store: "Store", session_ids: list[str], older_than: float) -> list[str]:
    """Of the given sessions, those hosted here whose last ping is before `older_than`."""
    due: list[str] = []
    for i in range(0, len(session_ids), 500):              # (SQLite's variable limit)
        chunk = session_ids[i:i + 500]
        marks = ",".join("?" * len(chunk))
        due += [r[0] for r in store.conn.execute(
            f"SELECT session_id FROM sessions WHERE session_id IN ({marks}) AND deleted = 0"
            f" AND host = ? AND last_ping < ?", (*chunk, store.node_id, older_than))]
    return due


def update_status(store: "Store", a: dict[str, Any]) -> bool:
    if "current_task" in a:
        return _update(store, a["session_id"], "status = ?, last_ping = ?, current_task = ?",
                       (a["status"], store.now(), a["current_task"]))
    return _update(store, a["session_id"], "status = ?, last_ping = ?", (a["status"], store.now()))


def list_sessions(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    rows = _select(store)
    rows = rows if a["include_offline"] else [r for r in rows if r["status"] != "offline"]
    return page_slice(rows, a)


def find(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    """All given criteria must match. OFFLINE sessions are left out unless asked for by
    status: an agent looking for help wants sessions that can answer."""
    where, params = [], []
    if a["agent_type"] is not None:
        where.append("AND agent_type = ?")
        params.append(a["agent_type"])
    if a["human_user"] is not None:
        where.append("AND human_user = ?")
        params.append(a["human_user"])
    if a["capability"] is not None:
        where.append("AND session_id IN (SELECT session_id FROM session_caps WHERE capability = ?)")
        params.append(a["capability"])
    rows = _select(store, " ".join(where), tuple(params))
    status = a["status"]
    if status is None:
        return page_slice([r for r in rows if r["status"] != "offline"], a)
    return page_slice([r for r in rows if r["status"] == status], a)


def stats(store: "Store", a: dict[str, Any] | None = None) -> dict[str, Any]:
    rows = _select(store)
    return {
        "total_sessions": len(rows),
        "active_sessions": sum(1 for r in rows if r["status"] != "offline"),
        "by_status": dict(Counter(r["status"] for r in rows)),
        "by_agent_type": dict(Counter(r["agent_type"] for r in rows)),
        "by_user": dict(Counter(r["human_user"] for r in rows if r["human_user"] is not None)),
    }


def clear_offline(store: "Store", a: dict[str, Any]) -> int:
    """Forget OFFLINE sessions. The rows stay as tombstones so replication cannot bring
    them back, until every member holds them (`replication.collect_sessions`); their
    capabilities index goes now."""
    cutoff = store.now() - store.stale_after
    ids = [r[0] for r in store.conn.execute(
        "SELECT session_id FROM sessions WHERE deleted = 0 AND "
        "(status = 'offline' OR last_ping < ?)", (cutoff,))]
    for sid in ids:
        version, hlc = store.stamp()
        store.conn.execute("UPDATE sessions SET deleted = 1, origin = ?, version = ?, hlc = ? "
                           "WHERE session_id = ?", (store.node_id, version, hlc, sid))
        store.conn.execute("DELETE FROM session_caps WHERE session_id = ?", (sid,))
    return len(ids)


def local_ids(store: "Store") -> list[str]:
    """Sessions hosted by this node (the inboxes this node keeps)."""
    return [r[0] for r in store.conn.execute(
        "SELECT session_id FROM sessions WHERE host = ? AND deleted = 0", (store.node_id,))]
