"""The API's calls as data: each function turns the contract's arguments into a command,
its arguments, and a converter for the answer. The blocking classes, the asyncio classes
and both backends (daemon or directory) run the same ops, so they cannot drift apart."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable

from meshd.errors import InvalidArgument
from sessions._core import MAX_PAGES, PAGE_ROWS, collect_pages  # noqa: F401  (paging lives there)
from sessions.models import new_id, now_iso, MemoryEntry, MemoryType, Message, MessageType, Session, SessionStatus

_HOST = socket.gethostname()


@dataclass(frozen=True, slots=True)
class Op:
    """A call: `convert` turns the answer into the API's return value. With `echo` set, the
    daemon answers only with an acknowledgement and the return value is built from the
    validated argument of that name (the record the client sent)."""

    command: str
    args: dict[str, Any]
    convert: Callable[[Any], Any]
    echo: str | None = None
    paged: bool = False          # a list read: asked for in pages (see `_core.Pages`)

    def result(self, args: dict[str, Any], answer: Any) -> Any:
        return self.convert(args[self.echo] if self.echo else answer)

    def page(self, offset: int) -> dict[str, Any]:
        """The arguments asking for the page at `offset`."""
        return {**self.args, "limit": PAGE_ROWS, "offset": offset}


def _same(x: Any) -> Any:
    return x


def _session(d: dict[str, Any] | None) -> Session | None:
    return None if d is None else Session.from_dict(d)


def _sessions(rows: list[dict[str, Any]]) -> list[Session]:
    return [Session.from_dict(r) for r in rows]


def _messages(rows: list[dict[str, Any]]) -> list[Message]:
    return [Message.from_dict(r) for r in rows]


def _entries(rows: list[dict[str, Any]]) -> list[MemoryEntry]:
    return [MemoryEntry.from_dict(r) for r in rows]


def _entry(d: dict[str, Any] | None) -> MemoryEntry | None:
    return None if d is None else MemoryEntry.from_dict(d)


def _enum(v: Any) -> Any:
    return v.value if isinstance(v, (SessionStatus, MessageType, MemoryType)) else v


# --- registry --------------------------------------------------------------------------------

def register(session_id: str, agent_name: str, agent_type: str, human_user: str | None = None,
             capabilities: list[str] | None = None, metadata: dict[str, Any] | None = None,
             location: str | None = None) -> Op:
    return Op("session.register", {
        "session_id": session_id, "agent_name": agent_name, "agent_type": agent_type,
        "human_user": human_user, "capabilities": [] if capabilities is None else capabilities,
        "metadata": metadata or {}, "location": location or _HOST}, _session)


def unregister(session_id: str) -> Op:
    return Op("session.unregister", {"session_id": session_id}, bool)


def ping(session_id: str) -> Op:
    return Op("session.ping", {"session_id": session_id}, bool)


def get_session(session_id: str) -> Op:
    return Op("session.get", {"session_id": session_id}, _session)


def update_status(session_id: str, status: SessionStatus | str,
                  current_task: str | None = None) -> Op:
    args: dict[str, Any] = {"session_id": session_id, "status": _enum(status)}
    if current_task is not None:
        args["current_task"] = current_task
    return Op("session.update_status", args, bool)


def list_sessions(include_offline: bool = False) -> Op:
    return Op("session.list", {"include_offline": include_offline}, _sessions, paged=True)


def find_sessions(status: SessionStatus | str | None = None, agent_type: str | None = None,
                  human_user: str | None = None, capability: str | None = None) -> Op:
    return Op("session.find", {"status": _enum(status), "agent_type": agent_type,
                               "human_user": human_user, "capability": capability}, _sessions,
              paged=True)


def registry_stats() -> Op:
    return Op("session.stats", {}, _same)


def import_session(session: Session | dict[str, Any]) -> Op:
    d = session.to_dict() if isinstance(session, Session) else dict(session)
    keep = ("session_id", "agent_name", "agent_type", "status", "started_at", "last_ping",
            "human_user", "location", "capabilities", "current_task", "metadata")
    return Op("session.import", {"session": {k: _enum(d.get(k)) for k in keep if k in d}},
              bool)


def clear_offline() -> Op:
    return Op("session.clear_offline", {}, _same)


# --- collaboration ---------------------------------------------------------------------------

def send(from_session: str, to_session: str | None, type: MessageType | str, subject: str,
         body: str, data: dict[str, Any] | None = None, in_reply_to: str | None = None,
         priority: str = "normal") -> Op:
    # A plain dict (not Message.new(...).to_dict(): asdict deep-copies, and this is a hot path).
    message = {"message_id": new_id(), "type": _enum(type), "from_session": from_session,
               "to_session": to_session, "subject": subject, "body": body,
               "data": {} if data is None else data, "timestamp": now_iso(),
               "in_reply_to": in_reply_to, "priority": priority}
    return Op("message.send", {"message": message}, Message.from_dict, echo="message")


def broadcast(from_session: str, subject: str, body: str,
              data: dict[str, Any] | None = None, priority: str = "normal") -> Op:
    return send(from_session, None, MessageType.BROADCAST, subject, body, data,
                priority=priority)


def reply(from_session: str, to_message: Message | dict[str, Any], body: str,
          data: dict[str, Any] | None = None) -> Op:
    if isinstance(to_message, dict):
        to_message = Message.from_dict(to_message)
    if not isinstance(to_message, Message):
        raise InvalidArgument("to_message must be a Message (as returned by send)")
    return send(from_session, to_message.from_session, MessageType.RESPONSE,
                f"Re: {to_message.subject}", body, data, to_message.message_id)


def ping_session(from_session: str, to_session: str) -> Op:
    return send(from_session, to_session, MessageType.PING, "Ping", "Are you there?")


def get_messages(session_id: str, include_broadcasts: bool = True,
                 message_type: MessageType | str | None = None, unread_only: bool = False) -> Op:
    return Op("message.list", {"session_id": session_id, "include_broadcasts": include_broadcasts,
                               "message_type": _enum(message_type), "unread_only": unread_only},
              _messages, paged=True)


def get_conversation(message_id: str) -> Op:
    return Op("message.conversation", {"message_id": message_id}, _messages)


def mark_read(session_id: str, message_ids: list[str] | None = None) -> Op:
    return Op("message.mark_read", {"session_id": session_id,
                                    "message_ids": [] if message_ids is None else message_ids},
              int)


def _status(d: dict[str, Any] | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {**d, "message": Message.from_dict(d["message"])}


def message_status(message_id: str) -> Op:
    return Op("message.status", {"message_id": message_id}, _status)


def sent_messages(session_id: str) -> Op:
    return Op("message.sent", {"session_id": session_id},
              lambda rows: [_status(r) for r in rows], paged=True)


def hub_stats() -> Op:
    return Op("message.stats", {}, _same)


# --- shared memory ---------------------------------------------------------------------------

def memory_set(session_id: str, key: str, value: Any, type: MemoryType | str = MemoryType.STATE,
               ttl: float | None = None, tags: list[str] | None = None,
               metadata: dict[str, Any] | None = None) -> Op:
    entry = {"entry_id": new_id(), "type": _enum(type), "key": key, "value": value,
             "session_id": session_id, "timestamp": now_iso(),
             "ttl": ttl, "tags": [] if tags is None else tags, "metadata": metadata or {}}
    return Op("memory.set", {"entry": entry}, MemoryEntry.from_dict, echo="entry")


def memory_get(key: str, default: Any = None) -> Op:
    return Op("memory.get", {"key": key}, lambda d: default if d is None else d["value"])


def memory_get_entry(key: str) -> Op:
    return Op("memory.get", {"key": key}, _entry)


def memory_get_all(key: str) -> Op:
    return Op("memory.get_all", {"key": key}, _entries, paged=True)


def memory_search(key_pattern: str) -> Op:
    return Op("memory.search", {"pattern": key_pattern}, _entries, paged=True)


def memory_by_tags(tags: list[str], match_all: bool = False) -> Op:
    return Op("memory.by_tags", {"tags": [] if tags is None else tags,
                                 "match_all": match_all}, _entries, paged=True)


def memory_by_session(session_id: str) -> Op:
    return Op("memory.by_session", {"session_id": session_id}, _entries, paged=True)


def memory_delete(key: str, session_id: str | None = None) -> Op:
    return Op("memory.delete", {"key": key, "session_id": session_id}, int)


def memory_clear(session_id: str | None = None) -> Op:
    return Op("memory.clear", {"session_id": session_id}, int)


def memory_stats() -> Op:
    return Op("memory.stats", {}, _same)


def node_info() -> Op:
    return Op("node.info", {}, _same)


def peers() -> Op:
    return Op("mesh.peers", {}, _same)


def join(address: str) -> Op:
    return Op("mesh.join", {"address": address}, _same)


def leave() -> Op:
    return Op("mesh.leave", {}, _same)


def force_leave(node: str) -> Op:
    return Op("mesh.force_leave", {"node": node}, _same)
