"""The same API for asyncio: `AsyncSessionRegistry`, `AsyncCollaborationHub`,
`AsyncSharedMemory`. Every method is a coroutine with the blocking version's signature.

Against the daemon, calls from one event loop share one DEALER socket and may be in
flight together (e.g. `asyncio.gather`), which pipelines them; each still has its own
deadline (`AsyncClient`, in `_aioclient`, over the sans-IO core `_core`). With a
directory, calls run against the store directly.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from typing import Any, Callable

from meshd.errors import InvalidArgument
from meshd.wire.ipc import validate_args
from meshd.wire.schema import enum_value
from sessions import _ops as ops
from sessions import asking
from sessions import memory as memory_ops
from sessions._aioclient import AsyncClient
from sessions._backend import DirectoryBackend
from sessions._core import Pages
from sessions._memwatch import AsyncMemoryWatch, DirectoryMemoryWatch, MemoryWatch
from sessions._monitor import AsyncMonitorStream, MonitorStream
from sessions._stream import AsyncStream, DirectoryStream, MessageStream
from sessions.claims import AsyncClaims  # noqa: F401  (the claims' asyncio twin)
from sessions.keepalive import DEFAULT_INTERVAL, AsyncKeepAlive
from sessions.models import MemoryEntry, MemoryType, Message, MessageType, Session, SessionStatus
from sessions.models import MemoryVersion

log = logging.getLogger("sessions.aio")

__all__ = ["AsyncClient", "AsyncSessionRegistry", "AsyncCollaborationHub", "AsyncSharedMemory",
           "AsyncMessageStream", "AsyncClaims", "AsyncMemoryWatch", "AsyncMonitorStream"]


class _AsyncBase:
    def __init__(self, path: str | os.PathLike[str] | None = None, *, socket: str | None = None,
                 timeout: float | None = None, client: AsyncClient | None = None) -> None:
        # A directory is served in this process, as by the blocking classes.
        self._dir = DirectoryBackend(path) if path is not None else None
        self._store = self._dir.store if self._dir is not None else None
        self._client = None if path is not None else (client or AsyncClient(socket, timeout))

    async def _run(self, op: ops.Op) -> Any:
        if self._dir is not None:
            return self._dir.run(op)
        args = validate_args(op.command, op.args)
        assert self._client is not None
        if op.paged:
            pages = Pages()
            while pages.feed(await self._client.call(
                    op.command, validate_args(op.command, op.page(pages.offset)))):
                pass
            return op.convert(pages.items)
        return op.result(args, await self._client.call(op.command, args))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class AsyncSessionRegistry(_AsyncBase):
    async def register(self, session_id: str, agent_name: str, agent_type: str,
                       human_user: str | None = None, capabilities: list[str] | None = None,
                       metadata: dict[str, Any] | None = None) -> Session:
        return await self._run(ops.register(session_id, agent_name, agent_type, human_user,
                                            capabilities, metadata))

    async def unregister(self, session_id: str) -> bool:
        return await self._run(ops.unregister(session_id))

    async def ping(self, session_id: str) -> bool:
        return await self._run(ops.ping(session_id))

    async def get(self, session_id: str) -> Session | None:
        return await self._run(ops.get_session(session_id))

    async def update_status(self, session_id: str, status: SessionStatus | str,
                            current_task: str | None = None) -> bool:
        return await self._run(ops.update_status(session_id, status, current_task))

    async def list_sessions(self, include_offline: bool = False) -> list[Session]:
        return await self._run(ops.list_sessions(include_offline))

    async def find_sessions(self, status: SessionStatus | str | None = None,
                            agent_type: str | None = None, human_user: str | None = None,
                            capability: str | None = None) -> list[Session]:
        return await self._run(ops.find_sessions(status, agent_type, human_user, capability))

    async def get_stats(self) -> dict[str, Any]:
        return await self._run(ops.registry_stats())

    async def clear_offline(self) -> int:
        return await self._run(ops.clear_offline())

    async def peers(self) -> list[dict[str, Any]]:
        return await self._run(ops.peers())

    async def node_info(self) -> dict[str, Any]:
        return await self._run(ops.node_info())

    def keepalive(self, session_id: str, interval: float = DEFAULT_INTERVAL) -> AsyncKeepAlive:
        """`async with registry.keepalive(id):` pings the session every `interval` seconds
        from a task on the running loop (NotFound at once if it is not registered)."""
        return AsyncKeepAlive(self.ping, session_id, interval)

    async def monitor(self, level: str = "info", backlog: int = 0) -> AsyncMonitorStream:
        """As SessionRegistry.monitor: the daemon's live events."""
        if self._client is None:
            raise InvalidArgument("monitor needs a daemon: a sessions directory has no events")
        path = self._client.path
        return AsyncMonitorStream(await asyncio.to_thread(MonitorStream, path, level, backlog))

    async def join(self, address: str) -> dict[str, Any]:
        return await self._run(ops.join(address))

    async def leave(self) -> dict[str, Any]:
        return await self._run(ops.leave())

    async def force_leave(self, node: str) -> dict[str, Any]:
        return await self._run(ops.force_leave(node))


class AsyncMessageStream(AsyncStream[Message]):
    """The asyncio face of a message stream: `async for msg in stream`, or
    `await stream.next(timeout)`. The blocking stream waits in a worker thread, so the
    event loop never blocks; `cursor` resumes a later stream where this one stopped."""


class AsyncCollaborationHub(_AsyncBase):
    """Like CollaborationHub: messages live in `messages_path` if given, else where
    `registry` (an AsyncSessionRegistry) keeps its state, else in this host's meshd."""

    def __init__(self, registry: "AsyncSessionRegistry | None" = None,
                 messages_path: str | os.PathLike[str] | None = None, *,
                 socket: str | None = None, timeout: float | None = None,
                 client: AsyncClient | None = None) -> None:
        if messages_path is None and registry is not None:
            super().__init__(None, socket=socket, timeout=timeout, client=registry._client)
            self._dir, self._store, self._client = registry._dir, registry._store, registry._client
            self._owns_client = False
        else:
            super().__init__(messages_path, socket=socket, timeout=timeout, client=client)
            self._owns_client = True
        self.registry = registry
        self._handler_tasks: set[asyncio.Task[None]] = set()

    async def subscribe(self, session_id: str | None = None, cursor: int | None = None,
                        types: list[MessageType | str] | None = None) -> AsyncMessageStream:
        """Messages arriving from now on (or after `cursor`), as in the blocking hub."""
        values = [enum_value(t, MessageType, "types") for t in (types or [])]
        if self._store is not None:
            return AsyncMessageStream(DirectoryStream(self._store, session_id, cursor, values))
        assert self._client is not None
        path = self._client.path
        stream = await asyncio.to_thread(MessageStream, path, session_id, cursor, values)
        return AsyncMessageStream(stream)

    async def register_handler(self, message_type: MessageType | str,
                               handler: Callable[[Message], Any],
                               session_id: str | None = None) -> None:
        """Call handler(message) (awaited if it is a coroutine function) on this loop for
        each message of that type arriving from now on."""
        mtype = enum_value(message_type, MessageType, "message_type")
        stream = await self.subscribe(session_id, types=[mtype])

        async def pump() -> None:
            async for msg in stream:
                try:
                    result = handler(msg)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("message handler %r failed", handler)

        task = asyncio.get_running_loop().create_task(pump())
        task.stream = stream  # type: ignore[attr-defined]
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)

    async def close(self) -> None:
        for task in list(self._handler_tasks):
            task.stream.close()  # type: ignore[attr-defined]
            task.cancel()
        for task in list(self._handler_tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self._owns_client:
            await super().close()

    async def send(self, from_session: str, to_session: str, type: MessageType | str,
                   subject: str, body: str, data: dict[str, Any] | None = None,
                   in_reply_to: str | None = None, priority: str = "normal") -> Message:
        return await self._run(ops.send(from_session, to_session, type, subject, body, data,
                                        in_reply_to, priority))

    async def broadcast(self, from_session: str, subject: str, body: str,
                        data: dict[str, Any] | None = None, priority: str = "normal") -> Message:
        return await self._run(ops.broadcast(from_session, subject, body, data, priority))

    async def ask(self, from_session: str, to_session: str, subject: str, body: str,
                  data: dict[str, Any] | None = None, timeout: float = 60.0) -> Message:
        """As CollaborationHub.ask: the RESPONSE to a REQUEST, or Timeout."""
        wait = asking.Asking(from_session, to_session, timeout, step=1.0)
        stream = await self.subscribe(from_session, types=[MessageType.RESPONSE])
        try:
            wait.sent(await self.send(from_session, to_session, MessageType.REQUEST, subject,
                                      body, data), time.monotonic())
            while (left := wait.wait(time.monotonic())) is not None:
                msg = await stream.next(timeout=left)
                if wait.answered(msg):
                    assert msg is not None
                    return msg
        finally:
            stream.close()
        raise wait.expired()

    async def dispatch(self, from_session: str, capability: str, subject: str, body: str,
                       data: dict[str, Any] | None = None,
                       type: MessageType | str = MessageType.REQUEST,
                       priority: str = "normal") -> Message:
        """As CollaborationHub.dispatch: to one IDLE or ACTIVE session with `capability`."""
        found = await self._run(ops.find_sessions(capability=capability))
        last = await self._run(ops.memory_get(asking.dispatch_key(capability), {}))
        chosen = asking.pick(found, capability, from_session, last)
        msg = await self.send(from_session, chosen.session_id, type, subject, body, data,
                              priority=priority)
        for op in asking.record_ops(from_session, capability, last, chosen.session_id):
            await self._run(op)
        return msg

    async def get_message_status(self, message_id: str) -> dict[str, Any] | None:
        return await self._run(ops.message_status(message_id))

    async def get_sent(self, session_id: str) -> list[dict[str, Any]]:
        return await self._run(ops.sent_messages(session_id))

    async def reply(self, from_session: str, to_message: Message, body: str,
                    data: dict[str, Any] | None = None) -> Message:
        return await self._run(ops.reply(from_session, to_message, body, data))

    async def ping_session(self, from_session: str, to_session: str) -> Message:
        return await self._run(ops.ping_session(from_session, to_session))

    async def get_messages(self, session_id: str, include_broadcasts: bool = True,
                           message_type: MessageType | str | None = None,
                           unread_only: bool = False) -> list[Message]:
        return await self._run(ops.get_messages(session_id, include_broadcasts, message_type,
                                                unread_only))

    async def mark_read(self, session_id: str, message_ids: list[str] | None = None) -> int:
        return await self._run(ops.mark_read(session_id, message_ids))

    async def get_conversation(self, message_id: str) -> list[Message]:
        return await self._run(ops.get_conversation(message_id))

    async def get_stats(self) -> dict[str, Any]:
        return await self._run(ops.hub_stats())


class AsyncSharedMemory(_AsyncBase):
    async def set(self, session_id: str, key: str, value: Any,
                  type: MemoryType | str = MemoryType.STATE, ttl: float | None = None,
                  tags: list[str] | None = None,
                  metadata: dict[str, Any] | None = None) -> MemoryEntry:
        return await self._run(ops.memory_set(session_id, key, value, type, ttl, tags, metadata))

    async def get(self, key: str, default: Any = None) -> Any:
        return await self._run(ops.memory_get(key, default))

    async def get_entry(self, key: str) -> MemoryEntry | None:
        return await self._run(ops.memory_get_entry(key))

    async def get_all(self, key: str) -> list[MemoryEntry]:
        return await self._run(ops.memory_get_all(key))

    async def search(self, key_pattern: str) -> list[MemoryEntry]:
        return await self._run(ops.memory_search(key_pattern))

    async def get_by_tags(self, tags: list[str], match_all: bool = False) -> list[MemoryEntry]:
        return await self._run(ops.memory_by_tags(tags, match_all))

    async def get_by_session(self, session_id: str) -> list[MemoryEntry]:
        return await self._run(ops.memory_by_session(session_id))

    async def delete(self, key: str, session_id: str | None = None) -> int:
        return await self._run(ops.memory_delete(key, session_id))

    async def clear(self, session_id: str | None = None) -> int:
        return await self._run(ops.memory_clear(session_id))

    async def get_stats(self) -> dict[str, Any]:
        return await self._run(ops.memory_stats())

    async def touch(self, key: str, ttl: float | None = None) -> MemoryEntry:
        """As SharedMemory.touch: renew the TTL of the key's newest live entry."""
        return await self._run(memory_ops.memory_touch(key, ttl))

    async def history(self, key: str, limit: int | None = None) -> list[MemoryVersion]:
        """As SharedMemory.history: the key's last versions as this host saw them."""
        return await self._run(memory_ops.memory_history(key, limit))

    async def watch(self, prefix: str | None = None, tags: list[str] | None = None,
                    cursor: int | None = None) -> AsyncMemoryWatch:
        """As SharedMemory.watch: memory changes from now on (or after `cursor`)."""
        if self._store is not None:
            return AsyncMemoryWatch(DirectoryMemoryWatch(self._store, prefix, tags, cursor))
        assert self._client is not None
        path = self._client.path
        watch = await asyncio.to_thread(MemoryWatch, path, prefix, tags, cursor)
        return AsyncMemoryWatch(watch)
