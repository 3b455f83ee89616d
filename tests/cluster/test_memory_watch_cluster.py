"""Memory change events across a mesh: three daemons on loopback with writers on all three
at once; a watcher on one daemon gets every write once, each origin's in its HLC order,
across a reconnect of the watcher and a restart of its daemon (while the others keep
writing, so what it missed comes back by anti-entropy, possibly after later pushes)."""

from __future__ import annotations

import threading
import time

from support.daemons import Daemon, eventually, wait_converged
from sessions import MemoryEvent, SharedMemory


class Writer(threading.Thread):
    """Sets `c/<name>/<i>` = i on one daemon, in order, while `go` is set; pauses when it
    is cleared (its daemon is being restarted). A set is never retried: a failure would
    leave it unknown whether the entry exists, so the phases avoid failures instead."""

    def __init__(self, d: Daemon, name: str, go: threading.Event, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.d, self.name, self.go, self.stop = d, name, go, stop
        self.written = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        mem = SharedMemory(socket=self.d.socket, timeout=10)
        while not self.stop.is_set():
            if not self.go.wait(0.05):
                continue
            try:
                mem.set("w", f"c/{self.name}/{self.written}", self.written)
            except BaseException as exc:        # reported by the test
                self.errors.append(exc)
                return
            self.written += 1
            time.sleep(0.003)


def collect(watch, into: list[MemoryEvent], until: float) -> None:
    while time.monotonic() < until:
        ev = watch.next(timeout=0.2)
        if ev is not None:
            into.append(ev)


def test_three_writers_one_watcher_once_each_in_origin_order(make_cluster):
    nodes = make_cluster(3, args=["--no-discovery"])
    wait_converged(nodes)
    a = nodes[0]
    ids = {d.node_id: name for d, name in zip(nodes, "abc")}
    watch = SharedMemory(socket=a.socket).watch("c/")
    stop = threading.Event()
    go = [threading.Event() for _ in nodes]
    writers = [Writer(d, name, g, stop) for d, name, g in zip(nodes, "abc", go)]
    events: list[MemoryEvent] = []
    for g in go:
        g.set()
    for w in writers:
        w.start()
    try:
        collect(watch, events, time.monotonic() + 1.5)          # all three writing
        cursor = watch.cursor
        watch.close()                                           # the watcher reconnects
        time.sleep(0.3)                                         # (writes go on meanwhile)
        watch = SharedMemory(socket=a.socket).watch("c/", cursor=cursor)
        collect(watch, events, time.monotonic() + 1.0)
        go[0].clear()                                           # a's writer pauses ...
        time.sleep(0.1)
        a.stop()                                                # ... its daemon restarts
        time.sleep(0.5)                                         # b and c keep writing
        a.start()
        go[0].set()
        collect(watch, events, time.monotonic() + 1.5)          # the same watch resubscribes
    finally:
        stop.set()
        for w in writers:
            w.join(10)
    for w in writers:
        assert not w.errors, (w.name, w.errors)
    total = {w.name: w.written for w in writers}
    assert all(n > 10 for n in total.values()), total

    def complete() -> bool:
        collect(watch, events, time.monotonic() + 0.3)
        return sum(1 for e in events if e.kind == "put") >= sum(total.values())

    eventually(complete, timeout=60, interval=0.0, message="every write seen by the watcher")
    watch.close()
    puts = [e for e in events if e.kind == "put"]
    assert not [e for e in events if e.kind != "put"], "only sets were made"
    # once each: every (origin, i), no more
    seen = [(ids[e.origin], e.entry.value) for e in puts if e.entry is not None]
    assert len(seen) == len(puts), "a put came without its entry"
    assert sorted(seen) == sorted((n, i) for n, c in total.items() for i in range(c)), total
    assert len({e.cursor for e in events}) == len(events)
    assert [e.cursor for e in events] == sorted(e.cursor for e in events)
    # each origin's in its HLC order (and so in its writer's order)
    for name in "abc":
        mine = [e for e in puts if ids[e.origin] == name]
        assert [e.hlc for e in mine] == sorted(e.hlc for e in mine), name
        assert [e.entry.value for e in mine] == list(range(total[name])), name
    # the key's history on the watcher's node names the origin too
    h = a.memory().history("c/b/0")
    assert h and h[0].op == "set" and ids[h[0].origin] == "b"
