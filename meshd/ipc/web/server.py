"""The dashboard's HTTP server (`meshd --http HOST:PORT`, docs/dashboard.md): a page, a JSON
API under /api for everything the page shows, live updates over server-sent events, a send
endpoint for human sessions, and /metrics when the metrics module is there.

Served with aiohttp (the well-kept asyncio web library) from the daemon's own event loop.
Reads go straight to the store (short read transactions, every list bounded); writes go
through the daemon's local API socket (`localapi.LocalAPI`), exactly like an SDK client's.

Security (docs/dashboard.md, "Security"): every /api request needs the token (a bearer
header; a SameSite=Strict cookie for the event stream), state-changing requests need the
header itself and an Origin of this very server; on a loopback address the Host header must
name loopback (no DNS rebinding); a non-loopback address needs --http-token-file. Responses
carry a strict Content-Security-Policy and the page renders data with textContent only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import uuid
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from meshd.config import Config
from meshd.errors import MeshError
from meshd.ipc.web import http_problem
from meshd.ipc.web.localapi import LocalAPI, LocalAPIError
from meshd.state import memory, sessions
from meshd.state.outbox import Outbox
from meshd.state.store import Store
from meshd.wire.schema import MessageType

if TYPE_CHECKING:
    import zmq.asyncio

log = logging.getLogger("meshd.http")

from meshd.ipc.web.common import (
    COOKIE, CSP, HUMAN_NAME, HttpConfigError, KEEPALIVE, MAX_BODY_BYTES, MAX_SSE, NodeInfo,
    Peers, STATIC, TICK, _TYPES, _dumps, _error, is_loopback, load_token, log, parse_http,
)
from meshd.ipc.web.views import ReadViews


class WebServer(ReadViews):
    """The dashboard. `start()` binds and serves from the running loop; `stop()` is idempotent."""

    def __init__(self, config: Config, store: Store, outbox: Outbox, ctx: "zmq.asyncio.Context",
                 info: NodeInfo, peers: Peers | None = None, metrics: Any | None = None) -> None:
        assert config.http
        self.config = config
        self.store = store
        self.outbox = outbox
        self.info = info
        self.peers = peers
        self.metrics = metrics
        problem = http_problem(config.http, config.http_token_file)
        if problem:
            raise HttpConfigError(problem)
        self.host, self.port = parse_http(config.http)
        self.loopback = is_loopback(self.host)
        self.token_from_file = bool(config.http_token_file)
        self.token = (load_token(config.http_token_file) if config.http_token_file
                      else secrets.token_urlsafe(32))
        self.api = LocalAPI(ctx, config.socket_path, config.max_frame_bytes,
                            timeout=config.client_timeout)
        self.url = ""
        self.counters: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Queue[str | None]] = set()
        self._last = ""
        self._ticker: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES,
                              middlewares=[self._guard])
        r = app.router
        r.add_get("/", self._static("index.html"))
        for name in STATIC:
            r.add_get(f"/static/{name}", self._static(name))
        r.add_get("/api/info", self._json(self.get_info))
        r.add_get("/api/hosts", self._json(self.get_hosts))
        r.add_get("/api/sessions", self._json(self.get_sessions))
        r.add_get("/api/messages", self._json(self.get_messages))
        r.add_get("/api/messages/{message_id}", self._json(self.get_message))
        r.add_get("/api/threads/{message_id}", self._json(self.get_thread))
        r.add_get("/api/outboxes", self._json(self.get_outboxes))
        r.add_get("/api/memory", self._json(self.get_memory))
        r.add_get("/api/overview", self._json(lambda _r: self.overview()))
        r.add_get("/api/events", self.events)
        r.add_post("/api/send", self.send)
        if self.metrics is not None:
            r.add_get("/metrics", self.get_metrics)
        return app

    async def start(self) -> None:
        self.api.start()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise HttpConfigError(f"cannot serve the dashboard on {self.config.http}: "
                                  f"{exc.strerror or exc}") from None
        server = site._server                              # (the bound port, for port 0)
        port = server.sockets[0].getsockname()[1] if server and server.sockets else self.port
        self.port = port
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{port}/"
        if self.token_from_file:
            log.info("dashboard on %s (token from %s: open %s#token=<token>)",
                     self.url, self.config.http_token_file, self.url)
        else:
            # Logged once: whoever reads this log may read and send as a human session.
            log.info("dashboard on %s#token=%s (the token lets a browser read the mesh and "
                     "send as a human session: keep it private)", self.url, self.token)
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except (asyncio.CancelledError, Exception):
                pass
            self._ticker = None
        for q in list(self._streams):
            self._offer(q, None)                  # streams end now, not at the timeout
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self.api.stop()

    def stats(self) -> dict[str, Any]:
        return {"url": self.url, "streams": len(self._streams), "counters": dict(self.counters)}

    # --- guards ----------------------------------------------------------------------------

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _allowed_host(self, host: str | None) -> bool:
        if not self.loopback:
            return True                            # (the token guards everything there)
        if not host:
            return False
        if host.startswith("["):
            name, _, rest = host[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else rest
        else:
            name, _, port = host.partition(":")
        return is_loopback(name) and port in ("", str(self.port))

    def _token_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def _bearer(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        return auth[7:].strip() if auth.startswith("Bearer ") else None

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        try:
            if not self._allowed_host(request.headers.get("Host")):
                self._count("refused.host")
                raise _error(421, "bad_host", "this dashboard answers to a loopback Host only")
            path = request.path
            if path.startswith("/api/"):
                if request.method not in ("GET", "HEAD"):
                    self._check_write(request)
                elif not (self._token_ok(self._bearer(request))
                          or self._token_ok(request.cookies.get(COOKIE))):
                    self._count("refused.token")
                    raise _error(401, "unauthorized", "a valid token is needed (the daemon logs "
                                 "it at start, or see --http-token-file)")
            elif path == "/metrics" and not self.loopback and not self._token_ok(
                    self._bearer(request)):
                self._count("refused.token")
                raise _error(401, "unauthorized", "a bearer token is needed off loopback")
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        self._secure(response, request.path)
        return response

    def _check_write(self, request: web.Request) -> None:
        """State-changing requests: the Origin of this server and the token in a header
        (never a cookie, so no other site can make a browser send one)."""
        origin = request.headers.get("Origin")
        if not origin or origin != f"http://{request.headers.get('Host', '')}":
            self._count("refused.origin")
            raise _error(403, "bad_origin", "state-changing requests must come from this "
                         "dashboard's own page (Origin)")
        if not self._token_ok(self._bearer(request)):
            self._count("refused.token")
            raise _error(401, "unauthorized", "state-changing requests need the token in an "
                         "Authorization: Bearer header")
        if request.content_type != "application/json":
            raise _error(415, "bad_content_type", "send application/json")

    @staticmethod
    def _secure(response: web.StreamResponse, path: str) -> None:
        if response.prepared:
            return
        h = response.headers
        h["Content-Security-Policy"] = CSP
        h["X-Content-Type-Options"] = "nosniff"
        h["X-Frame-Options"] = "DENY"
        h["Referrer-Policy"] = "no-referrer"
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        h["Cross-Origin-Resource-Policy"] = "same-origin"
        if path.startswith("/api/"):
            h["Cache-Control"] = "no-store"

    # --- plumbing --------------------------------------------------------------------------

    def _static(self, name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        ctype = _TYPES[name.rpartition(".")[2]]

        async def handler(_request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=ctype, charset="utf-8")
        return handler

    def _json(self, fn: Callable[[web.Request], Any]
              ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            try:
                result = fn(request)
            except MeshError as exc:
                raise _error(503, exc.code, str(exc)) from None
            return web.json_response(result, dumps=_dumps)
        return handler

    # --- live updates ----------------------------------------------------------------------

    @staticmethod
    def _offer(q: "asyncio.Queue[str | None]", item: str | None) -> None:
        if q.full():                              # a slow reader gets the newest only
            try:
                q.get_nowait()
            except asyncio.QueueEmpty:
                pass
        q.put_nowait(item)

    def _snapshot(self) -> str:
        doc = self.overview()
        return _dumps(doc)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            if not self._streams:
                self._last = ""
                continue
            try:
                # (uptime changes every tick: compare without it)
                snap = self._snapshot()
                key = re.sub(r'"uptime": [0-9.]+', "", snap)
                key = re.sub(r'"(last_contact|since|digest_age|oldest_age)": [0-9.]+', "", key)
            except MeshError as exc:
                log.warning("dashboard update failed: %s", exc)
                continue
            except Exception:                     # never let the ticker die
                log.exception("dashboard update failed")
                continue
            if key != self._last:
                self._last = key
                for q in list(self._streams):
                    self._offer(q, snap)

    async def events(self, request: web.Request) -> web.StreamResponse:
        if len(self._streams) >= MAX_SSE:
            self._count("refused.streams")
            raise _error(503, "too_many_streams", f"at most {MAX_SSE} live pages at once")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        self._secure(resp, request.path)
        q: asyncio.Queue[str | None] = asyncio.Queue(maxsize=2)
        self._streams.add(q)
        try:
            await resp.prepare(request)
            await resp.write(f"retry: 2000\nevent: overview\ndata: {self._snapshot()}\n\n".encode())
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), KEEPALIVE)
                except asyncio.TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if item is None:
                    break
                await resp.write(f"event: overview\ndata: {item}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(q)
        return resp

    # --- writes ----------------------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        """A message (to a session) or a broadcast (no `to`) from a named human session,
        registered here (agent_type "human") if it is not online yet."""
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise _error(400, "bad_request", "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise _error(400, "bad_request", "the body must be a JSON object")
        name = body.get("from")
        if not isinstance(name, str) or not HUMAN_NAME.match(name):
            raise _error(400, "invalid_argument", "`from` must be a human's name: letters, "
                         "digits, space . _ @ -, at most 64 characters")
        to = body.get("to") or None
        subject, text = body.get("subject", ""), body.get("body", "")
        mtype = body.get("type") or ("broadcast" if to is None else "request")
        if mtype not in {t.value for t in MessageType}:
            raise _error(400, "invalid_argument", f"unknown message type {mtype!r}")
        if not isinstance(subject, str) or not isinstance(text, str) or not (subject or text):
            raise _error(400, "invalid_argument", "give a subject or a body (strings)")
        message = {"message_id": uuid.uuid4().hex, "type": mtype, "from_session": name,
                   "to_session": to, "subject": subject, "body": text, "data": {},
                   "timestamp": datetime.now(timezone.utc).isoformat(),
                   "in_reply_to": body.get("in_reply_to") or None,
                   "priority": "high" if body.get("priority") == "high" else "normal"}
        try:
            me = await self.api.call("session.get", {"session_id": name})
            if me is None or me.get("status") == "offline" or me.get("agent_type") != "human":
                if me is not None and me.get("agent_type") != "human" \
                        and me.get("status") != "offline":
                    raise _error(403, "not_human", f"{name!r} is an online agent session, not "
                                 "a human one")
                await self.api.call("session.register", {
                    "session_id": name, "agent_name": name, "agent_type": "human",
                    "human_user": name, "capabilities": ["human"],
                    "metadata": {"via": "dashboard"}})
            else:
                await self.api.call("session.ping", {"session_id": name})
            result = await self.api.call("message.send", {"message": message})
        except LocalAPIError as exc:
            status = 400 if exc.code in ("invalid_argument", "too_large", "not_found") else 502
            raise _error(status, exc.code, str(exc)) from None
        self._count("sent")
        log.info("dashboard: %s sent %s %s", name, mtype,
                 f"to {to}" if to else "to everyone")
        return web.json_response({"message_id": message["message_id"], **(
            result if isinstance(result, dict) else {})})
