"""The dashboard's reads: every list bounded, short read transactions on the store, mail
from `meshd.state.mail`, outboxes from `meshd.state.outbox` (a mixin of `WebServer`)."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from meshd.state import mail, memory, sessions

if TYPE_CHECKING:
    import zmq.asyncio

log = logging.getLogger("meshd.http")

from meshd.ipc.web.common import (
    DEFAULT_LIMIT, MAX_LIMIT, MAX_TEXT, OVERVIEW_TEXT, _cut, _error, _page, log,
)


class ReadViews:
    """GET /api/...: what the page shows. Needs `store`, `outbox`, `node_info`, `peers`,
    `metrics` and `config` on the instance (`WebServer` sets them)."""

    # --- reads -----------------------------------------------------------------------------

    def get_info(self, _request: web.Request | None = None) -> dict[str, Any]:
        info = self.info()
        mesh = info.get("mesh") or {}
        return {"node_id": info.get("node_id"), "version": info.get("version"),
                "uptime": info.get("uptime"), "peer_address": info.get("peer_address"),
                "durability": info.get("durability"),
                "security": mesh.get("security"), "members": mesh.get("members"),
                "alive": mesh.get("alive"), "dashboard": self.url,
                "human_sends": True}

    def get_hosts(self, _request: web.Request | None = None) -> dict[str, Any]:
        me = self.store.node_id
        with self.store.read(fold=False):
            per_host = dict(self.store.conn.execute(
                "SELECT host, COUNT(*) FROM sessions WHERE deleted = 0 GROUP BY host").fetchall())
        hosts = [{"node_id": me, "address": self.info().get("peer_address"), "state": "alive",
                  "self": True, "last_contact": 0.0, "since": None, "behind": 0, "ahead": 0}]
        for p in (self.peers() if self.peers is not None else []):
            hosts.append({"node_id": p.get("node_id"), "address": p.get("address"),
                          "state": p.get("state"), "self": False,
                          "last_contact": p.get("last_contact"), "since": p.get("since"),
                          "behind": p.get("behind"), "ahead": p.get("ahead")})
        known = {h["node_id"] for h in hosts}
        for host in sorted(h for h in per_host if h not in known):
            hosts.append({"node_id": host, "address": None, "state": "unknown", "self": False,
                          "last_contact": None, "since": None, "behind": None, "ahead": None})
        for h in hosts:
            h["sessions"] = per_host.get(h["node_id"], 0)
        return {"items": hosts[:MAX_LIMIT], "more": len(hosts) > MAX_LIMIT}

    def get_sessions(self, request: web.Request) -> dict[str, Any]:
        limit, offset = _page(request)
        host = request.query.get("host")
        include_offline = request.query.get("include_offline", "1") not in ("0", "false")
        return self._sessions(limit, offset, host, include_offline)

    def _sessions(self, limit: int, offset: int, host: str | None = None,
                  include_offline: bool = True) -> dict[str, Any]:
        with self.store.read(fold=False):
            rows = sessions.list_sessions(self.store, {"include_offline": include_offline})
        if host:
            rows = [r for r in rows if r["host"] == host]
        items = [{k: r[k] for k in ("session_id", "agent_name", "agent_type", "status",
                                    "current_task", "capabilities", "last_ping", "started_at",
                                    "human_user", "host", "location")}
                 for r in rows[offset:offset + limit]]
        return {"items": items, "more": len(rows) > offset + limit, "total": len(rows)}

    def get_messages(self, request: web.Request) -> dict[str, Any]:
        limit, _ = _page(request)
        before = request.query.get("before")
        if before is not None and not before.isdigit():
            raise _error(400, "bad_request", "before must be a message seq")
        return self._messages(limit, int(before) if before else None, MAX_TEXT)

    def _messages(self, limit: int, before: int | None, cut: int) -> dict[str, Any]:
        with self.store.read():
            where, params = ("WHERE m.seq < ?", (before,)) if before is not None else ("", ())
            rows = self.store.conn.execute(
                f"SELECT m.seq, {mail.COLS} FROM messages m {where} ORDER BY m.seq DESC "
                f"LIMIT ?", (*params, limit + 1)).fetchall()
            items = []
            for r in rows[:limit]:
                st = mail.status(self.store, {"message_id": r[1]})
                if st is None:
                    continue
                items.append(self._message_view(r[0], st, cut))
        return {"items": items, "more": len(rows) > limit,
                "next_before": items[-1]["seq"] if items and len(rows) > limit else None}

    @staticmethod
    def _message_view(seq: int | None, st: dict[str, Any], cut: int) -> dict[str, Any]:
        m = dict(st["message"])
        m.pop("data", None)
        m["body"], m["truncated"] = _cut(m["body"], cut)
        m["seq"] = seq
        m["state"] = st["state"]
        m["deliveries"] = st["deliveries"][:32]
        return m

    def get_message(self, request: web.Request) -> dict[str, Any]:
        mid = request.match_info["message_id"]
        with self.store.read():
            st = mail.status(self.store, {"message_id": mid})
        if st is None:
            raise _error(404, "not_found", "no such message here")
        view = self._message_view(None, st, 1 << 30)
        view["data"] = st["message"].get("data")
        return view

    def get_thread(self, request: web.Request) -> dict[str, Any]:
        limit, _ = _page(request)
        mid = request.match_info["message_id"]
        with self.store.read():
            thread = mail.conversation(self.store, {"message_id": mid})[:limit + 1]
            items = [self._message_view(None, st, MAX_TEXT) for st in (
                mail.status(self.store, {"message_id": m["message_id"]})
                for m in thread[:limit]) if st is not None]
        if not items:
            raise _error(404, "not_found", "no such message here")
        return {"items": items, "more": len(thread) > limit}

    def get_outboxes(self, _request: web.Request | None = None) -> dict[str, Any]:
        now_ms = time.time() * 1000
        with self.store.read(fold=False):
            rows = self.outbox.destinations()
            waiting = self.store.conn.execute(
                "SELECT COUNT(*), MIN(queued_ms) FROM waiting").fetchone()
        states = {p.get("node_id"): p.get("state")
                  for p in (self.peers() if self.peers is not None else [])}
        dests: dict[str, dict[str, Any]] = {}
        for dest, lane, n, first, last, oldest in rows:
            d = dests.setdefault(dest, {"dest": dest, "state": states.get(dest, "unknown"),
                                        "depth": 0, "oldest_ms": None, "lanes": []})
            d["depth"] += n
            d["oldest_ms"] = oldest if d["oldest_ms"] is None else min(d["oldest_ms"], oldest)
            d["lanes"].append({"lane": "high" if lane == 0 else "normal", "depth": n,
                               "first_seq": first, "last_seq": last})
        items = sorted(dests.values(), key=lambda d: -d["depth"])
        for d in items:
            d["oldest_age"] = round(max(0.0, now_ms - d["oldest_ms"]) / 1000, 1)
        return {"items": items[:MAX_LIMIT], "more": len(items) > MAX_LIMIT,
                "waiting": {"messages": waiting[0] or 0,
                            "oldest_age": None if waiting[1] is None
                            else round(max(0.0, now_ms - waiting[1]) / 1000, 1)}}

    def get_memory(self, request: web.Request) -> dict[str, Any]:
        limit, offset = _page(request)
        q = request.query.get("q", "").strip()
        if len(q) > 256:
            raise _error(400, "bad_request", "the search is longer than 256 characters")
        return self._memory(q, limit, offset)

    def _memory(self, q: str, limit: int, offset: int) -> dict[str, Any]:
        # A plain word matches keys containing it; a glob (*, ?, [) is used as it is.
        pattern = q if any(c in q for c in "*?[") else f"*{q}*" if q else "*"
        with self.store.read():
            rows = memory.search(self.store, {"pattern": pattern, "limit": limit + 1,
                                              "offset": offset})
            total = memory.stats(self.store).get("total_entries")
        items = []
        for e in rows[:limit]:
            value = e["value"] if isinstance(e["value"], str) else json.dumps(
                e["value"], default=repr, ensure_ascii=False)
            value, cut = _cut(value, MAX_TEXT)
            items.append({"key": e["key"], "value": value, "truncated": cut,
                          "type": e["type"], "session_id": e["session_id"],
                          "timestamp": e["timestamp"], "ttl": e["ttl"], "tags": e["tags"]})
        return {"items": items, "more": len(rows) > limit, "total": total}

    def overview(self) -> dict[str, Any]:
        """What the page shows at once (and what each live event carries)."""
        return {"info": self.get_info(), "hosts": self.get_hosts()["items"],
                "sessions": self._sessions(MAX_LIMIT, 0), "messages": self._messages(
                    DEFAULT_LIMIT, None, OVERVIEW_TEXT),
                "outboxes": self.get_outboxes(), "memory": self._memory_stats()}

    def _memory_stats(self) -> dict[str, Any]:
        with self.store.read(fold=False):
            st = memory.stats(self.store)
            latest = self.store.conn.execute("SELECT MAX(hlc) FROM memory").fetchone()[0]
        return {"total": st.get("total_entries"), "latest": latest}

    async def get_metrics(self, request: web.Request) -> web.Response:
        body, ctype = self.metrics.render(request.headers.get("Accept"))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp
