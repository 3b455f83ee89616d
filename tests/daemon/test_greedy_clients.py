"""Greedy or broken local clients (issue 13, items 9 and 10), through the raw ipc socket:

* one small batch frame of hundreds of big reads must neither balloon the daemon's memory
  nor make another client wait seconds (it is served in slices, within a time budget per
  loop turn, its answers bounded per batch, and list reads come in pages);
* subscribers that never read must not pin memory without bound, and a stream's state
  goes with it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import msgpack
import zmq

from support.daemons import eventually

BATCH = 384


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def dealer(path: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{path}")
    return s


def fill(daemon, n: int, size: int) -> None:
    from sessions.aio import AsyncSharedMemory

    async def main() -> None:
        mem = AsyncSharedMemory(socket=daemon.socket, timeout=30)
        for i in range(0, n, 100):
            await asyncio.gather(*(mem.set("w", f"k{j:05d}", "x" * size)
                                   for j in range(i, min(n, i + 100))))
        await mem.close()

    asyncio.run(main())


def test_a_batch_of_big_searches_stays_bounded_and_fair(daemon):
    fill(daemon, 1000, 1024)
    before = rss_mb(daemon.pid)
    items = [[i + 1, "memory.search", {"pattern": "*"}] for i in range(BATCH)]
    greedy = dealer(daemon.socket)
    greedy.send(msgpack.packb([1, 0, "batch", items]))
    worst = [0.0]
    lats = []
    t0 = time.monotonic()
    done = threading.Event()

    def other_client() -> None:                      # a second client, meanwhile
        mem = daemon.memory(timeout=10)
        while not done.is_set():
            t = time.monotonic()
            assert mem.get("k00001") == "x" * 1024
            worst[0] = max(worst[0], time.monotonic() - t)
            lats.append((round(t - t0, 3), round(time.monotonic() - t, 3)))

    t = threading.Thread(target=other_client, daemon=True)
    t.start()
    ok = errors = 0
    deadline = time.monotonic() + 60
    peak = before
    while ok + errors < BATCH and time.monotonic() < deadline:
        if greedy.poll(100):
            _, kind, body = msgpack.unpackb(greedy.recv(), raw=False)
            for _, k, b in body:
                ok += k == 0
                errors += k == 1 and b["code"] == "too_large"
        peak = max(peak, rss_mb(daemon.pid))
    done.set()
    t.join(15)
    greedy.close()
    assert ok + errors == BATCH, (ok, errors)
    assert ok >= 10 and errors > 0          # the batch's answers are capped (16 MiB)
    assert peak - before < 250, (before, peak)                  # was +930 MB
    assert worst[0] < 1.0, (worst[0], lats[:5])                  # was 3.4 s
    info = daemon.registry().node_info()
    assert info["counters"].get("turns_deferred", 0) > 0
    assert info["counters"]["rejected.batch_reply_bytes"] == errors


def test_the_sdk_reads_big_lists_in_pages(daemon):
    from sessions import TooLarge
    fill(daemon, 1200, 100)
    reg = daemon.registry()
    before = reg.node_info()["counters"]["requests"]
    entries = daemon.memory().search("*")
    assert len(entries) == 1200 and len({e.key for e in entries}) == 1200
    assert reg.node_info()["counters"]["requests"] - before >= 2 + 1      # 2 pages, 1 info
    # Values of ~1 MB: one per page; unpaged, the answer is refused as too large.
    mem = daemon.memory()
    for i in range(5):
        mem.set("w", f"big{i}", "y" * 900_000)
    assert len(mem.search("big*")) == 5
    raw = dealer(daemon.socket)
    raw.send(msgpack.packb([1, 7, "memory.search", {"pattern": "big*"}]))
    assert raw.poll(10_000)
    rid, kind, body = msgpack.unpackb(raw.recv(), raw=False)
    raw.close()
    assert (rid, kind, body["code"]) == (7, 1, "too_large") and "limit" in body["message"]
    assert TooLarge.__module__ == "sessions"


def test_subscribers_that_never_read_are_bounded_and_freed(daemon):
    hub, reg = daemon.hub(), daemon.registry()
    reg.register("busy", "B", "T")
    from sessions.aio import AsyncCollaborationHub

    async def send_all() -> None:
        h = AsyncCollaborationHub(socket=daemon.socket, timeout=30)
        for i in range(0, 2000, 100):
            await asyncio.gather(*(h.send("x", "busy", "notification", f"m{j}", "z" * 2048)
                                   for j in range(i, i + 100)))
        await h.close()

    asyncio.run(send_all())
    before = rss_mb(daemon.pid)
    socks = []
    for _ in range(20):                       # twenty clients that subscribe, never read
        s = dealer(daemon.socket)
        s.send(msgpack.packb([1, 1, "stream.subscribe",
                              {"session_id": "busy", "cursor": 0, "window": 4096}]))
        socks.append(s)
    eventually(lambda: daemon.registry().node_info()["subscriptions"] == 20, timeout=10,
               message="the subscriptions")
    info = daemon.registry().node_info()
    assert info["streams"]["unacked_bytes"] <= 20 * (1 << 20) + 20 * 4096
    assert rss_mb(daemon.pid) - before < 150, (before, rss_mb(daemon.pid))
    for s in socks:
        s.close()
    # One connection may not open streams without bound.
    s = dealer(daemon.socket)
    codes = []
    for i in range(70):
        s.send(msgpack.packb([1, i + 1, "stream.subscribe", {"session_id": f"s{i}"}]))
    deadline = time.monotonic() + 10
    while len(codes) < 70 and time.monotonic() < deadline:
        if s.poll(100):
            rid, kind, body = msgpack.unpackb(s.recv(), raw=False)
            codes.append(kind if kind != 1 else body["code"])
    assert codes.count(0) == 64 and codes.count("too_large") == 6, codes
    s.close()
    # Subscribing and closing many streams on distinct sessions leaves nothing behind.
    s = dealer(daemon.socket)
    for i in range(2000):
        s.send(msgpack.packb([1, 1, "stream.subscribe", {"session_id": f"gone-{i}"}]))
        assert s.poll(5000)
        _, kind, body = msgpack.unpackb(s.recv(), raw=False)
        assert kind == 0, body
        s.send(msgpack.packb([1, 2, "stream.close", {"sub": body["sub"]}]))
        assert s.poll(5000)
        s.recv()
    s.close()
    streams = daemon.registry().node_info()["streams"]
    assert streams["heads"] <= 64 + 1 and streams["followed"] <= 64 + 1, streams


# --- found in review: order, budgets, a validator bug, one client starving the others -------

def recv_n(s: zmq.Socket, n: int, timeout: float = 15.0) -> list[list]:
    """Replies as [req_id, kind, body] (batch answers unpacked), at most `n`."""
    out: list[list] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        if s.poll(100):
            rid, kind, body = msgpack.unpackb(s.recv(), raw=False)
            out.extend(body if kind == 3 else [[rid, kind, body]])
    return out


def test_a_connection_is_served_in_order_even_when_its_batch_is_deferred(daemon):
    fill(daemon, 3000, 200)
    mem = daemon.memory()
    mem.set("w", "target", "v1")
    s = dealer(daemon.socket)
    items = [[i, "memory.search", {"pattern": "k0*"}] for i in range(1, 17)]
    items.append([100, "memory.delete", {"key": "target", "session_id": None}])
    s.send(msgpack.packb([1, 0, "batch", items]))
    time.sleep(0.02)                         # (the lone set goes in a later drain)
    s.send(msgpack.packb([1, 200, "memory.set", {"entry": {
        "entry_id": "e-after", "type": "state", "key": "target", "value": "v2",
        "session_id": "w", "timestamp": "t", "ttl": None, "tags": [], "metadata": {}}}]))
    got = recv_n(s, 18)
    s.close()
    assert [r[0] for r in got][-2:] == [100, 200], [r[0] for r in got]
    assert mem.get("target") == "v2"         # the set sent after the delete survives it


def test_the_reply_budget_never_refuses_a_write_and_is_per_frame(daemon):
    mem = daemon.memory()
    for i in range(17):
        mem.set("w", f"big{i:02d}", "y" * 950_000)
    s = dealer(daemon.socket)
    for frame in range(2):                   # two frames, each under the budget alone
        items = [[frame * 100 + i, "memory.get_all", {"key": f"big{i:02d}"}] for i in range(17)]
        s.send(msgpack.packb([1, 0, "batch", items]))
    got = recv_n(s, 34, timeout=30)
    assert len(got) == 34 and all(k == 0 for _, k, _ in got), [
        (r, b.get("code") if isinstance(b, dict) else None) for r, k, b in got if k != 0]
    # Past the budget, reads are refused but a write in the same batch runs and says so.
    items = [[i, "memory.get_all", {"key": f"big{i % 17:02d}"}] for i in range(1, 25)]
    items.append([99, "memory.delete", {"key": "big00", "session_id": None}])
    s.send(msgpack.packb([1, 0, "batch", items]))
    got = {r: (k, b) for r, k, b in recv_n(s, 25, timeout=30)}
    s.close()
    assert got[99] == (0, 1)                                    # answered as it was done
    assert any(k == 1 and b["code"] == "too_large" for k, b in got.values())
    assert mem.get("big00") is None


def test_a_request_that_trips_a_validator_costs_no_one_else(daemon):
    a, b = dealer(daemon.socket), dealer(daemon.socket)
    b.send(msgpack.packb([1, 1, "node.info", {}]))
    a.send(msgpack.packb([1, 7, "mesh.join", {"address": "127.0.0.1:\u00b2"}]))
    b.send(msgpack.packb([1, 2, "session.stats", {}]))
    ra, rb = recv_n(a, 1, 5), recv_n(b, 2, 5)
    a.close()
    b.close()
    assert ra and ra[0][1] == 1 and ra[0][2]["code"] == "invalid_argument", ra
    assert sorted(r[0] for r in rb) == [1, 2] and all(r[1] == 0 for r in rb)


def test_one_greedy_connection_cannot_stall_other_streams(daemon):
    reg, hub = daemon.registry(), daemon.hub(timeout=30)
    reg.register("snd", "S", "T")
    reg.register("v", "V", "T")
    greedy = dealer(daemon.socket)
    for i in range(64):                      # node-wide streams that read, never ack
        greedy.send(msgpack.packb([1, i + 1, "stream.subscribe", {"session_id": None}]))
    assert len(recv_n(greedy, 64)) == 64
    for i in range(2):
        hub.broadcast("snd", f"big{i}", "x" * 900_000)
    victim = hub.subscribe("v")
    try:
        hub.send("snd", "v", "request", "hello", "small")
        t = time.monotonic()
        msg = victim.next(timeout=5)
        assert msg is not None and msg.subject == "hello", "the victim's stream stalled"
        assert time.monotonic() - t < 3
        streams = reg.node_info()["streams"]
        assert streams["unacked_bytes"] <= 8 * (1 << 20) + 70 * 1_000_000, streams
    finally:
        victim.close()
        greedy.close()


def test_paged_lists_keep_each_row_once_while_writes_happen(daemon):
    fill(daemon, 2500, 10)
    mem = daemon.memory()
    stop = threading.Event()

    def writer() -> None:
        w = daemon.memory()
        i = 0
        while not stop.is_set() and i < 2000:
            w.set("w", f"kz{i:05d}", i)      # matches too: shifts the offsets
            i += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        originals = {f"k{j:05d}" for j in range(2500)}
        for _ in range(5):
            keys = [e.key for e in mem.search("k*")]
            assert len(keys) == len(set(keys)), "a row twice"
            assert originals <= set(keys), "a row missed"
    finally:
        stop.set()
        t.join(10)
