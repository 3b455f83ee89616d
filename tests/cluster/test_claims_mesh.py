"""Claims granted by a majority of three voter daemons on loopback (scope "mesh"): one
holder at a time across hosts, tokens that only rise, and a dead holder's host does not
free the lease before its TTL, after which the surviving majority grants it again.
The safety proof under partitions, pauses and restarts is the lab's history check
(tests/lab/test_claims_lab.py)."""

from __future__ import annotations

import socket
import time

import pytest

from support.daemons import eventually
from sessions import ClaimBusy, Claims

pytestmark = pytest.mark.slow


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def voters(make_daemon):
    """Three daemons, each a voter, on 127.0.0.4x with fixed ports (the voter list must be
    known before they start); they wait out the voters' start-up quarantine."""
    addrs = [f"127.0.0.{41 + i}:{_free_port(f'127.0.0.{41 + i}')}" for i in range(3)]
    nodes = []
    for i, addr in enumerate(addrs):
        args = ["--bind", addr, "--voters", ",".join(addrs)]
        if i:
            args += ["--join", addrs[0]]
        nodes.append(make_daemon(f"v{i}", args=args))
    for i, d in enumerate(nodes):
        d.registry().register(f"agent-{i}", f"agent-{i}", "test")

    def grants() -> bool:
        try:
            lease = Claims(socket=nodes[0].socket, timeout=5).acquire("warm-up", "agent-0", ttl=2)
        except Exception:
            return False
        Claims(socket=nodes[0].socket).release(lease)
        return True

    eventually(grants, timeout=30, interval=0.25, message="the voters grant (quarantine over)")
    return nodes


def test_one_holder_across_hosts_and_tokens_rise(voters):
    a, b, c = (Claims(socket=d.socket, timeout=5) for d in voters)
    first = a.acquire("build/main", "agent-0", ttl=5)
    assert first.scope == "mesh"
    with pytest.raises(ClaimBusy) as busy:
        b.acquire("build/main", "agent-1", ttl=5)
    assert "agent-0" in str(busy.value)
    assert c.holder("build/main").holder == "agent-0"
    assert a.release(first)
    second = b.acquire("build/main", "agent-1", ttl=5, wait=5)
    assert second.token > first.token
    third_wait_start = time.monotonic()
    b.release(second)
    third = c.acquire("build/main", "agent-2", ttl=5, wait=5)
    assert third.token > second.token and time.monotonic() - third_wait_start < 5


def test_a_killed_holders_lease_lapses_at_its_ttl_and_the_majority_grants_again(voters):
    holder_daemon = voters[2]
    Claims(socket=holder_daemon.socket, timeout=5).acquire("job/7", "agent-2", ttl=3)
    t_kill = time.monotonic()
    holder_daemon.kill9()
    b = Claims(socket=voters[1].socket, timeout=10)
    with pytest.raises(ClaimBusy):                      # not before its TTL (SWIM's verdict
        b.acquire("job/7", "agent-1", ttl=3)            # does not free it)
    lease = b.acquire("job/7", "agent-1", ttl=3, wait=15)
    took = time.monotonic() - t_kill
    assert lease.holder == "agent-1" and took < 3 + 10, took
