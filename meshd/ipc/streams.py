"""Live push of incoming messages to subscribed clients, resumable from a cursor.

A subscription follows one session's inbox (cursor = the inbox's per-session sequence) or
the node-wide message log. Events go out on the subscribe request's req_id. At most
`window` events are in flight beyond the client's last ack, so a slow client is never
flooded and ZeroMQ never has to drop a frame; when a client falls behind, the rest is
read back from the store once it acks. Subscriptions that neither ack nor renew within
`idle_timeout` are dropped (the client resubscribes from its cursor when it returns).

A client that subscribes and never reads must not pin the daemon's memory: what is
pushed and not yet acknowledged is bounded in bytes per stream and over all streams (a
stream over its share pauses, and resumes from its cursor when acks make room), streams
are bounded per client connection and in all, and a stream's state goes with it.

The same machinery serves memory watches (`memory.watch`): the stream is the node's
memory change log (`meshd.state.memlog`, cursor = its seq), filtered by key prefix and
tags; events of rows the filter skips move the stream on without being sent. A watch's
window counts the events in flight (not cursor distance, which skipped rows would eat).
A watcher resuming from a cursor below what was trimmed first gets a `gap` event.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from meshd.errors import InvalidArgument, NotFound, TooLarge
from meshd.state import mail, memlog
from meshd.state.store import Store
from meshd.wire.ipc import EVENT, encode_reply

log = logging.getLogger("meshd.ipc.streams")

#: send(identity, frame) -> True if queued, False if the client is gone or its queue is full.
SendFn = Callable[[bytes, bytes], bool]


def admit(what: str, open_total: int, total: int, open_here: int, per_client: int) -> None:
    """Refuse one more subscription of a kind (`what`: streams, monitors) past its bounds,
    in all and per client connection, with an error that tells the client what to do."""
    if open_total >= total:
        raise TooLarge(f"this daemon serves {total} {what} already; try again later")
    if open_here >= per_client:
        raise TooLarge(f"this connection has {per_client} {what} open already; close one "
                       f"first")


@dataclass(slots=True, eq=False)
class Subscription:
    sub_id: int
    ident: bytes
    req_id: int
    session_id: str | None
    types: frozenset[str]
    window: int
    sent: int            # highest seq pushed (or skipped by the type filter)
    acked: int           # highest seq the client confirmed
    last_seen: float = field(default_factory=time.monotonic)
    inflight: deque[tuple[int, int]] = field(default_factory=deque)   # (seq, bytes) unacked
    inflight_bytes: int = 0
    memory: bool = False             # a memory watch (memlog) rather than a message stream
    prefix: str | None = None        # memory watch: keys starting with it
    tags: frozenset[str] | None = None   # memory watch: entries with any of these tags


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what subscribers may hold (see the module docstring)."""

    sub_bytes: int = 1 << 20
    total_bytes: int = 64 << 20
    per_client: int = 64
    total: int = 4096
    client_bytes: int = 8 << 20      # one connection's streams together


class Streams:
    """All live subscriptions of one daemon."""

    def __init__(self, store: Store, send: SendFn, window: int, idle_timeout: float,
                 limits: Limits | None = None) -> None:
        self.store = store
        self.send = send
        self.window = window
        self.idle_timeout = idle_timeout
        self.limits = limits or Limits()
        self.inflight_bytes = 0                  # over all streams
        self.client_bytes: dict[bytes, int] = {}  # per connection
        self.paused: set[Subscription] = set()   # held back by the total, not their own share
        self.per_client: dict[bytes, int] = {}
        self.refused = 0
        self.subs: dict[int, Subscription] = {}
        self.by_key: dict[str | None, set[Subscription]] = {}
        # The highest seq known per stream (read at subscribe, raised by every published
        # event): a subscriber at it has nothing to read back, so an ack costs no query.
        # Rows committed but not yet published come with their events.
        self.heads: dict[str | None, int] = {}
        self._ids = itertools.count(1)
        self.pushed = 0
        self.dropped_subscriptions = 0

    def _admit(self, ident: bytes) -> None:
        """Refuse a new stream past the bounds (in all, per connection)."""
        try:
            admit("streams", len(self.subs), self.limits.total,
                  self.per_client.get(ident, 0), self.limits.per_client)
        except TooLarge:
            self.refused += 1
            raise

    def subscribe(self, ident: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        session_id = args["session_id"]
        self._admit(ident)
        with self.store.lock:
            head = mail.head(self.store, session_id)
        start = head if args["cursor"] is None else args["cursor"]
        if start > head:
            raise InvalidArgument(f"cursor {start} is ahead of the stream head {head}")
        self.heads[session_id] = max(self.heads.get(session_id, 0), head)
        window = min(args["window"] or self.window, self.window * 16)
        sub = Subscription(next(self._ids), ident, req_id, session_id,
                           frozenset(args["types"] or ()), max(1, window), start, start)
        self.subs[sub.sub_id] = sub
        self.by_key.setdefault(session_id, set()).add(sub)
        self.per_client[ident] = self.per_client.get(ident, 0) + 1
        return {"sub": sub.sub_id, "cursor": start, "head": head}

    def watch_memory(self, ident: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        """A memory watch from `cursor` (None: from now on), filtered by key prefix and
        tags. Answers the cursor it starts from and the log's head."""
        self._admit(ident)
        key = memlog.STREAM_KEY
        with self.store.lock:
            head = memlog.head(self.store)
        start = head if args["cursor"] is None else args["cursor"]
        if start > head:
            raise InvalidArgument(f"cursor {start} is ahead of this node's memory log "
                                  f"(head {head}): a cursor from another daemon?")
        self.heads[key] = max(self.heads.get(key, 0), head)
        window = min(args["window"] or self.window, self.window * 16)
        sub = Subscription(next(self._ids), ident, req_id, key, frozenset(), max(1, window),
                           start, start, memory=True, prefix=args["prefix"],
                           tags=frozenset(args["tags"]) or None)
        self.subs[sub.sub_id] = sub
        self.by_key.setdefault(key, set()).add(sub)
        self.per_client[ident] = self.per_client.get(ident, 0) + 1
        return {"sub": sub.sub_id, "cursor": start, "head": head}

    def _get(self, ident: bytes, sub_id: int) -> Subscription:
        sub = self.subs.get(sub_id)
        if sub is None or sub.ident != ident:
            raise NotFound(f"no subscription {sub_id} (expired or closed); subscribe again")
        return sub

    def ack(self, ident: bytes, args: dict[str, Any]) -> dict[str, Any]:
        sub = self._get(ident, args["sub"])
        sub.acked = max(sub.acked, min(args["cursor"], sub.sent))
        sub.last_seen = time.monotonic()
        freed = self._release(sub)
        self.pump(sub)
        if freed and self.paused:
            self._resume()
        return {"sub": sub.sub_id, "acked": sub.acked}

    def _release(self, sub: Subscription) -> int:
        """Forget the bytes of events the subscriber has acknowledged; how many."""
        freed = 0
        while sub.inflight and sub.inflight[0][0] <= sub.acked:
            freed += sub.inflight.popleft()[1]
        self._account(sub, -freed)
        return freed

    def _account(self, sub: Subscription, delta: int) -> None:
        sub.inflight_bytes += delta
        self.inflight_bytes += delta
        left = self.client_bytes.get(sub.ident, 0) + delta
        if left > 0:
            self.client_bytes[sub.ident] = left
        else:
            self.client_bytes.pop(sub.ident, None)

    def _resume(self) -> None:
        """Room was made under the total: let paused streams go on, a few at a time."""
        for sub in list(self.paused)[:16]:
            self.paused.discard(sub)
            self.pump(sub)

    def close(self, ident: bytes, args: dict[str, Any]) -> bool:
        sub = self._get(ident, args["sub"])
        self._drop(sub)
        return True

    def _drop(self, sub: Subscription) -> None:
        if self.subs.pop(sub.sub_id, None) is None:
            return
        group = self.by_key.get(sub.session_id)
        if group is not None:
            group.discard(sub)
            if not group:                       # nobody follows it: forget its head too
                del self.by_key[sub.session_id]
                self.heads.pop(sub.session_id, None)
        n = self.per_client.get(sub.ident, 0) - 1
        if n > 0:
            self.per_client[sub.ident] = n
        else:
            self.per_client.pop(sub.ident, None)
        self._account(sub, -sub.inflight_bytes)
        sub.inflight.clear()
        self.paused.discard(sub)
        if self.paused:
            self._resume()

    def _full(self, sub: Subscription) -> bool:
        """Over its own share of unacknowledged bytes, or its connection over its share,
        or the daemon over its total (then it waits in `paused` for others' acks). A
        stream with nothing in flight may always have one event out (up to twice the
        total), so no client, however greedy, can stall everyone else's streams."""
        lim = self.limits
        if sub.inflight_bytes >= lim.sub_bytes:
            return True
        if sub.inflight_bytes and self.client_bytes.get(sub.ident, 0) >= lim.client_bytes:
            return True
        if self.inflight_bytes >= lim.total_bytes:
            if not sub.inflight_bytes and self.inflight_bytes < 2 * lim.total_bytes:
                return False
            self.paused.add(sub)
            return True
        return False

    def _push(self, sub: Subscription, seq: int, message: dict[str, Any]) -> bool:
        if self._full(sub):
            return False
        frame = encode_reply(sub.req_id, EVENT, {"sub": sub.sub_id, "seq": seq, "message": message})
        if not self.send(sub.ident, frame):
            return False
        sub.sent = seq
        sub.inflight.append((seq, len(frame)))
        self._account(sub, len(frame))
        self.pushed += 1
        return True

    def publish(self, events: list[tuple[str | None, int, dict[str, Any]]]) -> None:
        """Push events just committed; subscribers that are behind catch up from the store."""
        behind: set[Subscription] = set()
        heads = self.heads
        for key, seq, message in events:
            group = self.by_key.get(key)
            if not group:
                continue                        # nobody follows it: nothing to remember
            if seq > heads.get(key, 0):
                heads[key] = seq
            for sub in list(group):
                if sub in behind or sub.sub_id not in self.subs:
                    continue
                if sub.memory:
                    if sub.sent != seq - 1 or len(sub.inflight) >= sub.window:
                        behind.add(sub)
                    elif not memlog.matches(sub.prefix, sub.tags, message["key"],
                                            message["tags"]):
                        sub.sent = seq
                    elif not self._push(sub, seq, message):
                        behind.add(sub)
                    continue
                if sub.sent != seq - 1 or sub.sent - sub.acked >= sub.window:
                    behind.add(sub)
                elif sub.types and message["type"] not in sub.types:
                    sub.sent = seq
                elif not self._push(sub, seq, message):
                    behind.add(sub)
        for sub in behind:
            self.pump(sub)

    def pump(self, sub: Subscription) -> None:
        """Send what the subscriber lacks, from the store, up to its window."""
        if sub.memory:
            self._pump_memory(sub)
            return
        for _ in range(1000):                    # bounded: each round moves the cursor forward
            room = sub.window - (sub.sent - sub.acked)
            if room <= 0 or sub.sub_id not in self.subs or self._full(sub):
                return
            if sub.sent >= self.heads.get(sub.session_id, 0):
                return                           # nothing committed beyond it yet
            with self.store.lock:
                rows = mail.after(self.store, sub.session_id, sub.sent, room, sorted(sub.types))
            if not rows:
                if sub.types:                   # skip past filtered-out events
                    with self.store.lock:
                        head = mail.head(self.store, sub.session_id)
                    sub.sent = max(sub.sent, head)
                return
            for seq, message in rows:
                if not self._push(sub, seq, message):
                    return

    def _pump_memory(self, sub: Subscription) -> None:
        """A memory watch's catch-up from the log: a few bounded reads per call (a watch
        that filters most rows out goes on at its next ack or event)."""
        key = memlog.STREAM_KEY
        for _ in range(16):
            room = sub.window - len(sub.inflight)
            if room <= 0 or sub.sub_id not in self.subs or self._full(sub):
                return
            if sub.sent >= self.heads.get(key, 0):
                return
            with self.store.lock:
                rows, through = memlog.after(self.store, sub.sent, room, sub.prefix, sub.tags)
            for seq, message in rows:
                if not self._push(sub, seq, message):
                    return
            if through > sub.sent:
                sub.sent = through              # rows the filter skipped
            elif not rows:
                return

    def expire(self) -> int:
        """Drop subscriptions whose client has gone quiet for too long."""
        cutoff = time.monotonic() - self.idle_timeout
        stale = [s for s in self.subs.values() if s.last_seen < cutoff]
        for sub in stale:
            self._drop(sub)
        self.dropped_subscriptions += len(stale)
        return len(stale)

    def forget_client(self, ident: bytes) -> None:
        for sub in [s for s in self.subs.values() if s.ident == ident]:
            self._drop(sub)
            self.dropped_subscriptions += 1
