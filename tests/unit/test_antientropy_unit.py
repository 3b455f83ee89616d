"""Replication as a unit: the daemon's own `Replicator`s and `Store`s on a fake network.

Each node of `SimCluster(data_dir=...)` is a real `Store` (SQLite in tmp_path), the real
`Replicator` (push after commit, SYNC digests every `sync_interval`, pulls answered in
chunks, the checks on every batch) and the real `Membership`, over
`meshd.mesh.fakenet` (every frame through the peer codec) on a virtual-time loop with
the LAN timings a deployment uses. Only the network and the clock are fakes, so a
partition of tens of virtual seconds costs milliseconds. What is compared at the end is
the replicated state itself: a dump of the replicated tables of every node, which must
be identical. tests/cluster/test_mesh.py checks the same end to end with real daemons.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

from meshd.config import Config
from meshd.mesh import simclock
from meshd.mesh.simcluster import SimCluster, SimNode
from meshd.state import replication
from meshd.state.store import Store
from meshd.wire.ipc import validate_args
from meshd.wire.peer import MemberState

# Small chunks, so a catch-up takes several pulls (a chain, chunk after chunk).
LAN = Config.lan(sync_chunk_records=16)
DEAD = MemberState.DEAD


def simulate(tmp_path: Path, n: int, scenario: Callable[[SimCluster], Awaitable[Any]], *,
             config: Config = LAN, seed: int = 3, real_budget: float = 10.0, **net: Any
             ) -> Any:
    """Run `scenario` on a started cluster of `n` replicating nodes in virtual time; a
    frame handler that raised anywhere fails the test."""
    async def main() -> Any:
        c = SimCluster(n, config, seed=seed, data_dir=tmp_path, **net)
        c.start()
        try:
            result = await scenario(c)
        finally:
            await c.close()
        assert c.net.errors == []
        return result
    return simclock.run(main, real_budget=real_budget)


# --- writing and comparing --------------------------------------------------------------------

def _execute(store: Store, command: str, args: dict[str, Any]) -> Any:
    """One validated command in its own transaction, as the SDK's directory mode runs it."""
    execute = getattr(store, "execute", None)
    if execute is None:                         # the store's commands live apart from it
        from meshd.state.commands import Commands
        execute = Commands(store).execute
    return execute(command, args)


def write(node: SimNode, command: str, **args: Any) -> Any:
    """A local write on `node`, then what the daemon does after a commit: push."""
    assert node.store is not None
    out = _execute(node.store, command, validate_args(command, args))
    node.committed()
    return out


_n = iter(range(10**9))


def put(node: SimNode, key: str, value: Any, session: str = "s") -> None:
    write(node, "memory.set", entry={"entry_id": f"e{next(_n)}", "type": "state", "key": key,
                                     "value": value, "session_id": session, "timestamp": "t",
                                     "ttl": None, "tags": [key[:1]], "metadata": {}})


def register(node: SimNode, sid: str) -> None:
    write(node, "session.register", session_id=sid, agent_name=sid.upper(),
          agent_type="Claude", capabilities=["python"])


_TABLES = {"sessions": "session_id", "session_caps": "capability, session_id",
           "memory": "origin, version", "memory_tags": "tag, hlc, entry_id",
           "deletions": "origin, version"}


def dump(node: SimNode) -> dict[str, Any]:
    """The replicated tables of a node, row by row, and its knowledge of each origin."""
    store = node.store
    assert store is not None
    with store.read(fold=False):
        out: dict[str, Any] = {t: store.conn.execute(f"SELECT * FROM {t} ORDER BY {o}")
                               .fetchall() for t, o in _TABLES.items()}
        out["digest"] = {o: v for o, v in replication.digest(store).items() if v}
    return out


def same(nodes: list[SimNode]) -> bool:
    first = dump(nodes[0])
    return all(dump(n) == first for n in nodes[1:])


def memory_values(node: SimNode, key: str) -> list[Any]:
    assert node.store is not None
    return [e["value"] for e in _execute(node.store, "memory.get_all", {"key": key})]


def status(node: SimNode, sid: str) -> str | None:
    assert node.store is not None
    with node.store.read(fold=False):
        row = node.store.conn.execute("SELECT status FROM sessions WHERE session_id = ?",
                                      (sid,)).fetchone()
    return None if row is None else row[0]


# --- the scenarios ----------------------------------------------------------------------------

def test_a_write_on_one_node_is_pushed_to_the_others_at_once(tmp_path):
    async def scenario(c: SimCluster) -> None:
        await c.run_for(1.0)
        a = c.nodes[0]
        register(a, "agent-1")
        put(a, "k", 1)
        await c.run_for(0.05)                    # a push, not an anti-entropy round
        assert same(c.nodes)
        for n in c.nodes:
            assert memory_values(n, "k") == [1] and status(n, "agent-1") is not None
        assert a.replicator is not None and a.replicator.counters["pushed_chunks"] >= 1
        assert sum(n.replicator.counters["pulls"] for n in c.nodes if n.replicator) == 0
    simulate(tmp_path, 4, scenario)


def test_a_partitioned_node_misses_writes_and_catches_up_after_the_heal(tmp_path):
    async def scenario(c: SimCluster) -> None:
        await c.run_for(1.0)
        a, b, _, cut = c.nodes
        c.net.partition([n.address for n in c.nodes[:3]], [cut.address])
        for i in range(40):                      # pushes to `cut` are lost
            put(a if i % 2 else b, f"k{i % 5}", i)
        register(cut, "lonely")                  # and it writes on its own side
        put(cut, "mine", "x")
        await c.run_for(10.0)
        assert c.all_see(cut, DEAD, observers=c.nodes[:3])
        assert not same(c.nodes) and same(c.nodes[:3])
        assert memory_values(cut, "k0") == []
        c.net.heal()
        took = await c.until(lambda: same(c.nodes), 30.0, step=0.1)
        assert took is not None, "not converged 30 virtual s after the heal"
        assert cut.replicator is not None and cut.replicator.counters["pulls"] >= 40 // 16
        assert sorted(memory_values(cut, "k0")) == [0, 5, 10, 15, 20, 25, 30, 35]
        assert all(status(n, "lonely") is not None for n in c.nodes)
    simulate(tmp_path, 4, scenario)


def test_a_node_that_joins_empty_is_shipped_everything(tmp_path):
    async def scenario(c: SimCluster) -> None:
        await c.run_for(1.0)
        for i in range(60):
            put(c.nodes[i % 3], f"k{i % 7}", i)
        for i in range(200):                     # 13 chunks of one origin
            put(c.nodes[1], "bulk", i)
        register(c.nodes[1], "agent")
        await c.run_for(1.0)
        assert same(c.nodes)
        late = c.add()
        c.join(late, c.nodes[0])
        took = await c.until(lambda: same(c.nodes), 20.0, step=0.1)
        assert took is not None, "the new node did not catch up"
        # Chunk after chunk as each is merged, not one chunk per anti-entropy round.
        assert took < LAN.sync_interval, took
        assert late.replicator is not None
        assert late.replicator.counters["records_in"] >= 261
        assert late.replicator.counters["pulls"] >= 200 // 16
    simulate(tmp_path, 3, scenario)


def test_a_node_that_restarts_is_shipped_only_what_it_lacks(tmp_path):
    async def scenario(c: SimCluster) -> None:
        await c.run_for(1.0)
        for i in range(30):
            put(c.nodes[0], "before", i)
        await c.run_for(1.0)
        assert same(c.nodes)
        gone = c.nodes[2]
        await gone.stop()
        for i in range(20):
            put(c.nodes[i % 2], "while-down", i)
        await c.run_for(5.0)
        back = await c.restart(gone)
        assert back.node_id == gone.node_id
        c.join(back, c.nodes[0])
        took = await c.until(lambda: same(c.live()), 20.0, step=0.1)
        assert took is not None, "the restarted node did not catch up"
        assert back.replicator is not None
        assert back.replicator.counters["records_in"] == 20   # not the 30 it held already
        assert sorted(memory_values(back, "while-down")) == list(range(20))
    simulate(tmp_path, 3, scenario)


def test_deletes_and_concurrent_writes_to_one_key_converge_to_one_winner(tmp_path):
    async def scenario(c: SimCluster) -> None:
        await c.run_for(1.0)
        left, right = c.nodes[:2], c.nodes[2:]
        register(left[0], "shared")
        put(left[0], "doomed", "old")
        put(left[0], "contested", "old")
        await c.run_for(0.5)
        assert same(c.nodes)
        c.net.partition([n.address for n in left], [n.address for n in right])
        await c.run_for(0.5)
        # Each side changes the same session and the same keys, without hearing the other.
        write(left[1], "session.update_status", session_id="shared", status="idle")
        write(right[0], "session.update_status", session_id="shared", status="working")
        write(right[1], "memory.delete", key="doomed")       # covers "old" only
        put(left[0], "doomed", "new")                         # written after "old"
        write(left[1], "memory.delete", key="contested")
        put(right[0], "contested", "right")
        await c.run_for(1.0)
        assert status(left[0], "shared") == "idle" and status(right[1], "shared") == "working"
        c.net.heal()
        took = await c.until(lambda: same(c.nodes), 30.0, step=0.1)
        assert took is not None, "not converged after the heal"
        winners = {status(n, "shared") for n in c.nodes}
        assert len(winners) == 1 and winners <= {"idle", "working"}
        for n in c.nodes:
            assert "old" not in memory_values(n, "doomed")   # the deletion is not undone
            assert "old" not in memory_values(n, "contested")
        assert len({tuple(memory_values(n, "doomed")) for n in c.nodes}) == 1
        assert len({tuple(memory_values(n, "contested")) for n in c.nodes}) == 1
    simulate(tmp_path, 4, scenario)


def test_a_hundred_nodes_replicate_through_failures_in_one_process(tmp_path):
    """Membership and replication together at N = 100: writes on a few nodes reach all,
    through a crash that every node learns of and a member that joins late."""
    async def scenario(c: SimCluster) -> None:
        await c.run_for(1.0)
        writers = c.nodes[:3]
        for i in range(30):
            put(writers[i % 3], f"k{i % 4}", i)
        victim = c.nodes[50]
        await victim.stop()
        for i in range(30, 45):
            put(writers[i % 3], f"k{i % 4}", i)
        others = c.live()
        late = c.add()
        c.join(late, c.nodes[7])
        took = await c.until(lambda: c.all_see(victim, DEAD, observers=others)
                             and same(c.live()), 60.0, step=1.0)
        assert took is not None, "100 nodes did not converge"
        assert sorted(memory_values(late, "k0")) == list(range(0, 45, 4))
        # The late node never admits the dead one (nothing to probe), yet knows all others.
        assert victim.node_id not in late.membership.members
        assert len(late.membership.members) == len(others)
    simulate(tmp_path, 100, scenario, config=Config.lan(), real_budget=60.0)
