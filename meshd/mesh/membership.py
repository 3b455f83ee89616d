"""Membership and failure detection, SWIM-style (as in hashicorp/memberlist).

Every `probe_interval` this node probes one member (round-robin over a shuffled list, so
each is probed at least once per cycle): a PING that must be ACKed within
`probe_timeout`, else PING_REQs through `indirect_checks` other members, which probe it on
our behalf and forward its ACK. A member that fails both becomes SUSPECT; it is declared
DEAD when `suspicion_timeout` passes without it refuting. A member refutes a suspicion
(or a death) of itself by raising its incarnation number, which outranks the rumour.
A member that shuts down announces LEFT to everyone at once.

News spreads by piggybacking on probe traffic: each update rides on the next few PINGs
and ACKs (`retransmit_mult` x log10(N+1) times) before it is dropped from the queue, and
the whole table is exchanged in anti-entropy SYNCs, so a node that missed news converges.
A node we do not know becomes a member only once it has answered a ping of ours (see
`meshd.mesh.admission`), and the table holds at most `max_members`.

**Incarnations stay in range.** A node's incarnation starts at its wall clock in
milliseconds and grows by one per refutation or leave, so a real one is never far ahead
of anyone's clock. An update whose incarnation is more than `max_incarnation_ahead` ahead
of our clock is hostile (or from a broken clock) and is dropped and counted, whoever it
is about, this node included: no sane peer believes it either. Every incarnation this
node takes is thus at most that ceiling plus one per refutation, which no run reaches
the protocol's maximum with (`MAX_INCARNATION`, 2**62, ~10**6 times the ceiling), and
raising it saturates there anyway. So a node can always outrank any rumour about itself
that a peer believes, and its frames always pass the peers' checks. A node that restarts
begins again at its clock; if the others hold it at a higher incarnation (refutations,
or a rumour pushed up to the ceiling) it hears its old self in their answer to its join
and outranks that the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from meshd.config import Config
from meshd.mesh.admission import Admission
from meshd.mesh.periodic import Periodic
from meshd.mesh.transport import Transport
from meshd.wire.peer import MAX_INCARNATION, MAX_UPDATES, FrameType, MemberState

log = logging.getLogger("meshd.mesh")

Update = tuple[str, str, int, int]          # node_id, address, state, incarnation


@dataclass
class Member:
    node_id: str
    address: str
    state: MemberState = MemberState.ALIVE
    incarnation: int = 0
    state_since: float = field(default_factory=time.monotonic)
    last_contact: float = 0.0                 # monotonic time we last heard from it; 0 never
    digest: dict[str, int] = field(default_factory=dict)   # its version vector (last SYNC)
    digest_at: float = 0.0

    @property
    def up(self) -> bool:
        return self.state in (MemberState.ALIVE, MemberState.SUSPECT)

    def update(self) -> Update:
        return (self.node_id, self.address, int(self.state), self.incarnation)


class BroadcastQueue:
    """Membership updates waiting to be piggybacked; one per node, newest wins, each sent
    a bounded number of times, least-sent first (memberlist's TransmitLimitedQueue)."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[Update, int]] = {}

    def put(self, update: Update) -> None:
        self._items[update[0]] = (update, 0)

    def take(self, limit: int, max_sends: int) -> list[Update]:
        chosen = sorted(self._items.values(), key=lambda x: x[1])[:limit]
        out = []
        for upd, sent in chosen:
            out.append(upd)
            if sent + 1 >= max_sends:
                self._items.pop(upd[0], None)
            else:
                self._items[upd[0]] = (upd, sent + 1)
        return out

    def __len__(self) -> int:
        return len(self._items)


#: Called on the loop when a member's state changes: (member, previous state or None).
OnChange = Callable[[Member, "MemberState | None"], None]


class Membership:
    def __init__(self, config: Config, transport: Transport, node_id: str,
                 on_change: OnChange, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.transport = transport
        self.node_id = node_id
        self.on_change = on_change
        self.clock = clock
        # Starting above any incarnation this node used before a restart (milliseconds
        # since the epoch only grow), so it never has to refute its own past.
        self.incarnation = int(time.time() * 1000)
        self.members: dict[str, Member] = {}
        self.broadcasts = BroadcastQueue()
        self.leaving = False
        self.false_refutations = 0            # times we had to refute a rumour of our death
        self.wrong_node_pings = 0             # probes for another node id at our address
        self._seq = itertools.count(1)
        self.counters: Counter[str] = Counter()
        self.admission = Admission(config, transport, clock, self.counters)
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._relays: dict[int, tuple[str, int, float]] = {}   # seq -> (requester, their seq, expiry)
        self._order: list[str] = []           # probe order, reshuffled every round
        self._cursor = 0
        # A probe round every probe_interval, measured from the start of the round: a
        # probe that waits for its ACK does not stretch the protocol period.
        self._probing = Periodic(self._round, config.probe_interval, what="probe round",
                                 first=0.0, fixed_rate=True)

    # --- the table ---------------------------------------------------------------------------

    def me(self) -> Update:
        state = MemberState.LEFT if self.leaving else MemberState.ALIVE
        return (self.node_id, self.transport.address, int(state), self.incarnation)

    def table(self) -> list[Update]:
        return [self.me()] + [m.update() for m in self.members.values()]

    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.up]

    def up_ids(self) -> frozenset[str]:
        """This node and every member alive or suspect."""
        return frozenset([self.node_id, *(m.node_id for m in self.members.values() if m.up)])

    def _max_sends(self) -> int:
        return max(1, self.config.retransmit_mult * math.ceil(math.log10(len(self.members) + 2)))

    def _piggyback(self) -> list[Update]:
        return self.broadcasts.take(MAX_UPDATES, self._max_sends())

    def _ceiling(self) -> int:
        """The highest incarnation believed now (see the module docstring)."""
        return int((time.time() + self.config.max_incarnation_ahead) * 1000)

    def _pin(self) -> None:
        """Keep the connections to the members that are up, and only those."""
        self.transport.pin(m.address for m in self.members.values() if m.up)

    def _set(self, m: Member, state: MemberState, incarnation: int, address: str | None = None
             ) -> None:
        old = m.state
        m.incarnation = incarnation
        if address:
            if address != m.address:
                self.transport.forget(m.address)
            m.address = address
        if state != old:
            m.state = state
            m.state_since = self.clock()
            log.info("member %s (%s) is now %s (incarnation %d)", m.node_id[:12], m.address,
                     state.name.lower(), incarnation, extra=_event(
                         f"member.{state.name.lower()}", m, old=old.name.lower()))
            if state in (MemberState.DEAD, MemberState.LEFT) and not any(
                    o.up and o.address == m.address for o in self.members.values()):
                self.transport.forget(m.address)     # unless a new identity lives there
        self.broadcasts.put(m.update())
        self._pin()
        if state != old:
            self.on_change(m, old)

    def apply(self, updates: list[Update], source: str = "") -> None:
        """Merge membership news (SWIM's precedence rules); `source` is the node that sent
        it (what it says of itself is first-hand)."""
        ceiling = self._ceiling()
        for update in updates:
            node_id, address, state_n, inc = update
            if inc > ceiling:
                self.counters["dropped.incarnation_ahead"] += 1
                continue
            state = MemberState(state_n)
            if node_id == self.node_id:
                self._about_me(state, inc)
                continue
            m = self.members.get(node_id)
            if m is None:
                if not self.leaving:
                    self.admission.propose(update, first_hand=node_id == source)
                continue
            if state == MemberState.ALIVE:
                if inc > m.incarnation:
                    self._set(m, MemberState.ALIVE, inc, address)
            elif state == MemberState.SUSPECT:
                if inc > m.incarnation or (inc == m.incarnation and m.state == MemberState.ALIVE):
                    if m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                        self._set(m, MemberState.SUSPECT, inc)
                    elif inc > m.incarnation:        # dead/left at an older incarnation
                        self._set(m, MemberState.SUSPECT, inc, address)
            elif state == MemberState.DEAD:
                if inc >= m.incarnation and m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                    self._set(m, MemberState.DEAD, inc)
                elif inc > m.incarnation:
                    m.incarnation = inc
            elif state == MemberState.LEFT:
                if inc >= m.incarnation and m.state != MemberState.LEFT:
                    self._set(m, MemberState.LEFT, inc)

    def _about_me(self, state: MemberState, inc: int) -> None:
        if self.leaving or state == MemberState.ALIVE and inc <= self.incarnation:
            return
        if state != MemberState.ALIVE and inc >= self.incarnation:
            # Someone thinks we are suspect, dead or gone: outrank the rumour.
            self.incarnation = _above(inc)
            self.false_refutations += 1
            log.info("refuting a rumour that this node is %s (incarnation now %d)",
                     state.name.lower(), self.incarnation)
            self.broadcasts.put(self.me())
        elif state == MemberState.ALIVE and inc > self.incarnation:
            self.incarnation = _above(inc)
            self.broadcasts.put(self.me())

    def _admit(self, update: Update) -> None:
        """A node that answered our ping joins the table (room made by forgetting the
        member down the longest, or refused and counted when every one is up)."""
        node_id, address, state_n, inc = update
        if node_id in self.members or self.leaving:
            return
        if len(self.members) >= self.config.max_members:
            down = [m for m in self.members.values() if not m.up]
            if not down:
                self.counters["members.refused_full"] += 1
                return
            self._forget(min(down, key=lambda m: m.state_since))
            self.counters["members.evicted"] += 1
        now = self.clock()
        m = Member(node_id, address, MemberState(state_n), inc, state_since=now,
                   last_contact=now)
        self.members[node_id] = m
        self._order.append(node_id)
        self.broadcasts.put(m.update())
        log.info("member %s (%s) joined as %s", node_id[:12], address, m.state.name.lower(),
                 extra=_event("member.join", m))
        self._pin()
        self.on_change(m, None)

    def _forget(self, m: Member) -> None:
        del self.members[m.node_id]
        self._order.remove(m.node_id)
        self._pin()
        self.on_change(m, m.state)

    def heard_from(self, node_id: str) -> None:
        m = self.members.get(node_id)
        if m is not None:
            m.last_contact = self.clock()

    def note_digest(self, node_id: str, digest: dict[str, int]) -> Member | None:
        """What a member says it holds (its SYNC's version vector), kept with it for
        replication's garbage collection and `sessions peers`; the member, if it is one."""
        m = self.members.get(node_id)
        if m is not None:
            m.digest, m.digest_at = digest, self.clock()
        return m

    def preload(self, members: Iterable[Member], shuffle: Callable[[list[str]], None]) -> None:
        """Fill the table as joining and admission would have, with nothing to gossip
        (simulations of a cluster formed long ago: through `_admit`, each admission
        re-pins the whole table, O(N^3) in all for N nodes)."""
        for m in members:
            self.members[m.node_id] = m
        self._order = list(self.members)
        shuffle(self._order)
        self._pin()

    # --- frames ------------------------------------------------------------------------------

    def handle(self, ftype: FrameType, sender: str, reply_to: str, body: dict[str, Any]) -> None:
        if ftype in (FrameType.PING, FrameType.ACK, FrameType.GOSSIP):
            self.apply(body["updates"], sender)
        if sender not in self.members and not self.leaving and ftype != FrameType.ACK:
            # A node we never heard of talks to us: learn it (it announces itself in SYNC,
            # but a probe may arrive first), once it answers us.
            self.apply([(sender, reply_to, int(MemberState.ALIVE), 0)], sender)
        self.heard_from(sender)
        if ftype == FrameType.PING:
            if body.get("node", self.node_id) != self.node_id:
                # Meant for whoever had this address before us: silence lets it be
                # found dead instead of kept alive by our answers.
                self.wrong_node_pings += 1
                return
            self.transport.send(reply_to, FrameType.ACK,
                                {"seq": body["seq"], "updates": self._piggyback()})
        elif ftype == FrameType.ACK:
            seq = body["seq"]
            admitted = self.admission.answered(seq, sender)
            if admitted is not None:
                self._admit(admitted)
            fut = self._acks.get(seq)
            if fut is not None and not fut.done():
                fut.set_result(None)
            relay = self._relays.pop(seq, None)
            if relay is not None and relay[2] >= self.clock():
                self.transport.send(relay[0], FrameType.ACK,
                                    {"seq": relay[1], "updates": self._piggyback()})
        elif ftype == FrameType.PING_REQ:
            if len(self._relays) >= self.config.max_relays:
                self.counters["dropped.relays_full"] += 1
                return
            seq = next(self._seq)
            self._relays[seq] = (reply_to, body["seq"], self.clock() + self.config.probe_interval)
            self.transport.send(body["target_addr"], FrameType.PING,
                                {"seq": seq, "updates": self._piggyback(),
                                 "node": body["target"]})

    # --- probing -----------------------------------------------------------------------------

    def start(self) -> None:
        self._probing.start()

    async def stop(self) -> None:
        await self._probing.stop()
        for fut in self._acks.values():
            if not fut.done():
                fut.cancel()

    def _next_target(self) -> Member | None:
        for _ in range(len(self._order) + 1):
            if not self._order:
                return None
            if self._cursor >= len(self._order):
                random.shuffle(self._order)
                self._cursor = 0
            node_id = self._order[self._cursor]
            self._cursor += 1
            m = self.members.get(node_id)
            if m is not None and m.up:
                return m
        return None

    async def _round(self) -> None:
        """One protocol period: timeouts first, then a probe of the next member."""
        self._tick()
        target = self._next_target()
        if target is not None:
            await self._probe(target)

    async def _probe(self, target: Member) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        seq = next(self._seq)
        fut: asyncio.Future[None] = loop.create_future()
        self._acks[seq] = fut
        try:
            self.transport.send(target.address, FrameType.PING,
                                {"seq": seq, "updates": self._piggyback(),
                                 "node": target.node_id})
            try:
                await asyncio.wait_for(asyncio.shield(fut), cfg.probe_timeout)
                return
            except asyncio.TimeoutError:
                pass
            helpers = [m for m in self.alive()
                       if m.node_id != target.node_id and m.state == MemberState.ALIVE]
            for h in random.sample(helpers, min(cfg.indirect_checks, len(helpers))):
                self.transport.send(h.address, FrameType.PING_REQ,
                                    {"seq": seq, "target": target.node_id,
                                     "target_addr": target.address})
            # One more direct try too: a lost frame should not make a suspect.
            self.transport.send(target.address, FrameType.PING,
                                {"seq": seq, "updates": self._piggyback(),
                                 "node": target.node_id})
            try:
                await asyncio.wait_for(asyncio.shield(fut),
                                       max(cfg.probe_interval - cfg.probe_timeout,
                                           cfg.probe_timeout))
                return
            except asyncio.TimeoutError:
                pass
            if target.state == MemberState.ALIVE and self.members.get(target.node_id) is target:
                self._set(target, MemberState.SUSPECT, target.incarnation)
        finally:
            self._acks.pop(seq, None)

    def _tick(self) -> None:
        """Suspects past their timeout die; stale relays go; news goes out even when
        there is nobody to probe."""
        now = self.clock()
        for m in list(self.members.values()):
            if m.state == MemberState.SUSPECT and now - m.state_since >= self.config.suspicion_timeout:
                self._set(m, MemberState.DEAD, m.incarnation)
            elif (m.state in (MemberState.DEAD, MemberState.LEFT)
                  and now - m.state_since >= self.config.reap_after):
                log.info("forgetting member %s, %s for %.0fs", m.node_id[:12],
                         m.state.name.lower(), now - m.state_since,
                         extra=_event("member.reap", m))
                self._forget(m)
        for seq in [s for s, r in self._relays.items() if r[2] < now]:
            del self._relays[seq]
        self.admission.tick()
        if len(self.broadcasts):
            # Updates ride on probes, but with few members they would spread slowly.
            updates = self._piggyback()
            for m in random.sample(self.alive(), min(3, len(self.alive()))):
                self.transport.send(m.address, FrameType.GOSSIP, {"updates": updates})

    def leave(self, also: Iterable[str] = ()) -> None:
        """Tell every member at once that this node is leaving (on SIGTERM), and the
        addresses in `also`: peers we were joining, which may see us alive already (our
        join reached them) while we have not heard back from them yet."""
        self.leaving = True
        self.incarnation = _above(self.incarnation)
        me = [self.me()]
        told = {m.address for m in self.members.values() if m.up}
        for addr in told | (set(also) - {self.transport.address}):
            self.transport.send(addr, FrameType.GOSSIP, {"updates": me})

    def peers(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [{"node_id": m.node_id, "address": m.address, "state": m.state.name.lower(),
                 "incarnation": m.incarnation,
                 "last_contact": None if not m.last_contact else round(now - m.last_contact, 3),
                 "since": round(now - m.state_since, 3)}
                for m in sorted(self.members.values(), key=lambda m: m.address)]

    def stats(self) -> dict[str, Any]:
        return {"candidates": len(self.admission), "relays": len(self._relays),
                "counters": dict(self.counters)}


def _above(incarnation: int) -> int:
    """The incarnation that outranks `incarnation`, saturating at the protocol's maximum
    (unreachable: see the module docstring; but never a value the peers would refuse)."""
    return min(incarnation + 1, MAX_INCARNATION)


def _event(kind: str, m: Member, **more: object) -> dict[str, object]:
    """A log record's `extra` that makes it a structured event (see meshd.ipc.monitor)."""
    return {"event": kind, "fields": {"node_id": m.node_id, "address": m.address,
                                      "state": m.state.name.lower(),
                                      "incarnation": m.incarnation, **more}}
