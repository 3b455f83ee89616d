"""SessionRegistry: who is on the mesh, what they can do, and what they are doing."""

from __future__ import annotations

import os
from typing import Any

from meshd.errors import InvalidArgument
from sessions import _ops as ops
from sessions._backend import Backend, DaemonBackend, backend_for
from sessions._monitor import MonitorStream
from sessions.keepalive import DEFAULT_INTERVAL, KeepAlive
from sessions.models import Session, SessionStatus

__all__ = ["SessionRegistry", "Session", "SessionStatus"]


class SessionRegistry:
    """The session registry. With no path it is this host's meshd (and so the whole mesh);
    with a directory it is a registry kept in that directory, with no daemon.

    `socket` and `timeout` (seconds per call) pick and bound the daemon connection.
    """

    def __init__(self, registry_path: str | os.PathLike[str] | None = None, *,
                 socket: str | None = None, timeout: float | None = None) -> None:
        self._backend: Backend = backend_for(registry_path, socket, timeout)

    def register(self, session_id: str, agent_name: str, agent_type: str,
                 human_user: str | None = None, capabilities: list[str] | None = None,
                 metadata: dict[str, Any] | None = None) -> Session:
        """Add a session (replacing one with the same id); it starts ACTIVE."""
        return self._backend.run(ops.register(session_id, agent_name, agent_type, human_user,
                                              capabilities, metadata))

    def unregister(self, session_id: str) -> bool:
        """Mark the session OFFLINE (it is kept for history); False if unknown."""
        return self._backend.run(ops.unregister(session_id))

    def ping(self, session_id: str) -> bool:
        """Refresh last_ping (a session silent for 300 s shows OFFLINE); False if unknown."""
        return self._backend.run(ops.ping(session_id))

    def get(self, session_id: str) -> Session | None:
        return self._backend.run(ops.get_session(session_id))

    def update_status(self, session_id: str, status: SessionStatus | str,
                      current_task: str | None = None) -> bool:
        """Set the status (refreshing last_ping); current_task changes only when given."""
        return self._backend.run(ops.update_status(session_id, status, current_task))

    def list_sessions(self, include_offline: bool = False) -> list[Session]:
        return self._backend.run(ops.list_sessions(include_offline))

    def find_sessions(self, status: SessionStatus | str | None = None,
                      agent_type: str | None = None, human_user: str | None = None,
                      capability: str | None = None) -> list[Session]:
        """Sessions matching every criterion given (OFFLINE ones only when status asks)."""
        return self._backend.run(ops.find_sessions(status, agent_type, human_user, capability))

    def get_stats(self) -> dict[str, Any]:
        return self._backend.run(ops.registry_stats())

    def clear_offline(self) -> int:
        """Forget OFFLINE sessions; returns how many."""
        return self._backend.run(ops.clear_offline())

    def node_info(self) -> dict[str, Any]:
        """The daemon serving this registry (node id, socket, counters), or the directory."""
        return self._backend.run(ops.node_info())

    def peers(self) -> list[dict[str, Any]]:
        """The other daemons of the mesh as this host's daemon sees them: node_id, address,
        state (alive, suspect, dead, left), incarnation, last_contact (seconds ago),
        behind (changes this node has that the peer had not, at its last summary)."""
        return self._backend.run(ops.peers())

    def close(self) -> None:
        """Nothing to release: blocking objects share one connection per daemon and
        process, closed at exit (here so code can close the blocking and asyncio objects
        alike)."""

    def keepalive(self, session_id: str, interval: float = DEFAULT_INTERVAL) -> KeepAlive:
        """Keep a session from going OFFLINE while you work: `with registry.keepalive(id):`
        pings it every `interval` seconds in a background thread (or call `.start()` and
        `.stop()`). Raises NotFound at once if the session is not registered."""
        return KeepAlive(self.ping, session_id, interval)

    def monitor(self, level: str = "info", backlog: int = 0) -> MonitorStream:
        """What this host's daemon sees and does, live (Serf's `monitor`): an iterator of
        `MonitorEvent`s at `level` (debug, info, warning, error) or above, from now on
        (after the last `backlog` recent ones, up to 256). Members joining, suspect, dead
        and left; joins attempted and refused; replication pulls and catch-up progress;
        routed batches, retries and expiries; client errors; and the daemon's log. A
        reader too slow gets a `monitor.dropped` event saying how many it missed. Follows
        the daemon across restarts; `close()` ends it. Needs a daemon."""
        b = self._backend
        if not isinstance(b, DaemonBackend):
            raise InvalidArgument("monitor needs a daemon: a sessions directory has no events")
        return MonitorStream(b.client.path, level, backlog)

    def join(self, address: str) -> dict[str, Any]:
        """Ask this host's daemon to join the mesh at HOST:PORT (retried with backoff until
        it answers; `peers()` shows it pending meanwhile). Serf's `join`."""
        return self._backend.run(ops.join(address))

    def leave(self) -> dict[str, Any]:
        """This host's daemon leaves the mesh gracefully (its peers see it as left, not
        failed) and stops. Serf's `leave`."""
        return self._backend.run(ops.leave())

    def force_leave(self, node: str) -> dict[str, Any]:
        """Mark a member that is down as gone for good (node id, or a prefix of 6+
        characters): it reads "left" everywhere and mail queued for it expires now."""
        return self._backend.run(ops.force_leave(node))
