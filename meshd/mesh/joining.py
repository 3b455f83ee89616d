"""Joining the mesh: seeds, backoff, why a seed is silent, known peers, reconnection.

A daemon knocks (a SYNC asking for a reply) at every seed address until it answers: the
addresses given with `--join` or `sessions join`, those mDNS discovery heard, and the
members known before a restart (persisted). Each is retried at `join_retry`, doubling up
to `join_retry_max`, for as long as the daemon runs (a seed may start later). Why one is
still pending is kept for `sessions peers` (`PendingJoin`): its name does not resolve,
nothing answers, or, from a handshake probe of the silent seed (`handshake.py`), a key
mismatch or nothing listening. Members declared dead are knocked at too, a few every
`reconnect_interval` (Serf's reconnect: a healed partition, a host back up).

The `Joiner` owns that state and its round; what it needs of the rest of the mesh comes
through its constructor (`node.py` composes it): the member table to read, a way to send
a SYNC, to drop a connection, to load and save the known peers, and to open a handshake
probe.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import zmq

from meshd.config import Config
from meshd.errors import MeshError
from meshd.mesh.handshake import SILENT_PEER
from meshd.mesh.membership import Member
from meshd.mesh.periodic import Periodic
from meshd.wire.peer import MemberState

log = logging.getLogger("meshd.mesh")


@dataclass
class PendingJoin:
    """A seed address that has not answered yet, and why, for `sessions peers`."""

    address: str
    since: float                       # monotonic time of the first attempt
    attempts: int = 0
    reason: str = "not tried yet"
    source: str = "join"               # join (--join, `sessions join`), known, discovered
    cause: str = ""                    # what a handshake probe found (`handshake.py`)
    probed_at: float = 0.0

    def view(self, now: float) -> dict[str, Any]:
        return {"address": self.address, "since": round(now - self.since, 1),
                "attempts": self.attempts, "reason": self.reason, "source": self.source}


class Probe(Protocol):
    """A handshake probe of one silent seed (`meshd.mesh.handshake.HandshakeProbe`)."""

    def verdict(self) -> str | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class JoinDeps:
    """What the joiner uses of the rest of the mesh (all read-only or fire-and-forget)."""

    members: Callable[[], Mapping[str, Member]]     # the member table, by node id
    own_address: Callable[[], str]                   # known once the transport is bound
    send_sync: Callable[[str], None]                 # a SYNC that asks for a reply
    forget: Callable[[str], None]                    # drop the queue to an address
    load_peers: Callable[[], list[str]]              # the addresses persisted last run
    save_peers: Callable[[list[str]], None]          # may raise MeshError
    probe: Callable[[str], Probe]                    # may raise zmq.ZMQError, ValueError
    keyed: bool = False                              # this node has a cluster key


def knock_on_dead(members: Mapping[str, Member], most: int, forget: Callable[[str], None],
                  send_sync: Callable[[str], None], rng: Any = random) -> None:
    """Knock on a few members declared dead. A SYNC carries our member table, so one
    that is back refutes its death and both sides catch up; one still gone costs a
    single queued frame (its old queue is dropped first, so nothing piles up)."""
    taken = {m.address for m in members.values() if m.up}   # reused by a new identity
    dead = [m for m in members.values()
            if m.state == MemberState.DEAD and m.address not in taken]
    for m in rng.sample(dead, min(len(dead), most)):
        forget(m.address)
        send_sync(m.address)


class Joiner:
    def __init__(self, config: Config, deps: JoinDeps,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.deps = deps
        self.clock = clock
        self._seeds: dict[str, tuple[float, float]] = {}    # address -> (next try, backoff)
        self._pending: dict[str, PendingJoin] = {}          # seeds not answered yet: why
        self._joined: set[str] = set()
        self._discovered: set[str] = set()     # seed addresses that came from mDNS
        self._probes: dict[str, Probe] = {}
        self._next_reconnect = 0.0
        self._save_peers = False
        self._round_task = Periodic(self._round, min(config.join_retry, 1.0),
                                    what="join round", first=0.0)

    def start(self) -> None:
        """Seed from --join and the peers known last run, and start knocking."""
        join = self.config.join
        known = [a for a in self.deps.load_peers() if isinstance(a, str)]
        now = self.clock()
        me = self.deps.own_address()
        for addr in dict.fromkeys(list(join) + known):
            if addr != me:
                self._seeds[addr] = (now, self.config.join_retry)
                self._pending[addr] = PendingJoin(
                    addr, now, source="join" if addr in join else "known")
        self._next_reconnect = now + self.config.reconnect_interval
        self._round_task.start()

    async def stop(self) -> None:
        await self._round_task.stop()
        for probe in self._probes.values():
            probe.close()
        self._probes.clear()

    def joining(self) -> set[str]:
        """Addresses we knocked at or that knocked at us, to tell of a leave too: they
        may see us alive already while we have not heard back from them."""
        return set(self._seeds) | self._joined

    # --- the round ---------------------------------------------------------------------------

    async def _round(self) -> None:
        """Send a SYNC to every seed that is due; probe silent ones; knock on the dead."""
        now = self.clock()
        for addr, (when, backoff) in list(self._seeds.items()):
            if addr in self._joined:
                del self._seeds[addr]
                self._joined_seed(addr)
            elif when <= now:
                problem = await self._resolves(addr)
                if problem is None:
                    self.deps.send_sync(addr)
                nxt = min(backoff * 2, self.config.join_retry_max)
                self._seeds[addr] = (now + backoff, nxt)
                self._attempted(addr, problem)
        self._probe_silent_seeds(now)
        if now >= self._next_reconnect:
            self._next_reconnect = now + self.config.reconnect_interval
            knock_on_dead(self.deps.members(), self.config.reconnect_max, self.deps.forget,
                          self.deps.send_sync)
        if self._save_peers:
            self.persist()

    async def _resolves(self, addr: str) -> str | None:
        """Why a seed named by host name cannot be reached (it does not resolve), or None.
        ZeroMQ itself would just stay silent about it."""
        host = addr.rpartition(":")[0].strip("[]")
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            pass
        try:
            await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM), timeout=2.0)
            return None
        except (OSError, asyncio.TimeoutError) as exc:
            return f"the name {host!r} does not resolve ({exc or 'timed out'})"

    def _attempted(self, addr: str, problem: str | None) -> None:
        """Count an attempt and say why it is still pending; log with backoff (the 1st
        name failure, then the 2nd, 4th, 8th... silent attempt), so a wrong --join is
        visible without flooding the log."""
        p = self._pending.get(addr)
        if p is None:
            p = self._pending[addr] = PendingJoin(addr, self.clock())
        p.attempts += 1
        if problem is None and p.cause:
            problem = f"no answer after {p.attempts} attempt(s): {p.cause}"
        elif problem is None:
            key = (" with the same cluster key (--key-file)" if self.deps.keyed
                   else " without a cluster key, as this node has none")
            problem = (f"no answer after {p.attempts} attempt(s): is meshd running there, "
                       f"reachable over TCP,{key}?")
        p.reason = problem
        fields = {"address": addr, "attempts": p.attempts, "source": p.source, "reason": problem}
        log.debug("join attempt %d to %s", p.attempts, addr,
                  extra={"event": "join.attempt", "fields": fields})
        if p.source != "discovered" and p.attempts & (p.attempts - 1) == 0 and (
                p.attempts >= 2 or "resolve" in problem):
            log.warning("joining %s: %s (retrying, at most every %.0f s)", addr, problem,
                        self.config.join_retry_max, extra={"event": "join.retry", "fields": fields})

    def _probe_silent_seeds(self, now: float) -> None:
        """Find out why seeds stay silent (a few at a time, each at most every 30 s), so
        `sessions peers` and the log can say "key mismatch" rather than "no answer"."""
        for addr, probe in list(self._probes.items()):
            verdict = probe.verdict()
            if verdict is None and addr in self._seeds:
                continue
            probe.close()
            del self._probes[addr]
            p = self._pending.get(addr)
            if p is None or verdict is None:
                continue
            cause = verdict or SILENT_PEER
            if cause != p.cause and p.source != "discovered":
                log.warning("joining %s: %s", addr, cause, extra={
                    "event": "join.refused", "fields": {"address": addr, "reason": cause}})
            p.cause, p.reason = cause, f"no answer after {p.attempts} attempt(s): {cause}"
        for addr, p in self._pending.items():
            if len(self._probes) >= 4:
                break
            if (addr in self._seeds and addr not in self._probes and p.attempts >= 2
                    and "resolve" not in p.reason and now - p.probed_at >= 30.0):
                p.probed_at = now
                try:
                    self._probes[addr] = self.deps.probe(addr)
                except (zmq.ZMQError, ValueError) as exc:
                    log.debug("cannot probe %s: %s", addr, exc)

    def _joined_seed(self, addr: str) -> None:
        p = self._pending.pop(addr, None)
        if p is not None and p.attempts > 1:
            log.info("joined %s after %d attempt(s)", addr, p.attempts, extra={
                "event": "join.ok", "fields": {"address": addr, "attempts": p.attempts}})

    # --- what the mesh tells it ----------------------------------------------------------------

    def answered(self, address: str) -> None:
        """A SYNC that is an answer came from `address`: that seed has joined."""
        self._joined.add(address)

    def members_changed(self) -> None:
        """The member table changed: save the known peers at the next round."""
        self._save_peers = True

    def persist(self) -> None:
        """Save the addresses of the members that are up, for the next start."""
        self._save_peers = False
        addrs = sorted(m.address for m in self.deps.members().values() if m.up)
        try:
            if addrs != self.deps.load_peers():
                self.deps.save_peers(addrs)
        except MeshError as exc:
            log.warning("cannot save the peer list: %s", exc)

    # --- for the operator and discovery --------------------------------------------------------

    def join(self, address: str) -> dict[str, Any]:
        """`sessions join`: knock at `address` now and keep trying with backoff, as a
        --join seed (Serf's join, without waiting: the answer is where it stands)."""
        if address == self.deps.own_address():
            raise MeshError(f"{address} is this daemon's own address")
        m = next((m for m in self.deps.members().values()
                  if m.address == address and m.up), None)
        if m is not None:
            return {"address": address, "state": "member", "node_id": m.node_id}
        now = self.clock()
        self._joined.discard(address)
        self._pending[address] = PendingJoin(address, now, source="join")
        self._seeds[address] = (now, self.config.join_retry)
        return {"address": address, "state": "pending"}

    def pending_joins(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [p.view(now) for a, p in sorted(self._pending.items()) if a in self._seeds]

    def forget(self, address: str) -> None:
        """Stop knocking at `address` (its member was force-left)."""
        self._seeds.pop(address, None)
        self._pending.pop(address, None)

    def discovered(self, node_id: str, addresses: list[str]) -> None:
        """mDNS heard a peer of our cluster: join it as a seed, unless it is already a
        member that is up at that address."""
        if self.is_up_member(node_id, addresses):
            return
        now = self.clock()
        me = self.deps.own_address()
        for addr in addresses:
            if addr == me:
                continue
            self._discovered.add(addr)
            self._joined.discard(addr)
            self.deps.send_sync(addr)                        # now, not at the next tick
            self._seeds[addr] = (now + self.config.join_retry,
                                 min(self.config.join_retry * 2, self.config.join_retry_max))
            if addr not in self._pending:
                self._pending[addr] = PendingJoin(addr, now, 1, "no answer yet", "discovered")

    def is_up_member(self, node_id: str, addresses: list[str]) -> bool:
        """An up member at one of these addresses (a fake announcement of a member's id
        at another address does not count)."""
        m = self.deps.members().get(node_id)
        return m is not None and m.up and m.address in addresses

    def undiscovered(self, addresses: list[str]) -> None:
        """An announcement went away: stop knocking at its addresses (unless they were
        given with --join). The member itself stays: membership decides."""
        for addr in addresses:
            if addr in self._discovered and addr not in self.config.join:
                self._discovered.discard(addr)
                self.forget(addr)
