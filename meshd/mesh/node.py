"""The mesh: this daemon's peer transport, membership and replication, composed.

It routes each incoming peer frame to the part that owns it, keeps the store's view of
which hosts are down (their sessions read OFFLINE), joins the seed addresses given with
`--join`, found by mDNS discovery, or known before a restart, with backoff until they
answer, keeps knocking on members declared dead (a healed partition, a host back up: as
Serf's reconnect), and announces a graceful leave on shutdown.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

import zmq

from meshd.config import Config
from meshd.errors import MeshError
from meshd.mesh.discovery import Discovery
from meshd.mesh.handshake import SILENT_PEER, HandshakeProbe
from meshd.mesh.membership import Member, Membership
from meshd.mesh.replicator import Replicator
from meshd.mesh.router import Router
from meshd.mesh.security import Authenticator, load_key
from meshd.mesh.transport import Transport
from meshd.state import replication
from meshd.state.store import Store
from meshd.wire.peer import FrameType, MemberState

log = logging.getLogger("meshd.mesh")

_PEERS_KEY = "peers"


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


class Mesh:
    def __init__(self, config: Config, store: Store, ctx: zmq.Context) -> None:
        self.config = config
        self.store = store
        self.auth: Authenticator | None = None
        key = None
        if config.key_file:
            key, readable = load_key(config.key_file)
            if readable:
                log.warning("the cluster key file %s can be read by users other than its "
                            "owner (whoever holds the key is a member): chmod 0600",
                            config.key_file)
            self.auth = Authenticator(ctx, key)
        self._ctx, self._key = ctx, key
        self._probes: dict[str, HandshakeProbe] = {}
        self.transport = Transport(config, ctx, store.node_id, self._on_frame, key)
        self.membership = Membership(config, self.transport, store.node_id, self._on_change)
        self.replicator = Replicator(config, store, self.membership, self.transport)
        self.router = Router(config, store, self.membership, self.transport)
        self._seeds: dict[str, tuple[float, float]] = {}    # address -> (next try, backoff)
        self._pending: dict[str, PendingJoin] = {}          # seeds not answered yet: why
        self._joined: set[str] = set()
        self._discovered: set[str] = set()     # seed addresses that came from mDNS
        self._next_reconnect = 0.0
        self._task: asyncio.Task[None] | None = None
        self._save_peers = False
        self.discovery: Discovery | None = None

    @property
    def address(self) -> str:
        return self.transport.address

    async def start(self) -> None:
        self.store.up_hosts = self.membership.up_ids()
        if self.auth is not None:
            self.auth.start()              # before the peer port opens: see Authenticator
            log.info("peer traffic authenticated and encrypted with cluster key %s",
                     self.auth.key.fingerprint)
        self.transport.start()
        if self.auth is not None and self.transport.socket is not None:
            self.auth.watch(self.transport.socket)
        self.membership.start()
        self.replicator.start()
        self.router.start()
        known = [a for a in self.store.get_meta(_PEERS_KEY, []) if isinstance(a, str)]
        now = time.monotonic()
        for addr in dict.fromkeys(list(self.config.join) + known):
            if addr != self.address:
                self._seeds[addr] = (now, self.config.join_retry)
                self._pending[addr] = PendingJoin(
                    addr, now, source="join" if addr in self.config.join else "known")
        self._next_reconnect = now + self.config.reconnect_interval
        self._task = asyncio.get_running_loop().create_task(self._join_loop())
        if self.config.discovery:
            self.discovery = Discovery(self.config, self.store.node_id, self.address,
                                       self.discovered, self.undiscovered,
                                       self.auth.key.fingerprint if self.auth else "",
                                       self._is_up_member)
            await self.discovery.start()

    async def stop(self, leave: bool = True) -> None:
        try:
            if self.discovery is not None:
                await self.discovery.stop()
            # (Not to members we hold down: a frame for an address that does not answer
            # would hold the shutdown for the whole linger.)
            down = {m.address for m in self.membership.members.values() if not m.up}
            joining = (set(self._seeds) | self._joined) - down
            if leave and (self.membership.members or joining):
                self.membership.leave(also=joining)
                await asyncio.sleep(self.config.leave_grace)   # let the LEFT frames go out
            if self._task is not None:
                self._task.cancel()
                try:
                    await self._task
                except (asyncio.CancelledError, Exception):
                    pass
            for probe in self._probes.values():
                probe.close()
            self._probes.clear()
            await self.membership.stop()
            await self.replicator.stop()
            await self.router.stop()
            self._persist_peers()
        finally:
            # Always (an open socket would hang the context), giving a leave announcement
            # still queued a bounded moment to go out.
            self.transport.stop(linger_ms=1000 if leave else 0)
            if self.auth is not None:
                self.auth.stop()

    # --- joining ------------------------------------------------------------------------------

    async def _join_loop(self) -> None:
        """Send a SYNC to every seed until it answers: at `join_retry`, doubling up to
        `join_retry_max`, for as long as the daemon runs (a seed may start later)."""
        while True:
            now = time.monotonic()
            for addr, (when, backoff) in list(self._seeds.items()):
                if addr in self._joined:
                    del self._seeds[addr]
                    self._joined_seed(addr)
                elif when <= now:
                    problem = await self._resolves(addr)
                    if problem is None:
                        self.replicator.send_sync(addr, reply=True)
                    nxt = min(backoff * 2, self.config.join_retry_max)
                    self._seeds[addr] = (now + backoff, nxt)
                    self._attempted(addr, problem)
            self._probe_silent_seeds(now)
            if now >= self._next_reconnect:
                self._next_reconnect = now + self.config.reconnect_interval
                self._reconnect()
            if self._save_peers:
                self._persist_peers()
            await asyncio.sleep(min(self.config.join_retry, 1.0))

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
            p = self._pending[addr] = PendingJoin(addr, time.monotonic())
        p.attempts += 1
        if problem is None and p.cause:
            problem = f"no answer after {p.attempts} attempt(s): {p.cause}"
        elif problem is None:
            key = (" with the same cluster key (--key-file)" if self.auth is not None
                   else " without a cluster key, as this node has none")
            problem = (f"no answer after {p.attempts} attempt(s): is meshd running there, "
                       f"reachable over TCP,{key}?")
        p.reason = problem
        if p.source != "discovered" and p.attempts & (p.attempts - 1) == 0 and (
                p.attempts >= 2 or "resolve" in problem):
            log.warning("joining %s: %s (retrying, at most every %.0f s)", addr, problem,
                        self.config.join_retry_max)

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
                log.warning("joining %s: %s", addr, cause)
            p.cause, p.reason = cause, f"no answer after {p.attempts} attempt(s): {cause}"
        for addr, p in self._pending.items():
            if len(self._probes) >= 4:
                break
            if (addr in self._seeds and addr not in self._probes and p.attempts >= 2
                    and "resolve" not in p.reason and now - p.probed_at >= 30.0):
                p.probed_at = now
                try:
                    self._probes[addr] = HandshakeProbe(self._ctx, addr, self._key)
                except (zmq.ZMQError, ValueError) as exc:
                    log.debug("cannot probe %s: %s", addr, exc)

    def _joined_seed(self, addr: str) -> None:
        p = self._pending.pop(addr, None)
        if p is not None and p.attempts > 1:
            log.info("joined %s after %d attempt(s)", addr, p.attempts)

    def join(self, address: str) -> dict[str, Any]:
        """`sessions join`: knock at `address` now and keep trying with backoff, as a
        --join seed (Serf's join, without waiting: the answer is where it stands)."""
        if address == self.address:
            raise MeshError(f"{address} is this daemon's own address")
        m = next((m for m in self.membership.members.values()
                  if m.address == address and m.up), None)
        if m is not None:
            return {"address": address, "state": "member", "node_id": m.node_id}
        now = time.monotonic()
        self._joined.discard(address)
        self._pending[address] = PendingJoin(address, now, source="join")
        self._seeds[address] = (now, self.config.join_retry)
        return {"address": address, "state": "pending"}

    def pending_joins(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [p.view(now) for a, p in sorted(self._pending.items()) if a in self._seeds]

    def force_leave(self, node: str) -> dict[str, Any]:
        """`sessions force-leave`: an operator says a member that is down is gone for good
        (Serf's force-leave): it is marked left everywhere, so its sessions read offline
        as departed rather than failed, and mail queued for it expires now instead of
        waiting for a host that will not return. A member that is up is refused (it would
        refute the rumour and stay)."""
        matches = [m for m in self.membership.members.values()
                   if m.node_id == node or (len(node) >= 6 and m.node_id.startswith(node))]
        if not matches:
            from meshd.errors import NotFound
            raise NotFound(f"no member {node!r} (see `sessions peers`)")
        if len(matches) > 1:
            raise MeshError(f"{node!r} names {len(matches)} members; give more of the id")
        m = matches[0]
        if m.up:                  # alive, or suspect: it may answer yet (not failed)
            raise MeshError(f"member {m.node_id[:12]} ({m.address}) is {m.state.name.lower()}; "
                            f"force-leave is for members declared dead")
        self.membership.apply([(m.node_id, m.address, int(MemberState.LEFT), m.incarnation)])
        dropped = self.router.forget_destination(m.node_id)
        self._seeds.pop(m.address, None)
        self._pending.pop(m.address, None)
        log.warning("force-leave: member %s (%s) marked left; %d queued item(s) for it "
                    "expired", m.node_id[:12], m.address, dropped)
        return {"node_id": m.node_id, "address": m.address, "state": "left",
                "expired": dropped}

    def _reconnect(self) -> None:
        """Knock on a few members declared dead. A SYNC carries our member table, so one
        that is back refutes its death and both sides catch up; one still gone costs a
        single queued frame (its old queue is dropped first, so nothing piles up)."""
        members = self.membership.members.values()
        taken = {m.address for m in members if m.up}   # reused by a new identity: not ours
        dead = [m for m in members if m.state == MemberState.DEAD and m.address not in taken]
        for m in random.sample(dead, min(len(dead), self.config.reconnect_max)):
            self.transport.forget(m.address)
            self.replicator.send_sync(m.address, reply=True)

    def discovered(self, node_id: str, addresses: list[str]) -> None:
        """mDNS heard a peer of our cluster: join it as a seed, unless it is already a
        member that is up at that address."""
        m = self.membership.members.get(node_id)
        if m is not None and m.up and m.address in addresses:
            return
        now = time.monotonic()
        for addr in addresses:
            if addr == self.address:
                continue
            self._discovered.add(addr)
            self._joined.discard(addr)
            self.replicator.send_sync(addr, reply=True)      # now, not at the next tick
            self._seeds[addr] = (now + self.config.join_retry,
                                 min(self.config.join_retry * 2, self.config.join_retry_max))
            if addr not in self._pending:
                self._pending[addr] = PendingJoin(addr, now, 1, "no answer yet", "discovered")

    def _is_up_member(self, node_id: str, addresses: list[str]) -> bool:
        """An up member at one of these addresses (a fake announcement of a member's id
        at another address does not count)."""
        m = self.membership.members.get(node_id)
        return m is not None and m.up and m.address in addresses

    def undiscovered(self, addresses: list[str]) -> None:
        """An announcement went away: stop knocking at its addresses (unless they were
        given with --join). The member itself stays: membership decides."""
        for addr in addresses:
            if addr in self._discovered and addr not in self.config.join:
                self._discovered.discard(addr)
                self._seeds.pop(addr, None)
                self._pending.pop(addr, None)

    def _persist_peers(self) -> None:
        self._save_peers = False
        addrs = sorted(m.address for m in self.membership.members.values() if m.up)
        try:
            if addrs != self.store.get_meta(_PEERS_KEY, []):
                self.store.set_meta(_PEERS_KEY, addrs)
        except MeshError as exc:
            log.warning("cannot save the peer list: %s", exc)

    # --- frames -------------------------------------------------------------------------------

    def _on_frame(self, ftype: FrameType, sender: str, reply_to: str, body: dict[str, Any]
                  ) -> None:
        if ftype == FrameType.SYNC:
            if not body["reply"]:
                self._joined.add(reply_to)
            self.replicator.on_sync(sender, reply_to, body)
            self.membership.heard_from(sender)
        elif ftype == FrameType.RECORDS:
            self.membership.heard_from(sender)
            self.replicator.on_records(sender, reply_to, body)
            if self.store.routed:
                self.router.committed()      # mail of a session that moved: send it now
        elif ftype == FrameType.PULL:
            self.membership.heard_from(sender)
            self.replicator.on_pull(reply_to, body)
        elif ftype == FrameType.ROUTE:
            self.membership.heard_from(sender)
            self.router.on_route(sender, reply_to, body)
        elif ftype == FrameType.ROUTE_ACK:
            self.membership.heard_from(sender)
            self.router.on_ack(sender, body)
        else:
            self.membership.handle(ftype, sender, reply_to, body)

    def _on_change(self, m: Member, old: MemberState | None) -> None:
        self.store.up_hosts = self.membership.up_ids()
        self._save_peers = True
        if m.up and (old is None or old in (MemberState.DEAD, MemberState.LEFT)):
            # New or back: exchange summaries now rather than at the next random round,
            # and send what waits for it in the outbox.
            self.replicator.send_sync(m.address, reply=True)
            self.router.member_up(m.node_id)

    # --- hooks for the daemon and its API -----------------------------------------------------

    def committed(self) -> None:
        self.replicator.committed()
        self.router.committed()

    def peers(self) -> list[dict[str, Any]]:
        with self.store.read(fold=False):
            mine = replication.digest(self.store)
        out = []
        for p in self.membership.peers():
            m = self.membership.members[p["node_id"]]
            if m.digest_at:
                p["behind"] = sum(max(0, v - m.digest.get(o, 0)) for o, v in mine.items())
                p["ahead"] = sum(max(0, v - mine.get(o, 0)) for o, v in m.digest.items())
                p["digest_age"] = round(time.monotonic() - m.digest_at, 3)
            else:
                p["behind"] = p["ahead"] = p["digest_age"] = None
            out.append(p)
        return out

    def security(self) -> dict[str, Any]:
        """How peers are admitted, for `sessions info` and `peers`."""
        if self.auth is not None:
            return {"mode": "cluster-key", "fingerprint": self.auth.key.fingerprint,
                    "encrypted": True}
        return {"mode": "open", "encrypted": False, "exposed": not _loopback(self.address)}

    def stats(self) -> dict[str, Any]:
        return {"address": self.address, "incarnation": self.membership.incarnation,
                "security": self.security(), "pending_joins": self.pending_joins(),
                "members": len(self.membership.members),
                "alive": len(self.membership.alive()),
                "refutations": self.membership.false_refutations,
                "wrong_node_pings": self.membership.wrong_node_pings,
                "membership": self.membership.stats(),
                "transport": self.transport.stats(),
                "auth": dict(self.auth.counters) if self.auth is not None else None,
                "replication": self.replicator.stats(),
                "routing": self.router.stats(),
                "discovery": self.discovery.stats() if self.discovery else {"state": "off"}}


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
