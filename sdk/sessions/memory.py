"""SharedMemory: keys with a history of typed, tagged entries, optionally expiring."""

from __future__ import annotations

import os
from typing import Any

from sessions import _ops as ops
from sessions._backend import Backend, backend_for
from sessions.models import MemoryEntry, MemoryType

__all__ = ["SharedMemory", "MemoryEntry", "MemoryType"]


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

    def close(self) -> None:
        """Nothing to release: blocking objects share one connection per daemon and
        process, closed at exit (here so code can close the blocking and asyncio objects
        alike)."""
