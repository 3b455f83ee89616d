"""Claims (PaxosLease with the Revisited rules) as a unit: the daemon's own `MeshClaims`
(proposer, acceptor, floor, renewals) on the fake network and a virtual clock.

Each "daemon" here is a `MeshClaims` on a `FakeTransport` (every frame through the real
peer codec) whose handler hands it the LEASE_* frames, as `meshd.mesh.node.Mesh` does;
three of them are the voters. A restart builds a new `MeshClaims` at the same address
with the same floor file (its in-memory acceptor state is gone, as after kill -9).

Every scenario that shows a safety property is also run with the mutant that should break
it (`MESHD_CLAIMS_MUTANT`, passed here as `mutant=`), and the test asserts that the
violation then happens: the scenarios can tell a broken build from a sound one.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from meshd.config import Config
from meshd.errors import ClaimBusy, InvalidArgument, LeaseLost, NoQuorum
from meshd.mesh import simclock
from meshd.mesh.claims import CLAIM_FRAMES, Grant, MeshClaims, check_voters
from meshd.mesh.fakenet import FakeNetwork
from meshd.mesh.paxoslease import FLOOR_BLOCK, gamma
from meshd.wire.peer import FrameType

VOTERS = ("10.0.0.1:7747", "10.0.0.2:7747", "10.0.0.3:7747")
CFG = Config.lan(voters=VOTERS, claim_max_ttl=10.0, claim_timeout=0.5)
TTL = 6.0
RES = "task/42"
QUARANTINE = CFG.claim_max_ttl + CFG.claim_timeout


class Node:
    """One daemon's claims on the fake network; `alive`: its registered sessions."""

    def __init__(self, lab: "Lab", addr: str, node_id: str) -> None:
        self.lab, self.addr, self.node_id = lab, addr, node_id
        self.alive: set[str] = set()
        self.start()

    def start(self) -> None:
        self.transport = self.lab.net.transport(CFG, self.node_id, self._on_frame, self.addr)
        self.claims = MeshClaims(
            CFG, None, self.transport, self.node_id, self.addr, self.alive.__contains__,
            clock=self.lab.loop.time, floor_path=self.lab.tmp / f"{self.node_id}.floor",
            mutant=self.lab.mutant, rng=random.Random(self.node_id))
        self.claims.start()

    def _on_frame(self, ftype: FrameType, sender: str, reply_to: str,
                  body: dict[str, Any]) -> None:
        if ftype in CLAIM_FRAMES:
            self.claims.on_frame(ftype, sender, reply_to, body)

    async def restart(self) -> None:
        """kill -9 and start again: same address, node id and floor file."""
        self.transport.stop()
        await self.claims.stop()
        self.start()

    async def release(self, g: Grant) -> bool:
        ok = await self.claims.release(g.resource, g.holder, g.token)
        self.lab.end(g)
        return ok

    async def acquire(self, sid: str, ttl: float = TTL, wait: float = 0.0,
                      resource: str = RES) -> Grant:
        self.alive.add(sid)
        g = await self.claims.acquire(resource, sid, ttl, wait)
        self.lab.record(g)
        return g


class Lab:
    def __init__(self, tmp: Path, mutant: str | None = None, others: int = 3) -> None:
        self.loop = asyncio.get_running_loop()
        self.tmp, self.mutant = tmp, mutant
        self.net = FakeNetwork(seed=1, loop=self.loop)
        self.voters = [Node(self, a, f"voter{i}") for i, a in enumerate(VOTERS)]
        self.others = [Node(self, f"10.0.1.{i + 1}:7747", f"node{i}") for i in range(others)]
        self.grants: list[tuple[float, float, str, int]] = []   # (from, until, holder, token)

    def record(self, g: Grant) -> None:
        now = self.loop.time()
        self.grants.append((now, now + g.valid_for, g.holder, g.token))

    def end(self, g: Grant) -> None:
        """The holder stopped (a release): its belief interval ends now."""
        now = self.loop.time()
        self.grants = [(a, min(b, now) if (h, t) == (g.holder, g.token) else b, h, t)
                       for a, b, h, t in self.grants]

    def overlap(self) -> bool:
        """Two sessions believed they held RES at one instant (the lab checker's check 1)."""
        g = sorted(self.grants)
        return any(b[0] < a[1] and a[2] != b[2] for i, a in enumerate(g) for b in g[i + 1:])

    def tokens_rise(self) -> bool:
        """Tokens of successive acquisitions by different holders strictly increase."""
        firsts = [t for i, (_, _, h, t) in enumerate(self.grants)
                  if i == 0 or self.grants[i - 1][2] != h or self.grants[i - 1][3] != t]
        return all(a < b for a, b in zip(firsts, firsts[1:]))

    async def close(self) -> None:
        for n in self.voters + self.others:
            await n.claims.stop()


def run(tmp: Path, scenario: Callable[[Lab], Awaitable[Any]], mutant: str | None = None,
        others: int = 3) -> Any:
    async def main() -> Any:
        lab = Lab(tmp, mutant, others)
        await asyncio.sleep(QUARANTINE)          # voters sit out after their first start too
        try:
            return await scenario(lab)
        finally:
            await lab.close()
    return simclock.run(main, real_budget=30.0)


# --- the basics -------------------------------------------------------------------------------

def test_a_claim_is_granted_by_three_voters_and_busy_names_the_holder(tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> None:
        p, q = lab.others[0], lab.others[1]
        g = await p.acquire("s1")
        assert (g.resource, g.holder, g.scope, g.ttl) == (RES, "s1", "mesh", TTL)
        assert g.token > 0
        assert gamma(CFG.claim_drift) * TTL - 0.1 < g.valid_for < gamma(CFG.claim_drift) * TTL
        v = g.view()
        assert v["token"] == g.token and v["expires_at"].endswith("Z")
        with pytest.raises(ClaimBusy) as busy:
            await q.acquire("s2")
        assert busy.value.holder == "s1" and 0 < busy.value.expires_in <= TTL
        assert "s1" in str(busy.value) and busy.value.code == "claim_busy"
        # A voter proposes too (its own acceptor answers locally).
        g2 = await lab.voters[0].acquire("s3", resource="other")
        assert g2.token > 0                              # (tokens are per resource)
        seen = await q.claims.holder(RES)
        assert seen is not None and (seen.holder, seen.token) == ("s1", g.token)
        assert [x.resource for x in await q.claims.list()] == ["other", RES]
        assert [(x.holder, x.token) for x in await q.claims.list("task/")] == [("s1", g.token)]
    run(tmp_path, scenario)


def test_release_frees_at_once_and_the_next_token_is_higher(tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> None:
        p, q = lab.others[0], lab.others[1]
        g = await p.acquire("s1")
        assert not await p.claims.release(RES, "s1", g.token + 1)     # exact token only
        assert await p.release(g)
        g2 = await q.acquire("s2")
        assert g2.token > g.token
        assert await q.claims.holder(RES) is not None
        with pytest.raises(LeaseLost):
            await p.claims.renew(RES, "s1", g.token)
        q.claims.session_gone("s2")                     # its own unregister: freed now
        await asyncio.sleep(0.2)
        assert await q.claims.holder(RES) is None
        assert (await p.acquire("s1")).token > g2.token
    run(tmp_path, scenario)


def test_a_lease_not_renewed_lapses_at_its_ttl_and_a_renewed_one_keeps_its_token(
        tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> None:
        p, q = lab.others[0], lab.others[1]
        lost: list[tuple[Grant, str]] = []
        p.claims.on_lost = lambda g, why: lost.append((g, why))
        g = await p.acquire("s1")
        await asyncio.sleep(3 * TTL)                    # renewed in the background
        assert p.claims._held[RES].token == g.token
        with pytest.raises(ClaimBusy):
            await q.acquire("s2")
        r = await p.claims.renew(RES, "s1", g.token)
        assert r.token == g.token and r.valid_for > g.valid_for - 0.5
        p.alive.discard("s1")                           # not registered here any more
        t0 = lab.loop.time()
        g2 = await q.acquire("s2", wait=2 * TTL)        # granted once it lapsed
        waited = lab.loop.time() - t0
        assert TTL / 3 < waited <= TTL + 1.5 and g2.token > g.token
        assert lost and lost[0][0].token == g.token and lost[0][1] == "expired"
        assert not lab.overlap() and lab.tokens_rise()
    run(tmp_path, scenario)


def test_tokens_strictly_increase_across_holders_and_daemons(tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> None:
        nodes = lab.others + lab.voters
        for i in range(12):
            n = nodes[i % len(nodes)]
            g = await n.acquire(f"s{i}", ttl=2.0, wait=5.0)
            assert await n.release(g)
        assert lab.tokens_rise() and not lab.overlap()
        assert len({t for *_, t in lab.grants}) == 12
    run(tmp_path, scenario)


def test_requests_and_voter_lists_are_checked(tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> None:
        g = await lab.others[0].acquire("s1", ttl=CFG.claim_max_ttl + 100)
        assert g.ttl == CFG.claim_max_ttl                # lowered to the bound, and said
        for bad in (0, -1, float("nan"), float("inf"), "5", True):
            with pytest.raises(InvalidArgument):
                await lab.others[0].acquire("s2", ttl=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await lab.others[0].acquire("", ttl=1)
    run(tmp_path, scenario)
    for bad in ([], VOTERS[:2], VOTERS + ("10.0.0.9:1",), (VOTERS[0],) * 3, ("nohost",)):
        with pytest.raises(InvalidArgument):
            check_voters(bad)
    assert check_voters(VOTERS) == VOTERS and check_voters(VOTERS[:1]) == VOTERS[:1]


# --- partitions -------------------------------------------------------------------------------

async def _minority_scenario(lab: Lab) -> dict[str, Any]:
    """P and voter 3 are cut off from Q, R and voters 1, 2 while P holds the lease."""
    p, q, r = lab.others
    v1, v2, v3 = (v.addr for v in lab.voters)
    g = await p.acquire("s1")
    lab.net.partition([p.addr, v3], [q.addr, r.addr, v1, v2])
    out: dict[str, Any] = {"minority": None, "majority_wait": None}
    try:                                       # the minority side: nobody may be granted
        await p.acquire("s3", resource="else")
        out["minority"] = "granted"
    except NoQuorum as exc:
        out["minority"] = str(exc)
    try:                                       # ... even the held resource, to another
        await lab.others[0].claims.acquire(RES, "s4", TTL)
        lab.record(Grant(RES, "s4", 0, TTL, TTL, "mesh"))
    except (NoQuorum, ClaimBusy):
        pass
    t0 = lab.loop.time()
    g2 = await q.acquire("s2", wait=3 * TTL)
    out["majority_wait"] = lab.loop.time() - t0
    out["tokens"] = (g.token, g2.token)
    return out


def test_a_minority_cannot_grant_and_the_majority_grants_after_the_ttl(tmp_path: Path) -> None:
    out = run(tmp_path, _minority_scenario)
    assert "no majority" in out["minority"] and "10.0.0.3:7747" in out["minority"]
    assert out["majority_wait"] <= TTL + 2 * CFG.claim_timeout + 1.0
    assert out["tokens"][1] > out["tokens"][0]

    async def checked(lab: Lab) -> None:
        await _minority_scenario(lab)
        assert not lab.overlap()
    run(tmp_path / "again", checked)


def test_mutant_no_majority_grants_on_a_minority(tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> bool:
        await _minority_scenario(lab)
        return lab.overlap()
    assert run(tmp_path, scenario, mutant="no-majority")     # two holders at once


# --- restarts ---------------------------------------------------------------------------------

async def _restart_scenario(lab: Lab) -> dict[str, Any]:
    """P's lease was accepted by voters 1 and 2 only (3 cut from P); voter 1 restarts
    and Q, cut from voter 2, asks voters 1 and 3: inside the quarantine, then after."""
    p, q, _ = lab.others
    v1, v2, v3 = lab.voters
    lab.net.cut(p.addr, v3.addr)
    for i in range(4):                       # P's ballots climb; voter 3 never sees them
        await p.release(await p.acquire(f"s0.{i}"))
    g = await p.acquire("s1")
    await v1.restart()
    lab.net.cut(q.addr, v2.addr)
    out: dict[str, Any] = {"inside": None, "tokens": [g.token]}
    q.claims.counters.clear()
    try:
        g2 = await q.acquire("s2")
        out["inside"] = "granted"
        out["tokens"].append(g2.token)
    except (NoQuorum, ClaimBusy) as exc:
        out["inside"] = type(exc).__name__
    p.alive.discard("s1")                    # P stops renewing: it lapses
    q.alive.discard("s2")                    # (granted only by a broken build)
    await asyncio.sleep(CFG.claim_max_ttl + CFG.claim_timeout)
    g3 = await q.acquire("s3", wait=2 * TTL)
    out["tokens"].append(g3.token)
    return out


def test_a_restarted_voter_sits_out_its_quarantine_and_tokens_still_rise(tmp_path: Path
                                                                          ) -> None:
    async def scenario(lab: Lab) -> dict[str, Any]:
        out = await _restart_scenario(lab)
        assert not lab.overlap() and lab.tokens_rise()
        assert lab.voters[0].claims.acceptor.counters.get("reject.quarantine", 0) >= 1
        return out
    out = run(tmp_path, scenario)
    assert out["inside"] == "NoQuorum"
    assert out["tokens"][-1] > out["tokens"][0]


def test_mutant_no_quarantine_gives_two_holders(tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> bool:
        out = await _restart_scenario(lab)
        return out["inside"] == "granted" and lab.overlap()
    assert run(tmp_path, scenario, mutant="no-quarantine")


async def _all_voters_restart(lab: Lab) -> list[int]:
    """Tokens issued before and after every voter restarts, the later one asked for by a
    daemon that never proposed before (its counter starts low)."""
    p = lab.others[0]
    for i in range(5):
        g = await p.acquire(f"s{i}")
        await p.release(g)
    for v in lab.voters:
        await v.restart()
    await asyncio.sleep(CFG.claim_max_ttl + 2 * CFG.claim_timeout)
    fresh = Node(lab, "10.0.2.1:7747", "newcomer")
    g = await fresh.acquire("late", wait=2.0)
    await fresh.claims.stop()
    return [t for *_, t in lab.grants]


def test_tokens_rise_when_every_voter_restarts(tmp_path: Path) -> None:
    tokens = run(tmp_path, _all_voters_restart)
    assert all(a < b for a, b in zip(tokens, tokens[1:])), tokens
    assert tokens[-1] > FLOOR_BLOCK                   # it learnt the floor from a reject


def test_mutant_no_floor_lets_tokens_go_backwards(tmp_path: Path) -> None:
    tokens = run(tmp_path, _all_voters_restart, mutant="no-floor")
    assert tokens[-1] <= tokens[-2], tokens


def test_one_restarted_voter_without_floor_lets_a_low_ballot_win(tmp_path: Path) -> None:
    """The notes' case: one restart among three voters, a proposer at a low counter."""
    async def scenario(lab: Lab) -> list[int]:
        out = await _restart_scenario(lab)
        return out["tokens"]
    sound = run(tmp_path / "sound", scenario)
    assert sound[-1] > sound[0]
    broken = run(tmp_path / "broken", scenario, mutant="no-floor")
    assert broken[-1] < broken[0], broken              # q's counter is low: token went back


# --- duplicated and delayed frames ------------------------------------------------------------

async def _duplicates(lab: Lab) -> str:
    """Only voter 1 is reachable from P, and every frame it sends arrives three times."""
    p = lab.others[0]
    v1 = lab.voters[0]
    for v in lab.voters[1:]:
        lab.net.cut(p.addr, v.addr)
    send = v1.transport.send

    def thrice(addr: str, ftype: FrameType, body: dict[str, Any]) -> bool:
        return all([send(addr, ftype, body) for _ in range(3)])
    v1.transport.send = thrice                          # type: ignore[method-assign]
    try:
        await p.acquire("s1")
        return "granted"
    except NoQuorum:
        return "no quorum"


def test_duplicated_answers_do_not_make_a_quorum(tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> tuple[str, dict[str, int]]:
        out = await _duplicates(lab)
        return out, dict(lab.others[0].claims.counters)
    out, counters = run(tmp_path, scenario)
    assert out == "no quorum" and counters["reply.duplicate"] >= 2


def test_mutant_count_messages_is_fooled_by_duplicates(tmp_path: Path) -> None:
    assert run(tmp_path, _duplicates, mutant="count-messages") == "granted"


def test_answers_for_an_old_ballot_are_dropped(tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> dict[str, int]:
        p, q = lab.others[0], lab.others[1]
        v3 = lab.voters[2]
        v3.transport.pause()                            # its answers come late
        g = await p.acquire("s1")
        assert await p.release(g)
        await q.acquire("s2")
        v3.transport.resume()                           # now, for rounds long over
        await asyncio.sleep(0.1)
        assert not lab.overlap()
        return dict(p.claims.counters) | dict(q.claims.counters)
    counters = run(tmp_path, scenario)
    assert counters.get("reply.stale", 0) >= 2


def test_hostile_frames_are_dropped_and_counted(tmp_path: Path) -> None:
    from meshd.wire.peer import encode

    async def scenario(lab: Lab) -> dict[str, int]:
        v1 = lab.voters[0]
        src = lab.others[0].transport
        bad = [
            {"resource": "r", "ballot": -1},
            {"resource": "r", "ballot": 2**63},
            {"resource": "", "ballot": 1},
            {"resource": "x" * 5000, "ballot": 1},
            {"resource": "r", "ballot": True},
        ]
        for body in bad:
            src.send_frame(v1.addr, encode(FrameType.LEASE_PREPARE, "node0", src.address, body))
        src.send_frame(v1.addr, encode(FrameType.LEASE_ACCEPT, "node0", src.address, {
            "resource": "r", "ballot": 5, "owner": "s", "token": 5, "ttl": float("nan")}))
        src.send_frame(v1.addr, encode(FrameType.LEASE_PROMISE, "node0", src.address, {
            "resource": "r", "ballot": 5, "acceptor": "10.9.9.9:1", "lease": ["s", 1]}))
        await asyncio.sleep(0.1)
        return dict(v1.transport.counters)
    counters = run(tmp_path, scenario)
    assert counters["frames_dropped"] == 7 and counters.get("frames_handled", 0) == 0


def test_a_full_acceptor_refuses_new_resources(tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> None:
        for v in lab.voters:
            v.claims.config = v.claims.acceptor.config = CFG.with_(claim_max_resources=2)
        p = lab.others[0]
        await p.acquire("s1", resource="a")
        await p.acquire("s1", resource="b")
        with pytest.raises(NoQuorum) as exc:
            await p.acquire("s1", resource="c")
        assert "full" in str(exc.value)
    run(tmp_path, scenario)


# --- host scope (no voters) -------------------------------------------------------------------

def test_host_claims_grant_only_local_sessions_lapse_and_keep_tokens_across_restarts(
        tmp_path: Path) -> None:
    from meshd.mesh.claims import HostClaims

    async def main() -> None:
        loop = asyncio.get_running_loop()
        cfg = Config.lan(claim_max_ttl=10.0)
        local = {"a", "b"}

        def make() -> HostClaims:
            h = HostClaims(cfg, None, local.__contains__, clock=loop.time,
                           floor_path=tmp_path / "claims-host.floor")
            h.start()
            return h
        h = make()
        g = await h.acquire(RES, "a", 3.0)
        assert (g.scope, g.holder, g.valid_for) == ("host", "a", 3.0)
        with pytest.raises(ClaimBusy) as busy:
            await h.acquire(RES, "b", 3.0)
        assert busy.value.holder == "a"
        with pytest.raises(InvalidArgument) as other:
            await h.acquire("x", "elsewhere", 3.0)
        assert "--voters" in str(other.value)
        await asyncio.sleep(10.0)                      # renewed while "a" is registered
        assert (await h.renew(RES, "a", g.token)).token == g.token
        local.discard("a")
        g2 = await h.acquire(RES, "b", 3.0, wait=5.0)  # lapses within its TTL
        assert g2.token > g.token
        assert [x.holder for x in await h.list()] == ["b"]
        with pytest.raises(LeaseLost):
            await h.renew(RES, "a", g.token)
        assert await h.release(RES, "b", g2.token) and await h.holder(RES) is None
        await h.stop()
        h = make()                                     # a restart: tokens go on rising
        g3 = await h.acquire(RES, "b", 3.0)
        assert g3.token > g2.token
        h.session_gone("b")
        assert await h.holder(RES) is None
        await h.stop()
    simclock.run(main, real_budget=10.0)


def test_idle_resources_are_forgotten_without_lowering_a_promise(tmp_path: Path) -> None:
    async def scenario(lab: Lab) -> None:
        p = lab.others[0]
        g = await p.acquire("s1", ttl=1.0)
        await p.release(g)
        acc = lab.voters[0].claims.acceptor
        assert acc is not None and RES in acc.slots
        promised = acc.slots[RES].promised
        await asyncio.sleep(2 * 60.0 + 1)               # idle past IDLE_SLOT: collected
        assert RES not in acc.slots and acc.base >= promised
        assert acc.on_prepare(RES, promised, "someone")[0] == "reject"
        assert (await p.acquire("s2")).token > g.token
    run(tmp_path, scenario)


def test_the_mutant_switch_is_read_from_the_environment_and_checked() -> None:
    from meshd.mesh.paxoslease import MUTANTS, read_mutant
    assert read_mutant({}) is None
    assert {read_mutant({"MESHD_CLAIMS_MUTANT": m}) for m in MUTANTS} == set(MUTANTS)
    with pytest.raises(InvalidArgument):
        read_mutant({"MESHD_CLAIMS_MUTANT": "nonsense"})
