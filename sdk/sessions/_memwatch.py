"""Memory watches for the SDK: an iterator of `MemoryEvent`s that resumes from its cursor
across reconnects and daemon restarts, each event once.

Against a daemon it is a live stream like `MessageStream` (same socket handling, acks,
renewals and resubscription; only the subscribe command, its arguments and the events
differ: `MemoryWatchSubscription`). In directory mode there is no daemon to push, so it
polls the directory's change log. The asyncio face runs the blocking one in a worker
thread, as every stream's does (`AsyncStream`).
"""

from __future__ import annotations

from typing import Any

from meshd.state import memlog
from meshd.state.store import Store
from meshd.wire.ipc import validate_args
from sessions._stream import AsyncStream, PolledStream, PushStream
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


class DirectoryMemoryWatch(PolledStream[MemoryEvent]):
    """The same interface over a directory store, by polling its change log."""

    def __init__(self, store: Store, prefix: str | None = None, tags: list[str] | None = None,
                 cursor: int | None = None) -> None:
        validate_args("memory.watch", {"prefix": prefix, "tags": tags or [], "cursor": cursor})
        self.prefix = prefix
        self.tags = list(tags or [])
        with store.read():
            head = memlog.head(store) if cursor is None else cursor
        super().__init__(store, head)

    def _fetch(self, cursor: int) -> tuple[list[tuple[int, MemoryEvent]], int]:
        rows, through = memlog.after(self.store, cursor, 256, self.prefix,
                                     frozenset(self.tags) or None)
        return [(seq, MemoryEvent.from_dict(seq, m)) for seq, m in rows], through


class AsyncMemoryWatch(AsyncStream[MemoryEvent]):
    """The asyncio face of a memory watch: `async for ev in watch`, or
    `await watch.next(timeout)`; the blocking watch waits in a worker thread."""
