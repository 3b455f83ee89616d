"""The mesh: this daemon's peer transport, membership and replication, composed.

It routes each incoming peer frame to the part that owns it, keeps the store's view of
which hosts are down (their sessions read OFFLINE), and announces a graceful leave on
shutdown. Joining (seeds from `--join`, mDNS discovery or the last run, with backoff,
and knocking on members declared dead) is `meshd.mesh.joining.Joiner`'s; each part gets
what it needs of the others through its constructor, here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any, Callable

import zmq

from meshd.config import Config
from meshd.errors import MeshError
from meshd.mesh.claims import CLAIM_FRAMES, MeshClaims
from meshd.mesh.claims_host import hosted_here
from meshd.mesh.discovery import Discovery
from meshd.mesh.handshake import HandshakeProbe
from meshd.mesh.joining import JoinDeps, Joiner
from meshd.mesh.membership import Member, Membership
from meshd.mesh.replicator import Replicator
from meshd.mesh.router import Router
from meshd.mesh.security import Authenticator, load_key
from meshd.mesh.transport import Transport
from meshd.state import replication
from meshd.state.outbox import Outbox
from meshd.state.pipeline import WritePipeline
from meshd.state.store import Store
from meshd.wire.peer import FrameType, MemberState

log = logging.getLogger("meshd.mesh")

_PEERS_KEY = "peers"


class Mesh:
    def __init__(self, config: Config, store: Store, ctx: zmq.Context, outbox: Outbox,
                 pipeline: WritePipeline | None = None,
                 on_delivered: Callable[[], None] | None = None,
                 on_merged: Callable[[], None] | None = None,
                 is_alive_session: Callable[[str], bool] | None = None) -> None:
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
        self.transport = Transport(config, ctx, store.node_id, self._on_frame, key)
        self.membership = Membership(config, self.transport, store.node_id, self._on_change)
        self.replicator = Replicator(config, store, self.membership, self.transport,
                                     outbox=outbox, on_merged=on_merged)
        self.router = Router(config, store, outbox, self.membership, self.transport,
                             pipeline, on_delivered)
        members = self.membership.members
        self.joiner = Joiner(config, JoinDeps(
            members=lambda: members, own_address=lambda: self.transport.address,
            send_sync=lambda addr: self.replicator.send_sync(addr, reply=True),
            forget=self.transport.forget,
            load_peers=lambda: store.get_meta(_PEERS_KEY, []),
            save_peers=lambda addrs: store.set_meta(_PEERS_KEY, addrs),
            probe=lambda addr: HandshakeProbe(ctx, addr, key), keyed=key is not None))
        self.discovery: Discovery | None = None
        # Claims granted by a majority of the voters (docs/claims.md); without voters the
        # daemon serves host-scope claims itself (`meshd.mesh.claims_host.HostClaims`).
        # A session is renewed for while it is registered here (the daemon may say more).
        self.claims: MeshClaims | None = None
        if config.voters:
            self.claims = MeshClaims(config, store, self.transport, store.node_id,
                                     lambda: self.transport.address,
                                     is_alive_session or hosted_here(store))

    @property
    def address(self) -> str:
        return self.transport.address

    async def start(self) -> None:
        self.store.set_up_hosts(self.membership.up_ids())
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
        self.joiner.start()
        if self.claims is not None:
            self.claims.start()            # (after the transport: it knows our address)
        if self.config.discovery:
            self.discovery = Discovery(self.config, self.store.node_id, self.address,
                                       self.joiner.discovered, self.joiner.undiscovered,
                                       self.auth.key.fingerprint if self.auth else "",
                                       self.joiner.is_up_member)
            await self.discovery.start()

    async def stop(self, leave: bool = True) -> None:
        try:
            if self.discovery is not None:
                await self.discovery.stop()
            # (Not to members we hold down: a frame for an address that does not answer
            # would hold the shutdown for the whole linger.)
            down = {m.address for m in self.membership.members.values() if not m.up}
            joining = self.joiner.joining() - down
            if leave and (self.membership.members or joining):
                self.membership.leave(also=joining)
                await asyncio.sleep(self.config.leave_grace)   # let the LEFT frames go out
            await self.joiner.stop()
            await self.membership.stop()
            await self.replicator.stop()
            await self.router.stop()
            if self.claims is not None:
                await self.claims.stop()
            self.joiner.persist()
        finally:
            # Always (an open socket would hang the context), giving a leave announcement
            # still queued a bounded moment to go out.
            self.transport.stop(linger_ms=1000 if leave else 0)
            if self.auth is not None:
                self.auth.stop()

    # --- joining (`joining.py`), for the daemon's API ---------------------------------------

    def join(self, address: str) -> dict[str, Any]:
        """`sessions join` (see `Joiner.join`)."""
        return self.joiner.join(address)

    def pending_joins(self) -> list[dict[str, Any]]:
        return self.joiner.pending_joins()

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
        self.joiner.forget(m.address)
        log.warning("force-leave: member %s (%s) marked left; %d queued item(s) for it "
                    "expired", m.node_id[:12], m.address, dropped)
        return {"node_id": m.node_id, "address": m.address, "state": "left",
                "expired": dropped}

    # --- frames -------------------------------------------------------------------------------

    def _on_frame(self, ftype: FrameType, sender: str, reply_to: str, body: dict[str, Any]
                  ) -> None:
        if ftype == FrameType.SYNC:
            if not body["reply"]:
                self.joiner.answered(reply_to)
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
        elif ftype in CLAIM_FRAMES:
            if self.claims is None:
                self.transport.counters["claims.no_voters"] += 1   # no --voters set here
            else:
                self.claims.on_frame(ftype, sender, reply_to, body)
        else:
            self.membership.handle(ftype, sender, reply_to, body)

    def _on_change(self, m: Member, old: MemberState | None) -> None:
        self.store.set_up_hosts(self.membership.up_ids())
        self.joiner.members_changed()
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
        out, pulls = [], self.replicator.catching_up()
        for p in self.membership.peers():
            mine_up = [c for c in pulls if c["peer"] == p.get("address")]   # catch-up progress
            p["catching_up"] = {"done": sum(c["known"] - c["start"] for c in mine_up),
                                "total": sum(c["target"] - c["start"] for c in mine_up),
                                "origins": len(mine_up)} if mine_up else None
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
                "discovery": self.discovery.stats() if self.discovery else {"state": "off"},
                "claims": self.claims.stats() if self.claims else None}


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
