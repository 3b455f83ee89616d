"""Local mail: messages stored once by message_id, listed per recipient in `inbox` with a
per-session sequence number that only grows (the cursor live streams resume from), threads,
read marks, and what a sender can see of where its messages stand.

Storing is idempotent on message_id, so a retried send or a duplicated delivery never puts
a message in an inbox twice. Whatever must leave this daemon (a message for a session
hosted elsewhere, a read receipt for the daemon a message came from) is handed to the
`Outbox` (`meshd.state.outbox`), the one place that knows where sessions are hosted and
how items are queued, sent and acknowledged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

from meshd.state import sessions
from meshd.state.paging import page_sql
from meshd.wire.schema import MessageType

if TYPE_CHECKING:
    from meshd.state.outbox import Outbox
    from meshd.state.store import Store

COLS = ("m.message_id, m.type, m.from_session, m.to_session, m.subject, m.body, m.data, "
        "m.timestamp, m.in_reply_to, m.priority")
MAX_THREAD_DEPTH = 10_000

_STATE_RANK = {"waiting": -1, "queued": 0, "stored": 1, "read": 2}


def row(r: tuple[Any, ...]) -> dict[str, Any]:
    """A message as the API gives it, from the first ten columns of `COLS`."""
    return {"message_id": r[0], "type": r[1], "from_session": r[2], "to_session": r[3],
            "subject": r[4], "body": r[5], "data": msgpack.unpackb(r[6], raw=False),
            "timestamp": r[7], "in_reply_to": r[8], "priority": r[9]}


def send(store: "Store", outbox: "Outbox", a: dict[str, Any], hlc: int | None = None,
         routes: list[list[Any]] | None = None) -> dict[str, Any]:
    """Store a message, put it in the inboxes of its local recipients (every local session
    but the sender for a broadcast) and queue it for the daemons hosting the others.
    `routes` ([dest, lane, seq] each) is what the outbox planned when the send was
    journaled (`Outbox.plan`): exactly those are queued then. A direct message to a
    session id no daemon knows yet waits in that id's inbox here (see
    `Outbox.release_waiting`). The answer is the id, how many local inboxes got it, how
    many daemons it was queued for (0, 0 for a retry) and whether it waits."""
    m = a["message"]
    hlc = store.hlc.now() if hlc is None else hlc
    priority = m.get("priority", "normal")
    cur = insert(store, m, store.node_id, hlc, priority)
    now_ms = int(store.now() * 1000)
    if cur.rowcount == 0:                           # a retry: already stored and delivered
        # Its seqs may be on the wire already: queue them (the destination ignores a
        # message id it has), so that no seq is ever missing from the outbox.
        outbox.requeue(m, routes or (), now_ms)
        return {"message_id": m["message_id"], "delivered": 0, "queued": 0}
    store.events.append((None, int(cur.lastrowid or 0), m))
    hosts = outbox.hosts(m["to_session"]) if routes is None else [r[0] for r in routes]
    if m["to_session"] is not None:
        local = [] if hosts else [m["to_session"]]
    else:
        local = [sid for sid in sessions.local_ids(store) if sid != m["from_session"]]
    for sid in local:
        to_inbox(store, sid, m)
    waiting = (m["to_session"] is not None and local == [m["to_session"]]
               and not sessions.exists(store, m["to_session"]))
    if waiting:
        store.conn.execute("INSERT OR IGNORE INTO waiting VALUES (?, ?, ?)",
                           (m["message_id"], m["to_session"], now_ms))
    outbox.queue_sent(m, hlc, hosts, routes, now_ms)
    return {"message_id": m["message_id"], "delivered": 0 if waiting else len(local),
            "queued": len(hosts), "waiting": waiting}


def insert(store: "Store", m: dict[str, Any], origin: str, hlc: int, priority: str) -> Any:
    """Store a message once by id (INSERT OR IGNORE: rowcount 0 means it was there)."""
    return store.conn.execute(
        "INSERT OR IGNORE INTO messages (message_id, type, from_session, to_session, subject, body,"
        " data, timestamp, in_reply_to, origin, hlc, priority)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (m["message_id"], m["type"], m["from_session"], m["to_session"], m["subject"], m["body"],
         msgpack.packb(m["data"], use_bin_type=True), m["timestamp"], m["in_reply_to"],
         origin, hlc, priority))


def to_inbox(store: "Store", session_id: str, m: dict[str, Any],
             heads: dict[str, int] | None = None) -> None:
    """Append to a session's inbox. With `heads`, a session's first message takes its
    seq from SQLite as usual and the next ones are counted in `heads`, written once by
    `save_heads` (a frame of routed messages costs two head updates per session at
    most, not one per message). In `heads`, a negative head is already in SQLite."""
    last = heads.get(session_id) if heads is not None else None
    if last is None:
        seq = _next_inbox_seq(store, session_id)
        if heads is not None:
            heads[session_id] = -seq         # (negative: written already)
    else:
        seq = heads[session_id] = abs(last) + 1
    store.conn.execute("INSERT INTO inbox (session_id, seq, message_id) VALUES (?, ?, ?)",
                       (session_id, seq, m["message_id"]))
    store.events.append((session_id, seq, m))


def _next_inbox_seq(store: "Store", session_id: str) -> int:
    return int(store.conn.execute(
        "INSERT INTO inbox_heads VALUES (?, 1) ON CONFLICT (session_id) "
        "DO UPDATE SET last = last + 1 RETURNING last", (session_id,)).fetchone()[0])


def save_heads(store: "Store", heads: dict[str, int]) -> None:
    behind = [(sid, last) for sid, last in heads.items() if last > 0]
    if behind:
        store.conn.executemany("INSERT INTO inbox_heads VALUES (?, ?) ON CONFLICT (session_id) "
                               "DO UPDATE SET last = excluded.last", behind)


def stored_for(store: "Store", message_id: str) -> str | None:
    """The recipient a stored message was addressed to (None: a broadcast or unknown)."""
    r = store.conn.execute("SELECT to_session FROM messages WHERE message_id = ?",
                           (message_id,)).fetchone()
    return r[0] if r else None


def in_inbox(store: "Store", session_id: str, message_id: str) -> bool:
    return store.conn.execute("SELECT 1 FROM inbox WHERE session_id = ? AND message_id = ?",
                              (session_id, message_id)).fetchone() is not None


def list_inbox(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    where, params = ["i.session_id = ?"], [a["session_id"]]
    if not a["include_broadcasts"]:
        where.append("m.to_session IS NOT NULL")
    if a["message_type"] is not None:
        where.append("m.type = ?")
        params.append(a["message_type"])
    if a["unread_only"]:
        where.append("i.read = 0")
    sql = (f"SELECT {COLS} FROM inbox i JOIN messages m ON m.message_id = i.message_id "
           f"WHERE {' AND '.join(where)} ORDER BY m.priority = 'high' DESC, i.seq{page_sql(a)}")
    return [row(r) for r in store.conn.execute(sql, params)]


def conversation(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    """The thread: walk up in_reply_to to the root, then every reply below it, root first."""
    c = store.conn
    current = a["message_id"]
    if c.execute("SELECT 1 FROM messages WHERE message_id = ?", (current,)).fetchone() is None:
        return []
    seen = {current}
    for _ in range(MAX_THREAD_DEPTH):
        r = c.execute("SELECT in_reply_to FROM messages WHERE message_id = ?",
                      (current,)).fetchone()
        parent = r[0] if r else None
        if parent is None or parent in seen or c.execute(
                "SELECT 1 FROM messages WHERE message_id = ?", (parent,)).fetchone() is None:
            break
        seen.add(parent)
        current = parent
    sql = (f"WITH RECURSIVE thread(id) AS (SELECT ? UNION "
           f"SELECT m.message_id FROM messages m JOIN thread t ON m.in_reply_to = t.id) "
           f"SELECT {COLS} FROM messages m JOIN thread t ON m.message_id = t.id "
           f"ORDER BY (m.message_id = ?) DESC, m.seq")
    return [row(r) for r in c.execute(sql, (current, current))]


def mark_read(store: "Store", outbox: "Outbox", a: dict[str, Any]) -> int:
    """Mark the given messages (all when none are given) of a session's inbox as read; the
    daemons that sent them from elsewhere get a read receipt."""
    where, params = "session_id = ? AND read = 0", [a["session_id"]]
    if a["message_ids"]:
        where += f" AND message_id IN ({','.join('?' * len(a['message_ids']))})"
        params += list(dict.fromkeys(a["message_ids"]))
    ids = [r[0] for r in store.conn.execute(f"SELECT message_id FROM inbox WHERE {where}",
                                            params)]
    if not ids:
        return 0
    store.conn.execute(f"UPDATE inbox SET read = 1 WHERE {where}", params)
    now_ms = int(store.now() * 1000)
    marks = ",".join("?" * len(ids))
    # Sent from here to this session, which has since moved here: the receipts are ours.
    store.conn.execute(
        f"UPDATE receipts SET state = 'read', at_ms = ? WHERE state IN ('queued', 'stored') "
        f"AND message_id IN (SELECT message_id FROM messages WHERE message_id IN ({marks}) "
        f"AND to_session = ? AND origin = ?)", (now_ms, *ids, a["session_id"], store.node_id))
    for mid, origin in store.conn.execute(
            f"SELECT message_id, origin FROM messages WHERE message_id IN ({marks}) "
            f"AND origin != ?", (*ids, store.node_id)).fetchall():
        outbox.queue_receipt(origin, mid, now_ms)
    return len(ids)


# --- what the sender can see ---------------------------------------------------------------------

def status(store: "Store", a: dict[str, Any]) -> dict[str, Any] | None:
    """Where a message stands: per recipient daemon queued, stored, read or expired (and
    for local recipients stored or read), and the least advanced of those overall."""
    r = store.conn.execute(f"SELECT {COLS} FROM messages m WHERE m.message_id = ?",
                           (a["message_id"],)).fetchone()
    if r is None:
        return None
    return _with_status(store, row(r))


def _with_status(store: "Store", m: dict[str, Any]) -> dict[str, Any]:
    """Receipts per daemon; "waiting" while no daemon knows the recipient (node None), and
    "expired" with node None when it waited too long."""
    states = [{"node": n or None, "state": st, "at_ms": at} for n, st, at in store.conn.execute(
        "SELECT node, state, at_ms FROM receipts WHERE message_id = ? ORDER BY node",
        (m["message_id"],))]
    wait = store.conn.execute("SELECT to_session, queued_ms FROM waiting WHERE message_id = ?",
                              (m["message_id"],)).fetchone()
    if wait is not None:
        states.append({"node": None, "session_id": wait[0], "state": "waiting",
                       "at_ms": wait[1]})
    for sid, read in store.conn.execute(
            "SELECT session_id, read FROM inbox WHERE message_id = ? ORDER BY session_id",
            (m["message_id"],)):
        if wait is not None and sid == wait[0]:
            continue
        states.append({"node": store.node_id, "session_id": sid,
                       "state": "read" if read else "stored", "at_ms": None})
    ranks = [_STATE_RANK.get(s["state"], -1) for s in states]
    if not states:
        overall = "stored"               # a broadcast with nobody else to reach
    elif any(s["state"] == "expired" for s in states):
        overall = "expired"
    else:
        overall = next(k for k, v in _STATE_RANK.items() if v == min(ranks))
    return {"message": m, "state": overall, "deliveries": states}


def sent(store: "Store", a: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages a session sent through this daemon, oldest first, with their state."""
    rows = store.conn.execute(
        f"SELECT {COLS} FROM messages m WHERE m.from_session = ? AND m.origin = ? "
        f"ORDER BY m.seq{page_sql(a)}", (a["session_id"], store.node_id)).fetchall()
    return [_with_status(store, row(r)) for r in rows]


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
        r = store.conn.execute("SELECT MAX(seq) FROM messages").fetchone()
    else:
        r = store.conn.execute("SELECT last FROM inbox_heads WHERE session_id = ?",
                               (session_id,)).fetchone()
    return int(r[0] or 0) if r else 0


def after(store: "Store", session_id: str | None, cursor: int, limit: int,
          types: list[str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """Events after `cursor`, oldest first, at most `limit`."""
    type_filter, params = "", []
    if types:
        type_filter = f"AND m.type IN ({','.join('?' * len(types))})"
        params = list(types)
    if session_id is None:
        sql = (f"SELECT m.seq, {COLS} FROM messages m WHERE m.seq > ? {type_filter} "
               f"ORDER BY m.seq LIMIT ?")
        rows = store.conn.execute(sql, (cursor, *params, limit))
    else:
        sql = (f"SELECT i.seq, {COLS} FROM inbox i JOIN messages m ON m.message_id = i.message_id"
               f" WHERE i.session_id = ? AND i.seq > ? {type_filter} ORDER BY i.seq LIMIT ?")
        rows = store.conn.execute(sql, (session_id, cursor, *params, limit))
    return [(r[0], row(r[1:])) for r in rows]
