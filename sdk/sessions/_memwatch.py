"""Memory watches for the SDK: an iterator of `MemoryEvent`s that resumes from its cursor
across reconnects and daemon restarts, each event once.

Against a daemon it is a live stream like `MessageStream` (same socket handling, acks,
renewals and resubscription; only the subscribe command, its arguments and the events
differ: `MemoryWatchSubscription`). In directory mode there is no daemon to push, so it
polls the directory's change log. The asyncio face runs the blocking one in a worker
thread, as every stream's does (`AsyncStream`).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from meshd.state import memlog
from meshd.state.store import Store
from meshd.wire.ipc import validate_args
from sessions._stream import AsyncStream, BaseStream, PushStream
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


class MemoryWatch(PushStream[MemoryEvent]):
    """Iterate memory changes: `for ev in watch: ...`. `cursor` is the cursor of the last
    event handed out; pass it to a new watch to resume after it."""

    def __init__(self, socket_path: str, prefix: str | None = None,
                 tags: list[str] | None = None, cursor: int | None = None,
                 window: int = 256) -> None:
        super().__init__(socket_path,
                         MemoryWatchSubscription(prefix, list(tags or []), cursor, window))

    prefix = property(lambda self: self._state.prefix)
    tags = property(lambda self: self._state.tags)


class DirectoryMemoryWatch(BaseStream[MemoryEvent]):
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

    def close(self) -> None:
        self.closed = True


class AsyncMemoryWatch(AsyncStream[MemoryEvent]):
    """The asyncio face of a memory watch: `async for ev in watch`, or
    `await watch.next(timeout)`; the blocking watch waits in a worker thread."""
