"""`SessionRegistry.monitor()`: the local daemon's live events (`node.monitor`), as Serf's
`monitor` shows an agent's log.

Against a daemon it is a live stream like `MessageStream` (same socket, acks, renewals,
and resubscription when the daemon restarts or forgets us; `on_state` says "lost" and
"back"); only the subscribe command, its arguments and the events differ. A monitor is
not resumable: after a resubscription it goes on from the daemon's recent events,
skipping those it already handed out. The asyncio face runs the blocking one in a
worker thread, as every stream's does (`AsyncStream`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sessions._stream import AsyncStream, PushStream
from sessions._subscription import Subscription

__all__ = ["MonitorEvent", "MonitorStream", "AsyncMonitorStream", "MonitorSubscription",
           "LEVELS"]

LEVELS = ("debug", "info", "warning", "error")


@dataclass
class MonitorEvent:
    """One thing the daemon saw or did. `event` is the kind ("log" for a plain log line;
    e.g. member.join / member.suspect / member.dead / member.left, join.attempt /
    join.refused, replication.pull / replication.progress / replication.caught_up,
    route.batch / route.retry / route.expired, client.error, monitor.dropped); `fields`
    holds its structured data (e.g. a member's node_id, address and state; a catch-up's
    known, target and `progress` from 0 to 1). `time` is seconds since the epoch."""

    time: float
    level: str
    source: str
    event: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    id: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MonitorEvent":
        return cls(float(d.get("time", 0.0)), str(d.get("level", "info")),
                   str(d.get("source", "")), str(d.get("event", "log")),
                   str(d.get("message", "")), dict(d.get("fields") or {}), int(d.get("id", 0)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MonitorSubscription(Subscription):
    """The protocol of one monitor (`node.monitor`; acks and closes as any stream)."""

    command = "node.monitor"

    def __init__(self, level: str, backlog: int) -> None:
        super().__init__(None, None, [], 128)
        self.level = level
        self.backlog = backlog
        self.last: tuple[float, int] = (0.0, 0)    # (time, id) of the last event handed out

    def args(self) -> dict[str, Any]:
        return {"level": self.level, "backlog": self.backlog}

    def subscribe(self) -> bytes:
        self.cursor = None           # a new subscription counts its events from 1 again
        return super().subscribe()

    def convert(self, seq: int, message: Any) -> MonitorEvent:
        return MonitorEvent.from_dict(message)

    def take(self) -> MonitorEvent | None:  # type: ignore[override]
        while True:
            ev: MonitorEvent | None = super().take()  # type: ignore[assignment]
            if ev is None:
                return None
            key = (ev.time, ev.id)
            if ev.id and key <= self.last:
                continue                  # seen before a resubscription
            if ev.id:
                self.last = key
            return ev


class MonitorStream(PushStream[MonitorEvent]):
    """Iterate the daemon's events: `for ev in monitor: ...` (until `close()`)."""

    def __init__(self, socket_path: str, level: str = "info", backlog: int = 0) -> None:
        super().__init__(socket_path, MonitorSubscription(level, backlog))

    level = property(lambda self: self._state.level)


class AsyncMonitorStream(AsyncStream[MonitorEvent]):
    """The asyncio face of a monitor: `async for ev in monitor`, or
    `await monitor.next(timeout)`; the blocking one waits in a worker thread."""
