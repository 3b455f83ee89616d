"""Live message streams for the SDK: an iterator of incoming messages that resumes from
its cursor across reconnects and daemon restarts, and the background thread that feeds
`register_handler` callbacks.

Against a daemon, a stream has its own DEALER socket: it subscribes with its cursor,
receives pushed events, acks them (which also renews the subscription), and when the
daemon forgets it (restart, idle expiry) subscribes again from the last cursor it
delivered. The protocol and its decisions are `_subscription.Subscription` (no I/O);
`MessageStream` carries them out on the socket. In directory mode there is no daemon to
push, so the stream polls the store.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Generic, Iterator, TypeVar

import zmq

from meshd.errors import DaemonUnavailable, MeshError, NotFound
from meshd.state import mail as store_messages
from meshd.state.store import Store
from meshd.wire.ipc import validate_args
from sessions._client import check_listening, new_dealer
from sessions._subscription import (  # noqa: F401  (the constants: re-exported, as before)
    ACK_EVERY, ACK_IDLE, RENEW_EVERY, RETRY_EVERY, SUBSCRIBE_WAIT, Subscription,
)
from sessions.models import Message

log = logging.getLogger("sessions.stream")

T = TypeVar("T")
S = TypeVar("S", bound="BaseStream[Any]")


class BaseStream(Generic[T]):
    """Iteration and `with` support shared by every kind of stream (messages, memory
    events, monitor events; pushed by a daemon or polled from a directory)."""

    closed: bool

    def next(self, timeout: float | None = None) -> T | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[T]:
        while not self.closed:
            item = self.next(timeout=None)
            if item is not None:
                yield item

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PushStream(BaseStream[T]):
    """What the daemon pushes on one subscription (`state`: its kind, e.g. messages,
    memory events, monitor events), carried out on its own socket. `cursor` is the
    cursor of the last item handed out."""

    def __init__(self, socket_path: str, state: Subscription) -> None:
        self.path = socket_path
        self._state = state
        validate_args(state.command, state.args())
        self._sock: zmq.Socket | None = None
        self._last_attempt = 0.0
        self.closed = False
        # Told "lost" when the daemon stops answering and "back" when the stream is
        # subscribed again (e.g. `sessions watch` says so on stderr); None: silent.
        self.on_state: Callable[[str], None] | None = None
        self._lost = False
        self._subscribe()       # pin the cursor now: "from now on" means from this call

    @property
    def cursor(self) -> int | None:
        return self._state.cursor

    @cursor.setter
    def cursor(self, value: int | None) -> None:
        self._state.cursor = value

    # --- I/O -----------------------------------------------------------------------------------

    def _subscribe(self) -> None:
        """(Re)subscribe from our cursor; waits at most a couple of seconds for the answer."""
        self._last_attempt = time.monotonic()
        if self._sock is None:
            check_listening(self.path)
            self._sock = new_dealer(self.path)
        deadline = time.monotonic() + SUBSCRIBE_WAIT
        while True:
            try:
                self._sock.send(self._state.subscribe(), zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise DaemonUnavailable(f"cannot reach meshd on {self.path}") from None
                self._sock.poll(50, zmq.POLLOUT)
        while self._state.sub is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(remaining * 1000, zmq.POLLIN):
                self._drop_socket()
                raise DaemonUnavailable(f"meshd on {self.path} did not answer a subscribe")
            self._handle(self._sock.recv(zmq.NOBLOCK))
        self._state.last_renew = time.monotonic()

    def _note(self, lost: bool) -> None:
        if lost != self._lost:
            self._lost = lost
            if self.on_state is not None:
                self.on_state("lost" if lost else "back")

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = None
        self._state.sub = None

    def _handle(self, frame: bytes) -> None:
        if self._state.feed(frame):
            self._note(True)                        # the daemon forgot us: resubscribe

    def _ack(self) -> None:
        frame = self._state.ack()
        if frame is None or self._sock is None:
            return
        try:
            self._sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return
        self._state.acked(time.monotonic())

    # --- public ------------------------------------------------------------------------------

    def next(self, timeout: float | None = None) -> T | None:
        """The next item, or None when `timeout` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        state = self._state
        while not self.closed:
            item: T | None = state.take()  # type: ignore[assignment]
            if item is not None:
                if state.ack_full():
                    self._ack()
                return item
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            if state.sub is None:
                if now - self._last_attempt < RETRY_EVERY:
                    time.sleep(min(RETRY_EVERY, 0.05))
                    continue
                try:
                    self._subscribe()
                    self._note(False)
                except DaemonUnavailable as exc:
                    log.debug("waiting for meshd: %s", exc)
                    self._drop_socket()
                    self._note(True)
                continue
            acking = state.ack_now(now)
            if acking:
                self._ack()
            wait = state.wait(now, deadline, after_ack=acking)
            assert self._sock is not None
            if self._sock.poll(wait * 1000, zmq.POLLIN):
                while self._sock is not None and self._sock.poll(0, zmq.POLLIN):
                    self._handle(self._sock.recv(zmq.NOBLOCK))
            elif state.silent(now):
                self._drop_socket()                 # no answer to our acks: reconnect
                self._note(True)
        return None

    def close(self) -> None:
        frame = self._state.close()
        if frame is not None and self._sock is not None:
            try:
                self._sock.send(frame, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.closed = True
        self._drop_socket()


class MessageStream(PushStream[Message]):
    """Iterate incoming messages: `for msg in stream: ...`. `cursor` is the sequence number
    of the last message handed out; pass it to a new stream to resume after it."""

    def __init__(self, socket_path: str, session_id: str | None = None, cursor: int | None = None,
                 types: list[str] | None = None, window: int = 256) -> None:
        super().__init__(socket_path, Subscription(session_id, cursor, types or [], window))

    # The subscription's fields, read as the stream's own.
    session_id = property(lambda self: self._state.session_id)
    types = property(lambda self: self._state.types)
    window = property(lambda self: self._state.window)


class PolledStream(BaseStream[T]):
    """A stream over a directory store, by polling (there is no daemon to push): a kind
    gives `_fetch`, the rows after a cursor; this hands them out one at a time."""

    POLL = 0.05

    def __init__(self, store: Store, cursor: int) -> None:
        self.store = store
        self.cursor: int = cursor
        self._pending: deque[tuple[int, T]] = deque()
        self.closed = False

    def _fetch(self, cursor: int) -> tuple[list[tuple[int, T]], int]:
        """Up to a page of (seq, item) after `cursor`, and the cursor the read covered
        (past rows a filter skipped)."""
        raise NotImplementedError

    def next(self, timeout: float | None = None) -> T | None:
        """The next item, or None when `timeout` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            if self._pending:
                self.cursor, item = self._pending.popleft()
                return item
            with self.store.read():
                rows, through = self._fetch(self.cursor)
            self._pending.extend(rows)
            if rows:
                continue
            self.cursor = max(self.cursor, through)
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(self.POLL)
        return None

    def close(self) -> None:
        self.closed = True


class DirectoryStream(PolledStream[Message]):
    """The message stream's interface over a directory store."""

    def __init__(self, store: Store, session_id: str | None = None, cursor: int | None = None,
                 types: list[str] | None = None) -> None:
        self.session_id = session_id
        self.types = types or []
        with store.lock:
            head = store_messages.head(store, session_id) if cursor is None else cursor
        super().__init__(store, head)

    def _fetch(self, cursor: int) -> tuple[list[tuple[int, Message]], int]:
        rows = store_messages.after(self.store, self.session_id, cursor, 256, self.types)
        return [(seq, Message.from_dict(m)) for seq, m in rows], cursor


Stream = MessageStream | DirectoryStream


class AsyncStream(Generic[T]):
    """The asyncio face of any stream: `async for item in stream`, or
    `await stream.next(timeout)`. The blocking stream waits in a worker thread, so the
    event loop never blocks; `cursor` resumes a later stream where this one stopped."""

    def __init__(self, stream: BaseStream[T]) -> None:
        self._stream = stream

    @property
    def cursor(self) -> int | None:
        return self._stream.cursor  # type: ignore[attr-defined, no-any-return]

    async def next(self, timeout: float | None = None) -> T | None:
        """The next item, or None when `timeout` seconds pass without one."""
        return await asyncio.to_thread(self._stream.next, 0.5 if timeout is None else timeout)

    def __aiter__(self: "A") -> "A":
        return self

    async def __anext__(self) -> T:
        while not self._stream.closed:
            item = await asyncio.to_thread(self._stream.next, 0.5)
            if item is not None:
                return item
        raise StopAsyncIteration

    def close(self) -> None:
        self._stream.closed = True
        self._stream.close()


A = TypeVar("A", bound=AsyncStream[Any])


class HandlerThread:
    """Feeds registered handlers from one stream in a daemon thread. A handler that raises
    is logged and does not stop the others or later messages."""

    def __init__(self, stream: Stream, handlers: dict[str, list[Callable[[Message], Any]]]) -> None:
        self.stream = stream
        self.handlers = handlers
        self.delivered = 0
        self._thread = threading.Thread(target=self._run, name="sessions-handlers", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.stream.closed:
            try:
                msg = self.stream.next(timeout=0.5)
            except MeshError as exc:
                log.warning("message stream failed, retrying: %s", exc)
                time.sleep(RETRY_EVERY)
                continue
            if msg is None:
                continue
            for handler in list(self.handlers.get(msg.type.value, ())):
                try:
                    handler(msg)
                except Exception:
                    log.exception("message handler %r failed", handler)
            self.delivered += 1

    def stop(self, timeout: float = 2.0) -> None:
        self.stream.closed = True
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.stream.close()


__all__ = ["PushStream", "PolledStream", "MessageStream", "DirectoryStream", "AsyncStream", "HandlerThread",
           "NotFound"]
