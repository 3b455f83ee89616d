"""Memory change events through one daemon: a watch sees puts, deletes and expiries with
their cursors, filtered by prefix and tags; it resumes across a reconnect and a daemon
restart (SIGTERM and kill -9) with nothing missed or twice; a forced trim (a tiny
--memory-log-max) gives the gap event; touch and history, and the TTL rules; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from support.daemons import CHILD_CWD, eventually, run_cli
from sessions import MemoryEvent, NotFound, SharedMemory
from sessions.aio import AsyncSharedMemory


def drain(watch, n: int, timeout: float = 10.0) -> list[MemoryEvent]:
    """Exactly the next `n` events (fails if they do not come in time)."""
    got: list[MemoryEvent] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} events: {got[-3:]}"
        ev = watch.next(timeout=min(left, 1.0))
        if ev is not None:
            got.append(ev)
    return got


def test_watch_sees_puts_deletes_and_expiry_with_filters(daemon):
    mem = daemon.memory()
    everything = mem.watch()
    only_a = mem.watch("a/")
    tagged = mem.watch(tags=["hot"])
    mem.set("s1", "a/1", {"v": 1}, tags=["hot"])
    mem.set("s1", "b/1", 2)
    assert mem.delete("a/1") == 1
    mem.set("s1", "a/ttl", "soon", ttl=0.3)
    evs = drain(everything, 5, timeout=15)
    assert [(e.kind, e.key) for e in evs] == [("put", "a/1"), ("put", "b/1"), ("delete", "a/1"),
                                              ("put", "a/ttl"), ("expire", "a/ttl")]
    assert evs[0].entry is not None and evs[0].entry.value == {"v": 1} and evs[0].op == "set"
    node = daemon.registry().node_info()["node_id"]
    assert all(e.origin == node for e in evs)
    assert [e.cursor for e in evs] == sorted(e.cursor for e in evs)
    assert [e.key for e in drain(only_a, 4)] == ["a/1", "a/1", "a/ttl", "a/ttl"]
    assert [(e.kind, e.key) for e in drain(tagged, 2)] == [("put", "a/1"), ("delete", "a/1")]
    assert everything.next(timeout=0.3) is None
    for w in (everything, only_a, tagged):
        w.close()


def test_watch_resumes_across_reconnect_and_restarts_nothing_missed_or_twice(daemon):
    mem = daemon.memory()
    watch = mem.watch("r/")
    for i in range(20):
        mem.set("s", f"r/{i}", i)
    got = drain(watch, 20)
    cursor = watch.cursor
    watch.close()                                       # a reconnect from the cursor
    for i in range(20, 40):
        mem.set("s", f"r/{i}", i)
    watch = mem.watch("r/", cursor=cursor)
    got += drain(watch, 20)
    daemon.stop()                                       # SIGTERM while watching
    daemon.start()
    mem = daemon.memory()
    for i in range(40, 60):
        mem.set("s", f"r/{i}", i)
    got += drain(watch, 20, timeout=20)                 # the same watch, resubscribed
    cursor = watch.cursor
    watch.close()
    for i in range(60, 70):
        mem.set("s", f"r/{i}", i)
    daemon.kill9()                                      # acknowledged sets come back from
    daemon.start()                                      # the journal, logged once
    watch = daemon.memory().watch("r/", cursor=cursor)
    got += drain(watch, 10, timeout=20)
    assert watch.next(timeout=0.5) is None
    watch.close()
    assert [e.entry.value for e in got] == list(range(70))
    assert len({e.cursor for e in got}) == 70


def test_forced_trim_gives_a_gap_event_then_the_rest(make_daemon):
    d = make_daemon(args=["--memory-log-max", "5"])
    mem = d.memory()
    start = mem.watch().cursor
    for i in range(12):
        mem.set("s", f"k{i}", i)
    assert mem.get("k11") == 11              # (a read folds the journaled sets: trimmed now)
    watch = mem.watch(cursor=start)
    evs = drain(watch, 6)
    assert evs[0].kind == "gap" and evs[0].cursor == start + 7
    assert [e.key for e in evs[1:]] == [f"k{i}" for i in range(7, 12)]
    watch.close()


def test_touch_history_and_ttl_rules(make_daemon):
    d = make_daemon(args=["--memory-history", "4"])
    mem = d.memory()
    e = mem.set("s1", "job", {"step": 1}, ttl=1.5, tags=["t"])
    t = mem.touch("job", ttl=30)
    assert (t.value, t.ttl, t.tags, t.session_id) == ({"step": 1}, 30, ["t"], "s1")
    assert t.entry_id != e.entry_id
    time.sleep(1.7)                          # the first version ran out; the touched one lives
    assert mem.get("job") == {"step": 1}
    kept = mem.touch("job")                  # ttl None: the same length (30 s) from now
    assert kept.ttl == 30
    with pytest.raises(NotFound):
        mem.touch("no-such-key")
    mem.set("s1", "job", {"step": 2})        # a set's own ttl (None): never expires
    assert mem.get_entry("job").ttl is None
    mem.delete("job")
    h = mem.history("job")
    assert [v.op for v in h] == ["delete", "set", "touch", "touch"]      # bounded at 4
    assert h[1].entry is None and h[0].origin == d.registry().node_info()["node_id"]
    assert len(mem.history("job", limit=2)) == 2
    # the same through the CLI
    mem.set("s1", "cli", "v", ttl=5)
    env = d.env()
    out = run_cli(["memory-touch", "cli", "--ttl", "60"], env)
    assert out.returncode == 0, out.stderr
    out = run_cli(["memory-history", "cli", "--json"], env)
    assert out.returncode == 0, out.stderr
    assert [v["op"] for v in json.loads(out.stdout)] == ["touch", "set"]
    assert run_cli(["memory-touch", "nothing"], env).returncode == 1


def test_cli_memory_watch_prints_json_lines(daemon):
    env = daemon.env()
    proc = subprocess.Popen([sys.executable, "-m", "sessions", "memory-watch", "w/", "--json"],
                            env=env, cwd=CHILD_CWD, stdout=subprocess.PIPE, text=True)
    try:
        mem = daemon.memory()
        watch = mem.watch()          # (to know the CLI's watch is subscribed: its own set)
        eventually(lambda: daemon.registry().node_info()["subscriptions"] >= 2)
        mem.set("s", "w/x", 1)
        mem.set("s", "other", 2)
        mem.set("s", "w/y", 3)
        lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [(x["kind"], x["key"], x["entry"]["value"]) for x in lines] == [
            ("put", "w/x", 1), ("put", "w/y", 3)]
        watch.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_asyncio_watch_touch_history(daemon):
    import asyncio

    async def main() -> None:
        mem = AsyncSharedMemory(socket=daemon.socket)
        watch = await mem.watch("x/")
        await mem.set("s", "x/1", 1, ttl=60)
        ev = await watch.next(timeout=5)
        assert ev is not None and ev.key == "x/1" and ev.kind == "put"
        t = await mem.touch("x/1")
        ev = await watch.next(timeout=5)
        assert ev is not None and ev.op == "touch" and ev.entry.entry_id == t.entry_id
        assert [v.op for v in await mem.history("x/1")] == ["touch", "set"]
        watch.close()
        await mem.close()

    asyncio.run(main())


def test_directory_mode_watch_polls(short_tmp):
    mem = SharedMemory(short_tmp / "dir")
    watch = mem.watch("p/")
    mem.set("s", "p/1", 1)
    mem.set("s", "q/1", 2)
    mem.touch("p/1", ttl=10)
    evs = drain(watch, 2)
    assert [(e.key, e.op) for e in evs] == [("p/1", "set"), ("p/1", "touch")]
    assert [v.op for v in mem.history("p/1")] == ["touch", "set"]
    watch.close()
