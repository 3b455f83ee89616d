"""Resources (the session's inbox, the session list) and the notice that the inbox changed.

A client that supports it subscribes to the inbox and is told when mail arrives, instead
of polling. Clients speak one of two protocol eras and each has its own path:
handshake-era clients send `resources/subscribe`, which MCPServer does not serve, so a
handler is added on the low-level server and the sessions that subscribed are sent
`notifications/resources/updated`; 2026-07-28 clients listen on `subscriptions/listen`,
fed by the server's subscription bus. Both are told on every change.
(No `from __future__ import annotations`: the SDK reads these signatures at run time.)
"""

import json
import logging
from typing import Any
from urllib.parse import quote

import mcp.types as mt
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.server.subscriptions import ResourceUpdated, SubscriptionBus

from sessions import SessionsError
from sessions.mcp import format as fmt
from sessions.mcp.agent import Agent

log = logging.getLogger("sessions.mcp")

INBOX_SHOWN = 50          # unread messages a read of the inbox resource shows
MAX_SUBSCRIBERS = 256     # handshake-era connections remembered per URI


def inbox_uri(session_id: str) -> str:
    return f"inbox://{quote(session_id, safe='')}"


SESSIONS_URI = "sessions://list"


class Subscribers:
    """Handshake-era subscriptions: per URI, the sessions that asked. The SDK builds a new
    session proxy for every request, so they are keyed by the connection underneath; a
    send that fails drops the subscriber (a closed connection may also drop it silently,
    hence the bound)."""

    def __init__(self) -> None:
        self.by_uri: dict[str, dict[Any, Any]] = {}

    @staticmethod
    def _key(session: Any) -> Any:
        return getattr(session, "_connection", None) or session

    async def subscribe(self, ctx: Any, params: mt.SubscribeRequestParams) -> mt.EmptyResult:
        subs = self.by_uri.setdefault(str(params.uri), {})
        subs.pop(self._key(ctx.session), None)
        subs[self._key(ctx.session)] = ctx.session
        while len(subs) > MAX_SUBSCRIBERS:
            subs.pop(next(iter(subs)))
        return mt.EmptyResult()

    async def unsubscribe(self, ctx: Any, params: mt.UnsubscribeRequestParams) -> mt.EmptyResult:
        self.by_uri.get(str(params.uri), {}).pop(self._key(ctx.session), None)
        return mt.EmptyResult()

    async def updated(self, uri: str) -> None:
        subs = self.by_uri.get(uri, {})
        for key, session in list(subs.items()):
            try:
                await session.send_resource_updated(uri)
            except Exception as exc:            # that client is gone
                log.debug("dropping a subscriber of %s: %s", uri, exc)
                subs.pop(key, None)


def register(mcp: MCPServer, agent: Agent, bus: SubscriptionBus) -> Subscribers:
    sid = agent.sid
    uri = inbox_uri(sid)
    subscribers = Subscribers()
    lowlevel = mcp._lowlevel_server     # the documented way to serve resources/subscribe
    lowlevel.add_request_handler("resources/subscribe", mt.SubscribeRequestParams,
                                 subscribers.subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", mt.UnsubscribeRequestParams,
                                 subscribers.unsubscribe)

    async def inbox_changed() -> None:
        await subscribers.updated(uri)
        await bus.publish(ResourceUpdated(uri=uri))

    agent.on_inbox_changed.append(inbox_changed)

    @mcp.resource(uri, name="inbox", mime_type="application/json",
                  description=f"The unread messages of session {sid} (at most {INBOX_SHOWN}, "
                              f"oldest first) and how many there are. Subscribe to be told "
                              f"when a message arrives.")
    async def inbox() -> str:
        try:
            await agent.ready()
            msgs = await agent.hub.get_messages(sid, unread_only=True)
        except SessionsError as exc:
            raise ResourceError(str(exc)) from exc
        return json.dumps({"session": sid, "unread": len(msgs),
                           "messages": [fmt.message(m) for m in msgs[:INBOX_SHOWN]]},
                          ensure_ascii=False, default=fmt.json_default)

    @mcp.resource(SESSIONS_URI, name="sessions", mime_type="application/json",
                  description="The sessions on the mesh that are not OFFLINE, every host.")
    async def sessions() -> str:
        try:
            found = await agent.registry.list_sessions()
        except SessionsError as exc:
            raise ResourceError(str(exc)) from exc
        return json.dumps([fmt.session(s) for s in found], ensure_ascii=False,
                          default=fmt.json_default)

    return subscribers
