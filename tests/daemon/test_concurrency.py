"""Concurrency: many client processes at once, nothing lost.

Client subprocesses start together (go-file barrier), each runs a seeded mix of registry,
messaging and memory calls and writes down everything that was acknowledged; afterwards
the test checks the daemon (or the shared directory) holds exactly that.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any


from support.daemons import subprocess_env
from sessions import CollaborationHub, SessionRegistry, SharedMemory

CLIENT = textwrap.dedent('''
    import json, os, random, sys, time
    from sessions import (CollaborationHub, MessageType, SessionRegistry,
                          SessionStatus, SharedMemory)

    idx, nclients, nops, workdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    directory = sys.argv[5] if len(sys.argv) > 5 else None

    def wait_for(paths, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(p) for p in paths):
            if time.monotonic() > deadline:
                sys.exit(f"client {idx}: barrier timed out")
            time.sleep(0.01)

    if directory:
        registry = SessionRegistry(directory)
        hub = CollaborationHub(registry=registry)
        memory = SharedMemory(directory)
    else:
        registry, hub, memory = SessionRegistry(), CollaborationHub(), SharedMemory()

    rnd = random.Random(idx)
    mine = [f"c{idx}-s0", f"c{idx}-s1"]
    others = [f"c{j}-s{k}" for j in range(nclients) if j != idx for k in range(2)]
    out = {"sessions": {}, "entries": [], "directs": [], "broadcasts": [], "expected_errors": 0,
           "errors": [], "ops": {}}

    def count(op):
        out["ops"][op] = out["ops"].get(op, 0) + 1

    wait_for([os.path.join(workdir, "go")])
    for sid in mine:
        s = registry.register(sid, f"Agent-{idx}", "Test", human_user=f"u{idx}",
                              capabilities=["load"])
        assert s.session_id == sid
        out["sessions"][sid] = {"status": "active", "task": None}
        count("register")
    open(os.path.join(workdir, f"registered-{idx}"), "w").close()
    wait_for([os.path.join(workdir, f"registered-{j}") for j in range(nclients)])

    statuses = ["active", "idle", "working", "waiting"]
    keys = []
    for j in range(nops):
        r = rnd.random()
        sid = rnd.choice(mine)
        try:
            if r < 0.04:
                new = f"c{idx}-x{j}"
                registry.register(new, f"Extra-{idx}", "Test")
                out["sessions"][new] = {"status": "active", "task": None}
                mine.append(new)
                count("register")
            elif r < 0.12:
                if registry.ping(sid) is not True:
                    out["errors"].append(f"ping {sid} returned False")
                count("ping")
            elif r < 0.22:
                st, task = rnd.choice(statuses), f"task-{j}"
                if registry.update_status(sid, st, current_task=task) is not True:
                    out["errors"].append(f"update_status {sid} returned False")
                out["sessions"][sid] = {"status": st, "task": task}
                count("update_status")
            elif r < 0.47:
                key = f"c{idx}-k{j}"
                value = {"c": idx, "j": j, "pad": "x" * rnd.randint(0, 200)}
                e = memory.set(sid, key, value, tags=[f"c{idx}", f"t{j % 5}"])
                out["entries"].append([e.entry_id, key, value, sid])
                keys.append((key, value))
                count("memory.set")
            elif r < 0.55:
                if keys:
                    key, value = rnd.choice(keys)
                    got = memory.get(key)
                    if got != value:
                        out["errors"].append(f"get {key} returned {got!r}")
                count("memory.get")
            elif r < 0.60:
                found = memory.search(f"c{idx}-k*")
                if len(found) != len(keys):
                    out["errors"].append(f"search saw {len(found)} of {len(keys)} own entries")
                count("memory.search")
            elif r < 0.80:
                to = rnd.choice(others)
                m = hub.send(sid, to, MessageType.REQUEST, f"from c{idx} #{j}", "body",
                             data={"j": j})
                out["directs"].append([m.message_id, sid, to])
                count("send")
            elif r < 0.83:
                m = hub.broadcast(sid, f"bc c{idx} #{j}", "to all")
                out["broadcasts"].append([m.message_id, sid])
                count("broadcast")
            elif r < 0.86:
                # accepted: it waits for a session with that id (never registered here)
                m = hub.send(sid, f"nobody-{idx}-{j}", MessageType.PING, "x", "y")
                if hub.get_message_status(m.message_id)["state"] != "waiting":
                    out["errors"].append("a send to an unknown id does not read as waiting")
                count("send_unknown")
            else:
                msgs = hub.get_messages(sid)
                ids = [m.message_id for m in msgs]
                if len(ids) != len(set(ids)):
                    out["errors"].append(f"duplicate message in {sid}'s inbox")
                count("get_messages")
        except Exception as exc:
            out["errors"].append(f"op {j}: {type(exc).__name__}: {exc}")
    with open(os.path.join(workdir, f"result-{idx}.json"), "w") as f:
        json.dump(out, f)
''')


def _run_clients(tmp: Path, n: int, nops: int, env: dict[str, str],
                 directory: str | None = None, timeout: float = 90.0) -> list[dict[str, Any]]:
    """Start n clients, release them together, wait for all; return their results."""
    work = tmp / "work"
    work.mkdir()
    script = tmp / "client.py"
    script.write_text(CLIENT)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(n):
            args = [sys.executable, str(script), str(i), str(n), str(nops), str(work)]
            if directory:
                args.append(directory)
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT))
        (work / "go").touch()
        outputs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"a client did not finish within {timeout}s") from None
            outputs.append(out.decode(errors="replace"))
        failed = [f"client {i} exit {p.returncode}:\n{outputs[i][-2000:]}"
                  for i, p in enumerate(procs) if p.returncode != 0]
        assert not failed, "\n".join(failed)      # every client's story, not just the first
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return [json.loads((work / f"result-{i}.json").read_text()) for i in range(n)]


def _verify(results: list[dict[str, Any]], registry: Any, hub: Any, memory: Any,
            nclients: int) -> dict[str, int]:
    """Everything acknowledged is stored, exactly once; returns the acknowledged totals."""
    for i, r in enumerate(results):
        assert r["errors"] == [], f"client {i} saw errors: {r['errors'][:10]}"

    # Sessions: all present, each with the status (and task) it was last given.
    expected_sessions = {sid: st for r in results for sid, st in r["sessions"].items()}
    stored = {s.session_id: s for s in registry.list_sessions(include_offline=True)}
    missing = sorted(set(expected_sessions) - set(stored))
    assert not missing, f"registered sessions lost: {missing}"
    wrong = [(sid, st, stored[sid].status.value, stored[sid].current_task)
             for sid, st in expected_sessions.items()
             if stored[sid].status.value != st["status"] or stored[sid].current_task != st["task"]]
    assert not wrong, f"sessions whose last status was lost: {wrong[:10]}"

    # Memory: every acknowledged entry, with its value, once; per-session counts match.
    acked = [e for r in results for e in r["entries"]]
    entries = memory.search("c*-k*")
    by_id = Counter(e.entry_id for e in entries)
    assert all(n == 1 for n in by_id.values()), "an entry is stored twice"
    stored_entries = {e.entry_id: e for e in entries}
    lost = [e for e in acked if e[0] not in stored_entries]
    assert not lost, f"{len(lost)} acknowledged memory entries lost: {lost[:5]}"
    for entry_id, key, value, sid in acked:
        e = stored_entries[entry_id]
        assert (e.key, e.value, e.session_id) == (key, value, sid)
    assert len(entries) == len(acked), "entries stored that nobody acknowledged"
    per_session = Counter(e[3] for e in acked)
    for sid, n in per_session.items():
        assert len(memory.get_by_session(sid)) == n, f"entry count of {sid}"
    for i in range(nclients):
        mine = [e for e in acked if e[1].startswith(f"c{i}-")]
        assert len(memory.get_by_tags([f"c{i}"])) == len(mine)

    # Messages: each direct message in its recipient's inbox exactly once; each broadcast in
    # the inbox of every session registered before the load began, except its sender's.
    directs = [d for r in results for d in r["directs"]]
    broadcasts = [b for r in results for b in r["broadcasts"]]
    base = [f"c{i}-s{k}" for i in range(nclients) for k in range(2)]
    all_broadcast_ids = {b[0] for b in broadcasts}
    inboxes = {sid: hub.get_messages(sid) for sid in expected_sessions}
    for sid, msgs in inboxes.items():
        ids = Counter(m.message_id for m in msgs)
        dup = [mid for mid, n in ids.items() if n > 1]
        assert not dup, f"{sid}: messages delivered twice: {dup[:5]}"
        expected_direct = {d[0] for d in directs if d[2] == sid}
        got_direct = {m.message_id for m in msgs if m.to_session is not None}
        assert got_direct == expected_direct, (
            f"{sid}: {len(expected_direct - got_direct)} direct messages lost, "
            f"{len(got_direct - expected_direct)} unexpected")
        got_bc = {m.message_id for m in msgs if m.to_session is None}
        assert got_bc <= all_broadcast_ids, f"{sid}: unknown broadcasts"
        assert not {b[0] for b in broadcasts if b[1] == sid} & got_bc, \
            f"{sid} received its own broadcast"
        if sid in base:
            assert got_bc == {b[0] for b in broadcasts if b[1] != sid}, \
                f"{sid}: broadcasts lost ({len(got_bc)} of {len(broadcasts)})"
    stats = hub.get_stats()
    unknown = sum(r["ops"].get("send_unknown", 0) for r in results)    # waiting messages
    assert stats["total_messages"] == len(directs) + len(broadcasts) + unknown
    assert stats["by_type"]["broadcast"] == len(broadcasts)
    assert stats["by_type"]["request"] == len(directs)
    assert memory.get_stats()["total_entries"] == len(acked)

    ops = Counter()
    for r in results:
        ops.update(r["ops"])
    ops["expected_errors"] = sum(r["expected_errors"] for r in results)
    return dict(ops)


def test_8_clients_500_mixed_ops_nothing_lost(daemon, short_tmp):
    nclients, nops = 8, 500
    before = daemon.registry().node_info()["counters"]
    results = _run_clients(short_tmp, nclients, nops, daemon.env())
    after = daemon.registry().node_info()["counters"]
    ops = _verify(results, daemon.registry(), daemon.hub(), daemon.memory(), nclients)
    assert sum(len(r["entries"]) for r in results) > nclients * nops * 0.15   # the mix ran

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    assert delta("ok.memory.set") == ops["memory.set"]
    assert delta("ok.session.register") == ops["register"]
    assert delta("ok.session.ping") == ops["ping"]
    assert delta("ok.session.update_status") == ops["update_status"]
    assert delta("ok.message.send") == ops["send"] + ops["broadcast"] + ops["send_unknown"]
    bad = {k: v for k, v in after.items()
           if (k.startswith(("rejected.", "dropped.")) or k in ("internal_errors",
               "error.store_error")) and v}
    assert not bad, f"unexpected error counters: {bad}"
    assert delta("requests") >= sum(v for k, v in ops.items() if k != "expected_errors")


def test_async_pipelined_sets_all_acknowledged_entries_present(daemon):
    from sessions.aio import AsyncSharedMemory

    total, window = 2000, 100
    before = daemon.registry().node_info()["counters"].get("ok.memory.set", 0)

    async def run() -> list[Any]:
        mem = AsyncSharedMemory(socket=daemon.socket)
        acked: list[Any] = []
        try:
            for start in range(0, total, window):
                batch = await asyncio.gather(*(
                    mem.set("async-1", f"a-{i}", {"i": i}, tags=["async", f"w{start}"])
                    for i in range(start, start + window)))
                acked.extend(batch)
        finally:
            await mem.close()
        return acked

    acked = asyncio.run(run())
    assert len(acked) == total
    assert [e.key for e in acked] == [f"a-{i}" for i in range(total)]   # answers matched to calls
    memory = daemon.memory()
    stored = {e.entry_id: e for e in memory.search("a-*")}
    assert len(stored) == total
    lost = [e.key for e in acked if e.entry_id not in stored]
    assert not lost, f"{len(lost)} acknowledged entries missing: {lost[:10]}"
    for e in acked:
        assert stored[e.entry_id].value == e.value and stored[e.entry_id].key == e.key
    assert len(memory.get_by_session("async-1")) == total
    assert len(memory.get_by_tags(["w1900"])) == window
    after = daemon.registry().node_info()["counters"].get("ok.memory.set", 0)
    assert after - before == total


def test_directory_mode_4_processes_200_ops_nothing_lost(short_tmp):
    directory = str(short_tmp / "shared")
    nclients = 4
    env = subprocess_env()
    # A socket that cannot exist: directory mode must not need (or find) a daemon.
    env["MESHD_SOCKET"] = str(short_tmp / "no-daemon.sock")
    results = _run_clients(short_tmp, nclients, 200, env, directory=directory)
    registry = SessionRegistry(directory)
    ops = _verify(results, registry, CollaborationHub(registry=registry),
                  SharedMemory(directory), nclients)
    assert ops["memory.set"] > 50
    assert not (short_tmp / "no-daemon.sock").exists()
