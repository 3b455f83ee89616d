"""The same API for asyncio: `AsyncSessionRegistry`, `AsyncCollaborationHub`,
`AsyncSharedMemory`. Every method is a coroutine with the blocking version's signature.

Against the daemon, calls from one event loop share one DEALER socket and may be in
flight together (e.g. `asyncio.gather`), which pipelines them; each still has its own
deadline. With a directory, calls run against the store directly.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import time
from typing import Any, Callable

import zmq

from meshd.errors import DaemonUnavailable, InvalidArgument, MeshError, Timeout, TooLarge
from meshd.wire.ipc import (
    BATCH, BATCHABLE, ERROR, OK, decode_reply, encode_item, encode_items, validate_args,
)
from sessions import _ops as ops
from sessions import asking
from sessions._backend import DirectoryBackend
from sessions._client import (
    MAX_REPLY_BYTES, check_listening, default_timeout, new_dealer, raise_error, resolve_socket,
)
from meshd.config import Config
from meshd.wire.schema import enum_value
from sessions._stream import DirectoryStream, MessageStream, Stream
from sessions.keepalive import DEFAULT_INTERVAL, AsyncKeepAlive
from sessions.models import MemoryEntry, MemoryType, Message, MessageType, Session, SessionStatus

log = logging.getLogger("sessions.aio")

_SWEEP = 0.05      # s between deadline checks: a call's timeout is honoured to within this
_BATCH_ITEMS = 256  # calls per batch frame at most


class _Expired(Exception):
    """A call's deadline passed (becomes Timeout for the caller)."""


# Plain ints: pyzmq's enum-typed getsockopt costs microseconds per call.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)

__all__ = ["AsyncClient", "AsyncSessionRegistry", "AsyncCollaborationHub", "AsyncSharedMemory",
           "AsyncMessageStream"]


class AsyncClient:
    """One asyncio connection to the daemon, bound to the loop that first uses it.

    The socket is watched with the loop's own reader on ZeroMQ's file descriptor and read
    with non-blocking calls, so many calls in flight cost one future each and no task per
    reply; sends that cannot go out at once (not yet connected) wait in a small queue.
    """

    def __init__(self, socket_path: str | None = None, timeout: float | None = None) -> None:
        self.path = resolve_socket(socket_path)
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self.max_frame_bytes = Config().max_frame_bytes
        self._sock: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._outbox: list[tuple[bytes, bool]] = []   # (packed item, batchable)
        self._retry: asyncio.Handle | None = None     # a pending send pass
        self._ids = itertools.count(1)
        self._deadlines: list[tuple[float, int]] = []
        self._sweeper: asyncio.TimerHandle | None = None

    def _ensure(self) -> zmq.Socket:
        if self._sock is None:
            check_listening(self.path)
            self._sock = new_dealer(self.path)
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.getsockopt(zmq.FD), self._drain)
        return self._sock

    def _drain(self) -> None:
        sock = self._sock
        while sock is not None and sock.get(_EVENTS) & _POLLIN:
            try:
                frame = sock.recv(_NOBLOCK)
            except zmq.Again:
                break
            try:
                rid, kind, body = decode_reply(frame, MAX_REPLY_BYTES)
            except MeshError:
                continue
            if kind == BATCH:
                for item in body:
                    if isinstance(item, list) and len(item) == 3:
                        self._settle(item[0], item[1], item[2])
            else:
                self._settle(rid, kind, body)

    def _settle(self, rid: Any, kind: Any, body: Any) -> None:
        fut = self._waiting.pop(rid, None) if isinstance(rid, int) else None
        if fut is None or fut.done():
            return
        if kind == OK:
            fut.set_result(body)
        elif kind == ERROR:
            try:
                raise_error(body)
            except MeshError as exc:
                fut.set_exception(exc)

    def _flush(self) -> None:
        """Send what is queued, several calls to a frame (a batch); retry shortly while the
        connection is not up yet."""
        self._retry = None
        sock = self._sock
        if sock is None:
            return
        while self._outbox:
            items, size = [], 0
            for item, batchable in self._outbox:
                if items and (not batchable or len(items) >= _BATCH_ITEMS
                              or size + len(item) > self.max_frame_bytes - 64):
                    break
                items.append(item)
                size += len(item)
                if not batchable:
                    break
            try:
                sock.send(encode_items(items), _NOBLOCK)
            except zmq.Again:
                assert self._loop is not None
                self._retry = self._loop.call_later(0.002, self._flush)
                break
            del self._outbox[:len(items)]
        self._drain()                 # a send can consume the FD's edge: look for replies

    async def call(self, command: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        limit = self.timeout if timeout is None else timeout
        self._ensure()
        req_id = next(self._ids)
        item = encode_item(req_id, command, args)
        if len(item) > self.max_frame_bytes - 16:
            raise TooLarge(f"request of {len(item)} bytes is over the "
                           f"{self.max_frame_bytes}-byte limit")
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._waiting[req_id] = fut
        # Store commands share frames; the others (streams, node info) go alone.
        self._outbox.append((item, command in BATCHABLE))
        if self._retry is None:
            # One send pass per loop turn: calls started together (gather) go out together.
            self._retry = self._loop.call_soon(self._flush)  # type: ignore[assignment]
        self._deadlines.append((self._loop.time() + limit, req_id))
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(_SWEEP, self._sweep)
        try:
            return await fut
        except _Expired:
            check_listening(self.path)
            raise Timeout(f"meshd on {self.path} did not answer {command} within {limit:g}s") from None
        except zmq.ZMQError as exc:
            raise DaemonUnavailable(f"lost the connection to meshd on {self.path}: {exc}") from exc
        finally:
            self._waiting.pop(req_id, None)

    def _sweep(self) -> None:
        """Fail the calls whose deadline has passed. One timer for all calls in flight is
        much cheaper than a timeout handle per call when thousands are pipelined."""
        assert self._loop is not None
        now = self._loop.time()
        keep = []
        for deadline, req_id in self._deadlines:
            fut = self._waiting.get(req_id)
            if fut is None or fut.done():
                continue
            if deadline <= now:
                fut.set_exception(_Expired())
            else:
                keep.append((deadline, req_id))
        self._deadlines = keep
        self._sweeper = self._loop.call_later(_SWEEP, self._sweep) if keep else None

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
            self._sock.close(linger=0)
        self._sock = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._waiting.clear()


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
            pages: list[Any] = []
            offset = 0
            for _ in range(ops.MAX_PAGES):
                answer = await self._client.call(
                    op.command, validate_args(op.command, op.page(offset)))
                pages.append(answer)
                offset += len(answer["items"])
                if not answer["more"] or not answer["items"]:
                    it = iter(pages)
                    return op.convert(ops.collect_pages(lambda at: next(it)))
            raise InvalidArgument(f"more than {ops.MAX_PAGES} pages: narrow the query")
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

    async def join(self, address: str) -> dict[str, Any]:
        return await self._run(ops.join(address))

    async def leave(self) -> dict[str, Any]:
        return await self._run(ops.leave())

    async def force_leave(self, node: str) -> dict[str, Any]:
        return await self._run(ops.force_leave(node))


class AsyncMessageStream:
    """The asyncio face of a message stream: `async for msg in stream`, or
    `await stream.next(timeout)`. The blocking stream waits in a worker thread, so the
    event loop never blocks; `cursor` resumes a later stream where this one stopped."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    @property
    def cursor(self) -> int | None:
        return self._stream.cursor

    async def next(self, timeout: float | None = None) -> Message | None:
        return await asyncio.to_thread(self._stream.next, 0.5 if timeout is None else timeout)

    def __aiter__(self) -> "AsyncMessageStream":
        return self

    async def __anext__(self) -> Message:
        while not self._stream.closed:
            msg = await asyncio.to_thread(self._stream.next, 0.5)
            if msg is not None:
                return msg
        raise StopAsyncIteration

    def close(self) -> None:
        self._stream.closed = True
        self._stream.close()


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
        stream = await self.subscribe(from_session, types=[MessageType.RESPONSE])
        try:
            request = await self.send(from_session, to_session, MessageType.REQUEST, subject,
                                      body, data)
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                msg = await stream.next(timeout=min(remaining, 1.0))
                if asking.answers(msg, request.message_id):
                    assert msg is not None
                    return msg
        finally:
            stream.close()
        raise Timeout(f"no reply from {to_session} to {request.message_id} within "
                      f"{timeout:g}s; the request was delivered and a late reply will be in "
                      f"{from_session}'s inbox")

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
