"""SharedMemory: keys with a history of typed, tagged entries, optionally expiring, and
the change events, TTL renewals and per-key history built on them.

TTL rules: every set adds an entry with its own `ttl` (None: it never expires), counted
from when the daemon stamped it; it leaves earlier entries' TTLs as they were, and reads
show the newest entry still live. `touch(key, ttl)` adds a version of the key's newest
live entry (same value, type, session, tags and metadata; no value resent) with `ttl`, or
with that entry's own TTL length when None, counted again from now; it replicates like a
set. Expiry instants are computed from the entry's clock stamp, the same on every host.
"""

from __future__ import annotations

import os
from typing import Any

from sessions import _ops as ops
from sessions._backend import Backend, DaemonBackend, DirectoryBackend, backend_for
from sessions._memwatch import DirectoryMemoryWatch, MemoryWatch
from sessions.models import MemoryEntry, MemoryEvent, MemoryType, MemoryVersion, new_id

__all__ = ["SharedMemory", "MemoryEntry", "MemoryType", "MemoryEvent", "MemoryVersion",
           "MemoryWatch", "DirectoryMemoryWatch"]

#: Entry ids of touch versions start with this (the history's op says "touch").
TOUCH_PREFIX = "touch:"


def memory_touch(key: str, ttl: float | None = None) -> ops.Op:
    """The touch call; its id is chosen here so that a retried touch adds one version."""
    return ops.Op("memory.touch", {"key": key, "ttl": ttl,
                                   "entry_id": f"{TOUCH_PREFIX}{new_id()}"},
                  MemoryEntry.from_dict)


def memory_history(key: str, limit: int | None = None) -> ops.Op:
    return ops.Op("memory.history", {"key": key, "limit": limit},
                  lambda rows: [MemoryVersion.from_dict(r) for r in rows])


class SharedMemory:
    """Shared memory. With no path it is this host's meshd, replicated across the mesh;
    with a directory it is kept in that directory, with no daemon."""

    def __init__(self, memory_path: str | os.PathLike[str] | None = None, *,
                 socket: str | None = None, timeout: float | None = None) -> None:
        self._backend: Backend = backend_for(memory_path, socket, timeout)

    def set(self, session_id: str, key: str, value: Any, type: MemoryType | str = MemoryType.STATE,
            ttl: float | None = None, tags: list[str] | None = None,
            metadata: dict[str, Any] | None = None) -> MemoryEntry:
        """Add an entry for `key`; earlier entries stay until deleted or expired."""
        return self._backend.run(ops.memory_set(session_id, key, value, type, ttl, tags, metadata))

    def get(self, key: str, default: Any = None) -> Any:
        """The value of the newest live entry for `key`, else `default`."""
        return self._backend.run(ops.memory_get(key, default))

    def get_entry(self, key: str) -> MemoryEntry | None:
        return self._backend.run(ops.memory_get_entry(key))

    def get_all(self, key: str) -> list[MemoryEntry]:
        """Every live entry for `key`, newest first."""
        return self._backend.run(ops.memory_get_all(key))

    def search(self, key_pattern: str) -> list[MemoryEntry]:
        """Entries whose key matches a shell-style pattern (`*`, `?`, `[...]`), newest first."""
        return self._backend.run(ops.memory_search(key_pattern))

    def get_by_tags(self, tags: list[str], match_all: bool = False) -> list[MemoryEntry]:
        """Entries with any of the tags (all of them with match_all), newest first."""
        return self._backend.run(ops.memory_by_tags(tags, match_all))

    def get_by_session(self, session_id: str) -> list[MemoryEntry]:
        return self._backend.run(ops.memory_by_session(session_id))

    def delete(self, key: str, session_id: str | None = None) -> int:
        """Remove the key's entries (only that session's when given); returns how many."""
        return self._backend.run(ops.memory_delete(key, session_id))

    def clear(self, session_id: str | None = None) -> int:
        """Remove every entry (only that session's when given); returns how many."""
        return self._backend.run(ops.memory_clear(session_id))

    def get_stats(self) -> dict[str, Any]:
        return self._backend.run(ops.memory_stats())

    def touch(self, key: str, ttl: float | None = None) -> MemoryEntry:
        """Renew the TTL of the key's newest live entry without resending its value: a new
        version with `ttl` (None: the entry's own TTL length, from now). Returns it;
        NotFound when the key has no live entry."""
        return self._backend.run(memory_touch(key, ttl))

    def history(self, key: str, limit: int | None = None) -> list[MemoryVersion]:
        """The last versions of `key` as this host saw them, newest first (at most the
        daemon's per-key bound, 50 by default): set, touch, delete or expire, each with
        its origin node, clock stamp, and the entry while this host still holds it."""
        return self._backend.run(memory_history(key, limit))

    def watch(self, prefix: str | None = None, tags: list[str] | None = None,
              cursor: int | None = None) -> MemoryWatch | DirectoryMemoryWatch:
        """Memory changes from now on (or after `cursor`), local and replicated alike: keys
        starting with `prefix`, entries with any of `tags`. Iterate it, or call
        `.next(timeout)`; `.cursor` resumes a later watch, after a restart too, with
        nothing missed or repeated (a `gap` event first if the daemon trimmed past it)."""
        b = self._backend
        if isinstance(b, DirectoryBackend):
            return DirectoryMemoryWatch(b.store, prefix, tags, cursor)
        assert isinstance(b, DaemonBackend)
        return MemoryWatch(b.client.path, prefix, tags, cursor)

    def close(self) -> None:
        """Nothing to release: blocking objects share one connection per daemon and
        process, closed at exit (here so code can close the blocking and asyncio objects
        alike)."""
