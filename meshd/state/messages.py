"""Messages: stored once by message_id, listed per recipient in `inbox` with a per-session
sequence number that only grows (the cursor live streams resume from).

Storing is idempotent on message_id, so a retried send or a duplicated delivery never puts
a message in an inbox twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

from meshd.errors import NotFound
from meshd.state import sessions
from meshd.wire.schema import MessageType

if TYPE_CHECKING:
    from meshd.state.store import Store

_COLS = ("m.message_id, m.type, m.from_session, m.to_session, m.subject, m.body, m.data, "
         "m.timestamp, m.in_reply_to")
MAX_THREAD_DEPTH = 10_000


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"message_id": r[0], "type": r[1], "from_session": r[2], "to_session": r[3],
            "subject": r[4], "body": r[5], "data": msgpack.unpackb(r[6], raw=False),
            "timestamp": r[7], "in_reply_to": r[8]}


def _recipients(store: "Store", m: dict[str, Any]) -> list[str]:
    if m["to_session"] is not None:
        return [m["to_session"]]
    return [sid for sid in sessions.local_ids(store) if sid != m["from_session"]]


def check_recipient(store: "Store", m: dict[str, Any]) -> None:
    if m["to_session"] is not None and not sessions.exists(store, m["to_session"]):
        raise NotFound(f"unknown session: {m['to_session']}")


def send(store: "Store", a: dict[str, Any], hlc: int | None = None) -> dict[str, Any]:
    """Store a message and put it in its recipients' inboxes (every local session but the
    sender for a broadcast). A direct message to an unknown session is an error. The
    answer is the id and how many inboxes got it (0 for a retry already stored)."""
    m = a["message"]
    check_recipient(store, m)
    hlc = store.hlc.now() if hlc is None else hlc
    cur = store.conn.execute(
        "INSERT OR IGNORE INTO messages (message_id, type, from_session, to_session, subject, body, data,"
        " timestamp, in_reply_to, origin, hlc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (m["message_id"], m["type"], m["from_session"], m["to_session"], m["subject"], m["body"],
         msgpack.packb(m["data"], use_bin_type=True), m["timestamp"], m["in_reply_to"],
         store.node_id, hlc))
    if cur.rowcount == 0:                           # a retry: already stored and delivered
        return {"message_id": m["message_id"], "delivered": 0}
    store.events.append((None, int(cur.lastrowid or 0), m))
    recipients = _recipients(store, m)
    for sid in recipients:
        seq = _next_inbox_seq(store, sid)
        store.conn.execute("INSERT INTO inbox (session_id, seq, message_id) VALUES (?, ?, ?)",
                           (sid, seq, m["message_id"]))
        store.events.append((sid, seq, m))
    return {"message_id": m["message_id"], "delivered": len(recipients)}


def _next_inbox_seq(store: "Store", session_id: str) -> int:
    return int(store.conn.execute(
        "INSERT INTO inbox_heads VALUES (?, 1) ON CONFLICT (session_id) "
        "DO UPDATE SET last = last + 1 RETURNING last", (session_id,)).fetchone()[0])


def list_inbox(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    where, params = ["i.session_id = ?"], [a["session_id"]]
    if not a["include_broadcasts"]:
        where.append("m.to_session IS NOT NULL")
    if a["message_type"] is not None:
        where.append("m.type = ?")
        params.append(a["message_type"])
    if a["unread_only"]:
        where.append("i.read = 0")
    sql = (f"SELECT {_COLS} FROM inbox i JOIN messages m ON m.message_id = i.message_id "
           f"WHERE {' AND '.join(where)} ORDER BY i.seq")
    return [_row(r) for r in store.conn.execute(sql, params)]


def conversation(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    """The thread: walk up in_reply_to to the root, then every reply below it, root first."""
    c = store.conn
    current = a["message_id"]
    if c.execute("SELECT 1 FROM messages WHERE message_id = ?", (current,)).fetchone() is None:
        return []
    seen = {current}
    for _ in range(MAX_THREAD_DEPTH):
        row = c.execute("SELECT in_reply_to FROM messages WHERE message_id = ?",
                        (current,)).fetchone()
        parent = row[0] if row else None
        if parent is None or parent in seen or c.execute(
                "SELECT 1 FROM messages WHERE message_id = ?", (parent,)).fetchone() is None:
            break
        seen.add(parent)
        current = parent
    sql = (f"WITH RECURSIVE thread(id) AS (SELECT ? UNION "
           f"SELECT m.message_id FROM messages m JOIN thread t ON m.in_reply_to = t.id) "
           f"SELECT {_COLS} FROM messages m JOIN thread t ON m.message_id = t.id "
           f"ORDER BY (m.message_id = ?) DESC, m.seq")
    return [_row(r) for r in c.execute(sql, (current, current))]


def mark_read(store: "Store", a: dict[str, Any]) -> int:
    """Mark the given messages (all when none are given) of a session's inbox as read."""
    if a["message_ids"]:
        cur = store.conn.executemany(
            "UPDATE inbox SET read = 1 WHERE session_id = ? AND message_id = ? AND read = 0",
            [(a["session_id"], mid) for mid in a["message_ids"]])
    else:
        cur = store.conn.execute("UPDATE inbox SET read = 1 WHERE session_id = ? AND read = 0",
                                 (a["session_id"],))
    return max(cur.rowcount, 0)


def stats(store: "Store", a: dict[str, Any] | None = None) -> dict[str, Any]:
    by_type = {t.value: 0 for t in MessageType}
    for t, n in store.conn.execute("SELECT type, COUNT(*) FROM messages GROUP BY type"):
        by_type[t] = n
    return {"total_messages": sum(by_type.values()), "by_type": by_type,
            "active_sessions": sessions.stats(store)["active_sessions"]}


# --- stream reads (the IPC layer's live push) -------------------------------------------------

def head(store: "Store", session_id: str | None) -> int:
    """The current cursor of a session's inbox, or of the node-wide message log."""
    if session_id is None:
        row = store.conn.execute("SELECT MAX(seq) FROM messages").fetchone()
    else:
        row = store.conn.execute("SELECT last FROM inbox_heads WHERE session_id = ?",
                                 (session_id,)).fetchone()
    return int(row[0] or 0) if row else 0


def after(store: "Store", session_id: str | None, cursor: int, limit: int,
          types: list[str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Events after `cursor`, oldest first, at most `limit`."""
    type_filter, params = "", []
    if types:
        type_filter = f"AND m.type IN ({','.join('?' * len(types))})"
        params = list(types)
    if session_id is None:
        sql = (f"SELECT m.seq, {_COLS} FROM messages m WHERE m.seq > ? {type_filter} "
               f"ORDER BY m.seq LIMIT ?")
        rows = store.conn.execute(sql, (cursor, *params, limit))
    else:
        sql = (f"SELECT i.seq, {_COLS} FROM inbox i JOIN messages m ON m.message_id = i.message_id"
               f" WHERE i.session_id = ? AND i.seq > ? {type_filter} ORDER BY i.seq LIMIT ?")
        rows = store.conn.execute(sql, (session_id, cursor, *params, limit))
    return [(r[0], _row(r[1:])) for r in rows]
