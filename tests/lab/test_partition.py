"""A real network partition: daemons on separate hosts (network namespaces joined by a
bridge, see support/netlab.py), one host's cable pulled and plugged back. Both sides go on
working; after healing, everything written or sent on either side is everywhere, once.
Needs root (CI runs as root); skipped with the reason otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from support import netlab
from support.daemons import Daemon, eventually, peer_states, wait_converged
from support.mesh import wait_same_state

REASON = netlab.skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture
def lab3() -> Iterator[netlab.Lab]:
    lab = netlab.Lab(3)
    try:
        yield lab
    finally:
        lab.close()


def start_hosts(lab: netlab.Lab, tmp: Path, nodes: list[Daemon]) -> None:
    """Start a daemon on every host; each goes into `nodes` as soon as it exists, so the
    caller stops it even if a later one fails to start."""
    for i, ns in enumerate(lab.hosts):
        args = ["--bind", f"{lab.address(i)}:7747"]
        if i:
            args += ["--join", f"{lab.address(0)}:7747"]
        d = Daemon(socket=str(tmp / f"h{i}.sock"), data_dir=str(tmp / f"h{i}-data"),
                   log_path=str(tmp / f"h{i}.log"), args=args,
                   wrap=["ip", "netns", "exec", ns])
        nodes.append(d)
        d.start()


def test_a_partitioned_host_is_declared_dead_and_catches_up_after_healing(lab3, short_tmp):
    nodes: list[Daemon] = []
    try:
        start_hosts(lab3, short_tmp, nodes)
        wait_converged(nodes)
        for i, d in enumerate(nodes):
            d.registry().register(f"s{i}", f"S{i}", "claude")
        for d in nodes:
            eventually(lambda d=d: len(d.registry().list_sessions()) == 3, timeout=15,
                       message="sessions replicated")
        lab3.cut(2)
        for d in nodes[:2]:
            eventually(lambda d=d: peer_states(d).get(nodes[2].node_id) == "dead",
                       timeout=20, message="the cut-off host declared dead")
        eventually(lambda: set(peer_states(nodes[2]).values()) == {"dead"}, timeout=20,
                   message="the cut-off host seeing the others dead")
        assert nodes[0].registry().get("s2").status.value == "offline"
        # Both sides keep working while cut off.
        nodes[0].memory().set("s0", "during-0", "majority")
        nodes[2].memory().set("s2", "during-2", "minority")
        msg = nodes[0].hub().send("s0", "s2", "request", "across the cut", "x")
        assert nodes[0].hub().get_message_status(msg.message_id)["state"] == "queued"
        lab3.heal(2)
        wait_converged(nodes, timeout=30)
        eventually(lambda: nodes[2].memory().get("during-0") == "majority", timeout=20,
                   message="majority write on the healed host")
        eventually(lambda: nodes[0].memory().get("during-2") == "minority", timeout=20,
                   message="minority write on the majority")
        eventually(lambda: [m.subject for m in nodes[2].hub().get_messages("s2")]
                   == ["across the cut"], timeout=20, message="the queued message, once")
        eventually(lambda: nodes[0].hub().get_message_status(msg.message_id)["state"]
                   == "stored", timeout=20, message="its receipt")
        assert nodes[0].registry().get("s2").status.value == "active"
        wait_same_state(nodes)
    finally:
        for d in nodes:
            d.stop(timeout=10)
