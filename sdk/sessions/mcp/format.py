"""How results look to a language model: one compact JSON object per line, short field
names, second-resolution times, long texts cut with a note saying how to get the rest.

Every result costs context on every later turn of the agent, and clients cap results
(Claude Code at 25,000 tokens), so nothing here dumps a whole record or a whole list.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from sessions import MemoryEntry, Message, Session

BODY_MAX = 4000           # characters of a message body shown in lists
VALUE_MAX = 2000          # characters of a memory value shown in search results

__all__ = ["dumps", "message", "session", "entry", "cut", "lines"]


def json_default(o: Any) -> Any:
    if isinstance(o, bytes):
        try:
            return o.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(o).decode("ascii")}
    if hasattr(o, "value"):
        return o.value
    return str(o)


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=json_default)


def cut(text: str, limit: int, how: str) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [cut at {limit} of {len(text)} characters; {how}]"


def when(iso: str | None) -> str | None:
    """"2026-11-25T09:00:00.123456+00:00" -> "2026-11-25T09:00:00Z"."""
    if not iso:
        return iso
    return iso[:19] + "Z" if iso.endswith("+00:00") else iso


def message(m: Message, body_max: int | None = BODY_MAX) -> dict[str, Any]:
    d: dict[str, Any] = {"id": m.message_id, "from": m.from_session,
                         "to": m.to_session or "ALL", "type": m.type.value,
                         "subject": m.subject}
    d["body"] = m.body if body_max is None else cut(
        m.body, body_max, "message_status shows the whole message")
    if m.data:
        d["data"] = m.data
    if m.in_reply_to:
        d["in_reply_to"] = m.in_reply_to
    if m.priority != "normal":
        d["priority"] = m.priority
    d["at"] = when(m.timestamp)
    return d


def session(s: Session) -> dict[str, Any]:
    d: dict[str, Any] = {"id": s.session_id, "name": s.agent_name, "type": s.agent_type,
                         "status": s.status.value}
    if s.capabilities:
        d["capabilities"] = s.capabilities
    if s.current_task:
        d["task"] = s.current_task
    if s.human_user:
        d["user"] = s.human_user
    d["host"] = s.location or (s.host or "")[:8]
    d["host_state"] = s.host_state
    d["last_ping"] = when(s.last_ping)
    return d


def entry(e: MemoryEntry, value_max: int | None = VALUE_MAX) -> dict[str, Any]:
    d: dict[str, Any] = {"key": e.key}
    if value_max is not None:
        text = e.value if isinstance(e.value, str) else dumps(e.value)
        if len(text) > value_max:
            d["value"] = cut(text, value_max, f"memory_get key={e.key!r} gives it whole")
        else:
            d["value"] = e.value
    else:
        d["value"] = e.value
    d.update({"type": e.type.value, "by": e.session_id, "at": when(e.timestamp)})
    if e.tags:
        d["tags"] = e.tags
    if e.ttl is not None:
        d["ttl_s"] = e.ttl
    return d


def lines(header: str, rows: list[dict[str, Any]], more: str | None = None) -> str:
    """A header line, one JSON object per row, and what to do for more."""
    out = [header, *(dumps(r) for r in rows)]
    if more:
        out.append(more)
    return "\n".join(out)
