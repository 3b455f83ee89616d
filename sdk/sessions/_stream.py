"""Live message streams for the SDK: an iterator of incoming messages that resumes from
its cursor across reconnects and daemon restarts, and the background thread that feeds
`register_handler` callbacks.

Against a daemon, a stream has its own DEALER socket: it subscribes with its cursor,
receives pushed events, acks them (which also renews the subscription), and when the
daemon forgets it (restart, idle expiry) subscribes again from the last cursor it
delivered. Events at or below that cursor are dropped, so nothing is delivered twice.
In directory mode there is no daemon to push, so the stream polls the store.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

import zmq

from meshd.errors import DaemonUnavailable, MeshError, NotFound
from meshd.state import messages as store_messages
from meshd.state.store import Store
from meshd.wire.ipc import ERROR, EVENT, OK, decode_reply, encode_request, validate_args
from sessions._client import MAX_REPLY_BYTES, check_listening, new_dealer, raise_error
from sessions.models import Message

log = logging.getLogger("sessions.stream")

ACK_EVERY = 32            # events between acks
ACK_IDLE = 0.01           # s a partial ack waits for more events (saves acks under load)
RENEW_EVERY = 1.0         # s of silence between renewals (acks double as keep-alives)
RETRY_EVERY = 0.5         # s between attempts to (re)subscribe while the daemon is away


class _Iterable:
    """Iteration and `with` support shared by both kinds of stream."""

    closed: bool

    def next(self, timeout: float | None = None) -> Message | None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Message]:
        while not self.closed:
            msg = self.next(timeout=None)
            if msg is not None:
                yield msg

    def __enter__(self) -> "_Iterable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MessageStream(_Iterable):
    """Iterate incoming messages: `for msg in stream: ...`. `cursor` is the sequence number
    of the last message handed out; pass it to a new stream to resume after it."""

    def __init__(self, socket_path: str, session_id: str | None = None, cursor: int | None = None,
                 types: list[str] | None = None, window: int = 256) -> None:
        self.path = socket_path
        self.session_id = session_id
        self.cursor = cursor
        self.types = types or []
        self.window = window
        validate_args("stream.subscribe", self._sub_args())
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._sub: int | None = None
        self._sub_req: int | None = None
        self._unacked = 0
        self._last_renew = 0.0
        self._last_attempt = 0.0
        self._pending: deque[tuple[int, Message]] = deque()
        self.closed = False
        # Told "lost" when the daemon stops answering and "back" when the stream is
        # subscribed again (e.g. `sessions watch` says so on stderr); None: silent.
        self.on_state: Callable[[str], None] | None = None
        self._lost = False
        self._subscribe()       # pin the cursor now: "from now on" means from this call

    def _sub_args(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "cursor": self.cursor, "types": self.types,
                "window": self.window}

    # --- protocol ----------------------------------------------------------------------------

    def _request(self, command: str, args: dict[str, Any]) -> int:
        assert self._sock is not None
        req_id = next(self._ids)
        self._sock.send(encode_request(req_id, command, args), zmq.NOBLOCK)
        return req_id

    def _subscribe(self) -> None:
        """(Re)subscribe from our cursor; waits at most a couple of seconds for the answer."""
        self._last_attempt = time.monotonic()
        if self._sock is None:
            check_listening(self.path)
            self._sock = new_dealer(self.path)
        self._sub = None
        deadline = time.monotonic() + 2.0
        while True:
            try:
                self._sub_req = self._request("stream.subscribe", self._sub_args())
                break
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise DaemonUnavailable(f"cannot reach meshd on {self.path}") from None
                self._sock.poll(50, zmq.POLLOUT)
        while self._sub is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(remaining * 1000, zmq.POLLIN):
                self._drop_socket()
                raise DaemonUnavailable(f"meshd on {self.path} did not answer a subscribe")
            self._handle(self._sock.recv(zmq.NOBLOCK))
        self._last_renew = time.monotonic()

    def _note(self, lost: bool) -> None:
        if lost != self._lost:
            self._lost = lost
            if self.on_state is not None:
                self.on_state("lost" if lost else "back")

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = None
        self._sub = None

    def _handle(self, frame: bytes) -> None:
        try:
            rid, kind, body = decode_reply(frame, MAX_REPLY_BYTES)
        except MeshError:
            return
        if kind == EVENT and rid == self._sub_req and isinstance(body, dict):
            if body.get("sub") != self._sub or self._sub is None:
                return                              # from a subscription we replaced
            seq = body.get("seq")
            if isinstance(seq, int) and (self.cursor is None or seq > self.cursor):
                self._pending.append((seq, Message.from_dict(body["message"])))
        elif rid == self._sub_req and kind == OK:
            self._sub = body["sub"]
            if self.cursor is None:
                self.cursor = body["cursor"]
        elif kind == ERROR and isinstance(body, dict):
            if body.get("code") == "not_found":     # the daemon forgot us: resubscribe
                self._sub = None
                self._note(True)                    # (a restart, or we were idle too long)
            elif rid == self._sub_req:
                raise_error(body)

    def _ack(self) -> None:
        if self._sub is None or self._sock is None or self.cursor is None:
            return
        try:
            self._request("stream.ack", {"sub": self._sub, "cursor": self.cursor})
        except zmq.Again:
            return
        self._unacked = 0
        self._last_renew = time.monotonic()

    # --- public ------------------------------------------------------------------------------

    def next(self, timeout: float | None = None) -> Message | None:
        """The next message, or None when `timeout` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            if self._pending:
                seq, msg = self._pending.popleft()
                self.cursor = seq
                self._unacked += 1
                if self._unacked >= ACK_EVERY:
                    self._ack()
                return msg
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            if self._sub is None:
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
            since = now - self._last_renew
            if (self._unacked and since >= ACK_IDLE) or since >= RENEW_EVERY:
                self._ack()
                since = 0.0
            wait = RENEW_EVERY if deadline is None else min(RENEW_EVERY, deadline - now)
            if self._unacked:
                wait = min(wait, max(ACK_IDLE - since, 0.0))
            assert self._sock is not None
            if self._sock.poll(max(wait, 0) * 1000, zmq.POLLIN):
                while self._sock is not None and self._sock.poll(0, zmq.POLLIN):
                    self._handle(self._sock.recv(zmq.NOBLOCK))
            elif now - self._last_renew > 3 * RENEW_EVERY:
                self._drop_socket()                 # no answer to our acks: reconnect
                self._note(True)
        return None

    def close(self) -> None:
        if self._sub is not None and self._sock is not None:
            try:
                self._request("stream.close", {"sub": self._sub})
            except zmq.ZMQError:
                pass
        self.closed = True
        self._drop_socket()


class DirectoryStream(_Iterable):
    """The same interface over a directory store, by polling (there is no daemon to push)."""

    POLL = 0.05

    def __init__(self, store: Store, session_id: str | None = None, cursor: int | None = None,
                 types: list[str] | None = None) -> None:
        self.store = store
        self.session_id = session_id
        self.types = types or []
        with store.lock:
            self.cursor = store_messages.head(store, session_id) if cursor is None else cursor
        self._pending: deque[tuple[int, Message]] = deque()
        self.closed = False

    def next(self, timeout: float | None = None) -> Message | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            if self._pending:
                self.cursor, msg = self._pending.popleft()
                return msg
            with self.store.read():
                rows = store_messages.after(self.store, self.session_id, self.cursor, 256,
                                            self.types)
            self._pending.extend((seq, Message.from_dict(m)) for seq, m in rows)
            if rows:
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(self.POLL)
        return None

    def close(self) -> None:
        self.closed = True


Stream = MessageStream | DirectoryStream


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


__all__ = ["MessageStream", "DirectoryStream", "HandlerThread", "NotFound"]
