"""PaxosLease: the proposer's round (prepare, then accept), for `meshd.mesh.claims`.

PaxosLease (Trencseni, Gazsó, Reinhardt, arXiv:1209.4187, 2012) with the rules of
*PaxosLease Revisited* (2026, github.com/mtrencseni/paxoslease-revisited-2026); the
acceptor is `meshd.mesh.paxoslease.Acceptor`, docs/claims.md explains both. The Revisited
rules this half follows:

- the clock is read once before the Prepare is sent; the holder's lease ends at that
  moment + gamma * ttl. That deadline is stored in the attempt and checked by every reply
  handler, and once more before a grant is returned (a loop that stalled past it grants
  nothing), never left to the order in which timer callbacks run;
- quorums count distinct acceptor ids (the voter addresses of `config.voters`), one
  answer per acceptor per phase: a duplicated or delayed frame never counts twice, and a
  reply for a ballot that is not a live attempt's is dropped and counted;
- renewal qualifier: a promise reporting the proposer's own lease counts as open only
  for a renewal of exactly that lease (same owner and token, and one of the ballots
  accepted for it, captured when the attempt starts); anything else unexpired blocks;
- ballots come from a counter that starts at the durable floor and rises past every
  promise a voter reports, so they never repeat, even across restarts.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from meshd.mesh.paxoslease import Floor
from meshd.wire.peer import FrameType

#: Sends a frame body to every voter (the daemon's own acceptor included).
Broadcast = Callable[[FrameType, dict[str, Any]], None]


@dataclass
class Attempt:
    resource: str
    holder: str
    ttl: float
    ballot: int
    token: int                      # 0: an acquisition (the token will be `ballot`)
    chain: frozenset[int]           # own ballots a promise may report as open (renewal)
    deadline: float                 # started + gamma * ttl: the lease's end if it wins
    phase_until: float
    done: asyncio.Future[tuple[Any, ...]]
    phase: str = "prepare"
    open: set[str] = field(default_factory=set)
    blocked: dict[str, tuple[str, float, int]] = field(default_factory=dict)
    rejected: dict[str, tuple[int, str]] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    ever: set[str] = field(default_factory=set)

    def finish(self, outcome: tuple[Any, ...]) -> None:
        if not self.done.done():
            self.done.set_result(outcome)


class Proposer:
    """Runs PaxosLease rounds against `voters`; `round()` is one attempt, `on_reply()`
    takes the voters' answers. `quorum` is a majority (1 only for the no-majority mutant)."""

    def __init__(self, voters: tuple[str, ...], quorum: int, gamma: float, timeout: float,
                 floor: Floor, clock: Callable[[], float], send: Broadcast,
                 counters: Counter[str], count_messages: bool = False) -> None:
        self.voters = voters
        self.quorum = quorum
        self.gamma = gamma
        self.timeout = timeout
        self.floor = floor
        self.clock = clock
        self.send = send
        self.counters = counters
        self.counter = floor.value
        self.count_messages = count_messages        # the mutant "count-messages" (unsafe)
        self._msgs = 0
        self._attempts: dict[tuple[str, int], Attempt] = {}

    def stop(self) -> None:
        for att in self._attempts.values():
            att.finish(("stopped",))

    def next_ballot(self) -> int:
        self.counter += 1                        # (started at the floor; raised by rejects)
        self.floor.ensure(self.counter)          # never proposed again after a restart
        return self.counter

    async def round(self, resource: str, holder: str, ttl: float, token: int,
                     chain: frozenset[int]) -> tuple[Any, ...]:
        """Prepare then accept; ("granted", ballot, deadline, started), ("busy", owner,
        remaining), ("rejected", {acceptor: (promised, reason)}), ("timeout", answered)."""
        started = self.clock()                  # the holder's lease counts from here
        ballot = self.next_ballot()
        loop = asyncio.get_running_loop()
        att = Attempt(resource, holder, ttl, ballot, token, chain,
                       deadline=started + self.gamma * ttl,
                       phase_until=started + self.timeout,
                       done=loop.create_future())
        self._attempts[(resource, ballot)] = att
        try:
            self.send(FrameType.LEASE_PREPARE, {"resource": resource, "ballot": ballot})
            out = await self._phase(att, started)
            if out[0] != "open":
                return out
            now = self.clock()
            att.phase, att.answered, att.rejected = "accept", set(), {}
            att.phase_until = now + self.timeout
            att.done = loop.create_future()
            self.send(FrameType.LEASE_ACCEPT, {
                "resource": resource, "ballot": ballot, "owner": holder,
                "token": token or ballot, "ttl": float(ttl)})
            out = await self._phase(att, now)
            if out[0] != "accepted":
                return out
            if self.clock() >= att.deadline:     # (a loop stalled past the lease)
                self.counters["round.too_late"] += 1
                return ("timeout", att.ever)
            return ("granted", ballot, att.deadline, started)
        finally:
            self._attempts.pop((resource, ballot), None)

    async def _phase(self, att: Attempt, now: float) -> tuple[Any, ...]:
        try:
            return await asyncio.wait_for(asyncio.shield(att.done),
                                          max(0.0, min(att.phase_until, att.deadline) - now))
        except asyncio.TimeoutError:
            return ("timeout", att.ever)

    def on_reply(self, ftype: FrameType, body: dict[str, Any]) -> None:
        now = self.clock()
        att = self._attempts.get((body["resource"], body["ballot"]))
        acc = body["acceptor"]
        if att is None:
            self.counters["reply.stale"] += 1          # an earlier round's, or a duplicate
            return
        if acc not in self.voters:
            self.counters["reply.not_a_voter"] += 1
            return
        if now >= att.phase_until or now >= att.deadline:
            self.counters["reply.late"] += 1
            att.finish(("timeout", att.ever))
            return
        if self.count_messages:                         # (mutant: every answer a vote)
            self._msgs += 1
            acc = f"{acc}#{self._msgs}"
        if acc in att.answered:
            self.counters["reply.duplicate"] += 1       # one vote per acceptor per phase
            return
        if ftype == FrameType.LEASE_REJECT:
            att.rejected[acc] = (body["promised"], body["reason"])
            self.counter = max(self.counter, body["promised"])
            if body["reason"] == "ballot":          # preempted: retry above it at once
                att.answered.add(acc)
                att.ever.add(acc)
                att.finish(("rejected", dict(att.rejected)))
                return
        elif ftype == FrameType.LEASE_PROMISE and att.phase == "prepare":
            lease = body["lease"]
            if not lease or (att.token and lease[0] == att.holder and lease[2] == att.token
                             and lease[1] in att.chain):
                att.open.add(acc)
            else:
                att.blocked[acc] = (lease[0], lease[3], lease[1])
        elif ftype == FrameType.LEASE_ACCEPTED and att.phase == "accept":
            att.accepted.add(acc)
        else:
            self.counters["reply.wrong_phase"] += 1
            return
        att.answered.add(acc)
        att.ever.add(acc)
        n, q = len(self.voters), self.quorum
        if att.phase == "prepare":
            if len(att.open) >= q:
                att.finish(("open",))
            elif n - len(att.blocked) - len(att.rejected) < q:
                if att.blocked:
                    owner, remaining, _ = max(att.blocked.values(), key=lambda b: b[2])
                    att.finish(("busy", owner, remaining))
                else:
                    att.finish(("rejected", dict(att.rejected)))
        elif len(att.accepted) >= q:
            att.finish(("accepted",))
        elif n - len(att.rejected) < q:
            att.finish(("rejected", dict(att.rejected)))
