"""CollaborationHub: direct messages, broadcasts, threads, and live delivery to handlers."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from meshd.wire.schema import enum_value
from sessions import _ops as ops
from sessions import asking
from sessions._backend import Backend, DaemonBackend, DirectoryBackend, backend_for
from sessions._stream import DirectoryStream, HandlerThread, MessageStream, Stream
from sessions.models import Message, MessageType

__all__ = ["CollaborationHub", "Message", "MessageType"]

Handler = Callable[[Message], Any]


class CollaborationHub:
    """Messaging between sessions.

    The hub works where its messages live: `messages_path` (a directory, no daemon) if
    given, else the backend of `registry` if given, else this host's meshd.
    """

    def __init__(self, registry: Any = None, messages_path: str | os.PathLike[str] | None = None,
                 *, socket: str | None = None, timeout: float | None = None) -> None:
        self.registry = registry
        if messages_path is None and registry is not None and hasattr(registry, "_backend"):
            self._backend: Backend = registry._backend
        else:
            self._backend = backend_for(messages_path, socket, timeout)
        # Messages kept apart from the registry's sessions (the seed's
        # CollaborationHub(registry, messages_path)): the hub still knows those sessions.
        self._apart = (registry is not None and hasattr(registry, "_backend")
                       and registry._backend is not self._backend)
        self._handlers: dict[str | None, dict[str, list[Handler]]] = {}
        self._threads: dict[str | None, HandlerThread] = {}
        self._lock = threading.Lock()

    def send(self, from_session: str, to_session: str, type: MessageType | str, subject: str,
             body: str, data: dict[str, Any] | None = None,
             in_reply_to: str | None = None, priority: str = "normal") -> Message:
        """Send a direct message. A session on another host gets it through its daemon
        (queued while that host is away); a "high" priority message overtakes queued
        normal ones. A session id nobody has registered yet is no error, as in the seed:
        the message waits (get_message_status says "waiting") and is delivered once when
        the id registers on any host, or expires."""
        self._know_registry()
        return self._backend.run(ops.send(from_session, to_session, type, subject, body, data,
                                          in_reply_to, priority))

    def broadcast(self, from_session: str, subject: str, body: str,
                  data: dict[str, Any] | None = None, priority: str = "normal") -> Message:
        """Send to every session but the sender, on every host."""
        self._know_registry()
        return self._backend.run(ops.broadcast(from_session, subject, body, data, priority))

    def ask(self, from_session: str, to_session: str, subject: str, body: str,
            data: dict[str, Any] | None = None, timeout: float = 60.0) -> Message:
        """Send a REQUEST and wait for the RESPONSE that replies to it (by in_reply_to),
        at most `timeout` seconds. Raises Timeout when none came; the request stays
        delivered (get_message_status tells where it stands) and a late reply still lands
        in the inbox. The mesh's version of Serf's query."""
        wait = asking.Asking(from_session, to_session, timeout)
        stream = self.subscribe(from_session, types=[MessageType.RESPONSE])  # before sending
        try:
            wait.sent(self.send(from_session, to_session, MessageType.REQUEST, subject, body,
                                data), time.monotonic())
            while (left := wait.wait(time.monotonic())) is not None:
                msg = stream.next(timeout=left)
                if wait.answered(msg):
                    assert msg is not None
                    return msg
        finally:
            stream.close()
        raise wait.expired()

    def dispatch(self, from_session: str, capability: str, subject: str, body: str,
                 data: dict[str, Any] | None = None,
                 type: MessageType | str = MessageType.REQUEST,
                 priority: str = "normal") -> Message:
        """Send to ONE session that has `capability` and is IDLE or ACTIVE, chosen by the
        rule of `sessions.asking` (idle first, then least recently dispatched to, then by
        host state); the message's to_session says which. NotFound when none qualifies."""
        found = self._backend.run(ops.find_sessions(capability=capability))
        last = self._backend.run(ops.memory_get(asking.dispatch_key(capability), {}))
        chosen = asking.pick(found, capability, from_session, last)
        msg = self.send(from_session, chosen.session_id, type, subject, body, data,
                        priority=priority)
        for op in asking.record_ops(from_session, capability, last, chosen.session_id):
            self._backend.run(op)
        return msg

    def get_message_status(self, message_id: str) -> dict[str, Any] | None:
        """Where a message you sent stands: {"message", "state", "deliveries"}; state is
        waiting (no session has the recipient's id yet), queued (waiting for the
        recipient's host), stored (in the recipient's inbox), read, or expired (given up
        after the outbox's age or size limit)."""
        return self._backend.run(ops.message_status(message_id))

    def get_sent(self, session_id: str) -> list[dict[str, Any]]:
        """The messages a session sent through this daemon, oldest first, each with its
        state as in get_message_status()."""
        return self._backend.run(ops.sent_messages(session_id))

    def reply(self, from_session: str, to_message: Message, body: str,
              data: dict[str, Any] | None = None) -> Message:
        """Answer a message: RESPONSE to its sender, subject "Re: ...", threaded under it."""
        self._know_registry()
        return self._backend.run(ops.reply(from_session, to_message, body, data))

    def ping_session(self, from_session: str, to_session: str) -> Message:
        self._know_registry()
        return self._backend.run(ops.ping_session(from_session, to_session))

    def get_messages(self, session_id: str, include_broadcasts: bool = True,
                     message_type: MessageType | str | None = None,
                     unread_only: bool = False) -> list[Message]:
        """The session's inbox (direct messages, and broadcasts when asked), oldest first."""
        return self._backend.run(ops.get_messages(session_id, include_broadcasts, message_type,
                                                  unread_only))

    def mark_read(self, session_id: str, message_ids: list[str] | None = None) -> int:
        """Mark messages of the session's inbox read (all when none given); returns how many."""
        return self._backend.run(ops.mark_read(session_id, message_ids))

    def get_conversation(self, message_id: str) -> list[Message]:
        """The whole thread the message belongs to, root first; [] for an unknown id."""
        return self._backend.run(ops.get_conversation(message_id))

    def get_stats(self) -> dict[str, Any]:
        return self._backend.run(ops.hub_stats())

    def _know_registry(self) -> None:
        """Copy the registry's sessions to where the messages live, when those are apart,
        so that sends reach them and broadcasts count them (idempotent: an unchanged
        session is not written again)."""
        if not self._apart:
            return
        for s in self.registry.list_sessions(include_offline=True):
            self._backend.run(ops.import_session(s))

    # --- live delivery -----------------------------------------------------------------------

    def subscribe(self, session_id: str | None = None, cursor: int | None = None,
                  types: list[MessageType | str] | None = None) -> Stream:
        """A stream of messages arriving from now on (or after `cursor`): one session's
        inbox, or every message this node stores when session_id is None. Iterate it, or
        call `.next(timeout)`; `.cursor` resumes a later stream where this one stopped."""
        type_values = [enum_value(t, MessageType, "types") for t in (types or [])]
        b = self._backend
        if isinstance(b, DirectoryBackend):
            return DirectoryStream(b.store, session_id, cursor, type_values)
        assert isinstance(b, DaemonBackend)
        return MessageStream(b.client.path, session_id, cursor, type_values)

    def register_handler(self, message_type: MessageType | str, handler: Handler,
                         session_id: str | None = None) -> None:
        """Call handler(message) for each message of that type that arrives from now on
        (for one session's inbox when session_id is given), in a background thread."""
        mtype = enum_value(message_type, MessageType, "message_type")
        if not callable(handler):
            raise TypeError("handler must be callable")
        with self._lock:
            handlers = self._handlers.setdefault(session_id, {})
            handlers.setdefault(mtype, []).append(handler)
            if session_id not in self._threads:
                self._threads[session_id] = HandlerThread(self.subscribe(session_id), handlers)

    def close(self) -> None:
        """Stop handler threads."""
        with self._lock:
            threads, self._threads = list(self._threads.values()), {}
        for t in threads:
            t.stop()
