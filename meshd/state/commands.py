"""The store-level commands, one table shared by the daemon's IPC server and the SDK's
directory mode, so both give the same answers to the same validated arguments."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Callable

from meshd.errors import StoreError, UnknownCommand
from meshd.state import memory, messages, sessions

if TYPE_CHECKING:
    from meshd.state.store import Store

Handler = Callable[["Store", dict[str, Any]], Any]


def _register(store: "Store", a: dict[str, Any]) -> dict[str, Any]:
    """Register here; messages that waited for this id here are now in its inbox."""
    session = sessions.register(store, a)
    messages.release_waiting(store, a["session_id"], store.node_id)
    return session


def _import(store: "Store", a: dict[str, Any]) -> bool:
    changed = sessions.import_session(store, a)
    if changed:
        messages.release_waiting(store, a["session"]["session_id"], store.node_id)
    return changed

HANDLERS: dict[str, Handler] = {
    "session.register": _register,
    "session.unregister": sessions.unregister,
    "session.ping": sessions.ping,
    "session.get": sessions.get,
    "session.update_status": sessions.update_status,
    "session.list": sessions.list_sessions,
    "session.find": sessions.find,
    "session.stats": sessions.stats,
    "session.clear_offline": sessions.clear_offline,
    "session.import": _import,
    "message.send": messages.send,
    "message.list": messages.list_inbox,
    "message.conversation": messages.conversation,
    "message.mark_read": messages.mark_read,
    "message.stats": messages.stats,
    "message.status": messages.status,
    "message.sent": messages.sent,
    "memory.set": memory.set_entry,
    "memory.get": memory.get,
    "memory.get_all": memory.get_all,
    "memory.search": memory.search,
    "memory.by_tags": memory.by_tags,
    "memory.by_session": memory.by_session,
    "memory.delete": memory.delete,
    "memory.clear": memory.clear,
    "memory.stats": memory.stats,
}

READ_ONLY = frozenset({
    "session.get", "session.list", "session.find", "session.stats", "message.list",
    "message.conversation", "message.stats", "message.status", "message.sent", "memory.get", "memory.get_all", "memory.search",
    "memory.by_tags", "memory.by_session", "memory.stats",
})


def run(store: "Store", command: str, args: dict[str, Any]) -> Any:
    """Run a validated command inside the caller's transaction."""
    handler = HANDLERS.get(command)
    if handler is None:
        raise UnknownCommand(f"unknown command {command!r}")
    try:
        return handler(store, args)
    except sqlite3.Error as exc:
        raise StoreError(f"database error: {exc}") from exc
