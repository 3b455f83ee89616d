"""Build the MCP server for one session and run it on stdio or streamable HTTP.

The lifespan starts the background work (joining the mesh, the inbox notifier); the
session is unregistered (or kept) only after the event loop has finished, with a
blocking call, so neither a cancelled task group nor a signal can skip it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
from contextlib import asynccontextmanager
from typing import AsyncIterator

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.server.subscriptions import InMemorySubscriptionBus

import sessions
from sessions import SessionRegistry, SessionsError
from sessions.mcp import claimtools, memtools, memwatch, resources, tools
from sessions.mcp.agent import Agent
from sessions.mcp.state import Identity

log = logging.getLogger("sessions.mcp")

__all__ = ["build_server", "serve", "is_loopback", "INSTRUCTIONS"]

INSTRUCTIONS = """\
You are session {sid} ({name}) on meshd, a mesh of AI-agent sessions across the hosts of a \
LAN; others reach you by that id. list_sessions shows who is there. send_message writes to \
one session, ask sends a request and waits for the answer, dispatch hands work to one \
session with a capability, broadcast tells everyone. check_inbox reads your mail now; when \
you are idle or waiting on others, call wait_for_messages: it returns as soon as mail \
arrives. Answer requests with reply. Share state through memory_set / memory_get / \
memory_search. Keep set_status current (idle when you are free for work)."""


def build_server(identity: Identity, socket: str | None = None, timeout: float | None = None,
                 cursor_dir: str | None = None, progress_every: float = 15.0,
                 keepalive_interval: float = 60.0) -> tuple[MCPServer, Agent]:
    """The MCP server acting as `identity`, and the agent behind it (not started: the
    server's lifespan starts it)."""
    agent = Agent(identity, socket, timeout, cursor_dir, keepalive_interval)
    bus = InMemorySubscriptionBus()

    @asynccontextmanager
    async def lifespan(server: MCPServer) -> AsyncIterator[Agent]:
        background = [asyncio.create_task(agent.join_in_background(), name="mcp-join"),
                      asyncio.create_task(agent.notifier(), name="mcp-notifier")]
        try:
            yield agent
        finally:
            # Shielded: on SIGTERM this runs inside a cancelled scope.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await agent.close()

    mcp = MCPServer("meshd", title=f"meshd session {identity.session_id}",
                    instructions=INSTRUCTIONS.format(sid=identity.session_id,
                                                     name=identity.name),
                    version=sessions.__version__, lifespan=lifespan, subscriptions=bus,
                    log_level="WARNING")
    tools.register(mcp, agent, progress_every)
    memtools.register(mcp, agent)
    claimtools.register(mcp, agent)
    subscribers = resources.register(mcp, agent, bus)
    memwatch.register(mcp, agent, bus, subscribers)
    return mcp, agent


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Lines:
    """The client's lines from stdin, read without a thread. The SDK's own stdin reader
    blocks a worker thread in read(), which a cancellation waits for: SIGTERM would not
    stop the server until the client wrote or closed stdin."""

    LIMIT = 256 << 20               # bytes in one JSON-RPC line at most

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    def __aiter__(self) -> "_Lines":
        return self

    async def __anext__(self) -> str:
        line = await self.reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", "replace")


async def _stdin_lines() -> _Lines | None:
    """fd 0 as a non-blocking stream, or None where that cannot be (a regular file)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_Lines.LIMIT)
    try:
        pipe = os.fdopen(os.dup(0), "rb", buffering=0)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except (OSError, ValueError) as exc:
        log.debug("stdin is not a pipe (%s): the SDK reads it", exc)
        return None
    return _Lines(reader)


async def _serve_stdio(mcp: MCPServer) -> None:
    lines = await _stdin_lines()
    if lines is None:
        await mcp.run_stdio_async()
        return
    lowlevel = mcp._lowlevel_server
    async with stdio_server(stdin=lines) as (read, write):   # type: ignore[arg-type]
        await lowlevel.run(read, write, lowlevel.create_initialization_options())


async def _run(mcp: MCPServer, http: tuple[str, int] | None) -> None:
    """Serve until the client goes away (stdio EOF) or SIGTERM/SIGINT, which cancel the
    server so the lifespan's cleanup runs instead of the process dying mid-call."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, me.cancel)
    try:
        if http is None:
            await _serve_stdio(mcp)
        else:
            await mcp.run_streamable_http_async(host=http[0].strip("[]"), port=http[1])
    except asyncio.CancelledError:
        pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def serve(identity: Identity, socket: str | None = None, timeout: float | None = None,
          http: tuple[str, int] | None = None, progress_every: float = 15.0) -> None:
    """Run the server until the client disconnects or a signal stops it, then leave the
    session as `identity.on_exit` says."""
    mcp, agent = build_server(identity, socket, timeout, progress_every=progress_every)
    try:
        asyncio.run(_run(mcp, http))
    finally:
        if (agent.registered or agent.register_sent) and identity.on_exit == "offline":
            try:
                SessionRegistry(socket=agent.socket_path, timeout=3.0).unregister(
                    identity.session_id)
                log.info("session %s unregistered (offline)", identity.session_id)
            except SessionsError as exc:
                log.warning("could not unregister %s: %s", identity.session_id, exc)
