"""The running session behind the MCP server: its connection to meshd, its registration
and keep-alive, and the reader that turns the session's message stream into wake-ups.

The server must start, and answer every tool call, even while the daemon is down (an
agent client starts its MCP servers before anyone thinks of meshd), so joining the mesh
is retried in the background and on each tool call, and failures become tool errors.

Messages come from a blocking `MessageStream` in a thread of its own: it is the only
user of its ZeroMQ socket, it resumes from its cursor across daemon restarts by itself,
and the event loop never blocks on it. What it receives waits in `inbox` until
`wait_for_messages` hands it out; only then does the persisted cursor move, so a restart
of the server re-reads what was received but never handed out. When `inbox` is full the
thread stops reading and the daemon holds the rest (the stream's flow control).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Awaitable, Callable

from sessions import CollaborationHub, DaemonUnavailable, Message, SessionsError
from sessions.aio import AsyncCollaborationHub, AsyncSessionRegistry, AsyncSharedMemory
from sessions.keepalive import DEFAULT_INTERVAL, AsyncKeepAlive
from sessions.mcp.state import CursorFile, Identity, state_dir

log = logging.getLogger("sessions.mcp")

BUFFER_MAX = 1000           # messages received and not yet handed out, at most
RETRY_MIN, RETRY_MAX = 0.5, 5.0   # s between attempts to join while the daemon is away
SEEN_MAX = 4096             # ids handed out another way (ask, check_inbox) remembered

Notify = Callable[[], Awaitable[None]]


class Agent:
    """One session on the mesh, as the MCP tools see it."""

    def __init__(self, identity: Identity, socket: str | None = None,
                 timeout: float | None = None, cursor_dir: str | None = None,
                 keepalive_interval: float = DEFAULT_INTERVAL) -> None:
        self.identity = identity
        self.sid = identity.session_id
        self.registry = AsyncSessionRegistry(socket=socket, timeout=timeout)
        self.hub = AsyncCollaborationHub(self.registry)
        self.memory = AsyncSharedMemory(client=self.registry._client)
        self.socket_path: str = self.registry._client.path
        self.timeout = timeout
        self.keepalive_interval = keepalive_interval
        self.cursor_file = CursorFile(state_dir() if cursor_dir is None else Path(cursor_dir),
                                      self.sid)
        self.node_id: str | None = None
        self.delivered: int | None = None       # the cursor: last seq handed out
        self.registered = False
        self.register_sent = False          # a register request went out (see join)
        self.inbox: deque[tuple[int, Message]] = deque()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._arrived = asyncio.Event()
        self._dirty = asyncio.Event()
        self._join_lock = asyncio.Lock()
        self._keepalive: AsyncKeepAlive | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._space = threading.Condition()
        self._in_flight = 0                     # read by the thread, not yet handed out
        self.on_inbox_changed: list[Notify] = []

    # --- joining the mesh ------------------------------------------------------------------

    async def ready(self) -> None:
        """Joined, or a DaemonUnavailable (or other SDK error) that says why not. A daemon
        that stopped cleanly took its socket with it: say so at once rather than after a
        call's whole deadline."""
        if self.registered:
            if not os.path.exists(self.socket_path):
                raise DaemonUnavailable(
                    f"meshd is not running: no socket at {self.socket_path}; start it with "
                    f"`meshd` (or `systemctl start meshd`); this server reconnects by itself")
            return
        await self.join()

    async def join(self) -> None:
        """Register the session (idempotent: the same id keeps its inbox), start the
        keep-alive and the reader. The stream is opened before registering so that mail
        delivered by the registration itself (sent to the id before it existed) is seen."""
        async with self._join_lock:
            if self.registered:
                return
            node_id = (await self.registry.node_info())["node_id"]
            cursor = self.cursor_file.load(node_id)
            path, sid, timeout = self.socket_path, self.sid, self.timeout
            stream = await asyncio.to_thread(
                lambda: CollaborationHub(socket=path, timeout=timeout).subscribe(sid, cursor))
            try:
                ident = self.identity
                # (From here the daemon may hold the session even if a signal cuts the
                # join short: --on-exit offline must then still unregister it.)
                self.register_sent = True
                await self.registry.register(sid, ident.name, ident.agent_type, ident.user,
                                             list(ident.capabilities))
                self._keepalive = self.registry.keepalive(sid, self.keepalive_interval)
                await self._keepalive.start()
            except BaseException:
                await asyncio.to_thread(stream.close)
                raise
            self.node_id, self.delivered = node_id, stream.cursor
            if stream.cursor is not None:
                self.cursor_file.save(node_id, stream.cursor)
            loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._read, args=(stream, loop),
                                            name=f"mcp-reader-{sid}", daemon=True)
            self._thread.start()
            self.registered = True
            log.info("session %s registered on meshd %s (%s), cursor %s", sid, node_id[:8],
                     path, self.delivered)

    async def join_in_background(self) -> None:
        """Retry joining until it works (the daemon may start after the agent client)."""
        delay, said = RETRY_MIN, False
        while not self.registered:
            try:
                await self.join()
                return
            except SessionsError as exc:
                if not said:
                    log.warning("cannot join the mesh yet (retrying): %s", exc)
                    said = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def notifier(self) -> None:
        """Tell subscribers the inbox changed, coalescing bursts into one notice."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            for notify in list(self.on_inbox_changed):
                try:
                    await notify()
                except Exception:
                    log.exception("inbox notification failed")

    async def close(self) -> None:
        """Stop the reader and the keep-alive. Unregistering is the caller's choice."""
        self._stop.set()
        with self._space:
            self._space.notify_all()
        if self._keepalive is not None:
            await self._keepalive.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 3.0)
        await self.registry.close()

    # --- the reader thread -----------------------------------------------------------------

    def _read(self, stream: Any, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while not self._stop.is_set():
                with self._space:
                    while self._in_flight >= BUFFER_MAX and not self._stop.is_set():
                        self._space.wait(0.5)
                try:
                    msg = stream.next(0.25)
                except SessionsError as exc:
                    log.warning("message stream failed, retrying: %s", exc)
                    self._stop.wait(RETRY_MIN)
                    continue
                if msg is None:
                    continue
                with self._space:
                    self._in_flight += 1
                try:
                    loop.call_soon_threadsafe(self._arrive, stream.cursor, msg)
                except RuntimeError:            # the loop closed under us: shutting down
                    return
        finally:
            stream.close()

    def _arrive(self, seq: int, msg: Message) -> None:
        self.inbox.append((seq, msg))
        self._arrived.set()
        self._arrived = asyncio.Event()
        self._dirty.set()

    # --- handing messages out --------------------------------------------------------------

    def seen(self, message_ids: list[str]) -> None:
        """Messages the agent got another way (ask's answer, check_inbox with mark_read):
        wait_for_messages skips them rather than showing them twice."""
        for mid in message_ids:
            self._seen[mid] = None
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)

    def take(self, limit: int) -> list[Message]:
        """Up to `limit` messages received and not handed out yet; moves the cursor."""
        out: list[Message] = []
        taken = 0
        while self.inbox and len(out) < limit:
            seq, msg = self.inbox.popleft()
            taken += 1
            if self.delivered is not None and seq <= self.delivered:
                continue
            self.delivered = seq
            if msg.message_id in self._seen:
                continue
            out.append(msg)
        if taken:
            with self._space:
                self._in_flight -= taken
                self._space.notify_all()
            if self.node_id is not None and self.delivered is not None:
                self.cursor_file.save(self.node_id, self.delivered)
        return out

    async def wait(self, timeout: float, limit: int,
                   tick: Callable[[float], Awaitable[None]] | None = None,
                   tick_every: float = 15.0) -> list[Message]:
        """Messages as soon as there are any, or [] after `timeout` seconds; `tick(elapsed)`
        is awaited every `tick_every` seconds meanwhile (progress for the client)."""
        start = time.monotonic()
        deadline = start + timeout
        next_tick = start + tick_every
        while True:
            arrived = self._arrived
            got = self.take(limit)
            if got:
                return got
            now = time.monotonic()
            if now >= deadline:
                return []
            try:
                await asyncio.wait_for(arrived.wait(), min(deadline, next_tick) - now)
            except asyncio.TimeoutError:
                pass
            if tick is not None and time.monotonic() >= next_tick:
                next_tick += tick_every
                await tick(time.monotonic() - start)
