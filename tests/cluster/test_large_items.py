"""The largest write a client may make still crosses the mesh, and does not block what
comes after it: a message or memory value just under the request limit becomes a peer
frame a little over it (stamps, origin, frame fields), which peers must send and accept.
Real daemons on loopback, `eventually` waits."""

from __future__ import annotations

from typing import Any, Callable

from support.daemons import Daemon, eventually, peer_states, wait_converged

from sessions import TooLarge

MIB = 1024 * 1024


def largest_accepted(write: Callable[[int], Any], start: int, step: int = 64,
                     tries: int = 64) -> tuple[int, Any]:
    """Call write(size) from `start` down by `step` until the daemon takes it: the size
    and the result. Bounded: fails the test if none of `tries` sizes is accepted."""
    for i in range(tries):
        size = start - i * step
        try:
            return size, write(size)
        except TooLarge:
            continue
    raise AssertionError(f"no write between {start - tries * step} and {start} was accepted")


def two_hosts(make_cluster: Callable[..., list[Daemon]], a: str, b: str) -> list[Daemon]:
    """Two converged daemons, session `a` on node 0 and `b` on node 1, both known to node 0."""
    nodes = make_cluster(2)
    wait_converged(nodes)
    nodes[0].registry().register(a, a.upper(), "claude")
    nodes[1].registry().register(b, b.upper(), "claude")
    eventually(lambda: nodes[0].registry().get(b) is not None, timeout=15,
               message=f"{b} known on node 0")
    return nodes


def test_largest_message_routes_and_later_ones_follow(make_cluster):
    nodes = two_hosts(make_cluster, "big-a", "big-b")
    hub0, hub1 = nodes[0].hub(timeout=10), nodes[1].hub(timeout=10)
    size, big = largest_accepted(
        lambda n: hub0.send("big-a", "big-b", "notification", "big", "x" * n), MIB)
    assert size > MIB - 4096            # as large as the request limit allows
    hub0.send("big-a", "big-b", "notification", "after", "small")
    eventually(lambda: [m.subject for m in hub1.get_messages("big-b")] == ["big", "after"],
               timeout=15, message="the big message and the next one on b's host, in order")
    got = hub1.get_messages("big-b")[0]
    assert got.message_id == big.message_id and len(got.body) == size
    eventually(lambda: hub0.get_message_status(big.message_id)["state"] == "stored",
               timeout=10, message="receipt of the big message: stored")
    counters = nodes[0].registry().node_info()["mesh"]["transport"]["counters"]
    assert counters.get("dropped.too_large_out", 0) == 0


def test_largest_memory_value_replicates_and_later_ones_follow(make_cluster):
    nodes: list[Daemon] = make_cluster(2)
    wait_converged(nodes)
    mem0, mem1 = nodes[0].memory(timeout=10), nodes[1].memory(timeout=10)
    size, _ = largest_accepted(lambda n: mem0.set("writer", "big-key", "v" * n), MIB)
    assert size > MIB - 4096
    mem0.set("writer", "after-key", "small")
    eventually(lambda: mem1.get("after-key") == "small", timeout=15,
               message="the set made after the big one, on node 1")
    assert len(mem1.get("big-key") or "") == size
    repl = nodes[0].registry().node_info()["mesh"]["replication"]["counters"]
    assert repl.get("dropped.record_too_large", 0) == 0


def test_big_messages_for_a_host_that_is_down_wait_on_disk_not_in_memory(make_cluster):
    nodes = two_hosts(make_cluster, "mem-a", "mem-b")
    nodes[1].stop()
    eventually(lambda: peer_states(nodes[0]).get(nodes[1].node_id) in ("dead", "left"),
               timeout=15, message="node 1 seen gone")
    hub0 = nodes[0].hub(timeout=10)
    body = "y" * (256 * 1024)
    for i in range(64):                                   # 16 MiB of bodies
        hub0.send("mem-a", "mem-b", "notification", f"big-{i}", body)

    def routing() -> dict[str, Any]:
        return nodes[0].registry().node_info()["mesh"]["routing"]

    eventually(lambda: sum(q["items"] for q in routing()["outbox"]) == 64, timeout=10,
               message="all 64 folded into node 0's outbox")
    assert routing()["cached_bytes"] == 0                # on disk only
    nodes[1].start()
    hub1 = nodes[1].hub(timeout=10)
    eventually(lambda: len(hub1.get_messages("mem-b")) == 64, timeout=30,
               message="all 64 delivered once node 1 is back")
    assert [m.subject for m in hub1.get_messages("mem-b")] == [f"big-{i}" for i in range(64)]
