"""Session tombstones (left by `clear_offline`) are garbage-collected once every member's
version vector holds them: real daemons on loopback (fast preset: tombstones older than
2 s, checked every second), their SQLite files read once each daemon has stopped (a
running daemon holds its database exclusively). A collected session never comes back,
also not from a node that was down with a stale copy, and its id can be registered
again. Every wait is bounded."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from support.daemons import Daemon, eventually, peer_states, wait_converged
from meshd.state.outbox import Outbox
from meshd.state.commands import Commands
from meshd.state import Store, replication
from meshd.wire import records
from meshd.wire.ipc import validate_args

#: tombstone_min_age + 3 x tombstone_gc_interval of the test preset, and a margin.
GC_ROUNDS = 2.0 + 3 * 1.0 + 1.0


def collected(d: Daemon) -> int:
    """The daemon's count of session tombstones collected since it started."""
    counters = d.registry(timeout=5).node_info()["mesh"]["replication"]["counters"]
    return int(counters.get("session_tombstones_collected", 0))


def listed(d: Daemon) -> dict[str, Any]:
    """session_id -> session, offline ones included, as daemon `d` lists them."""
    return {s.session_id: s for s in d.registry(timeout=5).list_sessions(include_offline=True)}


def db_rows(d: Daemon, ids: list[str]) -> list[tuple[Any, ...]]:
    """Rows of `sessions` and `session_caps` for `ids` in the stopped daemon's database."""
    assert not d.alive(), "a running daemon holds its database exclusively"
    conn = sqlite3.connect(f"file:{Path(d.data_dir) / 'meshd.db'}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(ids))
        return (conn.execute(f"SELECT 'session', session_id, deleted FROM sessions "
                             f"WHERE session_id IN ({marks})", ids).fetchall()
                + conn.execute(f"SELECT 'cap', session_id, capability FROM session_caps "
                               f"WHERE session_id IN ({marks})", ids).fetchall())
    finally:
        conn.close()


def consistently(pred: Callable[[], bool], duration: float, message: str) -> None:
    """Poll `pred` for `duration` seconds: it must hold every time (the check that
    something does NOT happen within the time it would take)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert pred(), f"{message} stopped holding"
        time.sleep(0.1)


def check_files_clean(nodes: list[Daemon], ids: list[str]) -> None:
    """Stop each node in turn, check its file has no row for `ids`, start it again."""
    for d in nodes:
        d.stop()
        assert db_rows(d, ids) == [], f"rows left in {d.data_dir}"
        d.start()
    wait_converged(nodes)


def test_cleared_sessions_are_collected_everywhere_and_can_come_again(make_cluster):
    nodes = make_cluster(3)
    wait_converged(nodes)
    ids = ["gc-a", "gc-b", "gc-c"]
    for d, sid in zip(nodes, ids):
        d.registry().register(sid, sid.upper(), "claude", capabilities=["x"])
    for d, sid in zip(nodes, ids):
        d.registry().unregister(sid)
    for d in nodes:
        eventually(lambda d=d: all(listed(d)[s].status.value == "offline" for s in ids),
                   timeout=15, message="every session offline on every node")
    assert nodes[1].registry().clear_offline() == 3
    for d in nodes:
        eventually(lambda d=d: not set(ids) & set(listed(d)), timeout=15,
                   message="the cleared sessions gone from every list")
        eventually(lambda d=d: collected(d) == 3, timeout=30,
                   message="three session tombstones collected on every node")
    check_files_clean(nodes, ids)
    consistently(lambda: all(not set(ids) & set(listed(d)) for d in nodes), GC_ROUNDS,
                 "no collected session back after restarts")
    # The same id registered again is a new session, replicated as usual.
    nodes[2].registry().register("gc-a", "Again", "gpt", capabilities=["y"])
    for d in nodes:
        eventually(lambda d=d: [(s.agent_name, s.host, s.status.value) for s in
                                d.registry().find_sessions(capability="y")]
                   == [("Again", nodes[2].node_id, "active")], timeout=15,
                   message="the re-registered session on every node")
    # ... and cleared again, collected again.
    nodes[2].registry().unregister("gc-a")
    eventually(lambda: listed(nodes[0])["gc-a"].status.value == "offline", timeout=15,
               message="the re-registered session offline on node 0")
    assert nodes[0].registry().clear_offline() == 1
    for d in nodes:
        eventually(lambda d=d: collected(d) >= 1 and "gc-a" not in listed(d), timeout=30,
                   message="the second tombstone collected on every node")
    check_files_clean(nodes, ["gc-a"])


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_member_that_is_down_holds_back_what_it_lacks(make_cluster, how):
    """A member that left or died counts with the last version vector it sent: a
    tombstone it held is collected, one made while it was down waits for it, and its
    stale copy of that session does not come back when it returns."""
    nodes = make_cluster(3)
    n0, n1, n2 = nodes
    wait_converged(nodes)
    n0.registry().register("early", "Early", "claude")
    n0.registry().register("late", "Late", "claude")
    for d in nodes:
        eventually(lambda d=d: {"early", "late"} <= set(listed(d)), timeout=15,
                   message="both sessions on every node")
    n0.registry().unregister("early")
    assert n0.registry().clear_offline() == 1
    for d in nodes:
        eventually(lambda d=d: collected(d) == 1, timeout=30,
                   message="the first tombstone collected on every node")
    # n2 writes the last change "late" gets before it goes down: its copy has n2's origin.
    n2.registry().unregister("late")
    for d in (n0, n1):
        eventually(lambda d=d: listed(d)["late"].status.value == "offline", timeout=15,
                   message="'late' offline on nodes 0 and 1")
    if how == "stop":
        n2.stop()
    else:
        n2.kill9()
    gone_state = "left" if how == "stop" else "dead"
    for d in (n0, n1):
        eventually(lambda d=d: peer_states(d).get(n2.node_id) == gone_state, timeout=15,
                   message=f"node 2 {gone_state} as nodes 0 and 1 see it")
    assert n0.registry().clear_offline() == 1
    eventually(lambda: "late" not in listed(n1), timeout=15, message="'late' cleared on node 1")
    consistently(lambda: collected(n0) == 1 and collected(n1) == 1, GC_ROUNDS,
                 "no collection of the tombstone node 2 lacks")
    # n2 returns with its stale copy: it gets the tombstone, then everyone collects it.
    n2.start()
    came_back: list[str] = []

    def settled() -> bool:
        came_back.extend(d.node_id for d in (n0, n1) if "late" in listed(d))
        return ("late" not in listed(n2) and collected(n0) == 2 and collected(n1) == 2
                and collected(n2) == 1)

    eventually(settled, timeout=30, message="the second tombstone collected everywhere")
    assert came_back == [], "node 2's stale copy came back"
    consistently(lambda: all("late" not in listed(d) for d in nodes), GC_ROUNDS,
                 "'late' stays gone")
    for d in nodes:
        d.stop()
        assert db_rows(d, ["early", "late"]) == [], f"rows left in {d.data_dir}"


# --- the merge rule behind it, on real stores ---------------------------------------------------

def run(store: Store, command: str, **args: Any) -> Any:
    with store.write():
        return Commands(store).execute(command, validate_args(command, args))


def ship(src: Store, dst: Store, origin: str, after: int = 0) -> None:
    """src's records of `origin` above `after` merged into dst, as one RECORDS batch."""
    recs, through = replication.export(src, origin, after, 1000)
    with dst.write():
        replication.apply(dst, Outbox(dst), origin, after, through, [records.record(r) for r in recs])


def test_a_late_stale_copy_is_refused_after_collection(tmp_path):
    """A frame with the session's old record arriving after its tombstone was collected
    (our vector covers it) does not bring it back; registering the id again does."""
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    run(a, "session.register", session_id="s", agent_name="S", agent_type="claude")
    stale, _ = replication.export(a, a.node_id, 0, 1000)
    ship(a, b, a.node_id)
    run(b, "session.unregister", session_id="s")
    assert run(b, "session.clear_offline") == 1
    ship(b, a, b.node_id)
    everyone = [replication.digest(a), replication.digest(b)]
    for s in (a, b):
        with s.write():
            assert replication.collect_sessions(s, s.hlc.now(), everyone) == 1
    with b.write():                                      # a's old register, late
        replication.apply(b, Outbox(b), a.node_id, 0, 1, [records.record(r) for r in stale])
    assert run(b, "session.list", include_offline=True) == []
    run(a, "session.register", session_id="s", agent_name="S2", agent_type="gpt")
    ship(a, b, a.node_id, after=1)
    assert [s["agent_name"] for s in run(b, "session.list", include_offline=True)] == ["S2"]
    a.close()
    b.close()
