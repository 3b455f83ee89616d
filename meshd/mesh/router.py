"""Routing messages between daemons: durable outboxes, in-order exactly-once delivery.

A message for a session hosted elsewhere (or a broadcast, once per other daemon that hosts
sessions) gets its place in the sender daemon's outbox (a seq per destination and lane,
`Outbox.plan`) when it is journaled, before the sender is answered; the fold queues it
in SQLite under that seq, in the transaction that stores it. So once the sender is
answered the message cannot be lost: not on kill -9, not while the destination is down or
cut off. The router sends it right away, from the journaled record, before the fold:
items reach the router in memory (`Outbox.take_routed`), so the hot path never reads them
back from SQLite. Per destination and lane (high priority, normal) frames go out without
waiting for the previous one's answer, up to a window in flight; every frame says which
item is the oldest not yet acknowledged (`first`), so a lost frame shows up as a gap at
the destination. The destination applies items strictly in sequence, each exactly once
(it remembers the last sequence number it applied per origin and lane, in the same
transaction as the messages), and answers ROUTE_ACK with that number (which may come
before the fold: acks are applied with the next fold, after the writes they cover);
acknowledged items leave the outbox and their messages read as stored there. When the
answers stop moving forward for `route_retry` (doubling up to `route_retry_max`), or an
answer shows a gap, the run is sent again from the outbox, the durable copy; a
destination that is down is not tried until membership sees it back. Items older than
`outbox_max_age`, or beyond `outbox_max` per destination, expire: they are reported
(logged, counted, and their state reads expired), never silently dropped.

Read receipts travel the same way in the other direction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, Callable

from meshd.config import Config
from meshd.errors import MeshError
from meshd.mesh.membership import Membership
from meshd.mesh.periodic import Periodic, stop_all
from meshd.mesh.routequeue import NEVER as _NEVER, RouteQueue
from meshd.mesh.transport import Transport
from meshd.state.outbox import Outbox
from meshd.state.pipeline import WritePipeline
from meshd.state.store import Store
from meshd.wire.peer import FrameType, encode

log = logging.getLogger("meshd.mesh")

#: Frames sent to one destination and lane whose answer is still awaited, at most. Well
#: below the transport's per-peer queue (256), so routing alone never fills it.
WINDOW_FRAMES = 32
#: Items sent and not yet acknowledged per destination and lane, at most.
WINDOW_ITEMS = 4096
#: s acknowledgements may wait for a fold that sends bring anyway; then they are folded
#: in by themselves. (Reads fold them first, so nothing reads stale receipts meanwhile.)
ACK_FOLD_DELAY = 0.05



class Router:
    """Sends this daemon's outbox and applies what other daemons route to it. Acks go
    through the write pipeline when there is one (folded after the writes they cover);
    `on_delivered` is told when routed messages landed in local inboxes (live streams
    push them)."""

    def __init__(self, config: Config, store: Store, outbox: Outbox, membership: Membership,
                 transport: Transport, pipeline: WritePipeline | None = None,
                 on_delivered: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store
        self.outbox = outbox
        self.pipeline = pipeline
        self.membership = membership
        self.transport = transport
        self.counters: Counter[str] = Counter()
        self.on_delivered = on_delivered or (lambda: None)
        self.clock = clock              # the loop's clock (a virtual one in simulations)
        self._reopened: set[tuple[str, int]] = set()   # queues whose window has room again
        self._queues: dict[tuple[str, int], RouteQueue] = {}
        self._scheduled = False
        self._full_scheduled = False
        self._acks: dict[tuple[str, int], int] = {}       # acknowledged, not yet recorded
        self._acks_scheduled = False
        self._ack_timer: asyncio.TimerHandle | None = None
        self._running = False
        # A full round every route_tick (resends, queues not known yet), and expiry.
        self._rounds = Periodic(self.pump, config.route_tick, what="routing round")
        self._expiring = Periodic(self._expire_round, config.outbox_check_interval,
                                  what="outbox expiry")

    def start(self) -> None:
        self._running = True
        self._rounds.start()
        self._expiring.start()

    async def stop(self) -> None:
        self._running = False
        await stop_all(self._rounds, self._expiring)
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._acks:
            self._record_acks()          # (the store folds them when it closes)

    # --- sending ------------------------------------------------------------------------------

    def committed(self) -> None:
        """New items may be queued: send soon (coalesced)."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._fast_pump)

    def _schedule_full(self) -> None:
        if not self._full_scheduled:
            self._full_scheduled = True
            asyncio.get_running_loop().call_soon(self.pump)

    def member_up(self, node_id: str) -> None:
        """A destination came back: send what waits for it again from the oldest item not
        acknowledged, now rather than at the next retry. (The queue is kept, not
        forgotten: items journaled and not yet folded are in no other place that says
        where the run starts.)"""
        for key, q in self._queues.items():
            if key[0] == node_id:
                q.sent, q.frames, q.resend_at = q.first - 1, 0, _NEVER
                q.backoff, q.gap_resent = self.config.route_retry, False
        self._schedule_full()

    def _take_committed(self) -> set[tuple[str, int]]:
        """Move the items queued since last time (journaled or committed) into the
        queues' caches; the keys that got new items. A queue not known yet starts at its
        oldest item in SQLite, or at this item (every item queued since the router
        started came through here, in seq order)."""
        touched: set[tuple[str, int]] = set()
        members = self.membership.members
        for dest, lane, item in sorted(self.outbox.take_routed(),
                                       key=lambda r: (r[0], r[1], r[2][0])):
            key = (dest, lane)
            seq = item[0]
            q = self._queues.get(key)
            if q is None:
                with self.store.read(fold=False):
                    oldest = self.outbox.first(dest, lane)
                first = seq if oldest is None else min(oldest, seq)
                q = self._queues[key] = RouteQueue(first, first - 1, seq, self.config.route_retry)
            if seq > q.last:
                q.last = seq
            m = members.get(dest)
            if seq > q.sent and m is not None and m.up:   # (down: it waits in the outbox)
                q.cache_put(seq, item)
            touched.add(key)
        return touched

    def _fast_pump(self) -> None:
        self._scheduled = False
        self.send_new()

    def send_new(self) -> None:
        """After a commit, an ack, or sends just journaled: send what is new, from memory,
        to queues in order (high-priority lanes first)."""
        touched = self._take_committed()
        if self._reopened:
            touched |= self._reopened
            self._reopened = set()
        for key in sorted(touched, key=lambda k: k[1]):
            q = self._queues.get(key)
            m = self.membership.members.get(key[0])
            if q is not None and m is not None and m.up:
                self._send_more(key, q, m.address)

    def pump(self) -> None:
        """Look at every outbox queue in SQLite: start queues not known yet, resend runs
        that got no answer in time, and send what the fast path could not."""
        self._full_scheduled = False
        self._take_committed()
        now = self.clock()
        with self.store.read(fold=False):
            queues = self.outbox.destinations()
        for dest, lane, _count, first, last, _oldest in queues:
            m = self.membership.members.get(dest)
            if m is None or not m.up:
                continue                              # waits in the outbox for its return
            key = (dest, lane)
            q = self._queues.get(key)
            if q is None:
                q = self._queues[key] = RouteQueue(first, first - 1, last, self.config.route_retry)
            elif now >= q.resend_at:
                self.counters["resends"] += 1
                log.info("resending to %s from item %d (no acknowledgement in time)", dest[:12],
                         first, extra={"event": "route.retry", "fields": {
                             "node": dest, "lane": lane, "first": first, "last": last}})
                q.backoff = min(q.backoff * 2, self.config.route_retry_max)
                q.first, q.sent, q.frames, q.resend_at = first, first - 1, 0, _NEVER
            q.last = max(q.last, last)
            if first > q.first:                       # acknowledged or expired meanwhile
                q.first = first
                q.sent = max(q.sent, first - 1)
            self._send_more(key, q, m.address)

    def _send_more(self, key: tuple[str, int], q: RouteQueue, address: str) -> None:
        """Send the committed items above `q.sent`, a frame at a time, within the window."""
        dest, lane = key
        while (q.sent < q.last and q.frames < WINDOW_FRAMES
               and q.sent - q.first < WINDOW_ITEMS):
            items = self._next_items(dest, lane, q)
            if not items:
                q.last = q.sent                       # nothing above it is committed
                return
            frame, items = self._frame(dest, lane, q.first, items)
            if frame is None:
                return
            if not self.transport.send_frame(address, frame):
                return                                # dropped (queue full): the timer resends
            self.counters["route_frames"] += 1
            log.debug("routed %d item(s) to %s", len(items), dest[:12], extra={
                "event": "route.batch", "fields": {"node": dest, "lane": lane,
                                                   "items": len(items), "first": q.first}})
            q.sent = items[-1][0]
            q.frames += 1
            if q.resend_at == _NEVER:
                q.resend_at = self.clock() + q.backoff

    def _next_items(self, dest: str, lane: int, q: RouteQueue) -> list[list[Any]]:
        """Up to `route_batch` items above `q.sent`: from the cache while it has them in
        sequence, else from the outbox (committed items only)."""
        limit = self.config.route_batch
        cache = q.cache
        items: list[list[Any]] = []
        seq = q.sent + 1
        while len(items) < limit:
            item = cache.get(seq)
            if item is None:
                break
            items.append(item)
            seq += 1
        if items:
            return items
        with self.store.read(fold=False):
            return self.outbox.items(dest, lane, q.sent, limit)

    def _frame(self, dest: str, lane: int, first: int, items: list[list[Any]]
               ) -> tuple[bytes | None, list[list[Any]]]:
        """The ROUTE frame for a prefix of `items` that fits the frame size limit."""
        while True:
            try:
                frame = encode(FrameType.ROUTE, self.store.node_id, self.transport.address,
                               {"lane": lane, "first": first, "items": items})
            except MeshError as exc:
                self.counters["dropped.unencodable"] += 1
                log.warning("cannot encode routed items for %s: %s", dest[:12], exc)
                return None, items
            if len(frame) <= self.config.max_frame_bytes - 1024 or len(items) == 1:
                return frame, items
            items = items[:max(1, len(items) // 2)]

    def on_ack(self, sender: str, body: dict[str, Any]) -> None:
        lane, through = body["lane"], body["through"]
        key = (sender, lane)
        if through > self._acks.get(key, 0):
            self._acks[key] = through
            if not self._acks_scheduled:
                self._acks_scheduled = True
                asyncio.get_running_loop().call_soon(self._record_acks)
        q = self._queues.get(key)
        if q is None:
            return
        q.frames = max(0, q.frames - 1)
        if through >= q.first:                        # progress
            q.cache_drop_through(through)
            if q.sent <= through:
                q.frames = 0                          # (answers to them may have been lost)
            q.first = through + 1
            q.sent = max(q.sent, through)
            q.last = max(q.last, through)
            q.gap_resent = False
            q.backoff = self.config.route_retry
            q.resend_at = (_NEVER if q.sent <= through
                           else self.clock() + self.config.route_retry)
            if q.sent < q.last:                       # the window has room again
                self._reopened.add(key)
                self.committed()
        elif through == q.first - 1 and through < q.sent and not q.gap_resent:
            # Nothing new applied while items are out: a gap at the destination (a frame
            # was lost). Send the run again from the outbox now, once until progress.
            q.gap_resent = True
            q.resend_at = 0.0
            self._schedule_full()

    def _record_acks(self) -> None:
        """Acknowledged items leave the outbox: a burst of acks at once, with the next
        fold when one is due (the items may not be folded yet), else in a transaction."""
        self._acks_scheduled = False
        acks, self._acks = self._acks, {}
        try:
            deferred = self._ack([(dest, lane, through) for (dest, lane), through in acks.items()])
            if deferred and self._ack_timer is None and self._running:
                self._ack_timer = asyncio.get_running_loop().call_later(ACK_FOLD_DELAY,
                                                                        self._fold_acks)
        except MeshError as exc:
            log.warning("recording acknowledgements failed (retried): %s", exc)
            for key, through in acks.items():
                if through > self._acks.get(key, 0):
                    self._acks[key] = through
            if self._running and not self._acks_scheduled:
                self._acks_scheduled = True
                asyncio.get_running_loop().call_later(self.config.route_retry,
                                                      self._record_acks)
            return

    def _ack(self, acks: list[tuple[str, int, int]]) -> bool:
        """Delete acknowledged items: with the next fold of the write pipeline (True: the
        caller makes sure one comes), else now."""
        if self.pipeline is not None:
            self.pipeline.ack(acks)
            return True
        with self.store.write(keeps_routes=True):
            n = sum(self.outbox.acked(dest, lane, through) for dest, lane, through in acks)
        self.outbox.acked_items += n
        return False

    def _fold_acks(self) -> None:
        """Acks still wait for a fold (no send brought one): fold them in now."""
        self._ack_timer = None
        if self.pipeline is None or not self.pipeline.acks_pending:
            return
        try:
            self.pipeline.flush()
        except MeshError as exc:
            log.warning("recording acknowledgements failed (retried): %s", exc)
            self._ack_timer = asyncio.get_running_loop().call_later(self.config.route_retry,
                                                                    self._fold_acks)

    # --- receiving ----------------------------------------------------------------------------

    def on_route(self, sender: str, reply_to: str, body: dict[str, Any]) -> None:
        lane, first, items = body["lane"], body["first"], body["items"]
        forged = [it for it in items if it[1] == "msg" and it[2]["origin"] != sender]
        if forged:
            # A daemon routes only messages that were sent through it.
            self.counters["dropped.forged_origin"] += 1
            return
        try:
            with self.store.write(keeps_routes=True):       # (changes no session)
                through, unknown = self.outbox.deliver(sender, lane, first, items)
        except MeshError as exc:
            log.warning("storing messages routed from %s failed: %s", sender[:12], exc)
            self.counters["route_errors"] += 1
            return
        self.counters["routed_in"] += len(items)
        if unknown:
            self.counters["dropped.unknown_session"] += unknown
        if self.store.routed:
            self.committed()                 # forwarded to where a session moved
        # Committed, so durable: live subscribers first (they wait), then the sender.
        self.on_delivered()
        self.transport.send(reply_to, FrameType.ROUTE_ACK, {"lane": lane, "through": through})

    # --- expiry -------------------------------------------------------------------------------

    def _expire_round(self) -> None:
        try:
            self.expire()
        except MeshError as exc:
            log.warning("outbox expiry failed: %s", exc)

    def expire(self) -> int:
        # (The write folds every journaled send first: forgetting a queue below forgets
        # nothing that is not in the outbox.)
        with self.store.write(keeps_routes=True):
            gone = self.outbox.expire(int(self.config.outbox_max_age * 1000),
                                      self.config.outbox_max)
            unclaimed = self.outbox.expire_waiting(int(self.config.outbox_max_age * 1000))
        for mid, to in unclaimed:
            self.counters["expired_waiting"] += 1
            log.warning("message %s to %s expired: no session with that id registered "
                        "within the outbox's age limit", mid, to, extra={
                            "event": "route.expired", "fields": {"message_id": mid, "to": to}})
        self._report_expired(gone)
        return len(gone) + len(unclaimed)

    def forget_destination(self, node_id: str) -> int:
        """Everything queued for `node_id` expires now (it was force-left: the operator
        says it will not come back); senders see "expired" at once. How many items."""
        with self.store.write(keeps_routes=True):
            gone = self.outbox.expire(int(self.config.outbox_max_age * 1000),
                                      self.config.outbox_max, only=node_id)
        self._report_expired(gone)
        return len(gone)

    def _report_expired(self, gone: list[tuple[str, str, str]]) -> None:
        for dest in {d for _, d, _ in gone}:
            # What is cached or in flight for it may include expired items: start over
            # from the outbox.
            for key in [k for k in self._queues if k[0] == dest]:
                del self._queues[key]
        for mid, dest, kind in gone:
            if kind == "read":
                self.counters["expired_receipts"] += 1
                log.info("read receipt of %s for node %s expired in the outbox", mid, dest[:12])
                continue
            self.counters["expired"] += 1
            log.warning("message %s %s node %s expired in the outbox (undelivered)", mid,
                        "forwarded to" if kind == "fwd" else "to", dest[:12], extra={
                            "event": "route.expired",
                            "fields": {"message_id": mid, "node": dest, "kind": kind}})

    def stats(self) -> dict[str, Any]:
        with self.store.read(fold=False):
            queues = self.outbox.destinations()
        now_ms = int(self.store.now() * 1000)
        return {"counters": {**self.counters, "acked_items": self.outbox.acked_items},
                "cached_bytes": sum(q.cache_bytes for q in self._queues.values()),
                "outbox": [{"node": d, "lane": "high" if lane == 0 else "normal",
                            "items": n, "oldest_age": round(max(0, now_ms - oldest) / 1000, 3)}
                           for d, lane, n, _first, _last, oldest in queues]}
