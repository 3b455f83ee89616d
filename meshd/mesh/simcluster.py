"""SWIM on a fake network: N real `Membership`s on one virtual-time loop.

For tests/unit/test_swim_unit.py and bench/sim_membership.py. Each node is the daemon's own
`Membership` (probes, indirect probes, suspicion, refutation, piggybacked gossip,
admission) over a `FakeTransport`; only the network and the clock are fakes. Membership
also relies on a little of what the daemon composes around it, which this harness does
the same way, for the membership half only (the digest it sends is empty):

- anti-entropy (`Replicator`): every `sync_interval` (±25 %) a SYNC carrying the member
  table to one random member that is up, answered with ours; and at once to a member that
  is new or back (`Mesh._on_change`);
- reconnection (`Mesh._reconnect`): every `reconnect_interval` a SYNC to up to
  `reconnect_max` members held dead, so a healed partition merges again.

Must be built on a running loop, normally `meshd.mesh.simclock.VirtualTimeLoop`.
Membership draws from the global `random`, which `SimCluster(seed=...)` seeds (and
`close()` gives back as it was): a run is repeatable for a seed.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Callable

from meshd.config import Config
from meshd.mesh.fakenet import FakeNetwork
from meshd.mesh.membership import Member, Membership
from meshd.wire.peer import FrameType, MemberState

_MEMBERSHIP_FRAMES = (FrameType.PING, FrameType.ACK, FrameType.PING_REQ, FrameType.GOSSIP)


@dataclass(frozen=True)
class Change:
    """One node saw another change state (Membership's on_change), at virtual time `at`."""

    at: float
    observer: str
    subject: str
    old: MemberState | None
    new: MemberState


class SimNode:
    """One daemon, as far as membership goes."""

    def __init__(self, cluster: "SimCluster", config: Config, node_id: str) -> None:
        self.cluster = cluster
        self.config = config
        self.node_id = node_id
        self.transport = cluster.net.transport(config, node_id, self._on_frame)
        self.membership = Membership(config, self.transport, node_id, self._on_change,
                                     clock=cluster.loop.time)
        self.running = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def address(self) -> str:
        return self.transport.address

    def start(self) -> None:
        if self.running or self.transport.stopped:
            return
        self.running = True
        self.membership.start()
        loop = self.cluster.loop
        self._tasks = [loop.create_task(self._sync_loop()),
                       loop.create_task(self._reconnect_loop())]

    async def stop(self) -> None:
        """Crash: no leave, the transport simply goes silent."""
        self.transport.stop()
        await self._halt()

    async def leave(self) -> None:
        """Shut down gracefully, as `Mesh.stop` does: announce LEFT, give it
        `leave_grace` to go out, stop."""
        self.membership.leave()
        await asyncio.sleep(self.config.leave_grace)
        await self.stop()

    async def _halt(self) -> None:
        self.running = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.membership.stop()

    def _on_frame(self, ftype: FrameType, sender: str, reply_to: str,
                  body: dict[str, Any]) -> None:
        if ftype == FrameType.SYNC:
            self.membership.apply(body["members"], sender)
            self.membership.heard_from(sender)
            if body["reply"]:
                self.send_sync(reply_to, reply=False)
        elif ftype in _MEMBERSHIP_FRAMES:
            self.membership.handle(ftype, sender, reply_to, body)

    def _on_change(self, m: Member, old: MemberState | None) -> None:
        self.cluster.changes.append(
            Change(self.cluster.loop.time(), self.node_id, m.node_id, old, m.state))
        if m.up and (old is None or old in (MemberState.DEAD, MemberState.LEFT)):
            self.send_sync(m.address, reply=True)

    def send_sync(self, address: str, reply: bool) -> None:
        self.transport.send(address, FrameType.SYNC,
                            {"digest": {}, "members": self.membership.table(), "reply": reply})

    async def _sync_loop(self) -> None:
        rng = self.cluster.rng
        while True:
            await asyncio.sleep(self.config.sync_interval * rng.uniform(0.75, 1.25))
            up = self.membership.alive()
            if up and self.cluster.anti_entropy:
                self.send_sync(rng.choice(up).address, reply=True)

    async def _reconnect_loop(self) -> None:
        cfg, rng = self.config, self.cluster.rng
        while True:
            await asyncio.sleep(cfg.reconnect_interval)
            members = self.membership.members.values()
            taken = {m.address for m in members if m.up}
            dead = [m for m in members
                    if m.state == MemberState.DEAD and m.address not in taken]
            for m in rng.sample(dead, min(len(dead), cfg.reconnect_max)):
                self.transport.forget(m.address)
                self.send_sync(m.address, reply=True)


class SimCluster:
    """N `SimNode`s on one `FakeNetwork`. `converged=True` starts them as a cluster that
    formed long ago (each knows every other alive, nothing left to gossip), which is
    what a failure-detection run needs and what joining 1,000 nodes one by one would
    take minutes of virtual time to reach; `converged=False` leaves each alone, to be
    joined with `join()` through the real admission path."""

    def __init__(self, n: int, config: Config, *, seed: int = 0, converged: bool = True,
                 anti_entropy: bool = True, **net: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.rng = random.Random(seed)
        self._global_random = random.getstate()   # given back by close()
        random.seed(seed)                         # membership's probe order and helpers
        self.anti_entropy = anti_entropy
        self.net = FakeNetwork(seed=seed, loop=self.loop, **net)
        self.changes: list[Change] = []
        self.nodes = [SimNode(self, config, f"{self.rng.getrandbits(128):032x}")
                      for _ in range(n)]
        if converged:
            self._converge()

    def _converge(self) -> None:
        """Fill each table as joining and admission would have (every other node alive,
        first contact now, probe order shuffled), with nothing left in the broadcast
        queues. Written directly: through `_admit`, each admission re-pins the whole
        table, O(N^3) in all, minutes at N = 1,000."""
        now = self.loop.time()
        for node in self.nodes:
            ms = node.membership
            for other in self.nodes:
                if other is not node:
                    ms.members[other.node_id] = Member(
                        other.node_id, other.address, MemberState.ALIVE,
                        other.membership.incarnation, state_since=now, last_contact=now)
            ms._order = list(ms.members)
            self.rng.shuffle(ms._order)
            ms._pin()

    def start(self, stagger: bool = True) -> None:
        """Start every node, at random moments over one probe interval (daemons do not
        start in step; probing in step would make every node probe the same one)."""
        for node in self.nodes:
            delay = self.rng.uniform(0, self.config.probe_interval) if stagger else 0.0
            self.loop.call_later(delay, node.start)

    def join(self, node: SimNode, seed: SimNode) -> None:
        """Announce `node` to `seed`, as a daemon's SYNC to a --join address does."""
        node.send_sync(seed.address, reply=True)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes if not n.transport.stopped]

    def view(self, subject: SimNode, observers: list[SimNode] | None = None
             ) -> dict[str, MemberState | None]:
        """What each live node (or each of `observers`) holds of `subject`."""
        out: dict[str, MemberState | None] = {}
        for n in observers if observers is not None else self.live():
            if n is not subject:
                m = n.membership.members.get(subject.node_id)
                out[n.node_id] = None if m is None else m.state
        return out

    def all_see(self, subject: SimNode, *states: MemberState,
                observers: list[SimNode] | None = None) -> bool:
        return all(s in states for s in self.view(subject, observers).values())

    async def until(self, predicate: Callable[[], bool], timeout: float,
                    step: float = 0.01) -> float | None:
        """Advance virtual time in `step`s until `predicate()`; the virtual seconds it
        took, or None after `timeout` virtual seconds."""
        start = self.loop.time()
        for _ in range(int(timeout / step) + 1):
            if predicate():
                return self.loop.time() - start
            await asyncio.sleep(step)
        return self.loop.time() - start if predicate() else None

    async def run_for(self, seconds: float) -> None:
        """Let `seconds` of (virtual) time pass."""
        await asyncio.sleep(seconds)

    def first_change(self, subject: SimNode, new: MemberState, after: float = 0.0
                     ) -> float | None:
        return next((c.at for c in self.changes
                     if c.subject == subject.node_id and c.new == new and c.at >= after), None)

    async def close(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes if n.running))
        random.setstate(self._global_random)
