#!/usr/bin/env python3
"""meshd routing benchmark: messages between daemons, next to a raw pyzmq relay of the same shape.

    python bench/bench_routing.py [--quick] [--window W] [--messages N] [--nodes 3,10]
                                  [--preset test|lan] [--key]

In one run on this host it measures:
  1. direct messages between two daemons, SDK to SDK: the blocking
     CollaborationHub.send() on node 0's socket, to a session hosted by node 1, until
     that session's live stream (hub.subscribe) on node 1's socket hands it out:
     one-way latency p50/p99; and the sustained rate with W sends in flight (asyncio SDK),
     counting only the messages the receiver saw;
  2. broadcast latency to N nodes (one session per node, the broadcast from node 0's
     session): the time until every other node's session stream has it;
  3. next to each, a raw pyzmq relay of the same shape, measured the same way:
     PUSH (this process) -ipc-> relay A -tcp 127.0.0.x-> relay B -ipc-> PULL (this
     process), three processes; for a broadcast to N nodes relay A fans out to N-1
     relays B. Plain blocking Python recv/send loops, payloads as long as the messages'
     subject + body.

It prints a table with the ratio of each row to its raw relay, the target (p50 latency
within 2x, throughput at least 50%), and whether the target is met. It is a measurement,
not a test: it never asserts a time. Only loopback addresses (127.0.0.x) and ipc://
sockets under /tmp; every process it starts is stopped by pid; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import (ENV, ROOT, BenchError, cpu_ns, eventually, pct_us, read_line,  # noqa: E402
                     stop_pid, write_json)

import zmq  # noqa: E402

BODY = "x" * 100                        # message body; subjects are 12-14 characters
SUBJECT_LEN = 13                        # e.g. "d3-000123"-like tags padded: see subject()
RAW_HEADER = struct.Struct("!II")       # raw payload: (run, seq) + filler, same length
RAW_LEN = len(BODY) + SUBJECT_LEN
RAW_TIMEOUT_MS = 5000                   # no raw send/recv waits longer than this
ARRIVAL_TIMEOUT = 10.0                  # s a message may take to arrive before it counts lost
DAEMON_START_TIMEOUT = 30.0             # 10 daemons starting together on 2 cores are slow
DAEMON_STOP_TIMEOUT = 10.0
CONVERGE_TIMEOUT = 60.0
SDK_TIMEOUT = 10.0                      # per SDK call
TARGET_LATENCY = 2.0                    # meshd p50 <= 2x the raw relay's p50
TARGET_RATE = 0.5                       # meshd rate >= 50% of the raw relay's
NODE_HOST = "127.0.0.{}"                # daemon i binds 127.0.0.(20+i):0
RAW_HOST = "127.0.0.{}"                 # relay B j binds 127.0.0.(60+j):random


def subject(tag: str, i: int) -> str:
    """A message subject: the tag and sequence number, always SUBJECT_LEN characters."""
    s = f"{tag}-{i:06d}"
    return s + "." * max(0, SUBJECT_LEN - len(s))


def tag_of(subj: str) -> str:
    return subj.split("-", 1)[0]


# --- the raw relay (child processes, plain blocking pyzmq) ---------------------------------

RELAY = r"""
import os, signal, sys, time, zmq
signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the bench's: it stops us by pid
role, idle_limit = sys.argv[1], float(sys.argv[2])
parent = os.getppid()
ctx = zmq.Context()

def sock(kind):
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 1000)   # a vanished reader never blocks us for long
    s.setsockopt(zmq.RCVTIMEO, 1000)   # blocking recv; the timeout only lets an orphan notice
    return s

rx = sock(zmq.PULL)
if role == "A":                        # ipc in (bound), one PUSH per relay B (tcp, connected)
    rx.bind(sys.argv[3])
    txs = []
    for addr in sys.argv[4:]:
        s = sock(zmq.PUSH)
        s.connect(addr)
        txs.append(s)
    print("ready", flush=True)
else:                                  # "B": tcp in (bound on loopback), ipc out (bound)
    host, out = sys.argv[3], sys.argv[4]
    port = rx.bind_to_random_port(f"tcp://{host}")
    tx = sock(zmq.PUSH)
    tx.bind(out)
    txs = [tx]
    print(f"tcp://{host}:{port}", flush=True)
last = time.monotonic()
while True:
    try:
        m = rx.recv()
    except zmq.Again:
        if os.getppid() != parent or time.monotonic() - last > idle_limit:
            break
        continue
    last = time.monotonic()
    for s in txs:
        try:
            s.send(m)
        except zmq.Again:
            pass
for s in [rx] + txs:
    s.close()
ctx.term()
"""


# --- helpers ------------------------------------------------------------------------------




def cpu_of(pids: list[int]) -> int:
    return sum(cpu_ns(p) or 0 for p in pids)


# --- 1. the raw relay ---------------------------------------------------------------------


class RawRelay:
    """PUSH here -ipc-> relay A -tcp-> `fanout` relays B -ipc-> one PULL each here."""

    def __init__(self, sockdir: str, fanout: int, name: str) -> None:
        self.fanout = fanout
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ctx = zmq.Context()
        self.push: zmq.Socket | None = None
        self.pulls: list[zmq.Socket] = []
        try:
            tcp, outs = [], []
            for j in range(fanout):
                out = f"ipc://{sockdir}/{name}-b{j}.sock"
                p = self._spawn(["B", "600", RAW_HOST.format(60 + j), out])
                endpoint = read_line(p, 10.0).strip().decode()
                if not endpoint.startswith("tcp://127.0.0."):
                    raise BenchError(f"raw relay B{j} did not start (said {endpoint!r})")
                tcp.append(endpoint)
                outs.append(out)
            self.in_addr = f"ipc://{sockdir}/{name}-a.sock"
            p = self._spawn(["A", "600", self.in_addr, *tcp])
            if read_line(p, 10.0).strip() != b"ready":
                raise BenchError("raw relay A did not start within 10 s")
            self.tcp = tcp
            self.push = self._sock(zmq.PUSH)
            self.push.connect(self.in_addr)
            for out in outs:
                s = self._sock(zmq.PULL)
                s.connect(out)
                self.pulls.append(s)
            self.poller = zmq.Poller()
            for s in self.pulls:
                self.poller.register(s, zmq.POLLIN)
        except BaseException:
            self.close()
            raise

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-c", RELAY, *args], stdout=subprocess.PIPE,
                             env=ENV)
        self.procs.append(p)
        return p

    def _sock(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, RAW_TIMEOUT_MS)
        s.setsockopt(zmq.RCVTIMEO, RAW_TIMEOUT_MS)
        return s

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @staticmethod
    def payload(run: int, i: int) -> bytes:
        head = RAW_HEADER.pack(run, i)
        return head + b"x" * (RAW_LEN - len(head))

    def one_way(self, run: int, n: int) -> tuple[list[int], int]:
        """n messages one at a time: latency until every relay B's reader has it
        (ns each), and how many did not arrive everywhere within ARRIVAL_TIMEOUT."""
        assert self.push is not None
        clock, lat, lost = time.perf_counter_ns, [], 0
        for i in range(n):
            want = RAW_HEADER.pack(run, i)
            pending = set(range(self.fanout))
            last = 0
            t0 = clock()
            self.push.send(self.payload(run, i))
            deadline = time.monotonic() + ARRIVAL_TIMEOUT
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                ready = dict(self.poller.poll(remaining * 1000))
                for j in list(pending):
                    s = self.pulls[j]
                    if s not in ready:
                        continue
                    while True:
                        try:
                            m = s.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if m[:RAW_HEADER.size] == want:
                            last = max(last, clock())
                            pending.discard(j)
                            break
            if pending:
                lost += 1
            else:
                lat.append(last - t0)
        return lat, lost

    def throughput(self, run: int, n: int, window: int) -> dict[str, Any]:
        """n messages through the single relay with `window` in flight end to end."""
        assert self.push is not None and self.fanout == 1
        push, pull, clock = self.push, self.pulls[0], time.perf_counter_ns
        sent = got = 0
        cpu0 = cpu_of(self.pids)
        c0 = time.process_time_ns()
        first = clock()
        try:
            while got < n:
                while sent < n and sent - got < window:
                    push.send(self.payload(run, sent))
                    sent += 1
                m = pull.recv()
                if RAW_HEADER.unpack_from(m)[0] == run:
                    got += 1
        except zmq.Again:
            pass                                  # a 5 s silence: report what arrived
        last = clock()
        return {"sent": sent, "arrived": got, "seconds": (last - first) / 1e9,
                "rate": got / ((last - first) / 1e9), "acked_rate": None,
                "bench_cpu": time.process_time_ns() - c0, "server_cpu": cpu_of(self.pids) - cpu0,
                "missing": n - got, "dups": 0, "reordered": 0}

    def close(self) -> list[str]:
        for s in [self.push, *self.pulls]:
            if s is not None:
                s.close(linger=0)
        self.push, self.pulls = None, []
        self.ctx.term()
        how = [stop_pid(p, 3) for p in self.procs]
        for p in self.procs:
            if p.stdout is not None:
                p.stdout.close()
        return how


# --- 2. the daemons ---------------------------------------------------------------------------


class Node:
    """One `python -m meshd` on its own socket, data dir and loopback address."""

    def __init__(self, tmp: str, index: int, join: str | None, preset: str,
                 bind: str | None = None, extra: tuple[str, ...] = (),
                 unset: tuple[str, ...] = ()) -> None:
        """`bind` defaults to a port of 127.0.0.(20+index) the daemon picks; `extra` are
        more flags; `unset` names environment variables the daemon must not see."""
        self.index = index
        self.sock = f"{tmp}/n{index}.sock"
        self.data_dir = f"{tmp}/n{index}-data"
        self.log_path = f"{tmp}/n{index}.log"
        self.bind = bind or f"{NODE_HOST.format(20 + index)}:0"
        cmd = [sys.executable, "-m", "meshd", "--socket", self.sock, "--data-dir", self.data_dir,
               "--bind", self.bind, "--preset", preset, "--log-level", "warning", *extra]
        if join:
            cmd += ["--join", join]
        # Loopback only: never mDNS on this machine's network (daemons that know the
        # variable turn discovery off; older ones ignore it).
        env = dict(ENV, MESHD_DISCOVERY="0")
        for name in unset:
            env.pop(name, None)
        self._log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=env, cwd=str(ROOT))
        except BaseException:
            self._log.close()
            raise
        self.started = time.monotonic()
        self.pid = self.proc.pid
        self.info: dict[str, Any] = {}
        self.node_id = ""
        self.address = ""

    def wait_ready(self, deadline: float) -> None:
        from sessions import SessionRegistry
        last = "no socket file yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"meshd n{self.index} exited with {self.proc.returncode} "
                                   f"while starting:\n{self.log()[-3000:]}")
            if os.path.exists(self.sock):
                try:
                    self.info = SessionRegistry(socket=self.sock, timeout=1.0).node_info()
                    self.node_id = self.info["node_id"]
                    self.address = self.info.get("peer_address") or ""
                    if not self.address:
                        raise BenchError(f"meshd n{self.index} reports no peer address")
                    return
                except BenchError:
                    raise
                except Exception as exc:          # not answering yet: try again shortly
                    last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise BenchError(f"meshd n{self.index} did not answer in time (last: {last}):\n"
                           f"{self.log()[-3000:]}")

    def registry(self) -> Any:
        from sessions import SessionRegistry
        return SessionRegistry(socket=self.sock, timeout=SDK_TIMEOUT)

    def counters(self) -> dict[str, int]:
        mesh = self.registry().node_info().get("mesh") or {}
        out: dict[str, int] = {}
        for part in ("transport", "routing"):
            for k, v in ((mesh.get(part) or {}).get("counters") or {}).items():
                if isinstance(v, int):
                    out[f"{part}.{k}"] = v
        return out

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> str:
        how = stop_pid(self.proc, DAEMON_STOP_TIMEOUT)
        self._log.close()
        return how


class Cluster:
    """Daemons on 127.0.0.20, .21, ...; node 0 first, the others join it."""

    def __init__(self, tmp: str, preset: str) -> None:
        self.tmp, self.preset = tmp, preset
        self.nodes: list[Node] = []

    def grow(self, n: int) -> float:
        """Start nodes until there are n, wait until all are up and see each other alive;
        returns the seconds it took."""
        t0 = time.monotonic()
        if not self.nodes:
            self.nodes.append(Node(self.tmp, 0, None, self.preset))
            self.nodes[0].wait_ready(time.monotonic() + DAEMON_START_TIMEOUT)
        new = [Node(self.tmp, i, self.nodes[0].address, self.preset)
               for i in range(len(self.nodes), n)]
        self.nodes += new
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        for node in new:
            node.wait_ready(deadline)
        eventually(self.converged, CONVERGE_TIMEOUT, f"{n} daemons seeing each other alive",
                   interval=0.1)
        return time.monotonic() - t0

    def converged(self) -> bool:
        ids = {d.node_id for d in self.nodes}
        for d in self.nodes:
            states = {p["node_id"]: p["state"] for p in d.registry().peers()}
            if any(states.get(o) != "alive" for o in ids - {d.node_id}):
                return False
        return True

    def register(self, sessions: dict[str, int]) -> None:
        """Register each session on its node and wait until every node knows all of them."""
        for sid, i in sessions.items():
            self.nodes[i].registry().register(sid, sid.upper(), "bench")
        everyone = list(sessions)
        for d in self.nodes:
            reg = d.registry()
            eventually(lambda reg=reg: all(reg.get(s) is not None for s in everyone),
                       CONVERGE_TIMEOUT, f"sessions replicated to n{d.index}")

    def stop(self) -> list[str]:
        return [f"n{d.index}: {d.stop()}" for d in self.nodes]


# --- 3. SDK receivers and senders ---------------------------------------------------------------


class Receiver:
    """A session's live stream (hub.subscribe) read by a thread, which notes when each
    subject first arrived (perf_counter_ns) and counts any second arrival."""

    def __init__(self, node: Node, session_id: str) -> None:
        from sessions import CollaborationHub
        self.node, self.session_id = node, session_id
        self.hub = CollaborationHub(socket=node.sock, timeout=SDK_TIMEOUT)
        self.stream = self.hub.subscribe(session_id)      # subscribed when this returns
        self.cond = threading.Condition()
        self.first: dict[str, int] = {}
        self.by_tag: Counter[str] = Counter()
        self.last_at: dict[str, int] = {}
        self.dups: Counter[str] = Counter()
        self.reordered: Counter[str] = Counter()     # arrived after a later-numbered one
        self._high: dict[str, int] = {}
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name=f"rx-{session_id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        clock = time.perf_counter_ns
        stream = self.stream
        while not stream.closed and len(self.errors) < 100:
            try:
                m = stream.next(timeout=0.2)
            except Exception as exc:          # noted and retried; reported at the end
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)
                continue
            if m is None:
                continue
            t = clock()
            with self.cond:
                if m.subject in self.first:
                    self.dups[tag_of(m.subject)] += 1
                else:
                    self.first[m.subject] = t
                    tag = tag_of(m.subject)
                    self.by_tag[tag] += 1
                    self.last_at[tag] = t
                    try:
                        seq = int(m.subject.split("-", 1)[1].rstrip("."))
                    except (IndexError, ValueError):
                        seq = -1
                    if seq < self._high.get(tag, -1):
                        self.reordered[tag] += 1
                    else:
                        self._high[tag] = seq
                self.cond.notify_all()

    def arrival(self, subj: str, timeout: float) -> int | None:
        with self.cond:
            self.cond.wait_for(lambda: subj in self.first, timeout)
            return self.first.get(subj)

    def wait_tag(self, tag: str, n: int, timeout: float) -> int:
        with self.cond:
            self.cond.wait_for(lambda: self.by_tag[tag] >= n, timeout)
            return self.by_tag[tag]

    def close(self) -> None:
        self.stream.closed = True
        self.thread.join(3)
        if not self.thread.is_alive():
            self.stream.close()
        self.hub.close()


def sdk_direct(hub: Any, rx: Receiver, tag: str, n: int) -> tuple[list[int], list[int], int]:
    """n direct messages s0 -> s1 one at a time: one-way latency (ns), send() call time
    (ns), and how many did not arrive within ARRIVAL_TIMEOUT."""
    clock, lat, call, lost = time.perf_counter_ns, [], [], 0
    for i in range(n):
        subj = subject(tag, i)
        t0 = clock()
        hub.send("s0", "s1", "notification", subj, BODY)
        call.append(clock() - t0)
        t = rx.arrival(subj, ARRIVAL_TIMEOUT)
        if t is None:
            lost += 1
        else:
            lat.append(t - t0)
    return lat, call, lost


def sdk_broadcast(hub: Any, rxs: list[Receiver], tag: str, n: int
                  ) -> tuple[list[int], list[int], int]:
    """n broadcasts from s0 one at a time: latency until every receiver has it and until
    the first one has it (ns), and how many did not reach everyone in time."""
    clock, lat, first, lost = time.perf_counter_ns, [], [], 0
    for i in range(n):
        subj = subject(tag, i)
        t0 = clock()
        hub.broadcast("s0", subj, BODY)
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        times = []
        for rx in rxs:
            t = rx.arrival(subj, max(0.0, deadline - time.monotonic()))
            if t is None:
                break
            times.append(t)
        if len(times) < len(rxs):
            lost += 1
        else:
            lat.append(max(times) - t0)
            first.append(min(times) - t0)
    return lat, first, lost


def sdk_throughput(cluster: Cluster, rx: Receiver, tag: str, n: int, window: int
                   ) -> dict[str, Any]:
    """n direct messages s0 -> s1 from `window` coroutines (asyncio SDK), then wait until
    the receiver saw them all (bounded): rate = arrived / (first send -> last arrival)."""
    from sessions.aio import AsyncCollaborationHub
    pids = [d.pid for d in cluster.nodes]
    errors: Counter[str] = Counter()
    first_error: list[str] = []

    async def run() -> tuple[int, int, int]:
        hub = AsyncCollaborationHub(socket=cluster.nodes[0].sock, timeout=SDK_TIMEOUT)
        try:
            await hub.send("s0", "s1", "notification", subject(tag + "w", 0), BODY)  # connect
            todo = iter(range(n))
            acked = 0

            async def worker() -> None:
                nonlocal acked
                for i in todo:
                    if sum(errors.values()) >= 100:
                        return
                    try:
                        await hub.send("s0", "s1", "notification", subject(tag, i), BODY)
                    except Exception as exc:
                        errors[type(exc).__name__] += 1
                        if not first_error:
                            first_error.append(f"{type(exc).__name__}: {exc}")
                        continue
                    acked += 1

            t0 = time.perf_counter_ns()
            await asyncio.gather(*(worker() for _ in range(window)))
            return t0, time.perf_counter_ns(), acked
        finally:
            await hub.close()

    cpu0, c0 = cpu_of(pids), time.process_time_ns()
    t_first, t_acked, acked = asyncio.run(run())
    # Everything acknowledged must arrive; allow generous time, but bounded.
    got = rx.wait_tag(tag, acked, ARRIVAL_TIMEOUT + n / 500.0)
    with rx.cond:
        t_last = rx.last_at.get(tag, t_first)
        dups = rx.dups[tag]
        reordered = rx.reordered[tag]
    seconds = (t_last - t_first) / 1e9
    return {"sent": n, "acked": acked, "arrived": got, "seconds": seconds,
            "rate": got / seconds if seconds > 0 else 0.0,
            "acked_rate": acked / ((t_acked - t_first) / 1e9),
            "bench_cpu": time.process_time_ns() - c0, "server_cpu": cpu_of(pids) - cpu0,
            "missing": acked - got, "dups": dups, "reordered": reordered, "errors": dict(errors),
            "first_error": first_error[0] if first_error else None}


# --- main ---------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="short run with small counts, broadcast to N=3 only (smoke)")
    ap.add_argument("--window", type=int, default=64,
                    help="sends in flight for the throughput rows (default 64)")
    ap.add_argument("--messages", type=int, default=None,
                    help="messages per meshd throughput run (default 20000, --quick 2000; "
                         "the raw relay sends 10 times as many)")
    ap.add_argument("--nodes", default=None,
                    help="broadcast cluster sizes, e.g. 3,10 (default 3,10; --quick 3)")
    ap.add_argument("--preset", choices=["test", "lan"], default="test",
                    help="meshd timing preset (default test)")
    ap.add_argument("--key", action="store_true",
                    help="give the daemons a cluster key (CurveZMQ-encrypted peer traffic), "
                         "to see what encryption costs; the raw relay stays plaintext")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help="also write the results to PATH as JSON (for bench/compare.py)")
    args = ap.parse_args()

    if args.quick:
        lat_n, bc_n, warm, rounds, tp_n, tp_runs, sizes = 100, 20, 20, 2, 2000, 1, [3]
    else:
        lat_n, bc_n, warm, rounds, tp_n, tp_runs, sizes = 1000, 200, 50, 5, 20000, 3, [3, 10]
    if args.messages is not None:
        tp_n = max(100, min(args.messages, 1_000_000))
    if args.nodes is not None:
        sizes = sorted({max(2, min(int(x), 30)) for x in args.nodes.split(",") if x.strip()})
    window = max(1, min(args.window, 4096))
    raw_lat_n = lat_n              # the raw relay gets as many latency samples as meshd,
    raw_tp_n = tp_n * 10           # and runs about as long as meshd's in the throughput rows

    tmp = tempfile.mkdtemp(prefix="mr", dir="/tmp")          # short: ipc paths <= 107 bytes
    if args.key:
        from meshd.mesh.security import generate_key_file
        ENV["MESHD_KEY_FILE"] = f"{tmp}/cluster.key"
        generate_key_file(ENV["MESHD_KEY_FILE"])
    cluster = Cluster(tmp, args.preset)
    raw: RawRelay | None = None
    receivers: dict[str, Receiver] = {}
    t_start = time.monotonic()
    rows: list[dict[str, Any]] = []            # latency rows
    tp_rows: list[dict[str, Any]] = []         # throughput rows
    setup: list[str] = []
    stopped: list[str] = []
    raw_stops: list[str] = []
    counters: dict[str, int] = {}
    logs: list[tuple[str, str]] = []
    rx_errors: list[str] = []
    failure: BaseException | None = None
    info: dict[str, Any] = {}
    routed = 0                                  # items the daemons should report routed
    try:
        from sessions import CollaborationHub
        # --- two daemons: direct messages -------------------------------------------------
        took = cluster.grow(2)
        setup.append(f"2 daemons up and alive to each other in {took:.1f}s")
        cluster.register({"s0": 0, "s1": 1})
        info = cluster.nodes[0].info
        receivers["s1"] = Receiver(cluster.nodes[1], "s1")
        hub = CollaborationHub(socket=cluster.nodes[0].sock, timeout=SDK_TIMEOUT)
        raw = RawRelay(tmp, 1, "r1")

        raw.one_way(9999, warm * 4)                              # warm-up
        _, _, lost = sdk_direct(hub, receivers["s1"], "dw", warm)
        routed += warm
        if lost:
            setup.append(f"warm-up: {lost} of {warm} direct messages did not arrive")
        raw_lat: list[int] = []
        sdk_lat: list[int] = []
        sdk_call: list[int] = []
        raw_lost = sdk_lost = 0
        # Rounds alternate the raw relay and meshd, so that drift in the machine's speed
        # (a shared VM) weighs on both sides of the ratio alike.
        for r in range(rounds):
            lat, lost = raw.one_way(r, raw_lat_n // rounds)
            raw_lat += lat
            raw_lost += lost
            lat, call, lost = sdk_direct(hub, receivers["s1"], f"d{r}", lat_n // rounds)
            routed += lat_n // rounds
            sdk_lat += lat
            sdk_call += call
            sdk_lost += lost
        rows.append({"name": "raw relay ipc->tcp->ipc, one-way", "lat": raw_lat,
                     "lost": raw_lost, "raw": True})
        rows.append({"name": "meshd direct, SDK to SDK, one-way", "lat": sdk_lat,
                     "lost": sdk_lost, "call": sdk_call, "ref": raw_lat})

        raw_runs, sdk_runs = [], []
        raw.throughput(9998, min(tp_n, 2000), window)            # warm-up
        for r in range(tp_runs):
            raw_runs.append(raw.throughput(100 + r, raw_tp_n, window))
            sdk_runs.append(sdk_throughput(cluster, receivers["s1"], f"t{r}", tp_n, window))
            routed += sdk_runs[-1]["acked"] + 1                  # and its warm-up send
        tp_rows.append({"name": f"raw relay ipc->tcp->ipc, {window} in flight",
                        "short": "raw relay", "runs": raw_runs, "raw": True})
        tp_rows.append({"name": f"meshd direct, asyncio SDK, {window} sends in flight",
                        "short": "meshd direct", "runs": sdk_runs, "ref": raw_runs})
        raw_stops += raw.close()
        raw = None

        # --- broadcasts to N nodes ----------------------------------------------------------
        for n in sizes:
            took = cluster.grow(n)
            setup.append(f"{n} daemons up and alive to each other in {took:.1f}s")
            cluster.register({f"s{i}": i for i in range(n)})
            for i in range(1, n):
                sid = f"s{i}"
                if sid not in receivers:
                    receivers[sid] = Receiver(cluster.nodes[i], sid)
            for i in range(n):                                  # keep every session fresh
                cluster.nodes[i].registry().ping(f"s{i}")
            rxs = [receivers[f"s{i}"] for i in range(1, n)]
            raw = RawRelay(tmp, n - 1, f"r{n}")
            raw.one_way(9999, warm)
            _, _, lost = sdk_broadcast(hub, rxs, f"bw{n}", max(5, warm // 5))
            routed += max(5, warm // 5) * (n - 1)                # one item per other daemon
            if lost:
                setup.append(f"warm-up: {lost} broadcasts to {n} nodes did not reach all")
            raw_lat, sdk_lat, sdk_first = [], [], []
            raw_lost = sdk_lost = 0
            for r in range(rounds):
                lat, lost = raw.one_way(r, bc_n // rounds)
                raw_lat += lat
                raw_lost += lost
                lat, first, lost = sdk_broadcast(hub, rxs, f"b{n}r{r}", bc_n // rounds)
                routed += (bc_n // rounds) * (n - 1)
                sdk_lat += lat
                sdk_first += first
                sdk_lost += lost
            rows.append({"name": f"raw fan-out relay to {n - 1} (N={n}), all have it",
                         "lat": raw_lat, "lost": raw_lost, "raw": True})
            rows.append({"name": f"meshd broadcast, N={n} nodes, all {n - 1} have it",
                         "lat": sdk_lat, "lost": sdk_lost, "ref": raw_lat,
                         "first": sdk_first})
            raw_stops += raw.close()
            raw = None
        hub.close()
        # Every routed item is acknowledged by then (the receivers saw them all), but
        # allow the last acks a moment to be counted.
        def all_acked() -> bool:
            counters.clear()
            for d in cluster.nodes:
                for k, v in d.counters().items():
                    counters[k] = counters.get(k, 0) + v
            return counters.get("routing.acked_items", 0) >= routed
        try:
            eventually(all_acked, 10.0, "the routing acknowledgements", interval=0.2)
        except BenchError:
            pass                                  # reported below as a mismatch
    except BaseException as exc:                  # report what we have, then re-raise
        failure = exc
    finally:
        for rx in receivers.values():
            try:
                rx.close()
            except Exception as exc:
                rx_errors.append(f"closing {rx.session_id}: {exc}")
            rx_errors += [f"{rx.session_id}: {e}" for e in rx.errors[:3]]
        if raw is not None:
            raw_stops += raw.close()
        stopped = cluster.stop()
        for d in cluster.nodes:
            text = d.log()
            if "Traceback" in text or "ERROR" in text:
                logs.append((f"n{d.index}", "\n".join(text.splitlines()[-40:])))
            elif text.strip():
                logs.append((f"n{d.index} ({len(text.splitlines())} lines, warnings)",
                             "\n".join(text.splitlines()[-5:])))
        shutil.rmtree(tmp, ignore_errors=True)

    # --- the report ---------------------------------------------------------------------------
    print()
    print(f"meshd routing benchmark {time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, pyzmq {zmq.__version__} / libzmq "
          f"{zmq.zmq_version()}, meshd {info.get('version', '?')}, preset {args.preset}, "
          f"durability {info.get('durability', '?')}, peer traffic "
          f"{'encrypted (cluster key)' if args.key else 'plaintext'}")
    print(f"payload: subject {SUBJECT_LEN} + body {len(BODY)} characters; raw relay payload "
          f"{RAW_LEN} bytes")
    for line in setup:
        print("  " + line)
    if failure is not None:
        print()
        print(f"FAILED: {type(failure).__name__}: {failure}")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    def median_rate(runs: list[dict[str, Any]]) -> float:
        rates = sorted(r["rate"] for r in runs)
        return rates[len(rates) // 2] if len(rates) % 2 else sum(rates[len(rates) // 2 - 1:
                                                                         len(rates) // 2 + 1]) / 2

    if rows:
        print()
        print(f"one-way latency ({lat_n} direct messages and {bc_n} broadcasts per N, one at a "
              f"time, after warm-up, in {rounds} rounds alternating raw and meshd)")
        w = 104
        print(f"{'path':<50}{'p50 µs':>9}{'p99 µs':>9}{'max µs':>8}{'x raw':>7}  {'target':<8}"
              f"{'verdict':<8}{'lost':>5}")
        print("-" * w)
        for row in rows:
            p50, p99, top = pct_us(row["lat"], 0.5), pct_us(row["lat"], 0.99), pct_us(row["lat"], 1.0)
            if row.get("raw"):
                print(f"{row['name']:<50}{p50:>9.0f}{p99:>9.0f}{top:>8.0f}{1.0:>7.2f}  "
                      f"{'ceiling':<8}{'-':<8}{row['lost']:>5}")
                continue
            ratio = p50 / pct_us(row["ref"], 0.5)
            print(f"{row['name']:<50}{p50:>9.0f}{p99:>9.0f}{top:>8.0f}{ratio:>7.2f}  "
                  f"{'<= 2x':<8}{verdict(ratio <= TARGET_LATENCY):<8}{row['lost']:>5}")
        for row in rows:
            if "call" in row:
                print(f"  (the blocking send() call itself, acknowledged by node 0: p50 "
                      f"{pct_us(row['call'], 0.5):.0f} µs, p99 {pct_us(row['call'], 0.99):.0f} µs)")
            if "first" in row and row["first"]:
                print(f"  (N={row['name'].split('N=')[1].split()[0]}: the first receiver had it "
                      f"after p50 {pct_us(row['first'], 0.5):.0f} µs, p99 "
                      f"{pct_us(row['first'], 0.99):.0f} µs)")

    if tp_rows:
        print()
        print(f"sustained direct throughput ({tp_n} messages per meshd run, {raw_tp_n} per raw "
              f"run, {tp_runs} run(s) each, alternating; counted at the receiver: arrived / "
              f"(first send -> last arrival); the median run)")
        w = 104
        print(f"{'path':<50}{'msgs/s':>9}{'x raw':>7}  {'target':<8}{'verdict':<8}"
              f"{'missing':>8}{'dups':>6}{'order':>6}")
        print("-" * w)

        for row in tp_rows:
            rate = median_rate(row["runs"])
            missing = sum(r["missing"] for r in row["runs"])
            dups = sum(r["dups"] for r in row["runs"])
            order = sum(r["reordered"] for r in row["runs"])
            if row.get("raw"):
                print(f"{row['name']:<50}{rate:>9,.0f}{1.0:>7.2f}  {'ceiling':<8}{'-':<8}"
                      f"{missing:>8}{dups:>6}{'-':>6}")
                continue
            ratio = rate / median_rate(row["ref"])
            print(f"{row['name']:<50}{rate:>9,.0f}{ratio:>7.2f}  {'>= 0.5x':<8}"
                  f"{verdict(ratio >= TARGET_RATE):<8}{missing:>8}{dups:>6}{order:>6}")
        print()
        print("  per run: rate at the receiver, sends acknowledged per second, CPU µs per "
              "message (bench process / relays or daemons, all threads)")
        for row in tp_rows:
            for r in row["runs"]:
                n = max(1, r["arrived"])
                acked = "" if r["acked_rate"] is None else f", acked {r['acked_rate']:,.0f}/s"
                print(f"  {row['short']:<13}{r['rate']:>8,.0f}/s{acked}, "
                      f"{r['arrived']}/{r['sent']} arrived in {r['seconds']:.2f}s, CPU "
                      f"{r['bench_cpu'] / n / 1000:.0f} / {r['server_cpu'] / n / 1000:.0f} µs")
                if r.get("errors"):
                    print(f"    FAILED sends {r['errors']}; first: {r['first_error']}")

    # --- what meshd itself says, and anything odd ------------------------------------------
    dups = {sid: dict(rx.dups) for sid, rx in receivers.items() if rx.dups}
    print()
    reordered = {sid: dict(rx.reordered) for sid, rx in receivers.items() if rx.reordered}
    print(f"duplicates seen by the receivers: {dups or 'none'}; arrived out of send order: "
          f"{reordered or 'none'}")
    if counters:
        keep = {k: v for k, v in sorted(counters.items()) if v}
        print("mesh counters, summed over the daemons: "
              + ", ".join(f"{k}={v}" for k, v in keep.items()))
        got_in, got_acked = counters.get("routing.routed_in", 0), counters.get(
            "routing.acked_items", 0)
        ok = got_in == routed and got_acked == routed
        print(f"routing check: {routed} items sent for routing (direct sends acknowledged + "
              f"broadcasts x other daemons); routed_in {got_in}, acked_items {got_acked}: "
              f"{'OK' if ok else 'MISMATCH'}")
    for e in rx_errors:
        print(f"receiver: {e}")
    print(f"raw relays: {', '.join(sorted(set(raw_stops))) or '-'}")
    print("daemons: " + "; ".join(stopped))
    for name, tail in logs:
        print(f"daemon log {name}:")
        for line in tail.splitlines():
            print("  " + line)
    print(f"total bench time {time.monotonic() - t_start:.1f}s")
    write_json(args.json, {
        "bench": "routing", "quick": args.quick, "version": info.get("version"),
        "durability": info.get("durability"), "preset": args.preset, "key": args.key,
        "window": window, "setup": setup,
        "failure": None if failure is None else f"{type(failure).__name__}: {failure}",
        "latency": [{"name": row["name"], "raw": bool(row.get("raw")),
                     "p50_us": pct_us(row["lat"], 0.5), "p99_us": pct_us(row["lat"], 0.99),
                     "ratio": None if row.get("raw") else
                     pct_us(row["lat"], 0.5) / pct_us(row["ref"], 0.5),
                     "lost": row["lost"], "n": len(row["lat"]),
                     "call_p50_us": pct_us(row["call"], 0.5) if "call" in row else None,
                     "first_p50_us": pct_us(row["first"], 0.5) if row.get("first") else None}
                    for row in rows],
        "throughput": [{"name": row["name"], "raw": bool(row.get("raw")),
                        "rate": median_rate(row["runs"]),
                        "ratio": None if row.get("raw") else
                        median_rate(row["runs"]) / median_rate(row["ref"]),
                        "runs": [{k: r.get(k) for k in ("rate", "acked_rate", "arrived", "sent",
                                                         "missing", "dups", "reordered")}
                                 for r in row["runs"]]}
                       for row in tp_rows],
        "dups": dups, "reordered": reordered, "routed": routed,
        "routing_ok": bool(counters) and counters.get("routing.routed_in", 0) == routed
        and counters.get("routing.acked_items", 0) == routed,
        "receiver_errors": rx_errors, "bench_seconds": time.monotonic() - t_start})
    if failure is not None:
        if isinstance(failure, KeyboardInterrupt):
            return 130
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
