#!/usr/bin/env python3
"""meshd mesh benchmark: N daemons on one host, replication, membership, footprint.

    python bench/bench_mesh.py [--quick] [--nodes 3,10,20] [--samples M]
                               [--load-seconds S] [--load-rate R] [--idle-seconds S]
                               [--poll-ms MS] [--preset lan|test]

For each cluster size N (a fresh cluster each time) it measures on this host:
  1. join convergence: node 0 starts, the others start together with `--join` node 0;
     the time from the first start until every daemon's peers() lists the other N-1
     members, all 'alive';
  2. idle CPU (% of one core, all threads, /proc) and RSS (VmRSS) of every daemon over
     a quiet stretch after convergence;
  3. replication latency: a memory set on a random node (asyncio SDK) while every node's
     get(key) is polled (one get in flight per node, a short sleep between polls that
     grows to 10% of the time waited) until all N return it: p50/p99/max of set-start
     -> last node readable; next to it, in alternating rounds, a raw pyzmq ceiling of
     the same shape: this process sends a 200-byte message over TCP (loopback) to N-1
     tiny echo processes (one DEALER each) and waits for all N-1 acks;
  4. false suspicions during a write load (default 60 s at 200 sets/s spread over the
     nodes): every daemon's peers() is read every 0.5 s and any member leaving 'alive' or
     raising its incarnation (it refuted a rumour) is counted, next to the daemons' own
     refutation counters; then that every node ends with the same number of entries;
  5. failure detection: kill -9 of the last node; the time until the first and until
     the last survivor shows it 'dead'.
It prints a table per N and a summary with the targets. It is a measurement, not a test:
it never asserts a time. Only loopback addresses (daemon i on 127.0.0.(10+i), port 0; raw
receivers on 127.0.0.(50+j)) and ipc:// sockets under /tmp; every process it starts is
stopped by pid; every wait and loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import ENV, ROOT, cpu_ns, eventually, percentile, read_line, stop_pid  # noqa: E402

import zmq  # noqa: E402

NODE_HOST = "127.0.0.{}"                # daemon i binds 127.0.0.(10+i):0
RAW_HOST = "127.0.0.{}"                 # raw receiver j binds 127.0.0.(50+j):random
MAX_NODES = 30                          # keeps 10+i below the raw receivers' 50+j
RAW_LEN = 200                           # raw payload bytes (about a memory-set record)
VALUE_PAD = "x" * 180                   # memory value {"i": k, "p": VALUE_PAD}: ~200 bytes
RAW_TIMEOUT_MS = 5000                   # no raw send/recv waits longer than this
DAEMON_START_TIMEOUT = 60.0             # 20 daemons starting together on 2 cores are slow
DAEMON_STOP_TIMEOUT = 10.0
CONVERGE_TIMEOUT = 60.0
SDK_TIMEOUT = 5.0                       # per SDK call
ARRIVAL_TIMEOUT = 5.0                   # s a set may take to be readable everywhere
CATCHUP_TIMEOUT = 30.0                  # s for all nodes to hold the same entries after load
DETECT_TIMEOUT = 30.0                   # s for every survivor to mark a killed node dead
LOAD_IN_FLIGHT = 64                     # sets of the write load in flight at most
SETTLE = 2.0                            # s of quiet after convergence before measuring idle
TARGET_REPL_P99_MS = 100.0
TARGET_DETECT_S = 5.0
TARGET_RSS_MB = 40.0
TARGET_CPU_PCT = 1.0

# --- the raw receiver (child process, plain blocking pyzmq) ---------------------------------

RAW_RECEIVER = r"""
import os, sys, time, zmq
host, idle_limit = sys.argv[1], float(sys.argv[2])
parent = os.getppid()
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.SNDTIMEO, 1000)
s.setsockopt(zmq.RCVTIMEO, 1000)    # blocking recv; the timeout only lets an orphan notice
port = s.bind_to_random_port(f"tcp://{host}")
print(f"tcp://{host}:{port}", flush=True)
last = time.monotonic()
while True:
    try:
        ident, m = s.recv_multipart()
    except zmq.Again:
        if os.getppid() != parent or time.monotonic() - last > idle_limit:
            break
        continue
    except ValueError:
        continue
    last = time.monotonic()
    if m == b"quit":
        break
    try:
        s.send_multipart([ident, m[:8]])      # the ack: the sequence number
    except zmq.Again:
        pass
s.close(); ctx.term()
"""


# --- helpers ------------------------------------------------------------------------------


def mem_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon and RssFile of a process, in kB, from
    /proc/PID/status."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


# --- the raw ceiling ------------------------------------------------------------------------


class RawFanout:
    """`fanout` echo processes on 127.0.0.(50+j); one DEALER each in this process."""

    def __init__(self, fanout: int) -> None:
        self.fanout = fanout
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket] = []
        try:
            for j in range(fanout):
                p = subprocess.Popen([sys.executable, "-c", RAW_RECEIVER,
                                      RAW_HOST.format(50 + j), "600"],
                                     stdout=subprocess.PIPE, env=ENV)
                self.procs.append(p)
            self.poller = zmq.Poller()
            for j, p in enumerate(self.procs):
                endpoint = read_line(p, 15.0).strip().decode()
                if not endpoint.startswith("tcp://127.0.0."):
                    raise RuntimeError(f"raw receiver {j} did not start (said {endpoint!r})")
                s = self.ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDTIMEO, RAW_TIMEOUT_MS)
                s.setsockopt(zmq.RCVTIMEO, RAW_TIMEOUT_MS)
                s.connect(endpoint)
                self.socks.append(s)
                self.poller.register(s, zmq.POLLIN)
        except BaseException:
            self.close()
            raise

    def once(self, seq: int) -> int | None:
        """Send one message to every receiver; ns until the last ack (None: not all in 5 s)."""
        head = seq.to_bytes(8, "big")
        payload = head + b"x" * (RAW_LEN - 8)
        clock = time.perf_counter_ns
        pending = set(range(self.fanout))
        t0 = clock()
        for s in self.socks:
            s.send(payload)
        deadline = time.monotonic() + RAW_TIMEOUT_MS / 1000
        last = t0
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready = dict(self.poller.poll(remaining * 1000))
            for j in list(pending):
                s = self.socks[j]
                if s not in ready:
                    continue
                while True:
                    try:
                        m = s.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if m == head:
                        last = clock()
                        pending.discard(j)
        return last - t0

    def close(self) -> list[str]:
        for s in self.socks:
            try:
                s.send(b"quit", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            s.close(linger=0)
        self.socks = []
        self.ctx.term()
        how = []
        for p in self.procs:
            try:
                p.wait(2)
                how.append(f"exited ({p.returncode})")
            except subprocess.TimeoutExpired:
                how.append(stop_pid(p, 3))
            if p.stdout is not None:
                p.stdout.close()
        return how


# --- the daemons --------------------------------------------------------------------------


class Node:
    """One `python -m meshd` on its own socket, data dir and loopback address."""

    def __init__(self, tmp: str, index: int, join: str | None, preset: str) -> None:
        self.index = index
        self.sock = f"{tmp}/n{index}.sock"
        self.data_dir = f"{tmp}/n{index}-data"
        self.log_path = f"{tmp}/n{index}.log"
        cmd = [sys.executable, "-m", "meshd", "--socket", self.sock, "--data-dir", self.data_dir,
               "--bind", f"{NODE_HOST.format(10 + index)}:0", "--preset", preset,
               "--log-level", "warning"]
        if join:
            cmd += ["--join", join]
        self._log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=ENV,
                                     cwd=str(ROOT))
        self.pid = self.proc.pid
        self.info: dict[str, Any] = {}
        self.node_id = ""
        self.address = ""
        self.killed = False
        self._reg: Any = None

    def wait_ready(self, deadline: float) -> None:
        from sessions import SessionRegistry
        last = "no socket file yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshd n{self.index} exited with {self.proc.returncode} "
                                   f"while starting:\n{self.log()[-3000:]}")
            if os.path.exists(self.sock):
                try:
                    self.info = SessionRegistry(socket=self.sock, timeout=1.0).node_info()
                    self.node_id = self.info["node_id"]
                    self.address = self.info.get("peer_address") or ""
                    if not self.address:
                        raise RuntimeError(f"meshd n{self.index} reports no peer address")
                    return
                except RuntimeError:
                    raise
                except Exception as exc:          # not answering yet: try again shortly
                    last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise TimeoutError(f"meshd n{self.index} did not answer node.info in time "
                           f"(last: {last}):\n{self.log()[-3000:]}")

    def registry(self) -> Any:
        if self._reg is None:
            from sessions import SessionRegistry
            self._reg = SessionRegistry(socket=self.sock, timeout=SDK_TIMEOUT)
        return self._reg

    def mesh(self) -> dict[str, Any]:
        return self.registry().node_info().get("mesh") or {}

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.killed = True
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> str:
        how = stop_pid(self.proc, DAEMON_STOP_TIMEOUT)
        if self.killed:
            how = f"killed -9 by the bench ({how})"
        self._log.close()
        return how


class Cluster:
    """Daemons on 127.0.0.10, .11, ...; node 0 first, the others join it together."""

    def __init__(self, tmp: str, preset: str) -> None:
        self.tmp, self.preset = tmp, preset
        self.nodes: list[Node] = []

    def start(self, n: int) -> dict[str, float]:
        t0 = time.monotonic()
        self.nodes.append(Node(self.tmp, 0, None, self.preset))
        self.nodes[0].wait_ready(t0 + DAEMON_START_TIMEOUT)
        self.nodes += [Node(self.tmp, i, self.nodes[0].address, self.preset) for i in range(1, n)]
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        for node in self.nodes[1:]:
            node.wait_ready(deadline)
        return {"t0": t0, "ready": time.monotonic() - t0}

    @property
    def up(self) -> list[Node]:
        return [d for d in self.nodes if not d.killed]

    def alive_views(self) -> int:
        """How many daemons see all the others alive."""
        ids = {d.node_id for d in self.nodes}
        good = 0
        for d in self.nodes:
            states = {p["node_id"]: p["state"] for p in d.registry().peers()}
            if all(states.get(o) == "alive" for o in ids - {d.node_id}):
                good += 1
        return good

    def stop(self) -> list[str]:
        return [f"n{d.index}: {d.stop()}" for d in self.nodes]


# --- what each phase cost, and what the daemons counted meanwhile --------------------------


class Meter:
    """CPU of every daemon and of this process, and the daemons' refutation and pull
    counters, between begin() and end(); end() appends one row to `rows`."""

    def __init__(self, cluster: Cluster, rows: list[dict[str, Any]]) -> None:
        self.cluster, self.rows = cluster, rows
        self._begin: dict[str, Any] | None = None

    def _read(self) -> dict[str, Any]:
        refut: dict[int, int] = {}
        pulls: dict[int, int] = {}
        for d in self.cluster.up:
            try:
                mesh = d.mesh()
            except Exception:
                continue
            refut[d.index] = int(mesh.get("refutations") or 0)
            pulls[d.index] = int(((mesh.get("replication") or {}).get("counters") or {})
                                 .get("pulls", 0))
        return {"t": time.monotonic(), "bench": time.process_time_ns(),
                "cpu": {d.index: cpu_ns(d.pid) for d in self.cluster.up},
                "refut": refut, "pulls": pulls}

    def begin(self) -> None:
        self._begin = self._read()

    def end(self, name: str) -> None:
        if self._begin is None:
            return
        a, b = self._begin, self._read()
        self._begin = None
        wall = max(1e-9, b["t"] - a["t"])
        cpu = [(b["cpu"][i] - a["cpu"][i]) / 1e9 / wall * 100 for i in b["cpu"]
               if a["cpu"].get(i) is not None and b["cpu"][i] is not None]
        self.rows.append({
            "name": name, "seconds": wall, "cpu_sum": sum(cpu), "cpu_max": max(cpu, default=0.0),
            "bench": (b["bench"] - a["bench"]) / 1e9 / wall * 100,
            "refut": {i: b["refut"][i] - a["refut"].get(i, 0) for i in b["refut"]
                      if b["refut"][i] - a["refut"].get(i, 0)},
            "pulls": sum(b["pulls"][i] - a["pulls"].get(i, 0) for i in b["pulls"])})


# --- membership watch ---------------------------------------------------------------------


class Watch:
    """Reads peers() of several daemons at once and notes every change of a member's
    state or incarnation as each observer sees it."""

    def __init__(self, regs: dict[int, Any]) -> None:
        self.regs = regs
        self.seen: dict[tuple[int, str], tuple[str, int]] = {}
        self.events: list[tuple[float, int, str, tuple[str, int], tuple[str, int]]] = []
        self.errors: Counter[str] = Counter()
        self.polls = 0

    async def poll(self) -> dict[int, dict[str, str]]:
        """One read of every observer; returns {observer: {node_id: state}}."""
        idx = list(self.regs)
        res = await asyncio.gather(*(self.regs[i].peers() for i in idx), return_exceptions=True)
        now = time.monotonic()
        self.polls += 1
        out: dict[int, dict[str, str]] = {}
        for obs, rows in zip(idx, res):
            if isinstance(rows, BaseException):
                self.errors[type(rows).__name__] += 1
                continue
            out[obs] = {}
            for p in rows:
                key = (obs, p["node_id"])
                cur = (p["state"], int(p["incarnation"]))
                prev = self.seen.get(key)
                if prev is not None and prev != cur:
                    self.events.append((now, obs, p["node_id"], prev, cur))
                self.seen[key] = cur
                out[obs][p["node_id"]] = p["state"]
        return out


def bad_events(events: list[Any], exclude: str | None = None) -> list[Any]:
    """Changes that mean a member was suspected (or declared dead/left) by someone: it
    left 'alive' in a view, or its incarnation rose (it refuted such a rumour)."""
    return [e for e in events if e[2] != exclude
            and (e[4][0] != "alive" or e[4][1] > e[3][1])]


# --- one cluster size -----------------------------------------------------------------------


async def async_phases(cluster: Cluster, res: dict[str, Any], opts: argparse.Namespace,
                       meter: Meter) -> None:
    """Replication (with the raw ceiling), false suspicions under load, catch-up, failure
    detection. Each phase records its own failure and the next one still runs."""
    from sessions.aio import AsyncClient, AsyncSessionRegistry, AsyncSharedMemory
    nodes = cluster.nodes
    n = len(nodes)
    clients = [AsyncClient(d.sock, SDK_TIMEOUT) for d in nodes]
    mems = [AsyncSharedMemory(client=c) for c in clients]
    regs = [AsyncSessionRegistry(client=c) for c in clients]
    clock = time.perf_counter_ns
    poll_s = opts.poll_ms / 1000.0
    id2idx = {d.node_id: d.index for d in nodes}
    res["id2idx"] = id2idx
    try:
        # --- replication --------------------------------------------------------------------
        repl: dict[str, Any] = {"all": [], "first": [], "ack": [], "missing": 0,
                                "errors": Counter(), "polls": 0, "watch_ns": 0, "raw": [],
                                "raw_lost": 0, "slow": []}
        res["repl"] = repl

        async def sample(k: int, record: bool) -> None:
            origin = random.randrange(n)
            key = f"repl-{n}-{k}"
            arrival: list[int | None] = [None] * n
            t0 = clock()
            end = t0 + int(ARRIVAL_TIMEOUT * 1e9)

            async def do_set() -> int:
                await mems[origin].set("bench", key, {"i": k, "p": VALUE_PAD}, tags=["bench"])
                return clock()

            async def watch(i: int) -> None:
                polls = 0
                while True:
                    try:
                        v = await mems[i].get(key)
                    except Exception as exc:
                        repl["errors"][f"get {type(exc).__name__}"] += 1
                        v = None
                    now = clock()
                    polls += 1
                    if v is not None:
                        arrival[i] = now
                        break
                    if now >= end:
                        break
                    # Polls are dense at first and thin out for a slow arrival (a gap of
                    # at most 10% of the time waited so far), so that the polling does not
                    # pile load onto daemons that are already behind.
                    await asyncio.sleep(min(max(poll_s, (now - t0) / 1e10), 0.05))
                if record:
                    repl["polls"] += polls
                    repl["watch_ns"] += clock() - t0

            out = await asyncio.gather(do_set(), *(watch(i) for i in range(n)),
                                       return_exceptions=True)
            if not record:
                return
            if isinstance(out[0], BaseException):
                repl["errors"][f"set {type(out[0]).__name__}"] += 1
                return
            repl["ack"].append(out[0] - t0)
            if any(a is None for a in arrival):
                repl["missing"] += 1
                return
            total = max(a for a in arrival if a is not None) - t0
            repl["all"].append(total)
            last = max(range(n), key=lambda i: arrival[i] or 0)
            repl["slow"].append((total, origin, last, out[0] - t0))
            if n > 1:
                repl["first"].append(min(a for i, a in enumerate(arrival)
                                         if i != origin and a is not None) - t0)

        raw: RawFanout | None = None
        try:
            if n > 1:
                raw = RawFanout(n - 1)
                for s in range(20):                               # warm-up
                    raw.once(10**6 + s)
            for k in range(5):                                    # warm-up
                await sample(-1 - k, False)
                await asyncio.sleep(0.02)
            meter.begin()
            rounds = opts.rounds
            per = max(1, opts.samples // rounds)
            raw_per = max(1, opts.raw_samples // rounds)
            seq = 0
            # Rounds alternate the raw ceiling and meshd, so that drift in the machine's
            # speed (a shared VM) weighs on both sides of the ratio alike.
            for r in range(rounds):
                if raw is not None:
                    for _ in range(raw_per):
                        t = raw.once(seq)
                        seq += 1
                        if t is None:
                            repl["raw_lost"] += 1
                        else:
                            repl["raw"].append(t)
                for k in range(per):
                    await sample(r * per + k, True)
                    await asyncio.sleep(0.02)                     # let the push settle
        except Exception as exc:
            res["errors"].append(f"replication phase: {type(exc).__name__}: {exc}")
        finally:
            meter.end("replication (with the raw rounds)")
            if raw is not None:
                res["raw_stops"] = raw.close()

        # --- false suspicions under write load ----------------------------------------------
        load: dict[str, Any] = {"acked": 0, "offered": 0, "lat": [], "errors": Counter(),
                                "first_error": None}
        res["load"] = load
        try:
            before = {d.index: d.mesh() for d in nodes}
            watch = Watch({d.index: regs[d.index] for d in nodes})
            await watch.poll()                                    # the baseline
            loop = asyncio.get_running_loop()
            start = loop.time()
            stop_at = start + opts.load_seconds
            inflight: set[asyncio.Task[None]] = set()

            async def one_set(i: int) -> None:
                t = clock()
                try:
                    await mems[i % n].set("load", f"load-{n}-{i}", {"i": i, "p": VALUE_PAD},
                                          tags=["load"])
                except Exception as exc:
                    load["errors"][type(exc).__name__] += 1
                    if load["first_error"] is None:
                        load["first_error"] = f"{type(exc).__name__}: {exc}"
                    return
                load["lat"].append(clock() - t)
                load["acked"] += 1

            async def writer() -> None:
                i = 0
                while (now := loop.time()) < stop_at:
                    due = int((now - start) * opts.load_rate)
                    while i < due and len(inflight) < LOAD_IN_FLIGHT:
                        task = asyncio.ensure_future(one_set(i))
                        inflight.add(task)
                        task.add_done_callback(inflight.discard)
                        i += 1
                    await asyncio.sleep(0.005)
                load["offered"] = i
                if inflight:
                    await asyncio.wait(set(inflight), timeout=SDK_TIMEOUT + 5)

            async def watcher() -> None:
                while loop.time() < stop_at:
                    await asyncio.sleep(0.5)
                    await watch.poll()

            t_load = time.monotonic()
            meter.begin()
            await asyncio.gather(writer(), watcher())
            load["seconds"] = time.monotonic() - t_load
            meter.end(f"write load, {opts.load_rate:g} sets/s")
            after = {d.index: d.mesh() for d in nodes}
            load["refutations"] = sum(int(after[i].get("refutations") or 0)
                                      - int(before[i].get("refutations") or 0) for i in after)
            load["incarnation_bumps"] = sum(1 for i in after if after[i].get("incarnation")
                                            != before[i].get("incarnation"))
            load["events"] = bad_events(watch.events)
            load["polls"] = watch.polls
            load["poll_errors"] = dict(watch.errors)
        except Exception as exc:
            res["errors"].append(f"load phase: {type(exc).__name__}: {exc}")

        # --- every node holds the same entries after the load -------------------------------
        try:
            t0 = time.monotonic()
            counts: list[int] = []
            deadline = t0 + CATCHUP_TIMEOUT
            while True:
                got = await asyncio.gather(*(m.get_stats() for m in mems), return_exceptions=True)
                counts = [g["total_entries"] if isinstance(g, dict) else -1 for g in got]
                if len(set(counts)) == 1 and counts[0] >= 0:
                    res["catchup"] = {"seconds": time.monotonic() - t0, "entries": counts[0]}
                    break
                if time.monotonic() > deadline:
                    res["catchup"] = {"seconds": None, "counts": counts}
                    break
                await asyncio.sleep(0.25)
        except Exception as exc:
            res["errors"].append(f"catch-up check: {type(exc).__name__}: {exc}")
        res["rss_load"] = {d.index: mem_kb(d.pid) for d in nodes}

        # --- failure detection after kill -9 --------------------------------------------------
        if n < 2:
            return
        det: dict[str, Any] = {"victim": n - 1}
        res["detect"] = det
        try:
            victim = nodes[n - 1]
            survivors = nodes[:-1]
            meter.begin()
            det["refutations_before"] = {d.index: int(d.mesh().get("refutations") or 0)
                                         for d in survivors}
            watch = Watch({d.index: regs[d.index] for d in survivors})
            await watch.poll()
            first_suspect: dict[int, float] = {}
            dead_at: dict[int, float] = {}
            t_kill = time.monotonic()
            victim.kill9()
            deadline = t_kill + DETECT_TIMEOUT
            while len(dead_at) < len(survivors) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                views = await watch.poll()
                now = time.monotonic() - t_kill
                for obs, states in views.items():
                    st = states.get(victim.node_id)
                    if st in ("suspect", "dead", "left") and obs not in first_suspect:
                        first_suspect[obs] = now
                    if st in ("dead", "left") and obs not in dead_at:
                        dead_at[obs] = now
            det["suspect"] = sorted(first_suspect.values())
            det["dead"] = sorted(dead_at.values())
            det["survivors"] = len(survivors)
            det["others"] = bad_events(watch.events, exclude=victim.node_id)
            det["refutations"] = sum(int(d.mesh().get("refutations") or 0)
                                     - det["refutations_before"][d.index] for d in survivors)
            det["poll_errors"] = dict(watch.errors)
            meter.end("after the kill -9 (survivors)")
        except Exception as exc:
            res["errors"].append(f"failure detection: {type(exc).__name__}: {exc}")
    finally:
        for c in clients:
            await c.close()


def measure(n: int, opts: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """A fresh cluster of n daemons, measured, stopped, and its temp dir removed; its
    results go into `results` at once, so an interrupted run still reports them."""
    res: dict[str, Any] = {"n": n, "errors": [], "logs": [], "stops": [], "phases": []}
    results.append(res)
    tmp = tempfile.mkdtemp(prefix=f"mm{n}-", dir="/tmp")     # short: ipc paths <= 107 bytes
    cluster = Cluster(tmp, opts.preset)
    t_begin = time.monotonic()
    try:
        # --- start and join convergence -----------------------------------------------------
        started = cluster.start(n)
        res["ready"] = started["ready"]
        res["info"] = cluster.nodes[0].info
        try:
            eventually(lambda: cluster.alive_views() == n, CONVERGE_TIMEOUT,
                       f"{n} daemons seeing each other alive", interval=0.1)
            res["converge"] = time.monotonic() - started["t0"]
        except TimeoutError as exc:
            res["converge"] = None
            try:
                views = cluster.alive_views()
            except Exception:
                views = -1
            res["errors"].append(f"join convergence: {exc} ({views} of {n} saw all alive)")
        refut0 = {d.index: int(d.mesh().get("refutations") or 0) for d in cluster.nodes}
        meter = Meter(cluster, res["phases"])

        # --- idle CPU and RSS ---------------------------------------------------------------
        time.sleep(SETTLE)
        meter.begin()
        pids = {d.index: d.pid for d in cluster.nodes}
        c0 = {i: cpu_ns(p) for i, p in pids.items()}
        t0 = time.monotonic()
        time.sleep(opts.idle_seconds)
        c1 = {i: cpu_ns(p) for i, p in pids.items()}
        wall = time.monotonic() - t0
        res["idle_cpu"] = {i: (c1[i] - c0[i]) / 1e9 / wall * 100 for i in pids
                           if c0[i] is not None and c1[i] is not None}
        res["rss_idle"] = {i: mem_kb(p) for i, p in pids.items()}
        meter.end("idle")

        # --- replication, load, catch-up, failure detection ------------------------------
        asyncio.run(async_phases(cluster, res, opts, meter))

        # --- what the daemons say ---------------------------------------------------------
        counters: Counter[str] = Counter()
        refutations = 0
        for d in cluster.up:
            try:
                mesh = d.mesh()
            except Exception as exc:
                res["errors"].append(f"node_info n{d.index}: {type(exc).__name__}: {exc}")
                continue
            refutations += int(mesh.get("refutations") or 0) - refut0.get(d.index, 0)
            for part in ("transport", "replication"):
                for k, v in ((mesh.get(part) or {}).get("counters") or {}).items():
                    if isinstance(v, int) and v:
                        counters[f"{part}.{k}"] += v
        res["refutations_total"] = refutations
        res["counters"] = dict(counters)
    except Exception as exc:
        res["errors"].append(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        res["errors"].append("interrupted")
        raise
    finally:
        res["stops"] = cluster.stop()
        for d in cluster.nodes:
            text = d.log()
            if "Traceback" in text or "ERROR" in text:
                res["logs"].append((f"n{d.index} (has errors)", text.splitlines()[-40:]))
            elif text.strip():
                res["logs"].append((f"n{d.index} ({len(text.splitlines())} lines, warnings)",
                                    text.splitlines()[-5:]))
        shutil.rmtree(tmp, ignore_errors=True)
        res["seconds"] = time.monotonic() - t_begin


# --- the report -----------------------------------------------------------------------------


def ms(ns: float) -> str:
    return "-" if ns != ns else f"{ns / 1e6:.1f}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT MET")


Summary = list[tuple[str, str, str, "bool | None"]]


def report(res: dict[str, Any], opts: argparse.Namespace) -> Summary:
    """Prints the table of one cluster size; returns its summary rows."""
    n = res["n"]
    summary: list[tuple[str, str, str, bool | None]] = []
    print()
    print(f"N = {n} daemons ({res.get('seconds', 0):.0f}s)")
    w = 100
    print(f"{'measurement':<52}{'value':>22}  {'target':<12}verdict")
    print("-" * w)

    def row(name: str, value: str, target: str = "", ok: bool | None = None) -> None:
        print(f"{name:<52}{value:>22}  {target:<12}{verdict(ok) if target else ''}")

    if "ready" in res:
        row("all daemons answer node.info, from first start", f"{res['ready']:.1f} s")
    if "converge" in res:
        c = res["converge"]
        row(f"join convergence: all {n} see the other {n - 1} alive",
            "TIMEOUT" if c is None else f"{c:.1f} s")
        summary.append(("join convergence (no target)", f"N={n}",
                        "TIMEOUT" if c is None else f"{c:.1f} s", None if c is not None else False))
    if "idle_cpu" in res and res["idle_cpu"]:
        v = list(res["idle_cpu"].values())
        ok = max(v) < TARGET_CPU_PCT
        row(f"idle CPU per daemon, mean / max ({opts.idle_seconds:g}s)",
            f"{sum(v) / len(v):.2f} / {max(v):.2f} %", f"< {TARGET_CPU_PCT:g}%", ok)
        summary.append((f"idle CPU per daemon (max) < {TARGET_CPU_PCT:g}%", f"N={n}",
                        f"{max(v):.2f} %", ok))
    rss_max = 0.0
    for label, key in (("idle", "rss_idle"), ("after the load", "rss_load")):
        if res.get(key):
            v = [m.get("VmRSS", 0) / 1024 for m in res[key].values() if m]
            if v:
                rss_max = max(rss_max, max(v))
                row(f"RSS per daemon {label}, mean / max", f"{sum(v) / len(v):.1f} / "
                    f"{max(v):.1f} MB", f"< {TARGET_RSS_MB:g} MB", max(v) < TARGET_RSS_MB)
    if res.get("rss_load"):
        v = [m.get("VmHWM", 0) / 1024 for m in res["rss_load"].values() if m]
        if v:
            row("  peak RSS (VmHWM) per daemon, max", f"{max(v):.1f} MB")
        for label, key in (("idle", "rss_idle"), ("after the load", "rss_load")):
            ms_ = [m for m in (res.get(key) or {}).values() if m and "RssAnon" in m]
            if ms_:
                row(f"  RSS {label}: anonymous / file-backed, max",
                    f"{max(m['RssAnon'] for m in ms_) / 1024:.1f} / "
                    f"{max(m.get('RssFile', 0) for m in ms_) / 1024:.1f} MB")
    if rss_max:
        summary.append((f"RSS per daemon (max) < {TARGET_RSS_MB:g} MB", f"N={n}",
                        f"{rss_max:.1f} MB", rss_max < TARGET_RSS_MB))

    rp = res.get("repl")
    if rp is not None:
        a = rp["all"]
        p99 = percentile(a, 0.99) / 1e6 if a else float("nan")
        ok = bool(a) and p99 < TARGET_REPL_P99_MS and rp["missing"] == 0
        row(f"replication: set -> readable on all {n}, p50 / p99", f"{ms(percentile(a, 0.5))} / "
            f"{ms(percentile(a, 0.99))} ms", f"p99 < {TARGET_REPL_P99_MS:g}ms", ok)
        row(f"  max, over {len(a)} sets", f"{ms(max(a) if a else float('nan'))} ms")
        if rp["first"]:
            row("  first other node readable, p50 / p99",
                f"{ms(percentile(rp['first'], 0.5))} / {ms(percentile(rp['first'], 0.99))} ms")
        if rp["ack"]:
            row("  the set() call itself, p50 / p99",
                f"{ms(percentile(rp['ack'], 0.5))} / {ms(percentile(rp['ack'], 0.99))} ms")
        if rp["raw"]:
            r = rp["raw"]
            row(f"raw pyzmq: 200 B to {n - 1} receivers + acks, p50 / p99",
                f"{percentile(r, 0.5) / 1e6:.2f} / {percentile(r, 0.99) / 1e6:.2f} ms", "ceiling")
            if a:
                row("  meshd / raw, p50 / p99", f"{percentile(a, 0.5) / percentile(r, 0.5):.1f}x / "
                    f"{percentile(a, 0.99) / percentile(r, 0.99):.1f}x")
        if rp["polls"]:
            gap = rp["watch_ns"] / rp["polls"] / 1e6
            row("  polling: one get per node every (mean)", f"{gap:.1f} ms")
        if rp["missing"] or rp["raw_lost"] or rp["errors"]:
            row(f"  NOT everywhere within {ARRIVAL_TIMEOUT:g}s / raw lost",
                f"{rp['missing']} / {rp['raw_lost']}")
            if rp["errors"]:
                print(f"  errors: {dict(rp['errors'])}")
        summary.append((f"replication to all N, p99 < {TARGET_REPL_P99_MS:g} ms", f"N={n}",
                        f"{ms(percentile(a, 0.99))} ms" + (f" ({rp['missing']} missing)"
                                                   if rp["missing"] else ""), ok))

    ld = res.get("load")
    if ld is not None and "events" in ld:
        row(f"write load: sets acked / offered in {ld['seconds']:.0f}s",
            f"{ld['acked']:,} / {ld['offered']:,}")
        if ld["lat"]:
            row("  set latency under load, p50 / p99",
                f"{ms(percentile(ld['lat'], 0.5))} / {ms(percentile(ld['lat'], 0.99))} ms")
        if ld["errors"]:
            print(f"  FAILED sets {dict(ld['errors'])}; first: {ld['first_error']}")
        ev = ld["events"]
        members = {e[2] for e in ev}
        false_pos = len(ev) + ld["refutations"]
        ok = false_pos == 0 and not ld["poll_errors"]
        row(f"false suspicions under load ({ld['polls']} reads of all peers())",
            f"{len(ev)} seen, {ld['refutations']} refuted", "0", ok)
        if ev:
            idx = res.get("id2idx", {})
            for t, obs, mid, prev, cur in ev[:8]:
                print(f"    n{obs} saw n{idx.get(mid, mid[:8])}: {prev[0]}/{prev[1]} -> "
                      f"{cur[0]}/{cur[1]}")
            print(f"    ({len(members)} member(s) involved)")
        if ld["poll_errors"]:
            print(f"  peers() errors during the load: {ld['poll_errors']}")
        summary.append(("false suspicions under load = 0", f"N={n}",
                        f"{len(ev)} seen, {ld['refutations']} refuted", ok))
    cu = res.get("catchup")
    if cu is not None:
        if cu["seconds"] is None:
            row("same entries on every node after the load", "NO: " + ",".join(
                str(c) for c in cu["counts"])[:22])
        else:
            row("same entries on every node after the load",
                f"{cu['entries']:,} in {cu['seconds']:.1f} s")

    dt = res.get("detect")
    if dt is not None and "dead" in dt:
        s, d = dt["suspect"], dt["dead"]
        complete = len(d) == dt["survivors"]
        last = d[-1] if complete else None
        ok = complete and last is not None and last < TARGET_DETECT_S and not dt["others"]
        row(f"kill -9 n{dt['victim']}: first survivor marks it suspect",
            f"{s[0]:.2f} s" if s else "never")
        row("  first survivor marks it dead", f"{d[0]:.2f} s" if d else "never")
        row(f"  all {dt['survivors']} survivors mark it dead",
            f"{last:.2f} s" if complete else f"TIMEOUT ({len(d)} of {dt['survivors']})",
            f"< {TARGET_DETECT_S:g} s", ok)
        if dt["others"] or dt["refutations"]:
            row("  survivors suspected meanwhile / refuted",
                f"{len(dt['others'])} / {dt['refutations']}")
        summary.append((f"failure detection, all mark dead < {TARGET_DETECT_S:g} s", f"N={n}",
                        f"{last:.2f} s" if complete else "TIMEOUT", ok))
    if "refutations_total" in res:
        row("refutations over the whole run (daemon counters)", f"{res['refutations_total']}")
    if res.get("repl", {}).get("slow"):
        slow = sorted(res["repl"]["slow"], reverse=True)[:3]
        print("  slowest sets: " + "; ".join(
            f"{t / 1e6:.0f} ms (set on n{o}, ack {a / 1e6:.0f} ms, last n{l})"
            for t, o, l, a in slow))
    if res["phases"]:
        print(f"  {'phase':<38}{'s':>5}{'daemons CPU %':>15}{'max':>6}{'bench %':>9}"
              f"{'refutations':>13}{'pulls':>7}")
        for p in res["phases"]:
            refut = sum(p["refut"].values())
            who = ("" if not refut else " (" + ",".join(f"n{i}" for i in sorted(p["refut"])) + ")")
            print(f"  {p['name']:<38}{p['seconds']:>5.0f}{p['cpu_sum']:>15.1f}{p['cpu_max']:>6.1f}"
                  f"{p['bench']:>9.1f}{refut:>13}{p['pulls']:>7}{who}")
    for e in res["errors"]:
        print(f"  ERROR: {e}")
    keep = {k: v for k, v in sorted(res.get("counters", {}).items())
            if "dropped" in k or "error" in k}
    if keep:
        print("  drops/errors in mesh counters, summed: "
              + ", ".join(f"{k}={v}" for k, v in keep.items()))
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="N=3 only, short phases (smoke run, about 25 s)")
    ap.add_argument("--nodes", default=None, help="cluster sizes, e.g. 3,10,20 (default; "
                    "--quick 3)")
    ap.add_argument("--samples", type=int, default=None,
                    help="replication samples per N (default 100, --quick 30)")
    ap.add_argument("--load-seconds", type=float, default=None,
                    help="length of the write load (default 60, --quick 10)")
    ap.add_argument("--load-rate", type=float, default=200.0,
                    help="sets per second during the load, over all nodes (default 200)")
    ap.add_argument("--idle-seconds", type=float, default=None,
                    help="idle CPU sampling window (default 10, --quick 5)")
    ap.add_argument("--poll-ms", type=float, default=2.0,
                    help="sleep between two gets on one node while waiting for a set "
                         "(default 2; it grows to 10%% of the time waited, at most 50 ms)")
    ap.add_argument("--preset", choices=["lan", "test"], default="lan",
                    help="meshd timing preset (default lan: the targets are for LAN timings)")
    args = ap.parse_args()

    if args.quick:
        sizes, samples, load_s, idle_s = [3], 30, 10.0, 5.0
    else:
        sizes, samples, load_s, idle_s = [3, 10, 20], 100, 60.0, 10.0
    if args.nodes is not None:
        sizes = [max(2, min(int(x), MAX_NODES)) for x in args.nodes.split(",") if x.strip()]
    args.samples = max(5, min(args.samples or samples, 10_000))
    args.load_seconds = max(1.0, min(args.load_seconds if args.load_seconds is not None
                                     else load_s, 3600.0))
    args.idle_seconds = max(1.0, min(args.idle_seconds if args.idle_seconds is not None
                                     else idle_s, 600.0))
    args.load_rate = max(1.0, min(args.load_rate, 5000.0))
    args.poll_ms = max(0.0, min(args.poll_ms, 1000.0))
    args.rounds = 2 if args.quick else 5
    args.raw_samples = args.samples * 2

    from meshd.config import Config
    cfg = Config.test() if args.preset == "test" else Config.lan()

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt            # stop like Ctrl-C: every daemon is still stopped

    signal.signal(signal.SIGTERM, on_sigterm)
    t_start = time.monotonic()
    results: list[dict[str, Any]] = []
    interrupted = False
    try:
        for n in sizes:
            print(f"... N={n}: starting {n} daemons", file=sys.stderr, flush=True)
            measure(n, args, results)
    except KeyboardInterrupt:
        interrupted = True

    info = next((r["info"] for r in results if r.get("info")), {})
    print()
    print(f"meshd mesh benchmark {time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, pyzmq {zmq.__version__} / libzmq "
          f"{zmq.zmq_version()}, meshd {info.get('version', '?')}, durability "
          f"{info.get('durability', '?')}")
    print(f"preset {args.preset}: probe every {cfg.probe_interval:g}s, probe timeout "
          f"{cfg.probe_timeout:g}s, suspicion timeout {cfg.suspicion_timeout:g}s, anti-entropy "
          f"every {cfg.sync_interval:g}s; all daemons on this one host (loopback)")
    print(f"replication: {args.samples} sets per N on a random node (~200-byte value), every "
          f"node polled with get() (one in flight per node, {args.poll_ms:g} ms sleep between "
          f"polls, growing to 10% of the time waited), so a latency includes up to one poll gap "
          f"and the polling loads the daemons; "
          f"raw ceiling: {args.raw_samples} fan-outs per N; {args.rounds} alternating rounds")
    print(f"load: {args.load_rate:g} sets/s over all nodes for {args.load_seconds:g}s, "
          f"peers() of every daemon read every 0.5 s; idle: {args.idle_seconds:g}s after "
          f"{SETTLE:g}s of quiet")
    summary: list[tuple[str, str, str, bool | None]] = []
    for r in results:
        summary += report(r, args)

    if summary:
        print()
        print("summary")
        w = 100
        print(f"{'target':<46}{'N':<7}{'value':>26}  verdict")
        print("-" * w)
        order = []
        for name, *_ in summary:
            if name not in order:
                order.append(name)
        for name in order:
            for s in summary:
                if s[0] == name:
                    v = s[3]
                    print(f"{name:<46}{s[1]:<7}{s[2]:>26}  "
                          f"{'-' if v is None else verdict(v)}")
    print()
    for r in results:
        bad = [s for s in r["stops"] if "SIGTERM (exit 0)" not in s and "killed -9" not in s]
        print(f"N={r['n']}: {len(r['stops'])} daemons stopped"
              + (f"; not cleanly: {'; '.join(bad)}" if bad else " cleanly (SIGTERM, exit 0)")
              + (f"; raw receivers: {', '.join(sorted(set(r['raw_stops'])))}"
                 if r.get("raw_stops") else ""))
        for name, tail in r["logs"]:
            print(f"  daemon log N={r['n']} {name}:")
            for line in tail:
                print("    " + line)
    print(f"total bench time {time.monotonic() - t_start:.1f}s")
    if interrupted:
        print("INTERRUPTED")
        return 130
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
