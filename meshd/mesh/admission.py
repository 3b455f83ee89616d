"""Unknown nodes must answer before they become members.

Without a cluster key anyone who reaches the peer port can name nodes: a SYNC may list
thousands of invented members, any frame may come from an invented sender. Believed at
once, each would cost a connection, a slot in the round-robin probe order (so a real
member that dies would be probed, and found dead, only after all of them) and room in
the table for good. So a node we do not know is only a *candidate* until it answers a
PING of ours for its id (a real daemon answers only for its own id) within
`candidate_timeout`; then membership admits it with what was said of it. That PING's
sequence number is random, so an ACK cannot be forged for it without seeing the PING. Until then it
has no place in the probe order, gets no pushes, is no helper and is not listed.

Candidates are bounded: at most `max_candidates` at once, the oldest making room for a
new one (a real node answers within a round trip, long before a flood can push it out),
and of them at most `max_hearsay` known only from another node's word (a member list, a
piggybacked update) rather than from the node itself: past that, such claims are dropped
and counted, and anti-entropy repeats the true ones a moment later. A candidate said to
be dead or gone is dropped; an unknown node that is down is nothing to probe.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable

from meshd.config import Config
from meshd.mesh.transport import Transport
from meshd.wire.peer import FrameType, MemberState

log = logging.getLogger("meshd.mesh")

_random = random.SystemRandom()

Update = tuple[str, str, int, int]          # node_id, address, state, incarnation


@dataclass
class Candidate:
    update: Update
    first_hand: bool                  # heard from the node itself, not about it
    since: float
    seq: int                          # of our PING to it
    pinged: float


class Admission:
    def __init__(self, config: Config, transport: Transport, clock: Callable[[], float],
                 counters: Counter[str]) -> None:
        self.config = config
        self.transport = transport
        self.clock = clock
        self.counters = counters
        self._candidates: OrderedDict[str, Candidate] = OrderedDict()   # oldest first
        self._by_seq: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._candidates)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._candidates

    def propose(self, update: Update, first_hand: bool) -> None:
        """News of a node that is not a member."""
        node_id, address, state, inc = update
        c = self._candidates.get(node_id)
        if state in (MemberState.DEAD, MemberState.LEFT):
            if c is not None and inc >= c.update[3]:
                self._drop(node_id)
            return
        if c is not None:
            old = c.update
            if inc > old[3]:
                c.update = update
            if first_hand and not c.first_hand:       # where it says it is wins
                c.first_hand = True
                c.update = (node_id, address, c.update[2], c.update[3])
            if c.update[1] != old[1]:
                self._ping(c)
            return
        if not first_hand and self._hearsay() >= self.config.max_hearsay:
            self.counters["candidates.refused_hearsay"] += 1
            return
        while len(self._candidates) >= self.config.max_candidates:
            self._drop(next(iter(self._candidates)))
            self.counters["candidates.evicted"] += 1
        now = self.clock()
        c = Candidate(update, first_hand, now, 0, now)
        self._candidates[node_id] = c
        self._ping(c)

    def answered(self, seq: int, sender: str) -> Update | None:
        """An ACK: the update to admit when it answers the ping to a candidate, by it."""
        node_id = self._by_seq.get(seq)
        if node_id is None or node_id != sender:
            return None
        c = self._candidates[node_id]
        self._drop(node_id)
        self.counters["candidates.verified"] += 1
        return c.update

    def discard(self, node_id: str) -> None:
        """It became a member another way, or this node is leaving."""
        if node_id in self._candidates:
            self._drop(node_id)

    def tick(self) -> None:
        """Drop the candidates that never answered; ping again the others that have not
        yet (a lost frame, or a connection refused by the transport's budget)."""
        now = self.clock()
        for node_id, c in list(self._candidates.items()):
            if now - c.since >= self.config.candidate_timeout:
                self._drop(node_id)
                self.counters["candidates.expired"] += 1
            elif now - c.pinged >= self.config.probe_timeout:
                self._ping(c)

    def _hearsay(self) -> int:
        return sum(1 for c in self._candidates.values() if not c.first_hand)

    def _ping(self, c: Candidate) -> None:
        self._by_seq.pop(c.seq, None)
        c.seq, c.pinged = _random.getrandbits(62), self.clock()
        self._by_seq[c.seq] = c.update[0]
        # No piggybacked news: a node that may not exist is told nothing.
        self.transport.send(c.update[1], FrameType.PING,
                            {"seq": c.seq, "updates": [], "node": c.update[0]})

    def _drop(self, node_id: str) -> None:
        c = self._candidates.pop(node_id)
        self._by_seq.pop(c.seq, None)
