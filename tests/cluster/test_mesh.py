"""The mesh: several real daemons on loopback (each on its own 127.0.0.x and port, the fast
timing preset) behave as one system. Membership, failure detection, graceful leave,
replication of the registry and shared memory, catch-up after restarts, bulk transfer to a
new node, and hostile peer frames. Every wait is an `eventually` with a deadline."""

from __future__ import annotations

import asyncio

import json
import random
import threading
import time
from typing import Any

import msgpack
import pytest
import zmq

from support.daemons import Daemon, eventually, peer_states, run_cli, wait_converged
from support.mesh import wait_same_state
from meshd.state.commands import Commands
from meshd.wire.peer import frame_limit


def mesh_counters(d: Daemon) -> dict[str, int]:
    mesh = d.registry(timeout=5).node_info()["mesh"]
    return {**mesh["transport"]["counters"], **mesh["replication"]["counters"]}


def test_a_node_behind_two_peers_pulls_each_record_once(make_cluster, make_daemon):
    """Both sources hold the same origin's records: the newcomer pulls them from one of
    them, not from both at once (which doubled what a catch-up had to receive)."""
    from sessions.aio import AsyncSharedMemory
    a, b = make_cluster(2)
    n = 5000

    async def fill() -> None:
        mem = AsyncSharedMemory(socket=a.socket, timeout=30)
        sem = asyncio.Semaphore(128)

        async def one(i: int) -> None:
            async with sem:
                await mem.set("s", f"k{i}", {"i": i, "pad": "x" * 100})
        await asyncio.gather(*(one(i) for i in range(n)))
    asyncio.run(fill())
    eventually(lambda: b.memory().get_stats()["total_entries"] == n, timeout=30,
               message="both sources hold everything")
    new = make_daemon("new", args=["--bind", "127.0.0.12:0", "--join", a.peer_address])
    eventually(lambda: new.memory().get_stats()["total_entries"] == n, timeout=60,
               message="the newcomer caught up")
    wait_converged([a, b, new])
    received = mesh_counters(new).get("records_in", 0)
    assert n <= received < 1.5 * n, received


# --- membership ------------------------------------------------------------------------------

def test_three_nodes_join_replicate_and_list_peers(make_cluster):
    nodes = make_cluster(3)
    wait_converged(nodes)
    peers = nodes[0].registry().peers()
    assert {p["address"] for p in peers} == {nodes[1].peer_address, nodes[2].peer_address}
    for p in peers:
        assert p["state"] == "alive" and p["incarnation"] > 0
        assert p["last_contact"] is not None and p["last_contact"] < 30
    # A session and an entry written on each node reach every node; the host is recorded.
    for i, d in enumerate(nodes):
        d.registry().register(f"agent-{i}", f"Agent {i}", "claude", capabilities=["x"])
        d.memory().set(f"agent-{i}", f"key-{i}", {"from": i}, tags=["mesh"])
    for d in nodes:
        eventually(lambda d=d: len(d.memory().get_by_tags(["mesh"])) == 3, timeout=15,
                   message="3 entries everywhere")
        eventually(lambda d=d: len(d.registry().list_sessions()) == 3, timeout=15,
                   message="3 sessions everywhere")
        hosts = {s.session_id: s.host for s in d.registry().list_sessions()}
        assert hosts == {f"agent-{i}": n.node_id for i, n in enumerate(nodes)}
        assert d.memory().get("key-1") == {"from": 1}
    # Lag is reported once summaries were exchanged.
    eventually(lambda: all(p["behind"] == 0 for p in nodes[0].registry().peers()),
               timeout=15, message="peers not behind")
    # The CLI shows the same table.
    r = run_cli(["--socket", nodes[0].socket, "peers"], env=nodes[0].env())
    assert r.returncode == 0, r.stderr
    assert nodes[1].peer_address in r.stdout and "alive" in r.stdout
    r = run_cli(["--socket", nodes[0].socket, "peers", "--json"], env=nodes[0].env())
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 2


def test_ten_nodes_converge_and_replicate(make_cluster):
    nodes = make_cluster(10)
    wait_converged(nodes, timeout=60)
    nodes[7].memory().set("s", "ten", 10)
    for d in nodes:
        eventually(lambda d=d: d.memory().get("ten") == 10, timeout=15,
                   message=f"the entry on {d.peer_address}")


def test_kill9_marks_a_node_dead_its_sessions_offline_and_restart_catches_up(make_cluster):
    nodes = make_cluster(4)
    wait_converged(nodes)
    victim, others = nodes[3], nodes[:3]
    victim.registry().register("on-victim", "V", "claude")
    for d in others:
        eventually(lambda d=d: d.registry().get("on-victim") is not None, timeout=15,
                   message="the victim's session replicated")
        assert d.registry().get("on-victim").status.value == "active"
    victim.kill9()
    for d in others:
        eventually(lambda d=d: peer_states(d).get(victim.node_id) == "dead", timeout=20,
                   message=f"{d.peer_address} marking the killed node dead")
        s = d.registry().get("on-victim")
        assert s.status.value == "offline"
        assert "on-victim" not in [x.session_id for x in d.registry().list_sessions()]
    # Writes made while it is down reach it when it comes back.
    others[0].memory().set("w", "while-down", {"n": 1})
    others[1].registry().register("born-while-down", "B", "gpt")
    others[2].memory().delete("nothing-there")
    victim.start()                      # same data dir, port and --join
    for d in nodes:
        eventually(lambda d=d: d.registry().get("on-victim") is not None
                   and d.registry().get("on-victim").status.value == "active", timeout=20,
                   message=f"the session back on {d.peer_address}")
    eventually(lambda: victim.memory().get("while-down") == {"n": 1}, timeout=20,
               message="the write made while down")
    eventually(lambda: victim.registry().get("born-while-down") is not None, timeout=20,
               message="the session registered while down")
    wait_converged(nodes)
    wait_same_state(nodes)


def test_sigterm_leave_is_seen_as_left_not_dead(make_cluster):
    nodes = make_cluster(3)
    wait_converged(nodes)
    nodes[2].registry().register("leaver-session", "L", "claude")
    for d in nodes[:2]:
        eventually(lambda d=d: d.registry().get("leaver-session") is not None, timeout=15,
                   message="session replicated")
    assert nodes[2].stop() == 0
    for d in nodes[:2]:
        # "left" comes from the announcement itself; failure detection would say "dead".
        eventually(lambda d=d: peer_states(d).get(nodes[2].node_id) == "left", timeout=10,
                   message="the leave seen")
        assert d.registry().get("leaver-session").status.value == "offline"
    assert "is now left" in nodes[0].log()



def test_a_daemon_stopped_right_after_it_joined_is_seen_left(make_cluster):
    """Its join reached the others (they see it alive) before it heard back from them:
    its leave must still reach them, or they would wait for failure detection ("dead")."""
    first, late = make_cluster(2)
    assert late.stop() == 0
    eventually(lambda: peer_states(first).get(late.node_id) == "left", timeout=10,
               message="the leave of a stopped node")
    for _ in range(3):                             # again: restarted, and stopped at once
        late.start()
        eventually(lambda: peer_states(first).get(late.node_id) == "alive", timeout=10,
                   interval=0.005, message="node 0 sees it alive again")
        assert late.stop() == 0                    # it may know no member yet
        eventually(lambda: peer_states(first).get(late.node_id) == "left", timeout=10,
                   message="the leave of a node that had only just joined")


# --- replication ------------------------------------------------------------------------------

def test_concurrent_writes_on_every_node_converge_to_identical_state(make_cluster):
    nodes = make_cluster(5)
    wait_converged(nodes)
    errors: list[str] = []

    def writer(i: int, d: Daemon) -> None:
        rnd = random.Random(i)
        mem, reg = d.memory(timeout=10), d.registry(timeout=10)
        try:
            reg.register(f"w{i}", f"Writer {i}", "claude")
            for j in range(60):
                op = rnd.random()
                if op < 0.55:
                    mem.set(f"w{i}", f"shared-{rnd.randrange(6)}", {"by": i, "j": j},
                            tags=[f"t{rnd.randrange(3)}"])
                elif op < 0.75:
                    mem.set(f"w{i}", f"own-{i}-{j}", j, ttl=None if j % 2 else 3600)
                elif op < 0.85:
                    mem.delete(f"shared-{rnd.randrange(6)}")
                elif op < 0.95:
                    reg.update_status(f"w{i}", rnd.choice(["active", "working", "idle"]),
                                      current_task=f"task {j}")
                else:
                    reg.register(f"w{i}-extra-{j}", "Extra", "gpt")
        except Exception as exc:           # reported below; a thread must not hide it
            errors.append(f"writer {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=writer, args=(i, d)) for i, d in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    state = wait_same_state(nodes, timeout=45)
    assert len(state["sessions"]) >= 5 and state["entries"]
    # Deleted keys are gone everywhere and the version vectors agree.
    digests = [d.registry().node_info()["mesh"]["replication"]["pushed_through"] for d in nodes]
    assert all(v > 0 for v in digests)
    eventually(lambda: all(p["behind"] == 0 and p["ahead"] == 0
                           for d in nodes for p in d.registry().peers()),
               timeout=30, message="every node holding what every other holds")


def test_deletions_replicate_and_their_records_are_collected_without_resurrection(make_cluster):
    nodes = make_cluster(3)
    wait_converged(nodes)
    nodes[0].memory().set("s", "doomed", "old", tags=["d"])
    for d in nodes:
        eventually(lambda d=d: d.memory().get("doomed") == "old", timeout=15,
                   message="the entry replicated")
    assert nodes[1].memory().delete("doomed") == 1
    for d in nodes:
        eventually(lambda d=d: d.memory().get("doomed") is None, timeout=15,
                   message="the deletion replicated")
    # The test preset lets a deletion record go after 2 s once every member holds it.
    for d in nodes:
        eventually(lambda d=d: mesh_counters(d).get("tombstones_collected", 0) >= 1,
                   timeout=30, message=f"the deletion record collected on {d.peer_address}")
    for d in nodes:
        assert d.memory().get("doomed") is None
        assert d.memory().get_by_tags(["d"]) == []
    nodes[2].memory().set("s", "doomed", "new")
    for d in nodes:
        eventually(lambda d=d: d.memory().get("doomed") == "new", timeout=15,
                   message="a later set of the same key")
    wait_same_state(nodes)


def test_a_new_empty_node_receives_100k_entries(make_daemon, short_tmp):
    """State transfer is chunked: no frame over the limit, and the source keeps serving."""
    from meshd.state import Store
    from meshd.wire.ipc import validate_args

    big = Daemon(socket=str(short_tmp / "big.sock"), data_dir=str(short_tmp / "big-data"),
                 log_path=str(short_tmp / "big.log"),
                 args=["--bind", "127.0.0.30:0", "--max-frame", str(256 * 1024)])
    store = Store(big.data_dir)
    run = Commands(store).run
    with store.write():
        for i in range(100_000):
            run("memory.set", validate_args("memory.set", {"entry": {
                "entry_id": f"bulk-{i}", "type": "fact", "key": f"bulk/{i % 1000}",
                "value": {"i": i, "pad": "x" * 40}, "session_id": "loader",
                "timestamp": "2026-11-25T00:00:00+00:00", "ttl": None,
                "tags": [f"t{i % 10}"], "metadata": {}}}))
    store.close()
    source = make_daemon("big", args=big.args)        # the same data dir, by name
    assert source.memory().get_stats()["total_entries"] == 100_000
    newcomer = make_daemon("new", args=["--bind", "127.0.0.31:0", "--max-frame",
                                        str(256 * 1024), "--join", source.peer_address])
    stalls = 0
    partial: set[int] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            source.registry(timeout=3).node_info()       # the loop keeps answering
        except Exception:
            stalls += 1
        have = newcomer.memory(timeout=10).get_stats()["total_entries"]
        if have >= 100_000:
            break
        if have:
            partial.add(have)
        time.sleep(0.2)
    assert newcomer.memory().get_stats()["total_entries"] == 100_000
    assert stalls == 0, "the source stopped answering its clients during the transfer"
    # The newcomer answered its own clients while it merged (peer frames yield the loop),
    # not only once the whole transfer was through.
    assert len(partial) >= 2, partial
    assert newcomer.memory().get("bulk/7")["i"] % 1000 == 7
    assert len(newcomer.memory().get_by_tags(["t3"])) == 10_000
    src, dst = mesh_counters(source), mesh_counters(newcomer)
    assert src.get("served_chunks", 0) >= 20            # many chunks, not one huge frame
    assert not any(k.startswith("dropped.too_large") for k in {**src, **dst})


# --- hostile peers ------------------------------------------------------------------------------

def test_bad_peer_frames_are_dropped_and_counted(make_daemon):
    d = make_daemon("victim", args=["--bind", "127.0.0.40:0", "--max-frame", "65536"])
    d.memory().set("s", "before", 1)
    me = d.node_id
    before = d.memory().get_stats()["total_entries"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 5000)          # close() waits (bounded) until they are out
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    sock.connect(f"tcp://{d.peer_address}")
    now_hlc = int(time.time() * 1000) << 16

    def frame(ftype: Any, body: Any, version: Any = 1, sender: Any = "f" * 32) -> bytes:
        return msgpack.packb([version, ftype, sender, "127.0.0.41:9", body])

    def entry(origin: str, version: int, **over: Any) -> dict[str, Any]:
        e = {"kind": "entry", "entry_id": f"evil-{origin[:4]}-{version}", "key": "evil",
             "type": "fact", "value": 1, "session_id": "x", "timestamp": "t", "ttl": None,
             "tags": [], "metadata": {}, "origin": origin, "version": version, "hlc": now_hlc}
        e.update(over)
        return e

    def records(origin: str, recs: list[Any], after: int = 0, through: int = 10) -> bytes:
        return frame(6, {"origin": origin, "after": after, "through": through,
                         "records": recs, "more": False})

    other = "a" * 32
    bad = [
        b"not msgpack at all \xc1",
        msgpack.packb({"a": 1}),
        frame(1, {"seq": 1, "updates": []}, version=99),              # unknown version
        frame(99, {}),                                               # unknown type
        frame(1, {"seq": "x", "updates": []}),                       # wrong field type
        frame(1, {"seq": 1, "updates": [["n", "nowhere", 0, 1]]}),   # bad address
        frame(2, {"seq": 1}),                                        # missing field
        frame(1, {"seq": 1, "updates": []}, sender=""),              # empty sender
        b"\x95" + b"\xcc" * (frame_limit(65536) + 1000),            # over the limit
        records(other, [entry(other, 1, value=object.__class__.__name__, type="nope")]),
        records(other, [entry("b" * 32, 1)]),                        # not the batch's origin
        records(other, [entry(other, 50)]),                          # outside the range
        records(other, [entry(other, 2, hlc=now_hlc + (3_600_000 << 16))]),   # far future
        records(me, [entry(me, 10**9)], after=10**9 - 1, through=10**9),  # forged own origin
        records(other, ["not a record", 5]),
        records(other, [], through=10**12),                          # "skip all that"
    ]
    try:
        for f in bad:
            sock.send(f)
        sock.send(frame(5, {"digest": {"x": -1}, "members": [], "reply": True}))
        # Far over the limit, ZeroMQ itself drops the frame and that connection.
        sock.send(b"\x95" + b"\xcc" * (frame_limit(65536) + 70_000))
    finally:
        sock.close()
        ctx.term()

    def counted() -> dict[str, int]:
        c = mesh_counters(d)
        return c if sum(v for k, v in c.items() if k.startswith("dropped.")) >= len(bad) else {}
    try:
        c = eventually(counted, timeout=10, message="every bad frame counted")
    except AssertionError:
        raise AssertionError(f"counters: {mesh_counters(d)}") from None
    for key in ("dropped.bad_request", "dropped.unsupported_version",
                "dropped.invalid_argument", "dropped.too_large", "dropped.invalid_record",
                "dropped.record_outside_batch", "dropped.future_clock",
                "dropped.forged_own_origin", "dropped.version_jump"):
        assert c.get(key, 0) >= 1, (key, c)
    assert d.alive()
    assert d.memory().get_stats()["total_entries"] == before
    assert d.memory().get("evil") is None
    assert [p for p in d.registry().peers() if p["address"] == "nowhere"] == []
    d.memory().set("s", "after", 2)
    assert d.memory().get("after") == 2
