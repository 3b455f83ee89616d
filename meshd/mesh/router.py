"""Routing messages between daemons: durable outboxes, in-order exactly-once delivery.

A message for a session hosted elsewhere (or a broadcast, once per other daemon that hosts
sessions) is queued in the sender daemon's outbox in the same transaction that stores it,
so once the sender is answered the message cannot be lost: not on kill -9, not while the
destination is down or cut off. Per destination and lane (high priority, normal) the
router keeps one ROUTE frame in flight: a run of items from the oldest unacknowledged
one. The destination applies them strictly in sequence, each exactly once (it remembers
the last sequence number it applied per origin and lane, in the same transaction as the
messages), and answers ROUTE_ACK with that number; acknowledged items leave the outbox
and their messages read as stored there. A frame that gets no answer is sent again after
`route_retry`, doubling up to `route_retry_max`; a destination that is down is not tried
until membership sees it back. Items older than `outbox_max_age`, or beyond `outbox_max`
per destination, expire: they are reported (logged, counted, and their state reads
expired), never silently dropped.

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
from meshd.mesh.transport import Transport
from meshd.state import messages
from meshd.state.store import Store
from meshd.wire.peer import FrameType, encode

log = logging.getLogger("meshd.mesh")


class Router:
    def __init__(self, config: Config, store: Store, membership: Membership,
                 transport: Transport) -> None:
        self.config = config
        self.store = store
        self.membership = membership
        self.transport = transport
        self.counters: Counter[str] = Counter()
        #: Told when routed messages landed in local inboxes (live streams push them).
        self.on_delivered: Callable[[], None] = lambda: None
        # (dest, lane) -> (through seq sent, resend at, current backoff)
        self._inflight: dict[tuple[str, int], tuple[int, float, float]] = {}
        self._scheduled = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._tick_loop()), loop.create_task(self._expiry_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []

    # --- sending ------------------------------------------------------------------------------

    def committed(self) -> None:
        """New items may be queued: send soon (coalesced)."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.pump)

    def member_up(self, node_id: str) -> None:
        """A destination came back: send what waits for it now, not at the next retry."""
        for key in [k for k in self._inflight if k[0] == node_id]:
            del self._inflight[key]
        self.committed()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.route_tick)
            try:
                self.pump()
            except Exception:                        # pragma: no cover - keep routing
                log.exception("routing round failed")

    def pump(self) -> None:
        self._scheduled = False
        now = time.monotonic()
        with self.store.read(fold=False):
            queues = messages.outbox_destinations(self.store)
        for dest, lane, _count, first, _oldest in queues:
            m = self.membership.members.get(dest)
            if m is None or not m.up:
                continue                              # waits in the outbox for its return
            key = (dest, lane)
            inflight = self._inflight.get(key)
            if inflight is not None and now < inflight[1]:
                continue                              # an answer is still awaited
            backoff = self.config.route_retry if inflight is None else inflight[2]
            frame, through = self._frame(dest, lane, first)
            if frame is None:
                continue
            if inflight is not None:
                self.counters["resends"] += 1
            self.transport.send_frame(m.address, frame)
            self.counters["route_frames"] += 1
            self._inflight[key] = (through, now + backoff,
                                   min(backoff * 2, self.config.route_retry_max))

    def _frame(self, dest: str, lane: int, first: int) -> tuple[bytes | None, int]:
        limit = self.config.route_batch
        while True:
            with self.store.read(fold=False):
                items = messages.outbox_items(self.store, dest, lane, first - 1, limit)
            if not items:
                return None, 0
            try:
                frame = encode(FrameType.ROUTE, self.store.node_id, self.transport.address,
                               {"lane": lane, "first": first, "items": items})
            except MeshError as exc:
                self.counters["dropped.unencodable"] += 1
                log.warning("cannot encode routed items for %s: %s", dest[:12], exc)
                return None, 0
            if len(frame) <= self.config.max_frame_bytes - 1024 or limit == 1:
                return frame, items[-1][0]
            limit = max(1, limit // 2)

    def on_ack(self, sender: str, body: dict[str, Any]) -> None:
        lane, through = body["lane"], body["through"]
        try:
            with self.store.write():
                n = messages.outbox_acked(self.store, sender, lane, through)
        except MeshError as exc:
            log.warning("recording an acknowledgement from %s failed: %s", sender[:12], exc)
            return
        self.counters["acked_items"] += n
        key = (sender, lane)
        inflight = self._inflight.get(key)
        if inflight is not None and through >= inflight[0]:
            del self._inflight[key]                   # answered: the next run may go
            self.committed()
        elif inflight is not None and n:
            # Partly applied (a gap at the receiver): resend the rest now.
            self._inflight[key] = (inflight[0], 0.0, self.config.route_retry)
            self.committed()

    # --- receiving ----------------------------------------------------------------------------

    def on_route(self, sender: str, reply_to: str, body: dict[str, Any]) -> None:
        lane, first, items = body["lane"], body["first"], body["items"]
        forged = [it for it in items if it[1] == "msg" and it[2]["origin"] != sender]
        if forged:
            # A daemon routes only messages that were sent through it.
            self.counters["dropped.forged_origin"] += 1
            return
        try:
            with self.store.write():
                through, unknown = messages.deliver_routed(self.store, sender, lane, first,
                                                           items)
        except MeshError as exc:
            log.warning("storing messages routed from %s failed: %s", sender[:12], exc)
            self.counters["route_errors"] += 1
            return
        self.counters["routed_in"] += len(items)
        if unknown:
            self.counters["dropped.unknown_session"] += unknown
        self.transport.send(reply_to, FrameType.ROUTE_ACK, {"lane": lane, "through": through})
        self.on_delivered()

    # --- expiry -------------------------------------------------------------------------------

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.outbox_check_interval)
            try:
                self.expire()
            except MeshError as exc:
                log.warning("outbox expiry failed: %s", exc)

    def expire(self) -> int:
        with self.store.write():
            gone = messages.expire_outbox(self.store, int(self.config.outbox_max_age * 1000),
                                          self.config.outbox_max)
        for mid, dest in gone:
            log.warning("message %s to node %s expired in the outbox (undelivered)", mid,
                        dest[:12])
        self.counters["expired"] += len(gone)
        return len(gone)

    def stats(self) -> dict[str, Any]:
        with self.store.read(fold=False):
            queues = messages.outbox_destinations(self.store)
        return {"counters": dict(self.counters),
                "outbox": [{"node": d, "lane": "high" if lane == 0 else "normal",
                            "items": n} for d, lane, n, _, _ in queues]}
