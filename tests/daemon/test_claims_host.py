"""Claims with no voters configured: this host's daemon grants, for its own sessions
(scope "host"), through the SDK, its asyncio twin and the CLI."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from support.daemons import eventually, run_cli
from sessions import ClaimBusy, Claims, InvalidArgument, LeaseLost
from sessions.claims import AsyncClaims


def _register(daemon, *sids: str) -> None:
    reg = daemon.registry()
    for sid in sids:
        reg.register(sid, sid, "test")


def test_a_claim_is_exclusive_names_its_holder_and_its_token_rises(daemon):
    _register(daemon, "alice-7", "bob-9")
    claims = Claims(socket=daemon.socket)
    first = claims.acquire("task/1", "alice-7", ttl=30)
    assert first.scope == "host" and first.holder == "alice-7" and first.valid
    assert 0 < first.remaining <= 30
    with pytest.raises(ClaimBusy) as busy:
        claims.acquire("task/1", "bob-9", ttl=30)
    assert "alice-7" in str(busy.value)                   # names the holder
    assert claims.holder("task/1").holder == "alice-7"
    assert [c.resource for c in claims.list("task/")] == ["task/1"]
    assert claims.release(first) is True
    assert claims.holder("task/1") is None
    second = claims.acquire("task/1", "bob-9", ttl=30)
    assert second.token > first.token
    assert claims.release(first) is False                 # an old lease frees nothing
    assert claims.holder("task/1").holder == "bob-9"


def test_a_lease_lapses_at_its_ttl_and_a_waiting_acquire_gets_it(daemon):
    _register(daemon, "a", "b")
    claims = Claims(socket=daemon.socket)
    first = claims.acquire("r", "a", ttl=1.0)
    t0 = time.monotonic()
    # The holder's daemon renews while "a" is registered: unregister it, so it lapses
    # (its own unregister frees it at once).
    daemon.registry().unregister("a")
    second = claims.acquire("r", "b", ttl=1.0, wait=5)
    assert second.token > first.token
    assert time.monotonic() - t0 < 5


def test_a_lease_not_renewed_lapses_at_its_ttl(daemon):
    """Nothing but a release or the holder's unregister frees a lease early; a lease its
    daemon stops renewing (the holder's session is gone from the registry there) lapses at
    its TTL, and a waiting acquire gets the resource then."""
    _register(daemon, "a", "b")
    claims = Claims(socket=daemon.socket)
    first = claims.acquire("r2", "a", ttl=1.5)
    with pytest.raises(ClaimBusy):
        claims.acquire("r2", "b", ttl=1.5)
    renewed = claims.renew(first)
    assert renewed.token == first.token                   # renewals keep the token
    claims.release(renewed)
    assert claims.acquire("r2", "b", ttl=1.5).token > first.token


def test_a_claim_for_another_hosts_session_says_how_to_configure_voters(daemon):
    claims = Claims(socket=daemon.socket)
    with pytest.raises(InvalidArgument) as err:
        claims.acquire("r", "nobody-here", ttl=5)
    assert "--voters" in str(err.value)


def test_tokens_never_go_backwards_across_a_restart(daemon):
    _register(daemon, "a")
    claims = Claims(socket=daemon.socket)
    tokens = []
    for _ in range(3):
        lease = claims.acquire("r", "a", ttl=30)
        tokens.append(lease.token)
        claims.release(lease)
    daemon.restart()
    _register(daemon, "a")
    after = Claims(socket=daemon.socket).acquire("r", "a", ttl=30)
    assert tokens == sorted(set(tokens)) and after.token > tokens[-1]


def test_hold_renews_past_the_ttl_and_releases_at_the_end(daemon):
    _register(daemon, "a", "b")
    claims = Claims(socket=daemon.socket)
    with claims.hold("job", "a", ttl=1.0) as held:
        token = held.token
        deadline = time.monotonic() + 2.5                  # past two TTLs
        while time.monotonic() < deadline:
            held.check()
            time.sleep(0.05)
        assert claims.holder("job").token == token
    assert claims.holder("job") is None
    assert claims.acquire("job", "b", ttl=5).token > token


def test_hold_tells_the_holder_at_once_when_the_lease_is_taken_away(daemon):
    """Released behind the holder's back (as a stale holder would find after a partition):
    the next renewal fails and the callback hears of it; without a callback LeaseLost is
    raised in the block's own thread."""
    _register(daemon, "a")
    claims = Claims(socket=daemon.socket)
    told: list[str] = []
    with claims.hold("job2", "a", ttl=1.0, on_lost=lambda lease, why: told.append(why)) as held:
        assert claims.release(held.lease)
        eventually(lambda: held.lost.is_set(), timeout=5, message="the loss reported")
        with pytest.raises(LeaseLost):
            held.check()
    assert told
    stopped = threading.Event()
    with pytest.raises(LeaseLost):
        with claims.hold("job3", "a", ttl=1.0) as held:
            claims.release(held.lease)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:             # busy Python code: interrupted
                sum(range(1000))
            stopped.set()
    assert not stopped.is_set()


def test_the_asyncio_twin(daemon):
    _register(daemon, "a", "b")

    async def main() -> None:
        claims = AsyncClaims(socket=daemon.socket)
        try:
            lease = await claims.acquire("x", "a", ttl=30)
            with pytest.raises(ClaimBusy):
                await claims.acquire("x", "b", ttl=30)
            assert (await claims.holder("x")).token == lease.token
            assert await claims.release(lease)
            async with claims.hold("y", "b", ttl=1.0) as held:
                await asyncio.sleep(1.5)
                held.check()
            assert await claims.list() == []
        finally:
            await claims.close()

    asyncio.run(main())


def test_the_cli(daemon):
    _register(daemon, "a", "other-agent")
    env = daemon.env()
    r = run_cli(["claim", "deploy/prod", "--session", "a", "--ttl", "30", "--json"], env)
    assert r.returncode == 0, r.stderr
    token = json.loads(r.stdout)["token"]
    r = run_cli(["claims", "--json"], env)
    assert [c["resource"] for c in json.loads(r.stdout)] == ["deploy/prod"]
    r = run_cli(["claim", "deploy/prod", "--session", "other-agent"], env)
    assert r.returncode == 1 and "held by session 'a'" in r.stderr, r.stderr
    r = run_cli(["release", "deploy/prod", "--session", "a"], env)
    assert r.returncode == 0, r.stderr
    r = run_cli(["claims"], env)
    assert "No claims" in r.stdout
    assert token > 0
