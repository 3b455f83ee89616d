#!/usr/bin/env python3
"""One-host benchmark of the local API, next to a raw pyzmq ceiling measured in the same run.

    python bench/bench_local.py [--quick] [--durability process|fsync]

Rows:
- raw pyzmq DEALER->ROUTER round trip over ipc:// between two processes (echo server in a
  child process, plain blocking sockets): the ceiling for any request/reply over ipc.
- memory-set / memory-get / send through the blocking SDK against a real meshd (the path
  users take: validation, msgpack, the daemon, SQLite, the reply).
- raw pipelined echo throughput, and durable memory-sets per second from P client
  processes each keeping W requests in flight with the asyncio SDK; every set counted was
  acknowledged, i.e. committed to SQLite, and the entries are counted afterwards.
A table, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "sdk"),
                                                   os.environ.get("PYTHONPATH", "")]))

ECHO_SERVER = r"""
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    m = s.recv_multipart()
    if m[1] == b"quit":
        break
    s.send_multipart(m)
"""

PIPELINED_SETS = r"""
import asyncio, json, sys, time
from sessions.aio import AsyncSharedMemory
sock, seconds, window, tag = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
async def main():
    m = AsyncSharedMemory(socket=sock, timeout=30)
    await m.set(tag, "warm", 0)
    counter = iter(range(10**9))
    acked = 0
    end = time.perf_counter() + seconds
    async def worker():
        # `window` of these run at once: a sliding window, each refills as soon as its
        # set is acknowledged, so the client never waits for a whole batch
        nonlocal acked
        while time.perf_counter() < end:
            i = next(counter)
            await m.set(tag, f"{tag}-{i}", {"i": i, "payload": "x" * 64}, tags=["bench"])
            acked += 1
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(window)))
    elapsed = time.perf_counter() - start
    await m.close()
    print(json.dumps({"acked": acked, "seconds": elapsed}))
asyncio.run(main())
"""


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))] * 1e6


class RawEcho:
    """A plain pyzmq ROUTER echo server in a child process and a DEALER to it."""

    def __init__(self, tmp: str) -> None:
        import zmq
        self.addr = f"ipc://{tmp}/echo.sock"
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, self.addr],
                                     stdout=subprocess.PIPE, env=ENV)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == b"ready"
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.addr)
        self.payload = b"x" * 100
        self.round_trips(200)

    def round_trips(self, n: int) -> list[float]:
        d, payload, lat = self.sock, self.payload, []
        for _ in range(n):
            t = time.perf_counter()
            d.send(payload)
            d.recv()
            lat.append(time.perf_counter() - t)
        return lat

    def pipelined(self, window: int, seconds: float) -> float:
        d, payload = self.sock, self.payload
        sent = recv = 0
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            while sent - recv < window:
                d.send(payload)
                sent += 1
            d.recv()
            recv += 1
        while recv < sent:
            d.recv()
            recv += 1
        return recv / (time.perf_counter() - start)

    def close(self) -> None:
        self.sock.send(b"quit")
        self.sock.close()
        self.ctx.term()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_daemon(tmp: str, durability: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = f"{tmp}/m.sock"
    log = open(f"{tmp}/meshd.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "meshd", "--socket", sock, "--data-dir",
                             f"{tmp}/data", "--durability", durability, "--log-level", "warning"],
                            stdout=log, stderr=log, env=ENV)
    from sessions import SessionRegistry
    deadline = time.monotonic() + 15
    while True:
        try:
            if os.path.exists(sock):
                SessionRegistry(socket=sock, timeout=1).node_info()
                return proc, sock
        except Exception:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"meshd did not start: {Path(tmp, 'meshd.log').read_text()}")
        time.sleep(0.05)


def sdk_ops(sock: str) -> dict[str, Callable[[int], object]]:
    from sessions import CollaborationHub, SessionRegistry, SharedMemory
    reg = SessionRegistry(socket=sock)
    reg.register("bench-a", "A", "bench")
    reg.register("bench-b", "B", "bench")
    mem, hub = SharedMemory(socket=sock), CollaborationHub(socket=sock)
    ops = {
        "memory-set": lambda i: mem.set("bench", f"k{i}", {"i": i, "payload": "x" * 64},
                                        tags=["bench"]),
        "memory-get": lambda i: mem.get("k1"),
        "send": lambda i: hub.send("bench-a", "bench-b", "request", "subject", "body"),
    }
    for fn in ops.values():
        for i in range(200):
            fn(i)
    return ops


def timed(fn: Callable[[int], object], n: int, base: int) -> list[float]:
    lat = []
    for i in range(base, base + n):
        t = time.perf_counter()
        fn(i)
        lat.append(time.perf_counter() - t)
    return lat


def pipelined_sets(sock: str, clients: int, seconds: float, window: int) -> tuple[float, int]:
    procs = [subprocess.Popen([sys.executable, "-c", PIPELINED_SETS, sock, str(seconds),
                               str(window), f"c{clients}-{i}"], stdout=subprocess.PIPE, env=ENV)
             for i in range(clients)]
    acked, rates = 0, 0.0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 60)
        r = json.loads(out)
        acked += r["acked"]
        rates += r["acked"] / r["seconds"]
    return rates, acked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (smoke test)")
    ap.add_argument("--durability", choices=["process", "fsync"], default="process")
    args = ap.parse_args()
    rounds, per_round = (3, 200) if args.quick else (6, 500)
    seconds = 1.0 if args.quick else 3.0
    window = 64
    tmp = tempfile.mkdtemp(prefix="mb", dir="/tmp")
    proc = None
    raw: RawEcho | None = None
    samples: dict[str, list[float]] = {"raw": []}
    ratios: dict[str, list[float]] = {}
    try:
        raw = RawEcho(tmp)
        proc, sock = start_daemon(tmp, args.durability)
        ops = sdk_ops(sock)
        # Rounds alternate the ceiling and each operation, so that drift in the machine's
        # speed (frequent on a shared VM) hits both sides of every ratio alike.
        for r in range(rounds):
            raw_lat = raw.round_trips(per_round)
            samples["raw"] += raw_lat
            for name, fn in ops.items():
                lat = timed(fn, per_round, 1000 + r * per_round)
                samples.setdefault(name, []).extend(lat)
                ratios.setdefault(name, []).append(pct(lat, 0.5) / pct(raw_lat, 0.5))
        raw_rate = raw.pipelined(window, seconds)
        from sessions import SharedMemory
        before = SharedMemory(socket=sock).get_stats()["total_entries"]
        rows = []
        total_acked = 0
        for p in (1, 2, 4):
            rate, acked = pipelined_sets(sock, p, seconds, window)
            total_acked += acked + p          # + each client's warm-up set
            rows.append((p, rate))
        after = SharedMemory(socket=sock).get_stats()["total_entries"]
    finally:
        if raw is not None:
            raw.close()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    raw_lat = samples["raw"]
    print(f"\nmeshd local API benchmark  (durability={args.durability}, {os.cpu_count()} cores, "
          f"{rounds} rounds x {per_round} round trips per operation)\n")
    print(f"{'operation':<26}{'p50 µs':>9}{'p99 µs':>9}{'p50/raw':>9}  target   meets")
    print("-" * 72)
    print(f"{'raw pyzmq ipc round trip':<26}{pct(raw_lat, 0.5):>9.0f}{pct(raw_lat, 0.99):>9.0f}"
          f"{1:>9.2f}  ceiling")
    for name in ops:
        lat = samples[name]
        ratio = statistics.median(ratios[name])
        print(f"{name + ' (SDK)':<26}{pct(lat, 0.5):>9.0f}{pct(lat, 0.99):>9.0f}{ratio:>9.2f}"
              f"  <= 3x    {'yes' if ratio <= 3 else 'NO'}")
    print("(p50/raw: the median over rounds of each round's p50 divided by that round's raw p50)")
    print()
    print(f"{'throughput':<40}{'per second':>12}  target     meets")
    print("-" * 72)
    print(f"{f'raw pyzmq echo, {window} in flight':<40}{raw_rate:>12,.0f}  ceiling")
    for p, rate in rows:
        label = f"durable memory-set, {p} client(s) x {window}"
        print(f"{label:<40}{rate:>12,.0f}  >= 10,000  {'yes' if rate >= 10_000 else 'NO'}")
    check = "ok" if after - before >= total_acked else "MISSING ENTRIES"
    print(f"\nacknowledged sets {total_acked:,}; entries added {after - before:,}: {check}")


if __name__ == "__main__":
    main()
