"""Claims: leases with fencing tokens, granted by a majority of fixed voters (PaxosLease).

The algorithm is PaxosLease (Trencseni, Gazsó, Reinhardt, arXiv:1209.4187, 2012) with
the rules of *PaxosLease Revisited* (2026, github.com/mtrencseni/paxoslease-revisited-2026);
docs/claims.md explains it. Its two roles are `meshd.mesh.proposer.Proposer` (every daemon
proposes for the sessions it hosts) and `meshd.mesh.paxoslease.Acceptor` (run by each
daemon listed in `config.voters`). This module is the service around them:

- the fencing token is the ballot that won the acquisition; renewals (new rounds that
  qualify only for that exact lease) keep it, and the holder's deadline moves to the
  renewal's send time + gamma * ttl;
- the holder's daemon renews in the background (every `claim_renew_fraction` of the TTL)
  while `is_alive_session(holder)` says so, and otherwise simply stops: the lease lapses
  at its TTL. Nothing but an explicit release or the holder's own unregister
  (`session_gone`) frees a lease early; never a SWIM verdict;
- release names the exact (owner, token, ballots accepted for it);
- `holder()`/`list()` ask the voters for their unexpired accepted leases and need a
  majority of answers (else NoQuorum), restarting voters (in quarantine) not counting.

`HostClaims` (`meshd.mesh.claims_host`) is the same interface without voters.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from meshd.config import Config
from meshd.errors import ClaimBusy, LeaseLost, NoQuorum
from meshd.mesh.claims_host import HostClaims, hosted_here
from meshd.mesh.claimtypes import Claims, Grant, Sender, check_request, check_voters
from meshd.mesh.paxoslease import (
    IDLE_SLOT, Acceptor, Floor, gamma, read_mutant, warn_mutant,
)
from meshd.mesh.periodic import Periodic
from meshd.mesh.proposer import Proposer
from meshd.wire import schema as s
from meshd.wire.peer import MAX_RELEASE_BALLOTS, FrameType

log = logging.getLogger("meshd.claims")

FLOOR_FILE = "claims.floor"
#: Frame types `meshd.mesh.node.Mesh` hands to `MeshClaims.on_frame`.
CLAIM_FRAMES = frozenset({
    FrameType.LEASE_PREPARE, FrameType.LEASE_ACCEPT, FrameType.LEASE_RELEASE,
    FrameType.LEASE_QUERY, FrameType.LEASE_PROMISE, FrameType.LEASE_ACCEPTED,
    FrameType.LEASE_REJECT, FrameType.LEASE_RELEASED, FrameType.LEASE_STATE})
_REPLY_TYPE = {"promise": FrameType.LEASE_PROMISE, "accepted": FrameType.LEASE_ACCEPTED,
               "reject": FrameType.LEASE_REJECT, "released": FrameType.LEASE_RELEASED,
               "state": FrameType.LEASE_STATE}
#: Attempts a call makes at once when a higher ballot beat it (a duel), before it reports.
_DUEL_RETRIES = 3
_UNSET: Any = object()

__all__ = ["CLAIM_FRAMES", "Claims", "Grant", "HostClaims", "MeshClaims", "check_voters",
           "hosted_here"]


@dataclass
class _Held:
    """A lease held by a session of this daemon: what renewals and releases need."""

    resource: str
    holder: str
    token: int
    ttl: float
    deadline: float                 # our clock: the holder must stop here
    renewed_at: float               # start of the last attempt that won
    chain: list[int]                # ballots accepted for it (the newest last)
    task: asyncio.Task[Any] | None = None
    retry_at: float = 0.0


class MeshClaims:
    """Claims granted by a majority of `config.voters` (see the module docstring)."""

    scope = "mesh"

    def __init__(self, config: Config, store: Any, transport: Sender, node_id: str,
                 own_address: str | Callable[[], str], is_alive_session: Callable[[str], bool],
                 clock: Callable[[], float] = time.monotonic, *,
                 floor_path: str | Path | None = None, mutant: str | None = _UNSET,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.voters = check_voters(config.voters)
        self.transport = transport
        self.node_id = node_id
        self._own = own_address
        self.is_alive_session = is_alive_session
        self.clock = clock
        self.mutant = read_mutant() if mutant is _UNSET else mutant
        self.quorum = 1 if self.mutant == "no-majority" else len(self.voters) // 2 + 1
        self.gamma = gamma(config.claim_drift)
        path = Path(floor_path) if floor_path else Path(store.data_dir) / FLOOR_FILE
        self.floor = Floor(path, durable=self.mutant != "no-floor")
        self.acceptor: Acceptor | None = None
        self.own = ""
        self.rng = rng or random.Random()
        self.on_lost: Callable[[Grant, str], None] | None = None   # for the daemon's API
        self.counters: Counter[str] = Counter()
        self.proposer = Proposer(self.voters, self.quorum, self.gamma, config.claim_timeout,
                                 self.floor, clock, self._to_voters, self.counters,
                                 count_messages=self.mutant == "count-messages")
        self._queries: dict[int, tuple[dict[str, list[Any]], set[str], asyncio.Future[None]]] = {}
        self._releases: dict[tuple[str, int], tuple[set[str], asyncio.Future[None]]] = {}
        self._held: dict[str, _Held] = {}
        self._reqs = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: Periodic | None = None
        self._next_gc = 0.0
        if len(self.voters) == 1:
            log.warning("claims have ONE voter (%s): no fault tolerance; when it is down no "
                        "claim is granted, and it is the single point of failure",
                        self.voters[0])

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._timer is not None:
            return
        warn_mutant(self.mutant)
        self.own = self._own() if callable(self._own) else self._own
        if self.own in self.voters:
            self.acceptor = Acceptor(self.config, self.own, self.floor, self.clock, self.mutant)
            self.acceptor.start()
        log.info("claims: %s; voters %s (majority %d)", "this daemon votes as " + self.own
                 if self.acceptor else f"{self.own} proposes only (not in the list)",
                 ", ".join(self.voters), self.quorum)
        self._timer = Periodic(self._tick, 0.5, what="claims renewal round", first=0.05,
                               adaptive=True)
        self._timer.start()

    async def stop(self) -> None:
        if self._timer is not None:
            await self._timer.stop()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            try:
                await t
            except BaseException:
                pass
        self.proposer.stop()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- the API ------------------------------------------------------------------------------

    def _grant(self, resource: str, holder: str, token: int, valid_for: float, ttl: float
               ) -> Grant:
        return Grant(resource, holder, token, max(0.0, valid_for), ttl, self.scope)

    async def acquire(self, resource: str, holder: str, ttl: float, wait: float = 0.0
                      ) -> Grant:
        ttl = check_request(self.config, resource, holder, ttl)
        end = self.clock() + max(0.0, wait)
        held = self._held.get(resource)
        if held is not None and held.holder == holder and self.clock() < held.deadline:
            return await self.renew(resource, holder, held.token)   # (already its own)
        tries = duels = 0
        while True:
            out = await self.proposer.round(resource, holder, ttl, 0, frozenset())
            if out[0] == "granted":
                _, ballot, deadline, started = out
                self._held[resource] = _Held(resource, holder, ballot, ttl, deadline,
                                             started, [ballot])
                return self._grant(resource, holder, ballot, deadline - self.clock(), ttl)
            exc, delay = self._failure(out, resource)
            if out[0] == "rejected" and duels < _DUEL_RETRIES:
                # A ballot below a voter's promise: the rejection told us the promise, so
                # the first retry goes at once, higher; only a duel backs off.
                delay = self.rng.uniform(0.005, 0.05) * duels
                duels += 1
            else:
                tries += 1
                delay = min(delay, self.rng.uniform(0.5, 1.0) * min(
                    2.0 ** tries * 0.05, 2 * self.config.claim_timeout))
                if self.clock() + delay > end:
                    raise exc
            await asyncio.sleep(delay)

    def _failure(self, out: tuple[Any, ...], resource: str) -> tuple[Exception, float]:
        """The error an attempt's outcome means, and the wait before trying again."""
        if out[0] == "busy":
            owner, remaining = out[1], out[2]
            return ClaimBusy(f"{resource!r} is held by session {owner!r}; its lease may run "
                             f"for {remaining:.1f} s more unless renewed",
                             holder=owner, expires_in=remaining), remaining
        if out[0] == "rejected":
            reasons = sorted({r for _, r in out[1].values()})
            return NoQuorum(f"the voters refused ({', '.join(reasons)}): "
                            f"{self._who(set(out[1]))}"), self.config.claim_timeout
        if out[0] == "stopped":
            return NoQuorum("claims are stopping"), 0.0
        return NoQuorum(f"no majority of the {len(self.voters)} voters answered in "
                        f"{self.config.claim_timeout:g} s: {self._who(out[1])}"), 0.0

    def _who(self, answered: set[str]) -> str:
        yes = [v for v in self.voters if v in answered]
        no = [v for v in self.voters if v not in answered]
        return f"answered: {', '.join(yes) or 'none'}; silent: {', '.join(no) or 'none'}"

    async def renew(self, resource: str, holder: str, token: int) -> Grant:
        held = self._held.get(resource)
        if held is None or held.holder != holder or held.token != token:
            raise LeaseLost(f"session {holder!r} holds no lease on {resource!r} with token "
                            f"{token} here (lapsed, released or never granted)")
        if self.clock() >= held.deadline:
            self._lose(held, "expired")
            raise LeaseLost(f"the lease of {holder!r} on {resource!r} (token {token}) lapsed")
        for duel in range(_DUEL_RETRIES + 1):
            out = await self.proposer.round(resource, holder, held.ttl, token,
                                            frozenset(held.chain))
            if self._held.get(resource) is not held:
                raise LeaseLost(f"the lease on {resource!r} (token {token}) was released")
            if out[0] == "granted":
                _, ballot, deadline, started = out
                held.deadline = max(held.deadline, deadline)
                held.renewed_at = started
                held.chain = (held.chain + [ballot])[-MAX_RELEASE_BALLOTS:]
                return self._grant(resource, holder, token, held.deadline - self.clock(),
                                   held.ttl)
            if out[0] == "busy":
                self._lose(held, f"taken by {out[1]}")
                raise LeaseLost(f"the lease on {resource!r} (token {token}) is gone: "
                                f"session {out[1]!r} holds it")
            if out[0] != "rejected" or duel == _DUEL_RETRIES:
                break
            await asyncio.sleep(self.rng.uniform(0.005, 0.05) * duel)   # (first: at once)
        raise self._failure(out, resource)[0]

    async def release(self, resource: str, holder: str, token: int) -> bool:
        held = self._held.get(resource)
        if held is None or held.holder != holder or held.token != token:
            return False
        del self._held[resource]
        if held.task is not None:
            held.task.cancel()
        valid = self.clock() < held.deadline
        acks: set[str] = set()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._releases[(resource, token)] = (acks, fut)
        try:
            self._to_voters(FrameType.LEASE_RELEASE, {
                "resource": resource, "owner": holder, "token": token,
                "ballots": held.chain[-MAX_RELEASE_BALLOTS:]})
            try:   # (for a claim that follows at once; the lease lapses at its TTL anyway)
                await asyncio.wait_for(fut, self.config.claim_timeout)
            except asyncio.TimeoutError:
                self.counters["release.unacknowledged"] += 1
        finally:
            self._releases.pop((resource, token), None)
        return valid

    async def holder(self, resource: str) -> Grant | None:
        s.ident(resource, "resource")
        found = await self._query(resource, exact=True)
        return found[0] if found else None

    async def list(self, prefix: str | None = None) -> list[Grant]:
        return await self._query(s.text(prefix or "", "prefix", s.MAX_ID_LEN), exact=False)

    async def _query(self, prefix: str, exact: bool) -> list[Grant]:
        req = next(self._reqs)
        answers: dict[str, list[Any]] = {}
        heard: set[str] = set()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queries[req] = (answers, heard, fut)
        try:
            self._to_voters(FrameType.LEASE_QUERY, {"req": req, "prefix": prefix,
                                                    "exact": exact})
            try:
                await asyncio.wait_for(fut, self.config.claim_timeout)
            except asyncio.TimeoutError:
                pass
        finally:
            self._queries.pop(req, None)
        if len(answers) < self.quorum:
            raise NoQuorum(f"no majority of the {len(self.voters)} voters could say who "
                           f"holds what (restarting voters sit out): {self._who(heard)}")
        best: dict[str, list[Any]] = {}
        for leases in answers.values():
            for lease in leases:        # [resource, owner, token, ballot, remaining, ttl]
                cur = best.get(lease[0])
                if cur is None or (lease[3], lease[4]) > (cur[3], cur[4]):
                    best[lease[0]] = lease
        now = self.clock()
        out = []
        for res in sorted(best):
            _, owner, token, _b, remaining, ttl = best[res]
            held = self._held.get(res)
            if held is not None and held.token == token:      # we know it better
                remaining = held.deadline - now
            out.append(self._grant(res, owner, token, remaining, ttl))
        return out

    def session_gone(self, session_id: str) -> None:
        for held in [h for h in self._held.values() if h.holder == session_id]:
            self._spawn(self.release(held.resource, held.holder, held.token))

    # --- background renewal -------------------------------------------------------------------

    def _tick(self) -> float:
        now = self.clock()
        wake = 0.5
        if self.acceptor is not None and now >= self._next_gc:
            self._next_gc = now + IDLE_SLOT
            self.acceptor.collect(now)          # resources idle without a lease
        for held in list(self._held.values()):
            if now >= held.deadline:
                self._lose(held, "expired")
                continue
            if held.task is not None and not held.task.done():
                continue
            due = max(held.renewed_at + held.ttl * self.config.claim_renew_fraction,
                      held.retry_at)
            if now >= due and self.is_alive_session(held.holder):
                held.task = self._spawn(self._auto_renew(held))
            else:
                wake = min(wake, max(due, now) - now, held.deadline - now)
        return max(0.01, wake)

    async def _auto_renew(self, held: _Held) -> None:
        try:
            await self.renew(held.resource, held.holder, held.token)
        except LeaseLost:
            pass
        except NoQuorum as exc:
            held.retry_at = self.clock() + self.config.claim_timeout
            log.info("renewing %r for %s failed, retrying: %s", held.resource, held.holder,
                     exc)

    def _lose(self, held: _Held, reason: str) -> None:
        if self._held.get(held.resource) is held:
            del self._held[held.resource]
            self.counters[f"lost.{reason.split()[0]}"] += 1
            if self.on_lost is not None:
                self.on_lost(self._grant(held.resource, held.holder, held.token, 0.0,
                                         held.ttl), reason)

    # --- frames -------------------------------------------------------------------------------

    def _to_voters(self, ftype: FrameType, body: dict[str, Any]) -> None:
        for addr in self.voters:
            if addr == self.own and self.acceptor is not None:
                asyncio.get_running_loop().call_soon(self._local, ftype, body)
            else:
                self.transport.send(addr, ftype, body)

    def _local(self, ftype: FrameType, body: dict[str, Any]) -> None:
        reply = self._accept_frame(ftype, self.node_id, body)
        if reply is not None:
            self._reply_frame(_REPLY_TYPE[reply[0]], reply[1])

    def on_frame(self, ftype: FrameType, sender: str, reply_to: str, body: dict[str, Any]
                 ) -> None:
        """A LEASE_* frame from a peer (the mesh hands every type in CLAIM_FRAMES here)."""
        if ftype in (FrameType.LEASE_PREPARE, FrameType.LEASE_ACCEPT,
                     FrameType.LEASE_RELEASE, FrameType.LEASE_QUERY):
            reply = self._accept_frame(ftype, sender, body)
            if reply is not None:
                self.transport.send(reply_to, _REPLY_TYPE[reply[0]], reply[1])
        else:
            self._reply_frame(ftype, body)

    def _accept_frame(self, ftype: FrameType, proposer: str, body: dict[str, Any]
                      ) -> tuple[str, dict[str, Any]] | None:
        a = self.acceptor
        if a is None:
            self.counters["dropped.not_a_voter"] += 1       # (voters lists differ?)
            return None
        if ftype == FrameType.LEASE_PREPARE:
            return a.on_prepare(body["resource"], body["ballot"], proposer)
        if ftype == FrameType.LEASE_ACCEPT:
            return a.on_accept(body["resource"], body["ballot"], proposer, body["owner"],
                               body["token"], body["ttl"])
        if ftype == FrameType.LEASE_RELEASE:
            return a.on_release(body["resource"], body["owner"], body["token"],
                                body["ballots"])
        return a.on_query(body["req"], body["prefix"], body["exact"])

    def _reply_frame(self, ftype: FrameType, body: dict[str, Any]) -> None:
        if ftype in (FrameType.LEASE_PROMISE, FrameType.LEASE_ACCEPTED,
                     FrameType.LEASE_REJECT):
            self.proposer.on_reply(ftype, body)
        elif ftype == FrameType.LEASE_RELEASED:
            pending = self._releases.get((body["resource"], body["token"]))
            if pending is not None and body["acceptor"] in self.voters:
                pending[0].add(body["acceptor"])
                if len(pending[0]) >= self.quorum and not pending[1].done():
                    pending[1].set_result(None)
        elif ftype == FrameType.LEASE_STATE:
            q = self._queries.get(body["req"])
            if q is None or body["acceptor"] not in self.voters:
                self.counters["reply.stale"] += 1
                return
            answers, heard, fut = q
            heard.add(body["acceptor"])
            if body["ok"]:
                answers[body["acceptor"]] = body["leases"]
            if (len(answers) >= self.quorum or len(heard) == len(self.voters)) \
                    and not fut.done():
                fut.set_result(None)

    def stats(self) -> dict[str, Any]:
        return {"scope": self.scope, "voters": list(self.voters), "quorum": self.quorum,
                "held": len(self._held), "ballot": self.proposer.counter, "floor": self.floor.value,
                "mutant": self.mutant, "counters": dict(self.counters),
                "acceptor": self.acceptor.stats() if self.acceptor else None}

