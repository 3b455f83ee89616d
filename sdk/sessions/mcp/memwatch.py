"""Watched memory keys for the agent: the `watch_memory` and `memory_changes` tools and the
`memory://changes` resource, whose subscribers are told when a watched key changes.

An agent cannot be interrupted, so a change is kept until it asks: `watch_memory(prefix,
tags)` adds a filter; one memory watch (`SharedMemory.watch`, blocking, in a thread of its
own as the inbox reader is) follows every change this host's daemon sees, and those a
filter wants wait in a bounded buffer for `memory_changes`, which can also block until
one comes. Clients that subscribe to `memory://changes` get
`notifications/resources/updated` (handshake era) or a `ResourceUpdated` event
(`subscriptions/listen`) when one arrives: the cue to call `memory_changes`.
(No `from __future__ import annotations`: the SDK reads these signatures at run time.)
"""

import asyncio
import json
import logging
import threading
import time
from collections import deque
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import ResourceUpdated, SubscriptionBus
from pydantic import Field

from sessions import MemoryEvent, SessionsError, SharedMemory
from sessions.mcp import format as fmt
from sessions.mcp.agent import Agent
from sessions.mcp.common import READ, Limit, guard, tool
from sessions.mcp.resources import Subscribers

log = logging.getLogger("sessions.mcp")

CHANGES_URI = "memory://changes"
MAX_WATCHES = 32            # filters one server keeps
BUFFER_MAX = 1000           # changes kept for memory_changes; the oldest go first
SHOWN = 50                  # changes a read of the resource shows

Prefix = Annotated[str | None, Field(max_length=1024, description="Keys starting with this, "
                                     "e.g. project/; none: every key")]
Tags = Annotated[list[str] | None, Field(max_length=64, description="Only entries with any "
                                         "of these tags")]


class Watched:
    """The filters, the reader thread and the buffer of changes they want."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.filters: list[tuple[str | None, frozenset[str]]] = []
        self.buffer: deque[MemoryEvent] = deque()
        self.dropped = 0
        self.arrived = asyncio.Event()
        self.on_change: list[Any] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def wants(self, ev: MemoryEvent) -> bool:
        if ev.kind == "gap":
            return True
        return any((p is None or ev.key.startswith(p)) and (not t or not t.isdisjoint(ev.tags))
                   for p, t in self.filters)

    def start(self) -> None:
        if self._thread is not None:
            return
        watch = SharedMemory(socket=self.agent.socket_path, timeout=self.agent.timeout).watch()
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._read, args=(watch, loop),
                                        name="mcp-memory-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _read(self, watch: Any, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while not self._stop.is_set():
                try:
                    ev = watch.next(0.25)
                except SessionsError as exc:
                    log.warning("memory watch failed, retrying: %s", exc)
                    self._stop.wait(0.5)
                    continue
                if ev is None or not self.wants(ev):
                    continue
                try:
                    loop.call_soon_threadsafe(self._arrive, ev)
                except RuntimeError:            # the loop closed: shutting down
                    return
        finally:
            watch.close()

    def _arrive(self, ev: MemoryEvent) -> None:
        self.buffer.append(ev)
        while len(self.buffer) > BUFFER_MAX:
            self.buffer.popleft()
            self.dropped += 1
        self.arrived.set()
        for notify in list(self.on_change):
            asyncio.ensure_future(notify())

    def take(self, limit: int) -> list[MemoryEvent]:
        out = []
        while self.buffer and len(out) < limit:
            out.append(self.buffer.popleft())
        if not self.buffer:
            self.arrived.clear()
        return out


def event(ev: MemoryEvent) -> dict[str, Any]:
    """A change as one compact JSON object."""
    d: dict[str, Any] = {"kind": ev.kind if ev.kind != "put" else ev.op, "key": ev.key,
                         "cursor": ev.cursor}
    if ev.kind == "gap":
        d["note"] = "changes were trimmed before they were read: re-read the keys you need"
        return d
    d["origin"] = ev.origin[:12]
    if ev.entry is not None:
        d["value"] = fmt.entry(ev.entry, 2000).get("value")
    return d


def register(mcp: MCPServer, agent: Agent, bus: SubscriptionBus,
             subscribers: Subscribers) -> Watched:
    watched = Watched(agent)
    g = guard(agent)

    async def changed() -> None:
        await subscribers.updated(CHANGES_URI)
        await bus.publish(ResourceUpdated(uri=CHANGES_URI))

    watched.on_change.append(changed)

    @tool(mcp, READ)
    @g
    async def watch_memory(prefix: Prefix = None, tags: Tags = None,
                           stop: Annotated[bool, Field(description="Remove this watch "
                                                       "instead")] = False) -> str:
        """Be told when shared memory changes: keys starting with prefix (and with any of
        tags), set, touched, deleted or expired, by any session on any host. Changes wait
        for memory_changes (which can block until one comes); clients subscribed to the
        resource memory://changes are notified. stop=true removes that watch."""
        f = (prefix, frozenset(tags or ()))
        if stop:
            if f in watched.filters:
                watched.filters.remove(f)
            return f"stopped watching {prefix or 'every key'}; {len(watched.filters)} left"
        if f not in watched.filters:
            if len(watched.filters) >= MAX_WATCHES:
                return f"already {MAX_WATCHES} watches: stop one first"
            watched.filters.append(f)
        watched.start()
        return (f"watching {prefix or 'every key'}" + (f" with tags {sorted(f[1])}" if f[1]
                                                       else "")
                + "; call memory_changes to read what changed")

    @tool(mcp, READ)
    @g
    async def memory_changes(
            timeout_s: Annotated[float, Field(ge=0, le=600, description="Wait this long for "
                                              "a change when none is waiting")] = 0,
            limit: Limit = 20) -> str:
        """The shared-memory changes on watched keys (see watch_memory) since the last call,
        oldest first, each once: kind (set, touch, delete, expire), key, value. With
        timeout_s it blocks until a change arrives or the time is up."""
        if not watched.filters:
            return "no watches: call watch_memory first"
        deadline = time.monotonic() + timeout_s
        while not watched.buffer and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(watched.arrived.wait(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
        got = watched.take(limit)
        more = f"{len(watched.buffer)} more: call again" if watched.buffer else None
        header = f"{len(got)} change{'' if len(got) == 1 else 's'}"
        if watched.dropped:
            header += f" ({watched.dropped} older ones dropped: the buffer holds {BUFFER_MAX})"
        return fmt.lines(header, [event(e) for e in got], more)

    @mcp.resource(CHANGES_URI, name="memory changes", mime_type="application/json",
                  description=f"The last shared-memory changes on watched keys (at most "
                              f"{SHOWN}, not consumed). Subscribe to be told when one "
                              f"arrives; watch_memory chooses the keys.")
    async def changes() -> str:
        return json.dumps({"watches": [{"prefix": p, "tags": sorted(t)}
                                       for p, t in watched.filters],
                           "changes": [event(e) for e in list(watched.buffer)[-SHOWN:]]},
                          ensure_ascii=False, default=fmt.json_default)

    return watched
