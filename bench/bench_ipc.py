#!/usr/bin/env python3
"""meshd IPC benchmark: the SDK against a real daemon, next to a raw pyzmq ceiling.

    python bench/bench_ipc.py [--quick] [--durability process|fsync] [--window W]
                              [--seconds S] [--clients 1,2,4]

In one run on this host it measures:
  1. the ceiling: a plain blocking pyzmq DEALER (this process) -> ROUTER echo server (a
     child process) round trip over ipc://, ~100-byte payload, p50/p99; and the
     pipelined throughput of the same pair with W messages in flight;
  2. a real `python -m meshd` started as a subprocess on a temporary socket and data dir;
  3. the blocking SDK (the users' path): SharedMemory.set, SharedMemory.get and
     CollaborationHub.send, p50/p99 and the ratio of p50 to the raw p50;
  4. durable memory sets per second from P client processes, each keeping W sets in
     flight with the asyncio SDK; only acknowledged sets are counted, and the daemon's
     entry count is checked afterwards to have grown by at least that many.

It prints a table. It is a measurement, not a test: it never asserts a time. Everything
stays on this host (ipc:// sockets under /tmp); every wait and loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from _common import ENV, ROOT, cpu_ns, pct_us, read_line, stop_pid, write_json  # noqa: E402

import zmq  # noqa: E402

PAYLOAD = b"x" * 100                    # raw round-trip payload (~ a small request frame)
RAW_TIMEOUT_MS = 5000                   # no raw send/recv waits longer than this
DAEMON_START_TIMEOUT = 10.0
DAEMON_STOP_TIMEOUT = 10.0
SDK_TIMEOUT = 10.0                      # per SDK call
TARGET_RATIO = 3.0
TARGET_RATE = 10_000.0

# --- the raw echo server (child process, plain blocking pyzmq) -----------------------------

ECHO_SERVER = r"""
import os, sys, time, zmq
addr, idle_limit = sys.argv[1], float(sys.argv[2])
parent = os.getppid()
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.RCVTIMEO, 1000)    # blocking recv; the timeout only lets an orphan notice
s.bind(addr)
print("ready", flush=True)
last = time.monotonic()
while True:
    try:
        m = s.recv_multipart()
    except zmq.Again:
        if os.getppid() != parent or time.monotonic() - last > idle_limit:
            break
        continue
    last = time.monotonic()
    if m[-1] == b"quit":
        break
    s.send_multipart(m)
s.close(); ctx.term()
"""

# --- one pipelined asyncio SDK client (child process) ---------------------------------------

SET_CLIENT = r"""
import asyncio, itertools, json, sys, time
from sessions.aio import AsyncSharedMemory
sock, seconds, window, tag, timeout = (sys.argv[1], float(sys.argv[2]), int(sys.argv[3]),
                                       sys.argv[4], float(sys.argv[5]))
MAX_ERRORS = 1000

async def main():
    m = AsyncSharedMemory(socket=sock, timeout=timeout)
    await m.set(tag, f"{tag}-warm", {"warm": True}, tags=["bench"])   # connect, warm up
    print("ready", flush=True)
    go = sys.stdin.readline()          # the parent starts all clients at once; EOF = abort
    if go.strip() != "go":
        await m.close()
        return
    seq = itertools.count()
    acked = 0
    errors = {}
    first_error = None
    cpu0 = time.process_time_ns()
    start = time.monotonic()
    end = start + seconds

    async def worker():
        # `window` workers: each starts its next set as soon as its last one is
        # acknowledged, so `window` sets are in flight the whole time.
        nonlocal acked, first_error
        while time.monotonic() < end and sum(errors.values()) < MAX_ERRORS:
            i = next(seq)
            try:
                await m.set(tag, f"{tag}-{i}", {"i": i, "payload": "x" * 64}, tags=["bench"])
            except Exception as exc:
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                if first_error is None:
                    first_error = f"{name}: {exc}"
                continue
            acked += 1

    await asyncio.gather(*(worker() for _ in range(window)))
    stop = time.monotonic()
    cpu = time.process_time_ns() - cpu0
    await m.close()
    print(json.dumps({"acked": acked, "start": start, "stop": stop, "cpu_ns": cpu,
                      "errors": errors, "first_error": first_error}), flush=True)

asyncio.run(main())
"""


# --- helpers ------------------------------------------------------------------------------


# --- 1. the raw ceiling ---------------------------------------------------------------------


class RawEcho:
    """A blocking ROUTER echo server in a child process and a blocking DEALER here."""

    def __init__(self, sockdir: str) -> None:
        self.addr = f"ipc://{sockdir}/echo.sock"
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, self.addr, "300"],
                                     stdout=subprocess.PIPE, env=ENV)
        if read_line(self.proc, 10.0).strip() != b"ready":
            raise RuntimeError("the raw echo server did not start within 10 s")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, RAW_TIMEOUT_MS)
        self.sock.setsockopt(zmq.SNDTIMEO, RAW_TIMEOUT_MS)
        self.sock.connect(self.addr)

    def round_trips(self, n: int) -> list[int]:
        d, payload, clock = self.sock, PAYLOAD, time.perf_counter_ns
        lat = []
        try:
            for _ in range(n):
                t = clock()
                d.send(payload)
                d.recv()
                lat.append(clock() - t)
        except zmq.Again:
            raise RuntimeError(f"raw echo: no reply within {RAW_TIMEOUT_MS} ms") from None
        return lat

    def pipelined(self, window: int, seconds: float) -> tuple[float, int]:
        """Messages per second with `window` in flight, and how many were echoed."""
        d, payload = self.sock, PAYLOAD
        sent = got = 0
        start = time.perf_counter()
        end = start + seconds
        try:
            while time.perf_counter() < end:
                while sent - got < window:
                    d.send(payload)
                    sent += 1
                d.recv()
                got += 1
            while got < sent:                     # drain; each recv bounded by RCVTIMEO
                d.recv()
                got += 1
        except zmq.Again:
            raise RuntimeError(f"raw echo (pipelined): no reply within {RAW_TIMEOUT_MS} ms"
                               ) from None
        return got / (time.perf_counter() - start), got

    def close(self) -> None:
        try:
            self.sock.send(b"quit", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.sock.close(linger=0)
        self.ctx.term()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            stop_pid(self.proc, 3)


# --- 2. the daemon --------------------------------------------------------------------------


class Daemon:
    def __init__(self, sockdir: str, datadir: str, durability: str) -> None:
        self.sock = f"{sockdir}/meshd.sock"
        self.log_path = f"{sockdir}/meshd.log"
        self.durability = durability
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshd", "--socket", self.sock, "--data-dir", datadir,
             "--durability", durability, "--log-level", "warning", "--no-mesh"],
            stdout=self._log, stderr=subprocess.STDOUT, env=ENV, cwd=str(ROOT))
        self.pid = self.proc.pid
        self.info: dict[str, Any] = {}
        self.startup = 0.0

    def wait_ready(self) -> None:
        """Until the socket exists and node.info answers (bounded); the daemon's own
        node.info says which durability mode it runs."""
        from sessions import SessionRegistry
        t0 = time.monotonic()
        deadline = t0 + DAEMON_START_TIMEOUT
        last = "no socket file yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {self.proc.returncode} while starting:\n"
                                   f"{self.log()}")
            if os.path.exists(self.sock):
                try:
                    self.info = SessionRegistry(socket=self.sock, timeout=1.0).node_info()
                    self.startup = time.monotonic() - t0
                    return
                except Exception as exc:          # not answering yet: try again shortly
                    last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise RuntimeError(f"meshd did not answer within {DAEMON_START_TIMEOUT:g}s "
                           f"(last: {last}):\n{self.log()}")

    def cpu(self) -> int | None:
        return cpu_ns(self.pid)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace").strip()
        except OSError:
            return ""

    def stop(self) -> str:
        how = stop_pid(self.proc, DAEMON_STOP_TIMEOUT)
        self._log.close()
        return how


# --- 3. blocking SDK latency -------------------------------------------------------------


def sdk_ops(sock: str) -> dict[str, Callable[[int], object]]:
    from sessions import CollaborationHub, SessionRegistry, SharedMemory
    reg = SessionRegistry(socket=sock, timeout=SDK_TIMEOUT)
    reg.register("bench-a", "A", "bench")
    reg.register("bench-b", "B", "bench")
    mem = SharedMemory(socket=sock, timeout=SDK_TIMEOUT)
    hub = CollaborationHub(socket=sock, timeout=SDK_TIMEOUT)
    payload = "x" * 64
    return {
        "memory set": lambda i: mem.set("bench", f"k{i}", {"i": i, "payload": payload},
                                        tags=["bench"]),
        "memory get": lambda i: mem.get("k1"),
        "message send": lambda i: hub.send("bench-a", "bench-b", "request", "subject", "body"),
    }


def timed(name: str, fn: Callable[[int], object], first: int, n: int) -> list[int]:
    clock = time.perf_counter_ns
    lat = []
    for i in range(first, first + n):
        t = clock()
        try:
            fn(i)
        except Exception as exc:
            raise RuntimeError(f"SDK {name} call #{i} failed: {type(exc).__name__}: {exc}") from exc
        lat.append(clock() - t)
    return lat


# --- 4. pipelined durable sets ------------------------------------------------------------


def pipelined_sets(daemon: Daemon, clients: int, seconds: float, window: int,
                   run: int) -> dict[str, Any]:
    """P client processes, started together, each keeping `window` sets in flight."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for c in range(clients):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", SET_CLIENT, daemon.sock, str(seconds), str(window),
                 f"bench-r{run}-p{clients}-c{c}", str(SDK_TIMEOUT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV))
        for c, p in enumerate(procs):             # every client connected and warmed up
            line = read_line(p, 15.0).strip()
            if line != b"ready":
                raise RuntimeError(f"set client {c} of {clients} did not get ready "
                                   f"(said {line!r}, exit {p.poll()})")
        d0 = daemon.cpu()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        results = []
        for c, p in enumerate(procs):
            line = read_line(p, seconds + SDK_TIMEOUT + 20.0).strip()
            if not line:
                raise RuntimeError(f"set client {c} of {clients} reported nothing "
                                   f"(exit {p.poll()})")
            results.append(json.loads(line))
        d1 = daemon.cpu()
        for p in procs:
            p.wait(10)
    finally:
        for p in procs:
            if p.poll() is None:
                stop_pid(p, 3)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()
    acked = sum(r["acked"] for r in results)
    wall = max(r["stop"] for r in results) - min(r["start"] for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {"clients": clients, "acked": acked, "rate": acked / wall if wall > 0 else 0.0,
            "wall": wall, "client_cpu_ns": sum(r["cpu_ns"] for r in results),
            "daemon_cpu_ns": None if d0 is None or d1 is None else d1 - d0,
            "errors": errors,
            "first_error": next((r["first_error"] for r in results if r["first_error"]), None)}


# --- main ---------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run with small counts (smoke)")
    ap.add_argument("--durability", choices=["process", "fsync"], default="process",
                    help="start the daemon with this durability mode (default: process)")
    ap.add_argument("--window", type=int, default=64, help="requests in flight per client")
    ap.add_argument("--seconds", type=float, default=None,
                    help="length of each throughput run (default 3, --quick 0.5)")
    ap.add_argument("--clients", default="1,2,4", help="client process counts, e.g. 1,2,4")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help="also write the results to PATH as JSON (for bench/compare.py)")
    args = ap.parse_args()

    if args.quick:
        raw_n, op_n, warm, rounds, seconds = 1000, 300, 50, 4, 0.5
    else:
        raw_n, op_n, warm, rounds, seconds = 5000, 3000, 200, 10, 3.0
    if args.seconds is not None:
        seconds = max(0.1, min(args.seconds, 60.0))
    window = max(1, min(args.window, 4096))
    client_counts = [max(1, min(int(x), 64)) for x in args.clients.split(",") if x.strip()]

    sockdir = tempfile.mkdtemp(prefix="mb", dir="/tmp")       # short: ipc paths <= 107 bytes
    datadir = tempfile.mkdtemp(prefix="meshd-bench-data-")
    raw: RawEcho | None = None
    daemon: Daemon | None = None
    stopped = "not started"
    t_start = time.monotonic()
    lat: dict[str, list[int]] = {}
    cpu: dict[str, list[int]] = {}             # [client cpu ns, server cpu ns, calls]
    runs: list[dict[str, Any]] = []
    check = ""
    entries_ok = False
    try:
        raw = RawEcho(sockdir)
        raw.round_trips(2000 if not args.quick else 300)          # warm-up
        daemon = Daemon(sockdir, datadir, args.durability)
        daemon.wait_ready()
        ops = sdk_ops(daemon.sock)
        for name, fn in ops.items():                              # warm-up
            timed(name, fn, 0, warm)

        # Rounds alternate the ceiling and each operation, so that drift in the machine's
        # speed (a shared VM) weighs on both sides of every ratio alike.
        names = ["raw"] + list(ops)
        for n in names:
            lat[n], cpu[n] = [], [0, 0, 0]
        for r in range(rounds):
            for name in names:
                count = (raw_n if name == "raw" else op_n) // rounds
                server_pid = raw.proc.pid if name == "raw" else daemon.pid
                c0, s0 = time.process_time_ns(), cpu_ns(server_pid) or 0
                if name == "raw":
                    samples = raw.round_trips(count)
                else:
                    samples = timed(name, ops[name], 1000 + r * count, count)
                c1, s1 = time.process_time_ns(), cpu_ns(server_pid) or 0
                lat[name] += samples
                cpu[name][0] += c1 - c0
                cpu[name][1] += s1 - s0
                cpu[name][2] += count

        raw_rate, _ = raw.pipelined(window, seconds)
        raw.close()
        raw = None

        from sessions import SharedMemory
        mem = SharedMemory(socket=daemon.sock, timeout=SDK_TIMEOUT)
        total_acked = 0
        before = mem.get_stats()["total_entries"]
        for i, p in enumerate(client_counts):
            res = pipelined_sets(daemon, p, seconds, window, i)
            res["warmups"] = p
            total_acked += res["acked"]
            runs.append(res)
        after = mem.get_stats()["total_entries"]
        grew = after - before
        need = total_acked + sum(r["warmups"] for r in runs)
        errs = sum(sum(r["errors"].values()) for r in runs)
        entries_ok = grew >= need
        check = (f"entries check: acknowledged sets {total_acked:,} (+{need - total_acked} "
                 f"warm-up sets); total_entries {before:,} -> {after:,}, grew by {grew:,}: "
                 f"{'OK' if grew >= need else 'MISSING ' + format(need - grew, ',') + ' ENTRIES'}")
        if errs:
            check += f" (plus {errs:,} failed sets, which may or may not have been applied)"
    finally:
        if raw is not None:
            raw.close()
        if daemon is not None:
            stopped = daemon.stop()
            log = daemon.log()
        else:
            log = ""
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(datadir, ignore_errors=True)

    # --- the table --------------------------------------------------------------------------
    assert daemon is not None
    raw_p50 = pct_us(lat["raw"], 0.5)
    mode = daemon.info.get("durability", "?")
    print()
    print(f"meshd IPC benchmark: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}, meshd "
          f"{daemon.info.get('version', '?')}")
    print(f"durability: {mode} (as reported by the daemon's node.info)")
    if mode == "fsync":
        print("  fsync: each acknowledged write is fsynced first (journal fdatasync / SQLite "
              "synchronous=FULL): survives power loss")
    else:
        print("  process: acknowledged writes are in the OS (journal write / SQLite WAL with "
              "synchronous=NORMAL) before the reply: survive kill -9 of the daemon, not power loss")
    print(f"latency: {len(lat['raw'])} raw round trips and {len(lat[next(iter(ops))])} calls per "
          f"SDK operation after {warm} warm-up calls, in {rounds} alternating rounds")
    print()
    w = 78
    print(f"{'operation':<34}{'p50 µs':>8}{'p99 µs':>9}{'p50/raw':>9}  {'target':<8}meets?")
    print("-" * w)
    print(f"{'raw pyzmq DEALER->ROUTER (ipc)':<34}{raw_p50:>8.1f}{pct_us(lat['raw'], 0.99):>9.1f}"
          f"{1.0:>9.2f}  {'ceiling':<8}-")
    for name in ops:
        p50 = pct_us(lat[name], 0.5)
        ratio = p50 / raw_p50
        print(f"{name + ' (blocking SDK)':<34}{p50:>8.1f}{pct_us(lat[name], 0.99):>9.1f}"
              f"{ratio:>9.2f}  {'<= 3x':<8}{'yes' if ratio <= TARGET_RATIO else 'NO'}")
    print()
    print(f"{'throughput':<40}{'per second':>12}  {'target':<10}meets?")
    print("-" * w)
    print(f"{f'raw pyzmq echo, {window} in flight':<40}{raw_rate:>12,.0f}  {'ceiling':<10}-")
    for r in runs:
        label = f"durable memory-set, P={r['clients']} x W={window}"
        print(f"{label:<40}{r['rate']:>12,.0f}  {'>= 10,000':<10}"
              f"{'yes' if r['rate'] >= TARGET_RATE else 'NO'}")
    print()
    print(check)
    for r in runs:
        if r["errors"]:
            print(f"  P={r['clients']}: FAILED sets {r['errors']}; first: {r['first_error']}")

    # --- where the time goes --------------------------------------------------------------
    print()
    print("CPU per call (µs; the server is the echo process or the daemon, all threads):")
    print(f"  {'operation':<32}{'wall p50':>9}{'client CPU':>12}{'server CPU':>12}")
    for name in ["raw"] + list(ops):
        c, s, n = cpu[name]
        label = "raw pyzmq round trip" if name == "raw" else name + " (blocking SDK)"
        print(f"  {label:<32}{pct_us(lat[name], 0.5):>9.1f}{c / n / 1000:>12.1f}{s / n / 1000:>12.1f}")
    for r in runs:
        n = max(1, r["acked"])
        d = "?" if r["daemon_cpu_ns"] is None else f"{r['daemon_cpu_ns'] / n / 1000:.1f}"
        label = f"pipelined set, P={r['clients']}"
        print(f"  {label:<32}{'':>9}"
              f"{r['client_cpu_ns'] / n / 1000:>12.1f}{d:>12}"
              f"   ({r['acked']:,} acked in {r['wall']:.2f}s; daemon busy "
              f"{(r['daemon_cpu_ns'] or 0) / 1e9 / r['wall'] * 100:.0f}% of one core)")
    print()
    print(f"daemon: started in {daemon.startup:.2f}s, {stopped}; total bench time "
          f"{time.monotonic() - t_start:.1f}s")
    if log:
        print("daemon log (warnings and errors):")
        for line in log.splitlines()[-20:]:
            print("  " + line)
    write_json(args.json, {
        "bench": "ipc", "quick": args.quick, "version": daemon.info.get("version"),
        "durability": mode, "window": window, "seconds": seconds,
        "latency": {name: {"p50_us": pct_us(lat[name], 0.5), "p99_us": pct_us(lat[name], 0.99),
                           "p50_ratio": pct_us(lat[name], 0.5) / raw_p50, "n": len(lat[name])}
                    for name in lat},
        "raw_rate": raw_rate,
        "durable": [{"clients": r["clients"], "rate": r["rate"], "acked": r["acked"],
                     "errors": r["errors"]} for r in runs],
        "entries_ok": entries_ok, "check": check,
        "bench_seconds": time.monotonic() - t_start})
    return 0


if __name__ == "__main__":
    sys.exit(main())
