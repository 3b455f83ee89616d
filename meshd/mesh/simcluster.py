"""SWIM (and, optionally, replication) on a fake network: N nodes on one virtual-time loop.

For tests/unit/test_swim_unit.py, tests/unit/test_antientropy_unit.py and
bench/sim_membership.py. Each node is the daemon's own `Membership` (probes, indirect
probes, suspicion, refutation, piggybacked gossip, admission) over a `FakeTransport`;
only the network and the clock are fakes. Membership also relies on a little of what the
daemon composes around it (`meshd.mesh.node.Mesh`), which this harness does the same way:

- anti-entropy: every `sync_interval` (±25 %) a SYNC carrying the member table to one
  random member that is up, answered with ours; and at once to a member that is new or
  back (`Mesh._on_change`). Without stores, only the membership half (the digest sent is
  empty); with `SimCluster(data_dir=...)`, each node has a real `Store` (SQLite) and the
  daemon's own `Replicator` (push, SYNC digests, pulls in chunks, tombstone collection);
- reconnection (`meshd.mesh.joining.knock_on_dead`): every `reconnect_interval` a SYNC to
  up to `reconnect_max` members held dead, so a healed partition merges again.

Must be built on a running loop, normally `meshd.mesh.simclock.VirtualTimeLoop`.
Membership draws from the global `random`, which `SimCluster(seed=...)` seeds (and
`close()` gives back as it was): a run is repeatable for a seed.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from meshd.config import Config
from meshd.mesh.fakenet import FakeNetwork
from meshd.mesh.joining import knock_on_dead
from meshd.mesh.membership import Member, Membership
from meshd.mesh.periodic import Periodic, stop_all
from meshd.mesh.replicator import Replicator
from meshd.state.store import Store
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
    """One daemon, as far as membership (and, with a `store`, replication) goes."""

    def __init__(self, cluster: "SimCluster", config: Config, node_id: str,
                 store: Store | None = None, address: str = "") -> None:
        self.cluster = cluster
        self.config = config
        self.store = store
        self.node_id = store.node_id if store is not None else node_id
        self.transport = cluster.net.transport(config, self.node_id, self._on_frame, address)
        self.membership = Membership(config, self.transport, self.node_id, self._on_change,
                                     clock=cluster.loop.time)
        self.replicator = (None if store is None else Replicator(
            config, store, self.membership, self.transport, clock=cluster.loop.time))  # type: ignore[arg-type]
        self.running = False
        rng = cluster.rng
        self._timers = [] if self.replicator is not None else [   # (it has its own)
            Periodic(self._sync_round, config.sync_interval, what="anti-entropy round",
                     jitter=0.25, rng=rng)]
        self._timers.append(Periodic(self._knock, config.reconnect_interval,
                                     what="reconnect round"))

    @property
    def address(self) -> str:
        return self.transport.address

    def start(self) -> None:
        if self.running or self.transport.stopped:
            return
        self.running = True
        self.membership.start()
        if self.replicator is not None:
            self.replicator.start()
        for t in self._timers:
            t.start()

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
        await stop_all(*self._timers)
        await self.membership.stop()
        if self.replicator is not None:
            await self.replicator.stop()

    def _on_frame(self, ftype: FrameType, sender: str, reply_to: str,
                  body: dict[str, Any]) -> None:
        """As `Mesh._on_frame`, without the router."""
        rep = self.replicator
        if ftype == FrameType.SYNC:
            if rep is not None:
                rep.on_sync(sender, reply_to, body)
            else:
                self.membership.apply(body["members"], sender)
                if body["reply"]:
                    self.send_sync(reply_to, reply=False)
            self.membership.heard_from(sender)
        elif ftype in _MEMBERSHIP_FRAMES:
            self.membership.handle(ftype, sender, reply_to, body)
        elif rep is not None and ftype == FrameType.RECORDS:
            self.membership.heard_from(sender)
            rep.on_records(sender, reply_to, body)
        elif rep is not None and ftype == FrameType.PULL:
            self.membership.heard_from(sender)
            rep.on_pull(reply_to, body)

    def _on_change(self, m: Member, old: MemberState | None) -> None:
        self.cluster.changes.append(
            Change(self.cluster.loop.time(), self.node_id, m.node_id, old, m.state))
        if m.up and (old is None or old in (MemberState.DEAD, MemberState.LEFT)):
            self.send_sync(m.address, reply=True)

    def send_sync(self, address: str, reply: bool) -> None:
        if self.replicator is not None:
            self.replicator.send_sync(address, reply)
            return
        self.transport.send(address, FrameType.SYNC,
                            {"digest": {}, "members": self.membership.table(), "reply": reply})

    def _sync_round(self) -> None:
        up = self.membership.alive()
        if up and self.cluster.anti_entropy:
            self.send_sync(self.cluster.rng.choice(up).address, reply=True)

    def _knock(self) -> None:
        knock_on_dead(self.membership.members, self.config.reconnect_max,
                      self.transport.forget, lambda addr: self.send_sync(addr, reply=True),
                      self.cluster.rng)

    def committed(self) -> None:
        """Local writes committed (the daemon's IPC server says so after each batch)."""
        if self.replicator is not None and self.running:
            self.replicator.committed()


class SimCluster:
    """N `SimNode`s on one `FakeNetwork`. `converged=True` starts them as a cluster that
    formed long ago (each knows every other alive, nothing left to gossip), which is
    what a failure-detection run needs and what joining 1,000 nodes one by one would
    take minutes of virtual time to reach; `converged=False` leaves each alone, to be
    joined with `join()` through the real admission path."""

    def __init__(self, n: int, config: Config, *, seed: int = 0, converged: bool = True,
                 anti_entropy: bool = True, data_dir: str | Path | None = None,
                 **net: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.rng = random.Random(seed)
        self._global_random = random.getstate()   # given back by close()
        random.seed(seed)                         # membership's probe order and helpers
        self.anti_entropy = anti_entropy
        self.net = FakeNetwork(seed=seed, loop=self.loop, **net)
        self.changes: list[Change] = []
        # With a data directory, every node gets a Store in it and replicates; the
        # stores' wall clock follows the virtual one (HLC stamps, record age checks).
        self.data_dir = None if data_dir is None else Path(data_dir)
        self._epoch = time.time() - self.loop.time()
        self.stores: list[Store] = []
        self.nodes: list[SimNode] = []
        for _ in range(n):
            self.add(start=False)
        if converged:
            self._converge()

    def wall(self) -> float:
        """The stores' wall clock: real time at the start, then virtual time."""
        return self._epoch + self.loop.time()

    def store(self, name: str) -> Store:
        """A store in the cluster's data directory, `name` under it (reopened if it
        exists: a node that restarts with its data)."""
        assert self.data_dir is not None, "SimCluster(data_dir=...) replicates"
        store = Store(self.data_dir / name, stale_after=self.config.session_stale_after,
                      wall=self.wall)
        self.stores.append(store)
        return store

    def add(self, store: Store | None = None, *, address: str = "", start: bool = True
            ) -> SimNode:
        """A new node (with `store`, or a fresh one when the cluster replicates), alone
        until joined (see `join`); `address` reuses that of a node that stopped."""
        if store is None and self.data_dir is not None:
            store = self.store(f"n{len(self.stores)}")
        node = SimNode(self, self.config, f"{self.rng.getrandbits(128):032x}", store, address)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def _converge(self) -> None:
        """Fill each table as joining and admission would have (every other node alive,
        first contact now, probe order shuffled), with nothing left in the broadcast
        queues. Written directly: through `_admit`, each admission re-pins the whole
        table, O(N^3) in all, minutes at N = 1,000."""
        now = self.loop.time()
        for node in self.nodes:
            node.membership.preload(
                (Member(o.node_id, o.address, MemberState.ALIVE, o.membership.incarnation,
                        state_since=now, last_contact=now)
                 for o in self.nodes if o is not node), self.rng.shuffle)

    def start(self, stagger: bool = True) -> None:
        """Start every node, at random moments over one probe interval (daemons do not
        start in step; probing in step would make every node probe the same one)."""
        for node in self.nodes:
            delay = self.rng.uniform(0, self.config.probe_interval) if stagger else 0.0
            self.loop.call_later(delay, node.start)

    async def restart(self, node: SimNode) -> SimNode:
        """Crash `node` (if it runs) and start it again at its address with its data:
        same node id, a new incarnation, what it missed to catch up on."""
        await node.stop()
        assert node.store is not None, "a node without a store has nothing to restart with"
        path = node.store.data_dir
        node.store.close()
        self.stores.remove(node.store)
        store = Store(path, stale_after=self.config.session_stale_after, wall=self.wall)
        self.stores.append(store)
        return self.add(store, address=node.address)

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
        if self.stores:
            # The replicators' last timers (a pull check push_grace after a SYNC) run
            # on open stores.
            await asyncio.sleep(2 * self.config.push_grace)
        for store in self.stores:
            store.close()
        random.setstate(self._global_random)
