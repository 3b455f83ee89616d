"""The public records of the `sessions` API. They are the contract's dataclasses, apart
from the wire dicts: mesh-only fields (origin, version, clock) never appear here."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from meshd.wire.schema import MemoryType, MessageType, SessionStatus

__all__ = ["SessionStatus", "MessageType", "MemoryType", "Session", "Message", "MemoryEntry",
           "MemoryEvent", "MemoryVersion", "SIGNAL_EMOJI"]


_second: list[Any] = [None, ""]       # the last whole second seen and its ISO text


def now_iso() -> str:
    """The current UTC time as ISO 8601 with microseconds ("...T09:00:00.123456+00:00").
    Every set and send is stamped with it, so the date part is formatted once a second."""
    t = time.time()
    sec = int(t)
    if sec != _second[0]:
        _second[:] = [sec, datetime.fromtimestamp(sec, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{int((t - sec) * 1_000_000):06d}+00:00"


def new_id() -> str:
    """A uuid4 string, as `str(uuid.uuid4())`, in a third of the time (one per call)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40           # version 4
    b[8] = (b[8] & 0x3F) | 0x80           # RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_uuid = new_id


_FIELDS: dict[type, frozenset[str]] = {}


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The keys of `d` that are fields of `cls` (the daemon may send more)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls))
    return {k: v for k, v in d.items() if k in names}


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, (SessionStatus, MessageType, MemoryType)) else v)
            for k, v in d.items()}


@dataclass
class Session:
    """One agent session in the registry. `host` is the node id of the daemon it
    registered through (None in directory mode before it is stored). `host_state` is how
    the answering daemon sees that host: "local" (itself), "alive", "suspect", "dead",
    "left" or "unknown" (not a member); None in directory mode or from an older daemon.
    A session whose host is not up reads OFFLINE whatever its own status."""

    session_id: str
    agent_name: str
    agent_type: str
    status: SessionStatus = SessionStatus.ACTIVE
    started_at: str = field(default_factory=now_iso)
    last_ping: str = field(default_factory=now_iso)
    human_user: str | None = None
    location: str = ""
    capabilities: list[str] = field(default_factory=list)
    current_task: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    host: str | None = None
    host_state: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Session":
        d = _known(cls, d)
        d["status"] = SessionStatus(d.get("status", "active"))
        return cls(**d)


SIGNAL_EMOJI = {
    MessageType.PING: "🔔", MessageType.REQUEST: "❓", MessageType.RESPONSE: "✅",
    MessageType.BROADCAST: "📡", MessageType.NOTIFICATION: "📢", MessageType.TASK_OFFER: "🤝",
    MessageType.TASK_ACCEPT: "👍", MessageType.SYNC: "🔄", MessageType.HANDOFF: "🎯",
}


@dataclass
class Message:
    """A direct message (to_session set) or a broadcast (to_session None)."""

    message_id: str
    type: MessageType
    from_session: str
    to_session: str | None
    subject: str
    body: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: str = field(default_factory=now_iso)
    in_reply_to: str | None = None
    priority: str = "normal"            # "high" overtakes queued normal messages

    def format_signal(self) -> str:
        emoji = SIGNAL_EMOJI.get(MessageType(self.type), "💬")
        return f"{emoji} {self.from_session} → {self.to_session or 'ALL'} : [COLLABORATION] {self.subject}"

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Message":
        d = _known(cls, d)
        d["type"] = MessageType(d["type"])
        return cls(**d)

    @classmethod
    def new(cls, type: MessageType | str, from_session: str, to_session: str | None,
            subject: str, body: str, data: dict[str, Any] | None = None,
            in_reply_to: str | None = None) -> "Message":
        """A fresh message with a new uuid4 id and the current time. The type is kept as
        given; the daemon (or the directory store) validates it before storing."""
        t = MessageType(type) if isinstance(type, str) and type in MessageType._value2member_map_ else type
        return cls(_uuid(), t, from_session, to_session, subject, body,  # type: ignore[arg-type]
                   {} if data is None else data, now_iso(), in_reply_to)


@dataclass
class MemoryEntry:
    """One value written to shared memory; every set adds one."""

    entry_id: str
    type: MemoryType
    key: str
    value: Any
    session_id: str
    timestamp: str = field(default_factory=now_iso)
    ttl: float | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MemoryEntry":
        t = d["type"]
        return cls(d["entry_id"], MemoryType._value2member_map_.get(t) or MemoryType(t),
                   d["key"], d["value"], d["session_id"], d["timestamp"], d["ttl"], d["tags"],
                   d["metadata"])

    def is_expired(self, now: datetime | None = None) -> bool:
        if self.ttl is None:
            return False
        born = datetime.fromisoformat(self.timestamp)
        if born.tzinfo is None:
            born = born.replace(tzinfo=timezone.utc)
        return ((now or datetime.now(tz=timezone.utc)) - born).total_seconds() > self.ttl


@dataclass
class MemoryEvent:
    """A change of shared memory as this host's daemon saw it (`SharedMemory.watch`).

    kind: "put" (an entry was stored: a set, a touch, or one replicated from another
    host; `entry` is it), "delete" (a deletion removed the key's entries), "expire" (the
    key's newest version ran out here; an older one may still be live) or "gap" (events
    up to `cursor` were trimmed before this watcher read them: re-read what you need).
    `op` tells a put's set from its touch. `cursor` resumes a later watch after it.
    `origin` is the node that made the change, `hlc` its clock stamp."""

    kind: str
    key: str
    origin: str
    hlc: int
    cursor: int
    entry: MemoryEntry | None = None
    op: str = ""
    tags: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, cursor: int, d: dict[str, Any]) -> "MemoryEvent":
        e = d.get("entry")
        return cls(d["kind"], d["key"], d["origin"], d["hlc"], cursor,
                   None if e is None else MemoryEntry.from_dict(e), d.get("op", ""),
                   list(d.get("tags") or []))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["entry"] = None if self.entry is None else self.entry.to_dict()
        return d


@dataclass
class MemoryVersion:
    """One version of a key as this host saw it (`SharedMemory.history`): `op` is set,
    touch, delete or expire; `entry` is the entry while this host still holds it."""

    op: str
    key: str
    origin: str
    hlc: int
    cursor: int
    entry_id: str | None = None
    entry: MemoryEntry | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MemoryVersion":
        e = d.get("entry")
        return cls(d["op"], d["key"], d["origin"], d["hlc"], d["cursor"], d.get("entry_id"),
                   None if e is None else MemoryEntry.from_dict(e))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["entry"] = None if self.entry is None else self.entry.to_dict()
        return d
