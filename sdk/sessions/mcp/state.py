"""Who the server is (the identity it registers) and where the session's stream cursor is
kept between runs.

The cursor is the per-session inbox sequence number of the last message
`wait_for_messages` handed out. Those numbers belong to the daemon that hosts the
session, so the file records that daemon's node id too: a cursor from another daemon (a
wiped data directory, the session moved hosts) would skip or replay the wrong messages,
and is ignored. A local file rather than the mesh's shared memory: the cursor is
per-host like the sequence it counts, it is written on every delivery (replicating that
would cost every host), and it would show up in every agent's memory searches.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sessions.mcp")

__all__ = ["Identity", "CursorFile", "state_dir"]


@dataclass(frozen=True)
class Identity:
    """The session one `sessions mcp` process acts as."""

    session_id: str
    name: str
    agent_type: str = "agent"
    user: str | None = None
    capabilities: list[str] = field(default_factory=list)
    on_exit: str = "offline"                # "offline" (unregister) or "keep"


def state_dir() -> Path:
    """$XDG_STATE_HOME/meshd/mcp (default ~/.local/state/meshd/mcp), where cursors live."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                            ".local", "state")
    return Path(base) / "meshd" / "mcp"


def _file_name(session_id: str) -> str:
    """A file name for any session id: ids may hold characters a path must not."""
    safe = "".join(c if c.isalnum() or c in "-_." else f"%{ord(c):02X}" for c in session_id)
    return (safe if safe not in ("", ".", "..") else f"%{safe}") + ".cursor"


class CursorFile:
    """`<dir>/<session_id>.cursor`: {"node_id": ..., "cursor": N}, replaced atomically so a
    crash mid-write leaves the old cursor, never a torn one."""

    def __init__(self, directory: Path, session_id: str) -> None:
        self.path = directory / _file_name(session_id)
        self._last: tuple[str, int] | None = None

    def load(self, node_id: str) -> int | None:
        """The saved cursor if it was saved against this daemon, else None."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable cursor file %s: %s", self.path, exc)
            return None
        cursor = data.get("cursor") if isinstance(data, dict) else None
        if not isinstance(cursor, int) or cursor < 0:
            log.warning("ignoring malformed cursor file %s", self.path)
            return None
        if data.get("node_id") != node_id:
            log.warning("cursor file %s is from daemon %s, not %s: starting from now",
                        self.path, data.get("node_id"), node_id)
            return None
        self._last = (node_id, cursor)
        return cursor

    def save(self, node_id: str, cursor: int) -> None:
        """Write the cursor (skipped when unchanged). A failure is logged, not raised: the
        messages were handed out already, and the worst case is a repeat after a restart."""
        if self._last == (node_id, cursor):
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".cursor-")
            with os.fdopen(fd, "w") as f:
                json.dump({"node_id": node_id, "cursor": cursor}, f)
            os.replace(tmp, self.path)
            self._last = (node_id, cursor)
        except OSError as exc:
            log.warning("cannot save the stream cursor to %s: %s", self.path, exc)
