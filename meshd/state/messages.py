"""Messages: stored once by message_id, listed per recipient in `inbox` with a per-session
sequence number that only grows (the cursor live streams resume from).

Storing is idempotent on message_id, so a retried send or a duplicated delivery never puts
a message in an inbox twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

from meshd.state import sessions
from meshd.state.paging import page_sql
from meshd.wire.schema import MessageType

if TYPE_CHECKING:
    from meshd.state.store import Routed, Store

_COLS = ("m.message_id, m.type, m.from_session, m.to_session, m.subject, m.body, m.data, "
         "m.timestamp, m.in_reply_to, m.priority")
MAX_THREAD_DEPTH = 10_000


#: Outbox lanes: high-priority items overtake queued normal ones.
LANES = {"high": 0, "normal": 1}
_STATE_RANK = {"waiting": -1, "queued": 0, "stored": 1, "read": 2}


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"message_id": r[0], "type": r[1], "from_session": r[2], "to_session": r[3],
            "subject": r[4], "body": r[5], "data": msgpack.unpackb(r[6], raw=False),
            "timestamp": r[7], "in_reply_to": r[8], "priority": r[9]}


def _route(store: "Store", m: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(local sessions whose inbox gets it, other daemons it must be routed to). A direct
    message goes where its recipient is hosted; a broadcast to every local session but
    the sender, and once to every other daemon that hosts a session."""
    me = store.node_id
    if m["to_session"] is not None:
        row = store.conn.execute("SELECT host FROM sessions WHERE session_id = ? AND deleted = 0",
                                 (m["to_session"],)).fetchone()
        if row is None or row[0] == me:
            return [m["to_session"]], []
        return [], [row[0]]
    local = [sid for sid in sessions.local_ids(store) if sid != m["from_session"]]
    hosts = [r[0] for r in store.conn.execute(
        "SELECT DISTINCT host FROM sessions WHERE deleted = 0 AND host != ?", (me,))]
    return local, hosts


def plan(store: "Store", a: dict[str, Any], hlc: int) -> list[Routed]:
    """Daemon, loop thread, when a send is journaled: decide now which daemons the message
    goes to and give it its outbox seq per destination (kept in `a["_routes"]`, so the
    fold queues exactly these), so the router can send it before the fold. The answer is
    the routed items, to hand to the router once the journal holds the send.

    Deciding here gives what the fold would decide: the sessions table only changes in
    `Store.write`, which folds every journaled send first and empties the host cache."""
    m = a["message"]
    hosts = _remote_hosts(store, m["to_session"])
    priority = m.get("priority", "normal")
    lane = LANES.get(priority, 1)
    routes: list[list[Any]] = []
    out: list[Routed] = []
    if hosts:
        payload = _routed_payload(m, store.node_id, hlc, priority)
        for host in hosts:
            seq = next_seq(store, host, lane)
            routes.append([host, lane, seq])
            out.append((host, lane, [seq, "msg", payload]))
    a["_routes"] = routes
    return out


def _remote_hosts(store: "Store", to_session: str | None) -> tuple[str, ...]:
    """The other daemons hosting `to_session` (None: any session), from SQLite through a
    cache that every `Store.write` empties (see `Store.route_hosts`)."""
    cache = store.route_hosts
    if cache is None:
        cache = store.route_hosts = {}
    hosts = cache.get(to_session)
    if hosts is None:
        me = store.node_id
        with store.lock:
            if to_session is not None:
                row = store.conn.execute(
                    "SELECT host FROM sessions WHERE session_id = ? AND deleted = 0",
                    (to_session,)).fetchone()
                hosts = (row[0],) if row is not None and row[0] != me else ()
            else:
                hosts = tuple(r[0] for r in store.conn.execute(
                    "SELECT DISTINCT host FROM sessions WHERE deleted = 0 AND host != ?", (me,)))
        cache[to_session] = hosts
    return hosts


def send(store: "Store", a: dict[str, Any], hlc: int | None = None) -> dict[str, Any]:
    """Store a message, put it in the inboxes of its local recipients (every local session
    but the sender for a broadcast) and queue it for the daemons hosting the others (as
    `plan` decided when it was journaled, if it was). A direct message to a session id
    no daemon knows yet waits in that id's inbox here (see `release_waiting`). The answer
    is the id, how many local inboxes got it, how many daemons it was queued for (0, 0
    for a retry) and whether it waits for its recipient."""
    m = a["message"]
    planned = a.get("_routes")
    hlc = store.hlc.now() if hlc is None else hlc
    priority = m.get("priority", "normal")
    cur = _insert(store, m, store.node_id, hlc, priority)
    now_ms = int(store.now() * 1000)
    if cur.rowcount == 0:                           # a retry: already stored and delivered
        for host, lane, seq in planned or ():
            # Its seqs may be on the wire already: queue them (the destination ignores a
            # message id it has), so that no seq is ever missing from the outbox.
            enqueue(store, host, lane, "msg", m["message_id"], now_ms, seq)
        return {"message_id": m["message_id"], "delivered": 0, "queued": 0}
    store.events.append((None, int(cur.lastrowid or 0), m))
    if planned is None:
        local, hosts = _route(store, m)
        lane = LANES.get(priority, 1)
        remote: list[Any] = [(h, lane, None) for h in hosts]
    else:
        remote = planned
        if m["to_session"] is not None:
            local = [] if planned else [m["to_session"]]
        else:
            local = [sid for sid in sessions.local_ids(store) if sid != m["from_session"]]
    for sid in local:
        _to_inbox(store, sid, m)
    waiting = (m["to_session"] is not None and local == [m["to_session"]]
               and not sessions.exists(store, m["to_session"]))
    if waiting:
        store.conn.execute("INSERT OR IGNORE INTO waiting VALUES (?, ?, ?)",
                           (m["message_id"], m["to_session"], now_ms))
    payload = None
    for host, lane, planned_seq in remote:
        seq = enqueue(store, host, lane, "msg", m["message_id"], now_ms, planned_seq)
        store.conn.execute("INSERT OR REPLACE INTO receipts VALUES (?, ?, 'queued', ?)",
                           (m["message_id"], host, now_ms))
        if planned_seq is None and store.routed is not None:   # (planned: router has it)
            if payload is None:
                payload = _routed_payload(m, store.node_id, hlc, priority)
            store.routed.append((host, lane, [seq, "msg", payload]))
    return {"message_id": m["message_id"], "delivered": 0 if waiting else len(local),
            "queued": len(remote), "waiting": waiting}


def _routed_payload(m: dict[str, Any], origin: str, hlc: int, priority: str) -> dict[str, Any]:
    """A message as `outbox_items` reads it back for routing (same fields, same values)."""
    return {"message_id": m["message_id"], "type": m["type"], "from_session": m["from_session"],
            "to_session": m["to_session"], "subject": m["subject"], "body": m["body"],
            "data": m["data"], "timestamp": m["timestamp"], "in_reply_to": m["in_reply_to"],
            "priority": priority, "origin": origin, "hlc": hlc}


def _insert(store: "Store", m: dict[str, Any], origin: str, hlc: int, priority: str) -> Any:
    """Store a message once by id (INSERT OR IGNORE: rowcount 0 means it was there)."""
    return store.conn.execute(
        "INSERT OR IGNORE INTO messages (message_id, type, from_session, to_session, subject, body,"
        " data, timestamp, in_reply_to, origin, hlc, priority)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (m["message_id"], m["type"], m["from_session"], m["to_session"], m["subject"], m["body"],
         msgpack.packb(m["data"], use_bin_type=True), m["timestamp"], m["in_reply_to"],
         origin, hlc, priority))


def _to_inbox(store: "Store", session_id: str, m: dict[str, Any],
              heads: dict[str, int] | None = None) -> None:
    """Append to a session's inbox. With `heads`, a session's first message takes its
    seq from SQLite as usual and the next ones are counted in `heads`, written once by
    `_save_heads` (a frame of routed messages costs two head updates per session at
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


def _save_heads(store: "Store", heads: dict[str, int]) -> None:
    behind = [(sid, last) for sid, last in heads.items() if last > 0]
    if behind:
        store.conn.executemany("INSERT INTO inbox_heads VALUES (?, ?) ON CONFLICT (session_id) "
                               "DO UPDATE SET last = excluded.last", behind)


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
           f"WHERE {' AND '.join(where)} ORDER BY m.priority = 'high' DESC, i.seq{page_sql(a)}")
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
        seq = enqueue(store, origin, LANES["normal"], "read", mid, now_ms)
        if store.routed is not None:
            store.routed.append((origin, LANES["normal"], [seq, "read", mid]))
    return len(ids)


# --- routing: the outbox (sender's side) and in-order delivery (receiver's side) ---------------

def next_seq(store: "Store", dest: str, lane: int) -> int:
    """The next outbox seq for (dest, lane), from the counters in memory (daemon with a
    router: seqs are given when sends are journaled, before their fold). Loop thread
    only; a counter is read from `outbox_heads` the first time, when every seq given
    before is committed (journaled sends are folded before the daemon serves)."""
    seqs = store.outbox_seqs
    assert seqs is not None
    key = (dest, lane)
    last = seqs.get(key)
    if last is None:
        with store.lock:
            row = store.conn.execute("SELECT last FROM outbox_heads WHERE dest = ? AND lane = ?",
                                     key).fetchone()
        last = int(row[0]) if row else 0
    seqs[key] = last + 1
    return last + 1


def enqueue(store: "Store", dest: str, lane: int, kind: str, message_id: str,
            now_ms: int, seq: int | None = None) -> int:
    """Queue an item for `dest` with the seq given (planned), or the next one."""
    if seq is None and store.outbox_seqs is not None:
        seq = next_seq(store, dest, lane)
    if seq is None:
        seq = int(store.conn.execute(
            "INSERT INTO outbox_heads VALUES (?, ?, 1) ON CONFLICT (dest, lane) "
            "DO UPDATE SET last = last + 1 RETURNING last", (dest, lane)).fetchone()[0])
    else:
        store.conn.execute("INSERT INTO outbox_heads VALUES (?, ?, ?) ON CONFLICT (dest, lane) "
                           "DO UPDATE SET last = MAX(last, excluded.last)", (dest, lane, seq))
    # OR IGNORE: folding a journaled send twice (a crash before its segment was emptied).
    store.conn.execute("INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?, ?, ?)",
                       (dest, lane, seq, kind, message_id, now_ms))
    return seq


def outbox_destinations(store: "Store") -> list[tuple[str, int, int, int, int, int]]:
    """(dest, lane, items, first seq, last seq, oldest queued_ms) for every non-empty
    queue, high-priority lanes first."""
    return [tuple(r) for r in store.conn.execute(  # type: ignore[misc]
        "SELECT dest, lane, COUNT(*), MIN(seq), MAX(seq), MIN(queued_ms) FROM outbox "
        "GROUP BY dest, lane ORDER BY lane, dest")]


def outbox_first(store: "Store", dest: str, lane: int) -> int | None:
    """The oldest committed seq queued for (dest, lane), None when none is."""
    row = store.conn.execute("SELECT MIN(seq) FROM outbox WHERE dest = ? AND lane = ?",
                             (dest, lane)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def outbox_items(store: "Store", dest: str, lane: int, after: int, limit: int
                 ) -> list[list[Any]]:
    """Up to `limit` queued items for `dest` above seq `after`, as [seq, kind, payload]:
    the routed message (with origin, clock stamp and priority) or the id of a read one."""
    out: list[list[Any]] = []
    rows = store.conn.execute(
        "SELECT seq, kind, message_id FROM outbox WHERE dest = ? AND lane = ? AND seq > ? "
        "ORDER BY seq LIMIT ?", (dest, lane, after, limit)).fetchall()
    for seq, kind, mid in rows:
        if kind == "read":
            out.append([seq, kind, mid])
            continue
        r = store.conn.execute(f"SELECT {_COLS}, m.origin, m.hlc FROM messages m "
                               f"WHERE m.message_id = ?", (mid,)).fetchone()
        if r is None:                    # cannot happen (messages are never deleted) - skip
            continue
        payload = _row(r[:10])
        payload["origin"], payload["hlc"] = r[10], r[11]
        out.append([seq, kind, payload])
    return out


def outbox_acked(store: "Store", dest: str, lane: int, through: int) -> int:
    """The destination applied everything up to `through`: those items leave the outbox
    and their messages read as stored there."""
    now_ms = int(store.now() * 1000)
    store.conn.execute(
        "UPDATE receipts SET state = 'stored', at_ms = ? WHERE node = ? AND state = 'queued' AND "
        "message_id IN (SELECT message_id FROM outbox WHERE dest = ? AND lane = ? AND seq <= ? "
        "AND kind = 'msg')", (now_ms, dest, dest, lane, through))
    cur = store.conn.execute("DELETE FROM outbox WHERE dest = ? AND lane = ? AND seq <= ?",
                             (dest, lane, through))
    return max(cur.rowcount, 0)


def expire_outbox(store: "Store", max_age_ms: int, max_items: int, only: str | None = None
                  ) -> list[tuple[str, str, str]]:
    """Drop queued items older than `max_age_ms`, or beyond `max_items` per destination
    (oldest first), or every item for destination `only` when given; their messages
    read as expired there (messages sent from here). Returns (message_id, dest, kind)
    for every item dropped, to be reported."""
    now_ms = int(store.now() * 1000)
    if only is not None:
        doomed = store.conn.execute("SELECT dest, lane, seq, kind, message_id FROM outbox "
                                    "WHERE dest = ?", (only,)).fetchall()
    else:
        doomed = store.conn.execute(
            "SELECT dest, lane, seq, kind, message_id FROM outbox WHERE queued_ms < ?",
            (now_ms - max_age_ms,)).fetchall()
    for dest, n in store.conn.execute(
            "SELECT dest, COUNT(*) FROM outbox GROUP BY dest HAVING COUNT(*) > ?",
            (max_items,)).fetchall() if only is None else ():
        doomed += store.conn.execute(
            "SELECT dest, lane, seq, kind, message_id FROM outbox WHERE dest = ? "
            "ORDER BY queued_ms, lane, seq LIMIT ?", (dest, n - max_items)).fetchall()
    out = []
    for dest, lane, seq, kind, mid in set(doomed):
        store.conn.execute("DELETE FROM outbox WHERE dest = ? AND lane = ? AND seq = ?",
                           (dest, lane, seq))
        if kind == "msg":
            store.conn.execute("UPDATE receipts SET state = 'expired', at_ms = ? "
                               "WHERE message_id = ? AND node = ?", (now_ms, mid, dest))
        out.append((mid, dest, kind))
    return out


def route_in(store: "Store", origin: str, lane: int) -> int:
    row = store.conn.execute("SELECT last FROM route_in WHERE origin = ? AND lane = ?",
                             (origin, lane)).fetchone()
    return int(row[0]) if row else 0


def deliver_routed(store: "Store", origin: str, lane: int, first: int,
                   items: list[list[Any]]) -> tuple[int, int]:
    """Apply items routed from `origin` in seq order, each exactly once (inside the
    caller's write transaction). Returns the seq applied through, which the sender is
    told, and how many messages named a session this node does not know (dropped).
    A gap stops at the last contiguous item (the sender resends the rest); `first` above
    what we have means the items in between expired at the sender."""
    unknown = 0
    last = route_in(store, origin, lane)
    if first > last + 1:
        last = first - 1
    now_ms = int(store.now() * 1000)
    heads: dict[str, int] = {}
    for seq, kind, payload in sorted(items, key=lambda it: it[0]):
        if seq <= last:
            continue                     # a resend of what we already have
        if seq != last + 1:
            break
        if kind == "read":
            cur = store.conn.execute("UPDATE receipts SET state = 'read', at_ms = ? "
                                     "WHERE message_id = ? AND node = ?",
                                     (now_ms, payload, origin))
            if cur.rowcount == 0:        # read where a daemon it went to forwarded it
                store.conn.execute("UPDATE receipts SET state = 'read', at_ms = ? "
                                   "WHERE message_id = ? AND state IN ('queued', 'stored')",
                                   (now_ms, payload))
        else:
            unknown += not _store_routed(store, payload, heads, origin, forwarded=kind == "fwd")
        last = seq
    if heads:
        _save_heads(store, heads)
    store.conn.execute("INSERT INTO route_in VALUES (?, ?, ?) ON CONFLICT (origin, lane) "
                       "DO UPDATE SET last = excluded.last", (origin, lane, last))
    return last, unknown


def _store_routed(store: "Store", m: dict[str, Any], heads: dict[str, int], via: str,
                  forwarded: bool = False) -> bool:
    """Store a routed message (from daemon `via`) once; False when its recipient is
    unknown here.

    A direct message whose recipient is hosted by another daemon (the session moved, and
    `via` did not know yet) is forwarded there through this daemon's outbox, durably.
    Each daemon forwards a message at most once, and never back to `via`, so a message
    cannot circle while registries disagree; where it cannot go on, it stays in the
    recipient's inbox here (and follows the session when this daemon learns where it
    went, see `session_moved`). A forwarded message this daemon already had (the session
    moved back, or to its sender's daemon) still goes into the recipient's inbox once."""
    to = m["to_session"]
    host = None
    if forwarded and to is None:
        return False                     # only direct messages are forwarded
    if to is not None:
        row = store.conn.execute("SELECT host FROM sessions WHERE session_id = ? AND deleted = 0",
                                 (to,)).fetchone()
        if row is None:
            return False
        host = row[0]
    cur = _insert(store, m, m["origin"], m["hlc"], m["priority"])
    if cur.rowcount == 0:
        # Already here (a duplicate id): never twice in an inbox, and only in the inbox of
        # the recipient it was stored for (a forged "fwd" must not put it elsewhere).
        if forwarded and _stored_for(store, m["message_id"]) == to \
                and not _in_inbox(store, to, m["message_id"]):
            _to_inbox(store, to, m, heads)
        return True
    store.hlc.witness(m["hlc"])
    store.events.append((None, int(cur.lastrowid or 0), m))
    if to is None:
        recipients = [sid for sid in sessions.local_ids(store) if sid != m["from_session"]]
    elif host is not None and host != store.node_id and host != via:
        forward(store, m, host)
        return True
    else:
        recipients = [to]
    for sid in recipients:
        _to_inbox(store, sid, m, heads)
    return True


def _stored_for(store: "Store", message_id: str) -> str | None:
    row = store.conn.execute("SELECT to_session FROM messages WHERE message_id = ?",
                             (message_id,)).fetchone()
    return row[0] if row else None


def _in_inbox(store: "Store", session_id: str, message_id: str) -> bool:
    return store.conn.execute("SELECT 1 FROM inbox WHERE session_id = ? AND message_id = ?",
                              (session_id, message_id)).fetchone() is not None


def forward(store: "Store", m: dict[str, Any], host: str) -> None:
    """Queue a stored message for the daemon that now hosts its recipient (kind "fwd":
    its origin stays the daemon it was sent through)."""
    priority = m.get("priority", "normal")
    lane = LANES.get(priority, 1)
    seq = enqueue(store, host, lane, "fwd", m["message_id"], int(store.now() * 1000))
    if store.routed is not None:
        store.routed.append((host, lane, [seq, "fwd", _routed_payload(
            m, m["origin"], m["hlc"], priority)]))


def session_moved(store: "Store", session_id: str, host: str) -> int:
    """A session hosted here is now hosted by `host` (registered there): its unread
    messages follow it and leave this inbox (so moving back, or on again, never hands
    out mail twice; the messages themselves stay, for threads and de-duplication). Read
    ones stay here as the session's history. How many went."""
    rows = store.conn.execute(
        f"SELECT {_COLS}, m.origin, m.hlc FROM inbox i JOIN messages m "
        f"ON m.message_id = i.message_id WHERE i.session_id = ? AND i.read = 0 "
        f"AND m.to_session = ? ORDER BY i.seq", (session_id, session_id)).fetchall()
    for r in rows:
        m = _row(r[:10])
        m["origin"], m["hlc"] = r[10], r[11]
        forward(store, m, host)
    if rows:
        store.conn.execute("DELETE FROM inbox WHERE session_id = ? AND read = 0 AND message_id "
                           "IN (SELECT message_id FROM messages WHERE to_session = ?)",
                           (session_id, session_id))
    return len(rows)


def release_waiting(store: "Store", session_id: str, host: str | None) -> int:
    """A session `session_id` became known, hosted by `host`: the messages that waited
    for it here are delivered once. Hosted here, they are in its inbox already; hosted
    elsewhere, they leave this inbox and go there as ordinary routed messages (from
    this daemon, their origin), in the order they were sent. How many were released."""
    rows = store.conn.execute(
        f"SELECT {_COLS}, m.hlc FROM waiting w JOIN messages m ON m.message_id = w.message_id "
        f"JOIN inbox i ON i.message_id = w.message_id AND i.session_id = w.to_session "
        f"WHERE w.to_session = ? ORDER BY i.seq", (session_id,)).fetchall()
    if not rows:
        return 0
    if host is not None and host != store.node_id:
        now_ms = int(store.now() * 1000)
        for r in rows:
            m = _row(r[:10])
            lane = LANES.get(m["priority"], 1)
            seq = enqueue(store, host, lane, "msg", m["message_id"], now_ms)
            store.conn.execute("INSERT OR REPLACE INTO receipts VALUES (?, ?, 'queued', ?)",
                               (m["message_id"], host, now_ms))
            if store.routed is not None:
                store.routed.append((host, lane, [seq, "msg", _routed_payload(
                    m, store.node_id, r[10], m["priority"])]))
        store.conn.execute("DELETE FROM inbox WHERE session_id = ? AND message_id IN "
                           "(SELECT message_id FROM waiting WHERE to_session = ?)",
                           (session_id, session_id))
    store.conn.execute("DELETE FROM waiting WHERE to_session = ?", (session_id,))
    return len(rows)


def expire_waiting(store: "Store", max_age_ms: int) -> list[tuple[str, str]]:
    """Give up on messages that waited longer than `max_age_ms` for their recipient to
    register: they leave its inbox here and read as expired. (message_id, to_session)
    for each, to be reported."""
    now_ms = int(store.now() * 1000)
    doomed = store.conn.execute("SELECT message_id, to_session FROM waiting WHERE queued_ms < ?",
                                (now_ms - max_age_ms,)).fetchall()
    for mid, to in doomed:
        store.conn.execute("DELETE FROM inbox WHERE session_id = ? AND message_id = ?", (to, mid))
        store.conn.execute("DELETE FROM waiting WHERE message_id = ?", (mid,))
        store.conn.execute("INSERT OR REPLACE INTO receipts VALUES (?, '', 'expired', ?)",
                           (mid, now_ms))
    return [(mid, to) for mid, to in doomed]


# --- what the sender can see ---------------------------------------------------------------------

def status(store: "Store", a: dict[str, Any]) -> dict[str, Any] | None:
    """Where a message stands: per recipient daemon queued, stored, read or expired (and
    for local recipients stored or read), and the least advanced of those overall."""
    row = store.conn.execute(f"SELECT {_COLS} FROM messages m WHERE m.message_id = ?",
                             (a["message_id"],)).fetchone()
    if row is None:
        return None
    return _with_status(store, _row(row))


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
        f"SELECT {_COLS} FROM messages m WHERE m.from_session = ? AND m.origin = ? "
        f"ORDER BY m.seq{page_sql(a)}", (a["session_id"], store.node_id)).fetchall()
    return [_with_status(store, _row(r)) for r in rows]


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
