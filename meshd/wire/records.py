"""Replicated records as they travel between daemons, and their validation.

Every record carries the node that made the change (`origin`), that node's change
counter (`version`, which only grows) and a hybrid logical clock stamp (`hlc`). A record
that fails validation is dropped by the receiver before it reaches the store.
"""

from __future__ import annotations

from typing import Any, Callable

from meshd.errors import InvalidArgument
from meshd.wire import schema as s
from meshd.wire.codec import check_value

MAX_VERSION = 2**62
KINDS = ("session", "entry", "deletion")


def _stamp(d: dict[str, Any]) -> dict[str, Any]:
    return {"origin": s.ident(d.get("origin"), "origin"),
            "version": s.count(d.get("version"), "version", 1, MAX_VERSION),
            "hlc": s.count(d.get("hlc"), "hlc", 0, 2**63 - 1)}


def _number(v: Any, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidArgument(f"{field} must be a number")
    return float(v)


def session_record(d: Any) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise InvalidArgument("session record must be a map")
    return {
        "kind": "session",
        "session_id": s.ident(d.get("session_id"), "session_id"),
        "agent_name": s.text(d.get("agent_name"), "agent_name"),
        "agent_type": s.text(d.get("agent_type"), "agent_type"),
        "status": s.enum_value(d.get("status"), s.SessionStatus, "status"),
        "started_at": s.text(d.get("started_at"), "started_at", 64),
        "last_ping": _number(d.get("last_ping"), "last_ping"),
        "human_user": s.opt_text(d.get("human_user"), "human_user"),
        "location": s.opt_text(d.get("location"), "location"),
        "capabilities": s.str_list(d.get("capabilities"), "capabilities"),
        "current_task": s.opt_text(d.get("current_task"), "current_task"),
        "metadata": s.mapping(d.get("metadata"), "metadata"),
        "host": s.ident(d.get("host"), "host"),
        "deleted": s.boolean(d.get("deleted"), "deleted"),
        **_stamp(d),
    }


def entry_record(d: Any) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise InvalidArgument("entry record must be a map")
    return {"kind": "entry", **s.entry_record(d), **_stamp(d)}


def deletion_record(d: Any) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise InvalidArgument("deletion record must be a map")
    key = d.get("key")
    return {"kind": "deletion", "key": None if key is None else s.key(key),
            "session_id": s.opt_ident(d.get("session_id"), "session_id"), **_stamp(d)}


_VALIDATORS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "session": session_record, "entry": entry_record, "deletion": deletion_record}


def record(d: Any) -> dict[str, Any]:
    """Validate any replicated record by its `kind` (checked to be a string first: an array
    or a map there must fail validation, not the lookup)."""
    if not isinstance(d, dict) or not isinstance(d.get("kind"), str) or d["kind"] not in _VALIDATORS:
        raise InvalidArgument(f"record kind must be one of {', '.join(KINDS)}")
    out = _VALIDATORS[d["kind"]](d)
    check_value(out.get("metadata"), "metadata")
    return out
