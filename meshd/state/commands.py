"""The store-level commands, one table shared by the daemon's IPC server and the SDK's
directory mode, so both give the same answers to the same validated arguments.

Each command is declared once, with its argument checks and flags, in
`meshd.wire.ipc.REGISTRY`; here each store command gets its handler, and a check at
import time makes sure the two agree.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Callable

import msgpack

from meshd.errors import StoreError, TooLarge, UnknownCommand
from meshd.state import mail, memory, sessions
from meshd.state.outbox import Outbox
from meshd.wire import ipc
from meshd.wire.ipc import PAGED

if TYPE_CHECKING:
    from meshd.state.store import Store

Handler = Callable[[dict[str, Any]], Any]

#: Declared once, with each command (`meshd.wire.ipc.REGISTRY`).
READ_ONLY = ipc.READ_ONLY


class Commands:
    """The handlers of the store's commands, bound to one store and its outbox (the
    daemon's, which routes; or one of its own, for the SDK's directory mode)."""

    def __init__(self, store: "Store", outbox: Outbox | None = None) -> None:
        self.store = store
        self.outbox = outbox = outbox if outbox is not None else Outbox(store)

        def on(fn: Callable[["Store", dict[str, Any]], Any]) -> Handler:
            return lambda a: fn(store, a)

        self.handlers: dict[str, Handler] = {
            "session.register": self._register,
            "session.unregister": on(sessions.unregister),
            "session.ping": on(sessions.ping),
            "session.get": on(sessions.get),
            "session.update_status": on(sessions.update_status),
            "session.list": on(sessions.list_sessions),
            "session.find": on(sessions.find),
            "session.stats": on(sessions.stats),
            "session.clear_offline": on(sessions.clear_offline),
            "session.import": self._import,
            "message.send": lambda a: mail.send(store, outbox, a),
            "message.list": on(mail.list_inbox),
            "message.conversation": on(mail.conversation),
            "message.mark_read": lambda a: mail.mark_read(store, outbox, a),
            "message.stats": on(mail.stats),
            "message.status": on(mail.status),
            "message.sent": on(mail.sent),
            "memory.set": on(memory.set_entry),
            "memory.get": on(memory.get),
            "memory.get_all": on(memory.get_all),
            "memory.search": on(memory.search),
            "memory.by_tags": on(memory.by_tags),
            "memory.by_session": on(memory.by_session),
            "memory.delete": on(memory.delete),
            "memory.clear": on(memory.clear),
            "memory.stats": on(memory.stats),
            "memory.touch": on(memory.touch),
            "memory.history": on(memory.history),
        }
        if set(self.handlers) != ipc.STORE_COMMANDS:    # declared without a handler
            raise ImportError(f"store commands and handlers differ: "
                              f"{sorted(set(self.handlers) ^ ipc.STORE_COMMANDS)}")

    def _register(self, a: dict[str, Any]) -> dict[str, Any]:
        """Register here; messages that waited for this id here are now in its inbox."""
        session = sessions.register(self.store, a)
        self.outbox.release_waiting(a["session_id"], self.store.node_id)
        return session

    def _import(self, a: dict[str, Any]) -> bool:
        changed = sessions.import_session(self.store, a)
        if changed:
            self.outbox.release_waiting(a["session"]["session_id"], self.store.node_id)
        return changed

    def run(self, command: str, args: dict[str, Any]) -> Any:
        """Run a validated command inside the caller's transaction."""
        handler = self.handlers.get(command)
        if handler is None:
            raise UnknownCommand(f"unknown command {command!r}")
        try:
            if command in PAGED:
                return _paged(handler, command, args)
            return handler(args)
        except sqlite3.Error as exc:
            raise StoreError(f"database error: {exc}") from exc

    def execute(self, command: str, args: dict[str, Any]) -> Any:
        """Run one validated command in its own transaction (the SDK's directory mode)."""
        if command in READ_ONLY:
            with self.store.read():
                return self.run(command, args)
        with self.store.write():
            return self.run(command, args)


#: Rows a list command may answer without `limit` (more is refused: page instead).
MAX_UNPAGED_ROWS = 10_000
#: Bytes of rows in one page, about (a page has at least one row whatever its size).
PAGE_BYTES = 1 << 20
#: Bytes an unpaged answer may have.
MAX_UNPAGED_BYTES = 4 << 20


def _paged(handler: Handler, command: str, args: dict[str, Any]) -> Any:
    """A list command, bounded: the handlers read `limit`/`offset` (one row more than
    asked, to know whether more follow), so no answer holds more than a page in memory.
    A greedy or old client that asks for everything gets at most MAX_UNPAGED_ROWS."""
    limit, offset = args.get("limit"), args.get("offset", 0)
    want = MAX_UNPAGED_ROWS if limit is None else limit
    rows = handler({**args, "limit": want + 1, "offset": offset})
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
