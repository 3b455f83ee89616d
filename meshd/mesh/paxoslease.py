"""PaxosLease: the voter (acceptor) half, its durable promise floor, and the timing rules.

The algorithm is PaxosLease (M. Trencseni, A. Gazsó, H. Reinhardt, "PaxosLease:
Diskless Paxos for Leases", arXiv:1209.4187, 2012) as restated and corrected by
*PaxosLease Revisited* (2026; github.com/mtrencseni/paxoslease-revisited-2026, its
`docs/implementation-contract.md`). docs/claims.md explains it for meshd; in short, per
resource an acceptor keeps only the highest ballot it promised and the lease it accepted,
with a timer, in memory. What this module follows of the Revisited contract:

- the clock is read once per handler (`now = self.clock()` first) and is monotonic,
  never a wall clock; every expiry is stored state compared with that one reading;
- a restarted acceptor refuses prepare, accept, release and queries for a quarantine of
  `claim_max_ttl` on its own clock, which covers the longest proposer lease D_P
  (D_P <= gamma * D_A, gamma = (1 - rho) / (1 + rho): see `quarantine()`);
- release drops a lease only when it is exactly (owner, token, one of its ballots);
- ballots are compared with the proposer's id: an equal ballot from another proposer is
  refused (never taken for a duplicate), so two rounds can never share one.

Beyond both papers (the fencing token, notes section 2): every ballot this daemon promises,
accepts or proposes stays below a FLOOR kept in a file, written and fsynced (block by
block) before the reply goes out. After a restart the acceptor promises nothing at or below
it and the proposer counts on from it, so the ballot that wins an acquisition, the
fencing token, never goes backwards, even when every voter restarts at once.

`MESHD_CLAIMS_MUTANT` (read once, by `meshd.mesh.claims.MeshClaims`) breaks one rule on
purpose, for the lab checker's run on a broken build: see `MUTANTS`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from meshd.config import Config
from meshd.errors import InvalidArgument, StoreError
from meshd.wire.peer import MAX_BALLOT, MAX_STATE_LEASES

log = logging.getLogger("meshd.claims")

#: Test-only ways to break safety (never in production): the lab checker runs a build with
#: one of them and must see a violation.
MUTANTS = {
    "no-majority": "a proposer grants on the first accept (and the first promise)",
    "no-floor": "no promise floor: ballots restart from 0 with the process",
    "no-quarantine": "a restarted voter answers at once",
    "count-messages": "a proposer counts answers, not distinct acceptors, toward a quorum",
}
#: Ballots the floor is raised by at a time: one fsync per this many ballots.
FLOOR_BLOCK = 1024
#: s a resource with no unexpired lease is kept before its promise folds into `base`.
IDLE_SLOT = 60.0


def gamma(rho: float) -> float:
    """The Revisited bound D_P <= gamma * D_A: with every clock's rate within 1 +/- rho,
    a holder that counts gamma * ttl on its clock stops before any acceptor that counted
    ttl on its own (from a later moment: receipt of the accept) lets another in."""
    return (1.0 - rho) / (1.0 + rho)


def quarantine(config: Config) -> float:
    """Seconds (acceptor clock) a restarted acceptor sits out. It forgot the leases it
    accepted; a holder of one may act for D_P = gamma * ttl on its own clock from before
    its request, i.e. at most gamma * ttl / (1 - rho) = ttl / (1 + rho) real seconds, and
    `ttl` on an acceptor clock lasts at least ttl / (1 + rho) real seconds. The bound is
    tight (Revisited), so we wait `claim_max_ttl` plus one round's timeout as margin."""
    return config.claim_max_ttl + config.claim_timeout


def read_mutant(environ: dict[str, str] | None = None) -> str | None:
    """`MESHD_CLAIMS_MUTANT`, checked and logged loudly; None when unset."""
    value = (os.environ if environ is None else environ).get("MESHD_CLAIMS_MUTANT", "")
    if not value:
        return None
    if value not in MUTANTS:
        raise InvalidArgument(f"MESHD_CLAIMS_MUTANT={value!r}: not one of {sorted(MUTANTS)}")
    return value


def warn_mutant(mutant: str | None) -> None:
    if mutant:
        log.critical("UNSAFE BUILD: MESHD_CLAIMS_MUTANT=%s (%s): claims may give two holders "
                     "or tokens that go backwards; for the lab checker only", mutant,
                     MUTANTS[mutant])


class Floor:
    """A durable number: every ballot this daemon promised, accepted or proposed is below
    it. `ensure(b)` raises it past `b` (by a block, so a write is rare) with the file
    written, fsynced and renamed, and the directory fsynced, BEFORE it returns: only then
    may the caller answer. `durable=False` (mutant no-floor) keeps it in memory from 0."""

    def __init__(self, path: str | Path, durable: bool = True) -> None:
        self.path = Path(path)
        self.durable = durable
        self.writes = 0
        self.value = self._load() if durable else 0

    def _load(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").split()
        except FileNotFoundError:
            return 0
        if len(text) != 2 or text[0] != "floor" or not text[1].isdigit():
            raise StoreError(f"{self.path} is not a claims floor file; remove it only if "
                             f"no voter or proposer of this mesh ran with this data dir")
        return int(text[1])

    def ensure(self, ballot: int) -> None:
        if ballot < self.value:
            return
        new = min(ballot + FLOOR_BLOCK, MAX_BALLOT)
        if self.durable:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, f"floor {new}\n".encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self.value = new
        self.writes += 1


@dataclass(frozen=True)
class Accepted:
    """A lease this acceptor accepted: exclusive on its clock until `until`."""

    owner: str          # the holder's session id
    ballot: int         # the ballot it was accepted under (a renewal has a newer one)
    token: int          # the ballot that won the acquisition (unchanged by renewals)
    ttl: float
    until: float


@dataclass
class Slot:
    """One resource's acceptor state (PaxosLease keeps one instance per resource)."""

    promised: int
    promised_by: str            # proposer node id; "" = the floor/base, nobody's
    lease: Accepted | None
    touched: float


#: (frame body fields of the answer, or None for no answer)
Reply = tuple[str, dict[str, Any]]


class Acceptor:
    """One voter's acceptor: in memory but for the floor, every handler answers by value.
    `acceptor_id` is this voter's address as listed in `config.voters`."""

    def __init__(self, config: Config, acceptor_id: str, floor: Floor,
                 clock: Callable[[], float], mutant: str | None = None) -> None:
        self.config = config
        self.id = acceptor_id
        self.floor = floor
        self.clock = clock
        self.mutant = mutant
        self.slots: dict[str, Slot] = {}
        self.base = 0                       # promise of a resource we hold no slot for
        self.quarantine_until = 0.0
        self.counters: dict[str, int] = {}

    def start(self) -> None:
        now = self.clock()
        self.base = self.floor.value        # everything promised before is below it
        q = 0.0 if self.mutant == "no-quarantine" else quarantine(self.config)
        self.quarantine_until = now + q
        if q:
            log.info("claims voter %s: quarantine for %.1f s after start (floor %d)",
                     self.id, q, self.base)

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _slot(self, resource: str, now: float) -> Slot | None:
        slot = self.slots.get(resource)
        if slot is None:
            if len(self.slots) >= self.config.claim_max_resources:
                self.collect(now)
                if len(self.slots) >= self.config.claim_max_resources:
                    return None
            slot = self.slots[resource] = Slot(self.base, "", None, now)
        slot.touched = now
        return slot

    def _reject(self, resource: str, ballot: int, promised: int, reason: str) -> Reply:
        self._count(f"reject.{reason}")
        return ("reject", {"resource": resource, "ballot": ballot, "acceptor": self.id,
                           "promised": promised, "reason": reason})

    @staticmethod
    def _may(slot: Slot, ballot: int, proposer: str) -> bool:
        """A ballot above the promise, or the very round promised (a resend)."""
        return ballot > slot.promised or (ballot == slot.promised
                                          and proposer == slot.promised_by != "")

    def on_prepare(self, resource: str, ballot: int, proposer: str) -> Reply:
        now = self.clock()
        if now < self.quarantine_until:
            return self._reject(resource, ballot, self.base, "quarantine")
        slot = self._slot(resource, now)
        if slot is None:
            return self._reject(resource, ballot, self.base, "full")
        if not self._may(slot, ballot, proposer):
            return self._reject(resource, ballot, slot.promised, "ballot")
        self.floor.ensure(ballot)                 # durable before the promise leaves
        slot.promised, slot.promised_by = ballot, proposer
        lease = slot.lease
        if lease is not None and now >= lease.until:
            lease = slot.lease = None
        self._count("promise")
        body = [] if lease is None else [lease.owner, lease.ballot, lease.token,
                                         round(lease.until - now, 6), lease.ttl]
        return ("promise", {"resource": resource, "ballot": ballot, "acceptor": self.id,
                            "lease": body})

    def on_accept(self, resource: str, ballot: int, proposer: str, owner: str, token: int,
                  ttl: float) -> Reply:
        now = self.clock()
        if now < self.quarantine_until:
            return self._reject(resource, ballot, self.base, "quarantine")
        if ttl > self.config.claim_max_ttl:
            return self._reject(resource, ballot, 0, "ttl")
        slot = self._slot(resource, now)
        if slot is None:
            return self._reject(resource, ballot, self.base, "full")
        if not self._may(slot, ballot, proposer):
            return self._reject(resource, ballot, slot.promised, "ballot")
        self.floor.ensure(ballot)
        slot.promised, slot.promised_by = ballot, proposer
        # (A duplicate accept arriving late restarts the timer: a longer exclusion only.)
        slot.lease = Accepted(owner, ballot, token, ttl, now + ttl)
        self._count("accept")
        return ("accepted", {"resource": resource, "ballot": ballot, "acceptor": self.id})

    def on_release(self, resource: str, owner: str, token: int, ballots: list[int]) -> Reply:
        now = self.clock()
        released = False
        if now >= self.quarantine_until:
            slot = self.slots.get(resource)
            lease = slot.lease if slot is not None else None
            if (lease is not None and lease.owner == owner and lease.token == token
                    and lease.ballot in ballots):
                slot.lease = None                 # type: ignore[union-attr]
                released = True
                self._count("release")
        return ("released", {"resource": resource, "token": token, "acceptor": self.id,
                             "released": released})

    def on_query(self, req: int, prefix: str, exact: bool) -> Reply:
        now = self.clock()
        if now < self.quarantine_until:
            return ("state", {"req": req, "acceptor": self.id, "ok": False, "leases": [],
                              "more": False})
        leases, more = [], False
        for res, slot in self.slots.items():
            lease = slot.lease
            if lease is None or now >= lease.until:
                continue
            if (res != prefix) if exact else not res.startswith(prefix):
                continue
            if len(leases) >= MAX_STATE_LEASES:
                more = True
                break
            leases.append([res, lease.owner, lease.token, lease.ballot,
                           round(lease.until - now, 6), lease.ttl])
        return ("state", {"req": req, "acceptor": self.id, "ok": True, "leases": leases,
                          "more": more})

    def collect(self, now: float | None = None) -> int:
        """Forget resources with no unexpired lease, idle for IDLE_SLOT (or any such when
        the table is full); their promises fold into `base`, the promise every resource
        without a slot starts from, so no promise is ever lowered."""
        now = self.clock() if now is None else now
        full = len(self.slots) >= self.config.claim_max_resources
        gone = [r for r, sl in self.slots.items()
                if (sl.lease is None or now >= sl.lease.until)
                and (full or now - sl.touched >= IDLE_SLOT)]
        for r in gone:
            self.base = max(self.base, self.slots.pop(r).promised)
        return len(gone)

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        return {"acceptor": self.id, "resources": len(self.slots), "floor": self.floor.value,
                "quarantine_left": round(max(0.0, self.quarantine_until - now), 3),
                "counters": dict(self.counters)}
