"""Delivery: the one owner of what leaves this daemon for another and of what arrives.

Sender's side: which daemons a message goes to (`hosts`, the one host lookup), its place
in the outbox (a seq per destination and lane, `next_seq`, the one allocator), queuing it
with its receipt (`queue_sent`, `queue_receipt`, `forward`: the one queue path),
acknowledgements (`acked`), expiry. Receiver's side: applying routed items in sequence,
each exactly once (`deliver`), forwarding a message whose recipient moved, releasing
messages that waited for a recipient nobody knew yet.

An `Outbox` holds what the daemon keeps of this in memory: in a routing daemon, the seq
counters (seqs are given when a send is journaled, before it is folded into SQLite, see
`plan`), a host cache, and the routed items of journaled sends released to the router
once the journal holds them. Without a router (the SDK's directory mode, `--no-mesh`)
seqs come from SQLite and nothing is kept for sending. Every function that writes runs
inside the caller's write transaction; the items it queues for the router are store
events (`Store.routed`), so a rolled-back write never sends anything.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Iterable

from meshd.state import mail, sessions

if TYPE_CHECKING:
    from meshd.state.store import Routed, Store

#: Outbox lanes: high-priority items overtake queued normal ones.
LANES = {"high": 0, "normal": 1}


def lane_of(priority: str | None) -> int:
    return LANES.get(priority or "normal", 1)


def routed_payload(m: dict[str, Any], origin: str, hlc: int, priority: str) -> dict[str, Any]:
    """A message as `items` reads it back for routing (same fields, same values)."""
    return {"message_id": m["message_id"], "type": m["type"], "from_session": m["from_session"],
            "to_session": m["to_session"], "subject": m["subject"], "body": m["body"],
            "data": m["data"], "timestamp": m["timestamp"], "in_reply_to": m["in_reply_to"],
            "priority": priority, "origin": origin, "hlc": hlc}


class Outbox:
    def __init__(self, store: "Store", routing: bool = False) -> None:
        self.store = store
        self.routing = routing
        self._seqs: dict[tuple[str, int], int] = {}
        self._hosts: dict[str | None, tuple[str, ...]] = {}
        self._hosts_gen = -1
        self._ready: list[Routed] = []      # journaled sends' items, released to the router
        self._lock = threading.Lock()
        self.acked_items = 0                # outbox items acknowledged (and deleted)

    # --- where a message goes ------------------------------------------------------------

    def hosts(self, to_session: str | None, cached: bool = False) -> tuple[str, ...]:
        """The other daemons hosting `to_session` (None: any session). `cached` (the loop
        thread, outside a transaction, see `plan`) answers from a cache that is valid
        while no write that may change a session has run (`Store.sessions_gen`)."""
        store = self.store
        if cached:
            if self._hosts_gen != store.sessions_gen:
                self._hosts, self._hosts_gen = {}, store.sessions_gen
            hit = self._hosts.get(to_session)
            if hit is not None:
                return hit
        me = store.node_id
        with store.lock:
            if to_session is not None:
                host = self.host_of(to_session)
                found: tuple[str, ...] = (host,) if host is not None and host != me else ()
            else:
                found = tuple(r[0] for r in store.conn.execute(
                    "SELECT DISTINCT host FROM sessions WHERE deleted = 0 AND host != ?", (me,)))
        if cached:
            self._hosts[to_session] = found
        return found

    def host_of(self, session_id: str) -> str | None:
        """The daemon hosting a session (this one's id when it is here); None when no
        daemon is known to (never registered, or forgotten)."""
        r = self.store.conn.execute("SELECT host FROM sessions WHERE session_id = ? "
                                    "AND deleted = 0", (session_id,)).fetchone()
        return None if r is None else str(r[0])

    def plan(self, m: dict[str, Any], hlc: int) -> tuple[list[list[Any]], list[Routed]]:
        """Loop thread, when a send is journaled: decide now which daemons the message goes
        to and give it its outbox seq per destination, so the router can send it before
        the fold. Returns the routes ([dest, lane, seq], kept in the journal record so the
        fold queues exactly these) and the routed items, to release to the router once the
        journal holds the send. Deciding here gives what the fold would decide: the
        sessions table only changes in `Store.write`, which folds every journaled send
        first (and moves `sessions_gen` on)."""
        hosts = self.hosts(m["to_session"], cached=True)
        if not hosts:
            return [], []
        priority = m.get("priority", "normal")
        lane = lane_of(priority)
        payload = routed_payload(m, self.store.node_id, hlc, priority)
        routes, items = [], []
        for host in hosts:
            seq = self.next_seq(host, lane)
            routes.append([host, lane, seq])
            items.append((host, lane, [seq, "msg", payload]))
        return routes, items

    def release(self, items: list[Routed]) -> None:
        """The journal holds these sends: their items may go out (`take_routed`)."""
        if items:
            with self._lock:
                self._ready.extend(items)

    def take_routed(self) -> list[Routed]:
        """Items to send: those of journaled sends, then those of committed writes."""
        with self._lock:
            ready, self._ready = self._ready, []
        return ready + self.store.take_routed()

    # --- queuing ---------------------------------------------------------------------------

    def next_seq(self, dest: str, lane: int) -> int:
        """The next outbox seq for (dest, lane). A routing daemon counts in memory (seqs are
        given on the loop when sends are journaled, before their fold), from `outbox_heads`
        the first time, when every seq given before is committed; otherwise SQLite counts,
        inside the caller's transaction."""
        key = (dest, lane)
        if not self.routing:
            return int(self.store.conn.execute(
                "INSERT INTO outbox_heads VALUES (?, ?, 1) ON CONFLICT (dest, lane) "
                "DO UPDATE SET last = last + 1 RETURNING last", key).fetchone()[0])
        last = self._seqs.get(key)
        if last is None:
            with self.store.lock:
                r = self.store.conn.execute(
                    "SELECT last FROM outbox_heads WHERE dest = ? AND lane = ?", key).fetchone()
            last = int(r[0]) if r else 0
        self._seqs[key] = last + 1
        return last + 1

    def _enqueue(self, dest: str, lane: int, kind: str, message_id: str, now_ms: int,
                 seq: int | None = None) -> int:
        """Queue an item for `dest` with the seq given (planned), or the next one."""
        counted = seq is None and not self.routing     # (SQLite moved outbox_heads on)
        if seq is None:
            seq = self.next_seq(dest, lane)
        if not counted:
            self.store.conn.execute(
                "INSERT INTO outbox_heads VALUES (?, ?, ?) ON CONFLICT (dest, lane) "
                "DO UPDATE SET last = MAX(last, excluded.last)", (dest, lane, seq))
        # OR IGNORE: folding a journaled send twice (a crash before its segment was emptied).
        self.store.conn.execute("INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?, ?, ?)",
                                (dest, lane, seq, kind, message_id, now_ms))
        return seq

    def _route(self, dest: str, lane: int, item: list[Any]) -> None:
        if self.routing:
            self.store.routed.append((dest, lane, item))

    def queue_sent(self, m: dict[str, Any], hlc: int, hosts: Iterable[str],
                   routes: list[list[Any]] | None, now_ms: int) -> None:
        """Queue a message sent through this daemon for each daemon in `hosts` (with the
        seqs of `routes` when the send was planned: the router has those items already),
        and mark it queued there."""
        planned = {r[0]: (r[1], r[2]) for r in routes} if routes is not None else {}
        priority = m.get("priority", "normal")
        payload = None
        for host in hosts:
            lane, seq = planned.get(host, (lane_of(priority), None))
            given = self._enqueue(host, lane, "msg", m["message_id"], now_ms, seq)
            self.store.conn.execute("INSERT OR REPLACE INTO receipts VALUES (?, ?, 'queued', ?)",
                                    (m["message_id"], host, now_ms))
            if seq is None:
                if payload is None:
                    payload = routed_payload(m, self.store.node_id, hlc, priority)
                self._route(host, lane, [given, "msg", payload])

    def requeue(self, m: dict[str, Any], routes: Iterable[list[Any]], now_ms: int) -> None:
        """A retried send already stored: queue the seqs it was planned with anyway."""
        for host, lane, seq in routes:
            self._enqueue(host, lane, "msg", m["message_id"], now_ms, seq)

    def queue_receipt(self, origin: str, message_id: str, now_ms: int) -> None:
        """Tell the daemon a message came from that it was read here."""
        lane = LANES["normal"]
        seq = self._enqueue(origin, lane, "read", message_id, now_ms)
        self._route(origin, lane, [seq, "read", message_id])

    def forward(self, m: dict[str, Any], host: str) -> None:
        """Queue a stored message for the daemon that now hosts its recipient (kind "fwd":
        its origin stays the daemon it was sent through)."""
        priority = m.get("priority", "normal")
        lane = lane_of(priority)
        seq = self._enqueue(host, lane, "fwd", m["message_id"], int(self.store.now() * 1000))
        self._route(host, lane, [seq, "fwd", routed_payload(m, m["origin"], m["hlc"], priority)])

    # --- the queues, for the router -----------------------------------------------------------

    def destinations(self) -> list[tuple[str, int, int, int, int, int]]:
        """(dest, lane, items, first seq, last seq, oldest queued_ms) for every non-empty
        queue, high-priority lanes first."""
        return [tuple(r) for r in self.store.conn.execute(  # type: ignore[misc]
            "SELECT dest, lane, COUNT(*), MIN(seq), MAX(seq), MIN(queued_ms) FROM outbox "
            "GROUP BY dest, lane ORDER BY lane, dest")]

    def first(self, dest: str, lane: int) -> int | None:
        """The oldest committed seq queued for (dest, lane), None when none is."""
        r = self.store.conn.execute("SELECT MIN(seq) FROM outbox WHERE dest = ? AND lane = ?",
                                    (dest, lane)).fetchone()
        return None if r is None or r[0] is None else int(r[0])

    def items(self, dest: str, lane: int, after: int, limit: int) -> list[list[Any]]:
        """Up to `limit` queued items for `dest` above seq `after`, as [seq, kind, payload]:
        the routed message (with origin, clock stamp and priority) or the id of a read one."""
        out: list[list[Any]] = []
        conn = self.store.conn
        for seq, kind, mid in conn.execute(
                "SELECT seq, kind, message_id FROM outbox WHERE dest = ? AND lane = ? "
                "AND seq > ? ORDER BY seq LIMIT ?", (dest, lane, after, limit)).fetchall():
            if kind == "read":
                out.append([seq, kind, mid])
                continue
            r = conn.execute(f"SELECT {mail.COLS}, m.origin, m.hlc FROM messages m "
                             f"WHERE m.message_id = ?", (mid,)).fetchone()
            if r is None:                # cannot happen (messages are never deleted) - skip
                continue
            payload = mail.row(r[:10])
            payload["origin"], payload["hlc"] = r[10], r[11]
            out.append([seq, kind, payload])
        return out

    def acked(self, dest: str, lane: int, through: int) -> int:
        """The destination applied everything up to `through`: those items leave the outbox
        and their messages read as stored there. How many items went."""
        now_ms = int(self.store.now() * 1000)
        conn = self.store.conn
        conn.execute(
            "UPDATE receipts SET state = 'stored', at_ms = ? WHERE node = ? AND state = 'queued' "
            "AND message_id IN (SELECT message_id FROM outbox WHERE dest = ? AND lane = ? AND "
            "seq <= ? AND kind = 'msg')", (now_ms, dest, dest, lane, through))
        cur = conn.execute("DELETE FROM outbox WHERE dest = ? AND lane = ? AND seq <= ?",
                           (dest, lane, through))
        return max(cur.rowcount, 0)

    def expire(self, max_age_ms: int, max_items: int, only: str | None = None
               ) -> list[tuple[str, str, str]]:
        """Drop queued items older than `max_age_ms`, or beyond `max_items` per destination
        (oldest first), or every item for destination `only` when given; their messages
        read as expired there (messages sent from here). Returns (message_id, dest, kind)
        for every item dropped, to be reported."""
        conn = self.store.conn
        now_ms = int(self.store.now() * 1000)
        if only is not None:
            doomed = conn.execute("SELECT dest, lane, seq, kind, message_id FROM outbox "
                                  "WHERE dest = ?", (only,)).fetchall()
        else:
            doomed = conn.execute(
                "SELECT dest, lane, seq, kind, message_id FROM outbox WHERE queued_ms < ?",
                (now_ms - max_age_ms,)).fetchall()
        for dest, n in conn.execute(
                "SELECT dest, COUNT(*) FROM outbox GROUP BY dest HAVING COUNT(*) > ?",
                (max_items,)).fetchall() if only is None else ():
            doomed += conn.execute(
                "SELECT dest, lane, seq, kind, message_id FROM outbox WHERE dest = ? "
                "ORDER BY queued_ms, lane, seq LIMIT ?", (dest, n - max_items)).fetchall()
        out = []
        for dest, lane, seq, kind, mid in set(doomed):
            conn.execute("DELETE FROM outbox WHERE dest = ? AND lane = ? AND seq = ?",
                         (dest, lane, seq))
            if kind == "msg":
                conn.execute("UPDATE receipts SET state = 'expired', at_ms = ? "
                             "WHERE message_id = ? AND node = ?", (now_ms, mid, dest))
            out.append((mid, dest, kind))
        return out

    # --- receiving -------------------------------------------------------------------------

    def route_in(self, origin: str, lane: int) -> int:
        r = self.store.conn.execute("SELECT last FROM route_in WHERE origin = ? AND lane = ?",
                                    (origin, lane)).fetchone()
        return int(r[0]) if r else 0

    def deliver(self, origin: str, lane: int, first: int,
                items: list[list[Any]]) -> tuple[int, int]:
        """Apply items routed from `origin` in seq order, each exactly once (inside the
        caller's write transaction). Returns the seq applied through, which the sender is
        told, and how many messages named a session this node does not know (dropped).
        A gap stops at the last contiguous item (the sender resends the rest); `first`
        above what we have means the items in between expired at the sender."""
        conn = self.store.conn
        unknown = 0
        last = self.route_in(origin, lane)
        if first > last + 1:
            last = first - 1
        now_ms = int(self.store.now() * 1000)
        heads: dict[str, int] = {}
        for seq, kind, payload in sorted(items, key=lambda it: it[0]):
            if seq <= last:
                continue                     # a resend of what we already have
            if seq != last + 1:
                break
            if kind == "read":
                cur = conn.execute("UPDATE receipts SET state = 'read', at_ms = ? "
                                   "WHERE message_id = ? AND node = ?", (now_ms, payload, origin))
                if cur.rowcount == 0:        # read where a daemon it went to forwarded it
                    conn.execute("UPDATE receipts SET state = 'read', at_ms = ? "
                                 "WHERE message_id = ? AND state IN ('queued', 'stored')",
                                 (now_ms, payload))
            else:
                unknown += not self._store_routed(payload, heads, origin, kind == "fwd")
            last = seq
        if heads:
            mail.save_heads(self.store, heads)
        conn.execute("INSERT INTO route_in VALUES (?, ?, ?) ON CONFLICT (origin, lane) "
                     "DO UPDATE SET last = excluded.last", (origin, lane, last))
        return last, unknown

    def _store_routed(self, m: dict[str, Any], heads: dict[str, int], via: str,
                      forwarded: bool) -> bool:
        """Store a routed message (from daemon `via`) once; False when its recipient is
        unknown here.

        A direct message whose recipient is hosted by another daemon (the session moved,
        and `via` did not know yet) is forwarded there through this daemon's outbox,
        durably. Each daemon forwards a message at most once, and never back to `via`, so
        a message cannot circle while registries disagree; where it cannot go on, it stays
        in the recipient's inbox here (and follows the session when this daemon learns
        where it went, see `session_moved`). A forwarded message this daemon already had
        (the session moved back, or to its sender's daemon) still goes into the
        recipient's inbox once."""
        store = self.store
        to = m["to_session"]
        host = None
        if forwarded and to is None:
            return False                     # only direct messages are forwarded
        if to is not None:
            host = self.host_of(to)
            if host is None:
                return False
        cur = mail.insert(store, m, m["origin"], m["hlc"], m["priority"])
        if cur.rowcount == 0:
            # Already here (a duplicate id): never twice in an inbox, and only in the inbox
            # of the recipient it was stored for (a forged "fwd" must not put it elsewhere).
            if forwarded and mail.stored_for(store, m["message_id"]) == to \
                    and not mail.in_inbox(store, to, m["message_id"]):
                mail.to_inbox(store, to, m, heads)
            return True
        store.hlc.witness(m["hlc"])
        store.events.append((None, int(cur.lastrowid or 0), m))
        if to is None:
            recipients = [sid for sid in sessions.local_ids(store) if sid != m["from_session"]]
        elif host is not None and host != store.node_id and host != via:
            self.forward(m, host)
            return True
        else:
            recipients = [to]
        for sid in recipients:
            mail.to_inbox(store, sid, m, heads)
        return True

    def session_moved(self, session_id: str, host: str) -> int:
        """A session hosted here is now hosted by `host` (registered there): its unread
        messages follow it and leave this inbox (so moving back, or on again, never hands
        out mail twice; the messages themselves stay, for threads and de-duplication).
        Read ones stay here as the session's history. How many went."""
        conn = self.store.conn
        rows = conn.execute(
            f"SELECT {mail.COLS}, m.origin, m.hlc FROM inbox i JOIN messages m "
            f"ON m.message_id = i.message_id WHERE i.session_id = ? AND i.read = 0 "
            f"AND m.to_session = ? ORDER BY i.seq", (session_id, session_id)).fetchall()
        for r in rows:
            m = mail.row(r[:10])
            m["origin"], m["hlc"] = r[10], r[11]
            self.forward(m, host)
        if rows:
            conn.execute("DELETE FROM inbox WHERE session_id = ? AND read = 0 AND message_id "
                         "IN (SELECT message_id FROM messages WHERE to_session = ?)",
                         (session_id, session_id))
        return len(rows)

    def release_waiting(self, session_id: str, host: str | None) -> int:
        """A session `session_id` became known, hosted by `host`: the messages that waited
        for it here are delivered once. Hosted here, they are in its inbox already; hosted
        elsewhere, they leave this inbox and go there as ordinary routed messages (from
        this daemon, their origin), in the order they were sent. How many were released."""
        conn = self.store.conn
        rows = conn.execute(
            f"SELECT {mail.COLS}, m.hlc FROM waiting w JOIN messages m "
            f"ON m.message_id = w.message_id JOIN inbox i ON i.message_id = w.message_id "
            f"AND i.session_id = w.to_session WHERE w.to_session = ? ORDER BY i.seq",
            (session_id,)).fetchall()
        if not rows:
            return 0
        if host is not None and host != self.store.node_id:
            now_ms = int(self.store.now() * 1000)
            for r in rows:
                self.queue_sent(mail.row(r[:10]), r[10], (host,), None, now_ms)
            conn.execute("DELETE FROM inbox WHERE session_id = ? AND message_id IN "
                         "(SELECT message_id FROM waiting WHERE to_session = ?)",
                         (session_id, session_id))
        conn.execute("DELETE FROM waiting WHERE to_session = ?", (session_id,))
        return len(rows)

    def expire_waiting(self, max_age_ms: int) -> list[tuple[str, str]]:
        """Give up on messages that waited longer than `max_age_ms` for their recipient to
        register: they leave its inbox here and read as expired. (message_id, to_session)
        for each, to be reported."""
        conn = self.store.conn
        now_ms = int(self.store.now() * 1000)
        doomed = conn.execute("SELECT message_id, to_session FROM waiting WHERE queued_ms < ?",
                              (now_ms - max_age_ms,)).fetchall()
        for mid, to in doomed:
            conn.execute("DELETE FROM inbox WHERE session_id = ? AND message_id = ?", (to, mid))
            conn.execute("DELETE FROM waiting WHERE message_id = ?", (mid,))
            conn.execute("INSERT OR REPLACE INTO receipts VALUES (?, '', 'expired', ?)",
                         (mid, now_ms))
        return [(mid, to) for mid, to in doomed]
