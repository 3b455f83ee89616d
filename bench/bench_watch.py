#!/usr/bin/env python3
"""meshd memory-watch benchmark: latency from a set on one daemon to the watch event on
another, next to the raw pyzmq relay ceiling measured in the same run.

  1. the raw relay (bench_routing's): PUSH (this process) -ipc-> relay A -tcp 127.0.0.x->
     relay B -ipc-> PULL (this process), three processes, one message at a time: the
     floor for "a local API call, a hop between daemons, a push to a local client";
  2. three daemons on loopback (127.0.0.20-22, --no-discovery, the chosen preset);
     a watcher (`SharedMemory.watch`) on node 2 and, for the local case, on node 0;
     sets on node 0, one at a time, each waiting for its event before the next:
     - "remote": set on n0 -> journal, fold, push to n2 -> merge -> change log -> event;
     - "local": set on n0 -> journal, fold -> change log -> event on n0's own watcher.

It prints a table (p50/p90/p99 in ms and the ratio of each p50 to the raw relay's). Times
are what this machine gave in this run: nothing is asserted.

    python bench/bench_watch.py [--n 300] [--preset lan|test]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

from _common import BenchError, pct_us  # noqa: E402  (puts the project on the path)
from bench_routing import Cluster, RawRelay  # noqa: E402


class Watcher:
    """A watch read by a thread, noting when each key's put first arrived (ns)."""

    def __init__(self, socket: str, prefix: str) -> None:
        from sessions import SharedMemory
        self.watch = SharedMemory(socket=socket, timeout=10).watch(prefix)
        self.arrived: dict[str, int] = {}
        self.dups = 0
        self.cond = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            ev = self.watch.next(timeout=0.2)
            if ev is None or ev.kind != "put":
                continue
            now = time.perf_counter_ns()
            with self.cond:
                if ev.key in self.arrived:
                    self.dups += 1
                else:
                    self.arrived[ev.key] = now
                self.cond.notify_all()

    def wait_for(self, key: str, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while key not in self.arrived:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.arrived[key]

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.watch.close()


def measure(mem: Any, watcher: Watcher, tag: str, n: int) -> tuple[list[int], int]:
    """n sets one at a time: ns from before the set to its event at the watcher."""
    lat, lost = [], 0
    for i in range(n):
        key = f"bench/{tag}/{i}"
        t0 = time.perf_counter_ns()
        mem.set("bench", key, {"i": i, "pad": "x" * 64})
        t1 = watcher.wait_for(key, 10.0)
        if t1 is None:
            lost += 1
        else:
            lat.append(t1 - t0)
    return lat, lost


def row(name: str, lat: list[int], lost: int, base: float | None) -> str:
    p50, p90, p99 = (pct_us(lat, p) / 1000 for p in (0.5, 0.9, 0.99))
    ratio = f"{p50 / base:6.1f}x" if base else "     -"
    return f"{name:<44} {len(lat):>5} {lost:>4} {p50:8.2f} {p90:8.2f} {p99:8.2f} {ratio}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="sets per measurement")
    ap.add_argument("--preset", choices=["lan", "test"], default="lan")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bw", dir="/tmp")
    relay = cluster = None
    watchers: list[Watcher] = []
    try:
        relay = RawRelay(tmp, 1, "raw")
        relay.one_way(0, 50)                                  # warm-up
        raw, raw_lost = relay.one_way(1, args.n)
        cluster = Cluster(tmp, args.preset)
        cluster.grow(3)
        n0, n2 = cluster.nodes[0], cluster.nodes[2]
        from sessions import SharedMemory
        mem = SharedMemory(socket=n0.sock, timeout=10)
        remote = Watcher(n2.sock, "bench/remote/")
        local = Watcher(n0.sock, "bench/local/")
        watchers = [remote, local]
        measure(mem, remote, "remote", 20)                    # warm-up (connections, caches)
        remote.arrived.clear()
        rem, rem_lost = measure(mem, remote, "remote", args.n)
        loc, loc_lost = measure(mem, local, "local", args.n)
        base = pct_us(raw, 0.5) / 1000 if raw else None
        print(f"\nmemory watch latency, {args.n} sets one at a time, preset {args.preset} "
              f"(ms; ratio = p50 / raw relay p50)")
        print(f"{'path':<44} {'n':>5} {'lost':>4} {'p50':>8} {'p90':>8} {'p99':>8}  ratio")
        print(row("raw pyzmq relay ipc->tcp->ipc (3 procs)", raw, raw_lost, None))
        print(row("set on n0 -> watch event on n2 (remote)", rem, rem_lost, base))
        print(row("set on n0 -> watch event on n0 (local)", loc, loc_lost, base))
        dups = sum(w.dups for w in watchers)
        print(f"duplicate events: {dups}")
        return 0
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for w in watchers:
            w.close()
        if cluster is not None:
            for line in cluster.stop():
                if "SIGTERM" not in line:
                    print(line, file=sys.stderr)
        if relay is not None:
            relay.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
