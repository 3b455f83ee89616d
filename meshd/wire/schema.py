"""The enums and record shapes shared by the daemon, the SDK and (later) peers, with the
validators that every record passes through at the edge."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, TypeVar

from meshd.errors import InvalidArgument
from meshd.wire.codec import check_value

MAX_ID_LEN = 256          # session ids, message ids, entry ids
MAX_KEY_LEN = 1024        # memory keys and patterns
MAX_SHORT_LEN = 4096      # names, subjects, tags, task descriptions
MAX_LIST_LEN = 1024       # capabilities, tags


class SessionStatus(str, Enum):
    ACTIVE = "active"
    IDLE = "idle"
    WORKING = "working"
    WAITING = "waiting"
    OFFLINE = "offline"


class MessageType(str, Enum):
    PING = "ping"
    REQUEST = "request"
    RESPONSE = "response"
    BROADCAST = "broadcast"
    NOTIFICATION = "notification"
    TASK_OFFER = "task_offer"
    TASK_ACCEPT = "task_accept"
    SYNC = "sync"
    HANDOFF = "handoff"


class MemoryType(str, Enum):
    STATE = "state"
    FACT = "fact"
    DECISION = "decision"
    TASK = "task"
    CONTEXT = "context"
    NOTE = "note"
    CONFIG = "config"


E = TypeVar("E", bound=Enum)


# --- field validators: each returns the normalised value or raises InvalidArgument ---------

def ident(v: Any, field: str) -> str:
    """A non-empty id without control characters."""
    if not isinstance(v, str):
        raise InvalidArgument(f"{field} must be a string, not {type(v).__name__}")
    if not v or not v.strip():
        raise InvalidArgument(f"{field} must not be empty")
    if len(v) > MAX_ID_LEN:
        raise InvalidArgument(f"{field} is longer than {MAX_ID_LEN} characters")
    if not v.isprintable():
        raise InvalidArgument(f"{field} must not contain control or non-printing characters")
    return v


def address(v: Any, field: str) -> str:
    """HOST:PORT (a name, an IPv4 address, or [IPv6]) with a port in 1..65535."""
    t = text(v, field, 300)
    host, sep, port = t.rpartition(":")
    if (not sep or not host or not (port.isascii() and port.isdigit())
            or not 0 < int(port) < 65536):
        raise InvalidArgument(f"{field} must be HOST:PORT, e.g. 192.168.1.12:7747; got {t!r}")
    if not host.strip("[]") or any(c.isspace() for c in t):
        raise InvalidArgument(f"{field} must be HOST:PORT; got {t!r}")
    return t


def opt_ident(v: Any, field: str) -> str | None:
    return None if v is None else ident(v, field)


def text(v: Any, field: str, max_len: int = MAX_SHORT_LEN) -> str:
    if not isinstance(v, str):
        raise InvalidArgument(f"{field} must be a string, not {type(v).__name__}")
    if len(v) > max_len:
        raise InvalidArgument(f"{field} is longer than {max_len} characters")
    return v


def opt_text(v: Any, field: str, max_len: int = MAX_SHORT_LEN) -> str | None:
    return None if v is None else text(v, field, max_len)


def long_text(v: Any, field: str) -> str:
    """Message bodies: bounded only by the frame size limit."""
    if not isinstance(v, str):
        raise InvalidArgument(f"{field} must be a string, not {type(v).__name__}")
    return v


def key(v: Any, field: str = "key") -> str:
    if not isinstance(v, str):
        raise InvalidArgument(f"{field} must be a string, not {type(v).__name__}")
    if not v:
        raise InvalidArgument(f"{field} must not be empty")
    if len(v) > MAX_KEY_LEN:
        raise InvalidArgument(f"{field} is longer than {MAX_KEY_LEN} characters")
    return v


def enum_value(v: Any, enum: type[E], field: str) -> str:
    """Accept the enum member or its string value; return the string value."""
    if type(v) is str and v in enum._value2member_map_:     # the common case, fast
        return v
    if isinstance(v, enum):
        return v.value
    if isinstance(v, str):
        try:
            return enum(v).value
        except ValueError:
            pass
    allowed = ", ".join(m.value for m in enum)  # type: ignore[attr-defined]
    raise InvalidArgument(f"{field} must be one of {allowed}; got {v!r}")


def opt_enum(v: Any, enum: type[E], field: str) -> str | None:
    return None if v is None else enum_value(v, enum, field)


def str_list(v: Any, field: str) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str) or not isinstance(v, (list, tuple)):
        raise InvalidArgument(f"{field} must be a list of strings")
    if len(v) > MAX_LIST_LEN:
        raise InvalidArgument(f"{field} has more than {MAX_LIST_LEN} items")
    if type(v) is list and all(type(x) is str and len(x) <= MAX_SHORT_LEN for x in v):
        return v                                            # the common case, fast
    return [text(x, f"{field} item") for x in v]


def mapping(v: Any, field: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise InvalidArgument(f"{field} must be a dict, not {type(v).__name__}")
    return check_value(v, field)


def boolean(v: Any, field: str) -> bool:
    if not isinstance(v, bool):
        raise InvalidArgument(f"{field} must be true or false")
    return v


def ttl(v: Any, field: str = "ttl") -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v <= 0:
        raise InvalidArgument(f"{field} must be a positive number of seconds or None")
    if v > 100 * 365 * 86400:
        raise InvalidArgument(f"{field} is longer than a century")
    return float(v)


def count(v: Any, field: str, lo: int = 0, hi: int = 2**62) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidArgument(f"{field} must be an integer in [{lo}, {hi}]")
    return v


# --- records ---------------------------------------------------------------------------------

def message_record(d: Any) -> dict[str, Any]:
    """A message as the SDK sends it and the daemon stores it."""
    if not isinstance(d, dict):
        raise InvalidArgument("message must be a map")
    return {
        "message_id": ident(d.get("message_id"), "message_id"),
        "type": enum_value(d.get("type"), MessageType, "type"),
        "from_session": ident(d.get("from_session"), "from_session"),
        "to_session": opt_ident(d.get("to_session"), "to_session"),
        "subject": text(d.get("subject"), "subject"),
        "body": long_text(d.get("body"), "body"),
        "data": mapping(d.get("data"), "data"),
        "timestamp": text(d.get("timestamp"), "timestamp", 64),
        "in_reply_to": opt_ident(d.get("in_reply_to"), "in_reply_to"),
        "priority": priority(d.get("priority", "normal")),
    }


PRIORITIES = ("normal", "high")


def priority(v: Any, field: str = "priority") -> str:
    """Message priority: "high" overtakes queued "normal" messages (outboxes, inboxes)."""
    if v not in PRIORITIES:
        raise InvalidArgument(f"{field} must be one of {', '.join(PRIORITIES)}; got {v!r}")
    return str(v)


def routed_message(d: Any) -> dict[str, Any]:
    """A message as one daemon routes it to another: the SDK's fields plus its origin
    daemon and clock stamp."""
    m = message_record(d)
    m["origin"] = ident(d.get("origin"), "origin")
    m["hlc"] = count(d.get("hlc"), "hlc", 0, 2**63 - 1)
    return m


def session_record(d: Any) -> dict[str, Any]:
    """A session as another store holds it (an import): its own times and status kept.
    Times are ISO 8601 text; one without a zone is local time, as the seed wrote them."""
    if not isinstance(d, dict):
        raise InvalidArgument("session must be a map")
    return {
        "session_id": ident(d.get("session_id"), "session_id"),
        "agent_name": text(d.get("agent_name"), "agent_name"),
        "agent_type": text(d.get("agent_type"), "agent_type"),
        "status": enum_value(d.get("status", "active"), SessionStatus, "status"),
        "started_at": iso_time(d.get("started_at"), "started_at"),
        "last_ping": iso_time(d.get("last_ping"), "last_ping"),
        "human_user": opt_text(d.get("human_user"), "human_user"),
        "location": text(d.get("location") or "", "location"),
        "capabilities": str_list(d.get("capabilities"), "capabilities"),
        "current_task": opt_text(d.get("current_task"), "current_task"),
        "metadata": mapping(d.get("metadata"), "metadata"),
    }


def iso_time(v: Any, field: str) -> str:
    """An ISO 8601 time as text (checked to parse)."""
    from datetime import datetime
    t = text(v, field, 64)
    try:
        datetime.fromisoformat(t)
    except ValueError:
        raise InvalidArgument(f"{field} must be an ISO 8601 time; got {t!r}") from None
    return t


def entry_record(d: Any) -> dict[str, Any]:
    """A shared-memory entry as the SDK sends it."""
    if not isinstance(d, dict):
        raise InvalidArgument("entry must be a map")
    return {
        "entry_id": ident(d.get("entry_id"), "entry_id"),
        "type": enum_value(d.get("type"), MemoryType, "type"),
        "key": key(d.get("key")),
        "value": check_value(d.get("value")),
        "session_id": ident(d.get("session_id"), "session_id"),
        "timestamp": text(d.get("timestamp"), "timestamp", 64),
        "ttl": ttl(d.get("ttl")),
        "tags": str_list(d.get("tags"), "tags"),
        "metadata": mapping(d.get("metadata"), "metadata"),
    }
