"""Memory watches for the SDK: an iterator of `MemoryEvent`s that resumes from its cursor
across reconnects and daemon restarts, each event once.

Against a daemon it is a live stream like `MessageStream` (same socket handling, acks,
renewals and resubscription; only the subscribe command, its arguments and the events
differ: `MemoryWatchSubscription`). In directory mode there is no daemon to push, so it
polls the directory's change log. The asyncio face runs the blocking one in a worker
thread, as `AsyncMessageStream` does.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Callable, Iterator

from meshd.state import memlog
from meshd.state.store import Store
from meshd.wire.ipc import validate_args
from sessions._stream import MessageStream
from sessions._subscription import Subscription
from sessions.models import MemoryEvent

__all__ = ["MemoryWatch", "DirectoryMemoryWatch", "AsyncMemoryWatch", "MemoryWatchSubscription"]


class MemoryWatchSubscription(Subscription):
    """The protocol of one memory watch (`memory.watch`; acks and closes as any stream)."""

    command = "memory.watch"

    def __init__(self, prefix: str | None, tags: list[str], cursor: int | None,
                 window: int) -> None:
        super().__init__(None, cursor, [], window)
        self.prefix = prefix
        self.tags = tags

    def args(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "tags": self.tags, "cursor": self.cursor,
                "window": self.window}

    def convert(self, seq: int, message: Any) -> MemoryEvent:
        return MemoryEvent.from_dict(seq, message)


class MemoryWatch(MessageStream):
    """Iterate memory changes: `for ev in watch: ...`. `cursor` is the cursor of the last
    event handed out; pass it to a new watch to resume after it."""

    def __init__(self, socket_path: str, prefix: str | None = None,
                 tags: list[str] | None = None, cursor: int | None = None,
                 window: int = 256) -> None:
        # (MessageStream's fields, with a memory watch's subscription.)
        self.path = socket_path
        self._state = MemoryWatchSubscription(prefix, list(tags or []), cursor, window)
        validate_args("memory.watch", self._state.args())
        self._sock = None
        self._last_attempt = 0.0
        self.closed = False
        self.on_state: Callable[[str], None] | None = None
        self._lost = False
        self._subscribe()       # pin the cursor now: "from now on" means from this call

    prefix = property(lambda self: self._state.prefix)
    tags = property(lambda self: self._state.tags)

    def next(self, timeout: float | None = None) -> MemoryEvent | None:  # type: ignore[override]
        """The next event, or None when `timeout` seconds pass without one."""
        return super().next(timeout)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[MemoryEvent]:  # type: ignore[override]
        while not self.closed:
            ev = self.next(timeout=None)
            if ev is not None:
                yield ev

    def __enter__(self) -> "MemoryWatch":
        return self


class DirectoryMemoryWatch:
    """The same interface over a directory store, by polling its change log."""

    POLL = 0.05

    def __init__(self, store: Store, prefix: str | None = None, tags: list[str] | None = None,
                 cursor: int | None = None) -> None:
        validate_args("memory.watch", {"prefix": prefix, "tags": tags or [], "cursor": cursor})
        self.store = store
        self.prefix = prefix
        self.tags = list(tags or [])
        with store.read():
            self.cursor: int | None = memlog.head(store) if cursor is None else cursor
        self._pending: deque[MemoryEvent] = deque()
        self.closed = False

    def next(self, timeout: float | None = None) -> MemoryEvent | None:
        """The next event, or None when `timeout` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        tags = frozenset(self.tags) or None
        while not self.closed:
            if self._pending:
                ev = self._pending.popleft()
                self.cursor = ev.cursor
                return ev
            assert self.cursor is not None
            with self.store.read():
                rows, through = memlog.after(self.store, self.cursor, 256, self.prefix, tags)
            self._pending.extend(MemoryEvent.from_dict(seq, m) for seq, m in rows)
            if rows:
                continue
            self.cursor = max(self.cursor, through)     # rows the filter skipped
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(self.POLL)
        return None

    def __iter__(self) -> Iterator[MemoryEvent]:
        while not self.closed:
            ev = self.next(timeout=None)
            if ev is not None:
                yield ev

    def __enter__(self) -> "DirectoryMemoryWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True


class AsyncMemoryWatch:
    """The asyncio face of a memory watch: `async for ev in watch`, or
    `await watch.next(timeout)`; the blocking watch waits in a worker thread."""

    def __init__(self, watch: MemoryWatch | DirectoryMemoryWatch) -> None:
        self._watch = watch

    @property
    def cursor(self) -> int | None:
        return self._watch.cursor

    async def next(self, timeout: float | None = None) -> MemoryEvent | None:
        """The next event, or None when `timeout` seconds pass without one."""
        return await asyncio.to_thread(self._watch.next, 0.5 if timeout is None else timeout)

    def __aiter__(self) -> "AsyncMemoryWatch":
        return self

    async def __anext__(self) -> MemoryEvent:
        while not self._watch.closed:
            ev = await asyncio.to_thread(self._watch.next, 0.5)
            if ev is not None:
                return ev
        raise StopAsyncIteration

    def close(self) -> None:
        self._watch.closed = True
        self._watch.close()
