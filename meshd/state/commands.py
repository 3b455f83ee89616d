"""The store-level commands, one table shared by the daemon's IPC server and the SDK's
directory mode, so both give the same answers to the same validated arguments."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Callable

import msgpack

from meshd.errors import StoreError, TooLarge, UnknownCommand
from meshd.state import memory, messages, sessions
from meshd.wire import ipc
from meshd.wire.ipc import PAGED

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

#: Declared once, with each command (`meshd.wire.ipc.REGISTRY`).
READ_ONLY = ipc.READ_ONLY
if set(HANDLERS) != ipc.STORE_COMMANDS:            # a command declared without a handler
    raise ImportError(f"store commands and handlers differ: "
                      f"{sorted(set(HANDLERS) ^ ipc.STORE_COMMANDS)}")


#: Rows a list command may answer without `limit` (more is refused: page instead).
MAX_UNPAGED_ROWS = 10_000
#: Bytes of rows in one page, about (a page has at least one row whatever its size).
PAGE_BYTES = 1 << 20
#: Bytes an unpaged answer may have.
MAX_UNPAGED_BYTES = 4 << 20


def run(store: "Store", command: str, args: dict[str, Any]) -> Any:
    """Run a validated command inside the caller's transaction."""
    handler = HANDLERS.get(command)
    if handler is None:
        raise UnknownCommand(f"unknown command {command!r}")
    try:
        if command in PAGED:
            return _paged(store, handler, command, args)
        return handler(store, args)
    except sqlite3.Error as exc:
        raise StoreError(f"database error: {exc}") from exc


def _paged(store: "Store", handler: Handler, command: str, args: dict[str, Any]) -> Any:
    """A list command, bounded: the handlers read `limit`/`offset` (one row more than
    asked, to know whether more follow), so no answer holds more than a page in memory.
    A greedy or old client that asks for everything gets at most MAX_UNPAGED_ROWS."""
    limit, offset = args.get("limit"), args.get("offset", 0)
    want = MAX_UNPAGED_ROWS if limit is None else limit
    rows = handler(store, {**args, "limit": want + 1, "offset": offset})
    if limit is None:
        if len(rows) > MAX_UNPAGED_ROWS or sum(
                len(msgpack.packb(r, use_bin_type=True)) for r in rows) > MAX_UNPAGED_BYTES:
            raise TooLarge(f"the answer to {command} is over {MAX_UNPAGED_ROWS} rows or "
                           f"{MAX_UNPAGED_BYTES >> 20} MiB: ask for pages with limit and "
                           f"offset (the SDK does)")
        return rows
    more = len(rows) > limit
    page, size = [], 0
    for row in rows[:limit]:
        size += len(msgpack.packb(row, use_bin_type=True))
        if page and size > PAGE_BYTES:
            more = True
            break
        page.append(row)
    return {"items": page, "more": more}
