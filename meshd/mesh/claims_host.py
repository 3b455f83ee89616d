"""Host-scope claims: with no voters configured (the zero-config LAN), this daemon grants
claims for the sessions it hosts, and only for them.

One daemon, one clock, one table: exclusion needs no consensus, and a lease lapses at its
TTL on the same monotonic clock that granted it (the holder counts from before its request,
so it stops first). A claim for a session of another host is refused with the way out
(`--voters`): two daemons each granting "their" claim on a shared resource would give two
holders. Tokens come from a counter kept below a durable, fsynced floor
(`meshd.mesh.paxoslease.Floor`, file `claims-host.floor` in the data directory), so they
never go backwards across restarts, and a restarted daemon holds no lease (its sessions'
leases lapsed with it: their holders' own deadlines passed no later than the TTL).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from meshd.config import Config
from meshd.errors import ClaimBusy, InvalidArgument, LeaseLost
from meshd.mesh.claimtypes import Grant, check_request
from meshd.mesh.paxoslease import Floor
from meshd.mesh.periodic import Periodic
from meshd.state import sessions
from meshd.wire import schema as s

FLOOR_FILE = "claims-host.floor"


def hosted_here(store: Any) -> Callable[[str], bool]:
    """`is_local_session` for a store: the session is registered and hosted by this node."""
    def check(session_id: str) -> bool:
        with store.read(fold=False):
            row = sessions.get(store, {"session_id": session_id})
        return row is not None and row.get("host") == store.node_id
    return check


@dataclass
class _Lease:
    holder: str
    token: int
    ttl: float
    deadline: float
    renewed_at: float


class HostClaims:
    """Claims for this host's sessions, granted by this daemon alone (scope "host")."""

    scope = "host"

    def __init__(self, config: Config, store: Any, is_local_session: Callable[[str], bool],
                 clock: Callable[[], float] = time.monotonic, *,
                 floor_path: str | Path | None = None) -> None:
        self.config = config
        self.is_local_session = is_local_session
        self.clock = clock
        self.floor = Floor(Path(floor_path) if floor_path
                           else Path(store.data_dir) / FLOOR_FILE)
        self.counter = self.floor.value
        self.on_lost: Callable[[Grant, str], None] | None = None
        self._leases: dict[str, _Lease] = {}
        self._changed: asyncio.Condition | None = None
        self._timer: Periodic | None = None

    def start(self) -> None:
        if self._timer is None:
            self._timer = Periodic(self._tick, 0.5, what="host claims round", first=0.05,
                                   adaptive=True)
            self._timer.start()

    async def stop(self) -> None:
        if self._timer is not None:
            await self._timer.stop()

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self._cond():
            self._cond().notify_all()

    def _grant(self, resource: str, lease: _Lease, now: float) -> Grant:
        return Grant(resource, lease.holder, lease.token, max(0.0, lease.deadline - now),
                     lease.ttl, self.scope)

    def _live(self, resource: str, now: float) -> _Lease | None:
        lease = self._leases.get(resource)
        if lease is not None and now >= lease.deadline:
            self._lapse(resource, lease)
            return None
        return lease

    def _lapse(self, resource: str, lease: _Lease) -> None:
        del self._leases[resource]
        if self.on_lost is not None:
            self.on_lost(Grant(resource, lease.holder, lease.token, 0.0, lease.ttl,
                               self.scope), "expired")

    async def acquire(self, resource: str, holder: str, ttl: float, wait: float = 0.0
                      ) -> Grant:
        ttl = check_request(self.config, resource, holder, ttl)
        if not self.is_local_session(holder):
            raise InvalidArgument(
                f"session {holder!r} is not registered on this daemon, and without voters "
                f"claims are granted per host only: to claim across hosts, start every "
                f"daemon with --voters HOST:PORT,... (the peer addresses of 3 or 5 of them)")
        end = self.clock() + max(0.0, wait)
        while True:
            now = self.clock()
            lease = self._live(resource, now)
            if lease is None:
                if len(self._leases) >= self.config.claim_max_resources:
                    raise InvalidArgument(f"this daemon holds {len(self._leases)} claims, "
                                          f"its limit (claim_max_resources)")
                self.counter += 1
                self.floor.ensure(self.counter)           # durable before it is given
                lease = self._leases[resource] = _Lease(holder, self.counter, ttl,
                                                        now + ttl, now)
                return self._grant(resource, lease, now)
            if lease.holder == holder:
                lease.deadline, lease.renewed_at = now + lease.ttl, now
                return self._grant(resource, lease, now)
            left = lease.deadline - now
            if now >= end:
                raise ClaimBusy(f"{resource!r} is held by session {lease.holder!r}; its "
                                f"lease may run for {left:.1f} s more unless renewed",
                                holder=lease.holder, expires_in=left)
            async with self._cond():
                try:
                    await asyncio.wait_for(self._cond().wait(), min(left, end - now) + 1e-3)
                except asyncio.TimeoutError:
                    pass

    async def renew(self, resource: str, holder: str, token: int) -> Grant:
        now = self.clock()
        lease = self._live(resource, now)
        if lease is None or lease.holder != holder or lease.token != token:
            raise LeaseLost(f"session {holder!r} holds no lease on {resource!r} with token "
                            f"{token} (lapsed, released or never granted)")
        lease.deadline, lease.renewed_at = now + lease.ttl, now
        return self._grant(resource, lease, now)

    async def release(self, resource: str, holder: str, token: int) -> bool:
        lease = self._live(resource, self.clock())
        if lease is None or lease.holder != holder or lease.token != token:
            return False
        del self._leases[resource]
        await self._notify()
        return True

    async def holder(self, resource: str) -> Grant | None:
        s.ident(resource, "resource")
        now = self.clock()
        lease = self._live(resource, now)
        return None if lease is None else self._grant(resource, lease, now)

    async def list(self, prefix: str | None = None) -> list[Grant]:
        now = self.clock()
        return [self._grant(r, lease, now) for r in sorted(self._leases)
                if (lease := self._live(r, now)) is not None and r.startswith(prefix or "")]

    def session_gone(self, session_id: str) -> None:
        gone = [r for r, lease in self._leases.items() if lease.holder == session_id]
        for r in gone:
            del self._leases[r]
        if gone:
            asyncio.get_running_loop().create_task(self._notify())

    def _tick(self) -> float:
        """Renew the leases of sessions still registered here (at `claim_renew_fraction`
        of their TTL); the others lapse at their TTL."""
        now = self.clock()
        wake = 0.5
        for r, lease in list(self._leases.items()):
            if now >= lease.deadline:
                self._lapse(r, lease)
                continue
            due = lease.renewed_at + lease.ttl * self.config.claim_renew_fraction
            if now >= due and self.is_local_session(lease.holder):
                lease.deadline, lease.renewed_at = now + lease.ttl, now
                due = now + lease.ttl * self.config.claim_renew_fraction
            wake = min(wake, max(0.0, min(due, lease.deadline) - now))
        return max(0.01, wake)
