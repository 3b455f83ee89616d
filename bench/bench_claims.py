#!/usr/bin/env python3
"""meshd claims benchmark: acquire+release round trips, host scope and mesh scope with 3
voters on loopback, next to a raw pyzmq majority round trip of the same shape.

    python bench/bench_claims.py [--n 300] [--quick]

In one run on this host it measures (issue 16: "acquire+release round trip with 3 voters
on loopback and with host scope"):
  1. the ceiling: a DEALER in this process -ipc-> a relay process (ROUTER) that sends the
     request over TCP (127.0.0.6x) to 3 echo processes in parallel and answers when 2 of
     the 3 replied: "a local call + a majority round trip". Acquire is 2 such rounds
     (prepare, accept), release 1, so acquire+release would cost 3 of them. Also measured:
     the bare ipc call (no round: the host-scope shape), the acquire shape (one call, two
     rounds), and the voter shape (the relay counts itself as one acceptor and answers at
     the first of 2 echoes, as a voter's own acceptor answers in-process);
  2. host scope: one daemon without --voters, a session registered there, N times
     `lease = claims.acquire("bench/r", sid, ttl=30); claims.release(lease)`;
  3. mesh scope: 3 daemons on 127.0.0.50-52 with fixed free ports, each started with
     `--voters` (the same list of the three) and `--bind` its address, joined to the
     first, plus a 4th daemon (127.0.0.53) with the same --voters that is not one of them;
     after the voters' quarantine (5.5 s with --preset test) the same pairs from a session
     on a voter and from a session on the non-voter.

It prints a table (p50/p90/p99 in µs, each p50 against the raw ceiling of its shape).
Latency is measured in rounds that alternate the raw rows and the meshd rows, so that a
drift in the machine's speed weighs on both sides of a ratio. It is a measurement, not a
test: nothing is asserted. Only loopback addresses and ipc:// sockets under /tmp, never
mDNS (--no-discovery); every process it starts is stopped by pid (SIGTERM, then SIGKILL),
its temp dir removed, and every wait is bounded, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from _common import (ENV, BenchError, eventually, pct_us, read_line,  # noqa: E402
                     stop_pid)
from bench_routing import Cluster, Node  # noqa: E402

import zmq  # noqa: E402

RESOURCE = "bench/r"
TTL = 30.0                              # lowered to claim_max_ttl (5 s) by the test preset
PRESET = "test"                         # voters' quarantine 5.5 s (lan: 301 s)
PAYLOAD_LEN = 100                       # raw request length
RAW_TIMEOUT_S = 5.0                     # a raw round waits at most this for its majority
SDK_TIMEOUT = 10.0                      # per SDK call (acquire adds its own 10 s margin)
START_TIMEOUT = 30.0                    # daemons up and answering
CONVERGE_TIMEOUT = 30.0                 # daemons alive to each other, sessions replicated
FIRST_GRANT_TIMEOUT = 60.0              # voters out of quarantine: the first grant
MAX_FAILURES = 10                       # failed calls per row before the row is given up
MESH_HOST = "127.0.0.{}"                # mesh daemon i on 127.0.0.(50+i), host daemon .54
ECHO_HOST = "127.0.0.{}"                # echo j on 127.0.0.(60+j), random port
CHILD_IDLE_S = 600                      # raw children exit when idle this long (or orphaned)

# Raw request: seq, rounds, mode (0: 3 echoes, answer at 2; 1: 2 echoes, answer at 1),
# then filler up to PAYLOAD_LEN. The reply's first byte says whether every round had its
# majority in time.
REQ = struct.Struct("!IBB")


# --- the raw majority round trip (child processes, plain blocking pyzmq) -------------------

ECHO = r"""
import os, signal, sys, time, zmq
signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the bench's: it stops us by pid
host, idle_limit = sys.argv[1], float(sys.argv[2])
parent = os.getppid()
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.SNDTIMEO, 1000)
s.setsockopt(zmq.RCVTIMEO, 1000)       # blocking recv; the timeout only lets an orphan notice
port = s.bind_to_random_port(f"tcp://{host}")
print(f"tcp://{host}:{port}", flush=True)
last = time.monotonic()
while True:
    try:
        parts = s.recv_multipart()
    except zmq.Again:
        if os.getppid() != parent or time.monotonic() - last > idle_limit:
            break
        continue
    last = time.monotonic()
    try:
        s.send_multipart(parts)
    except zmq.Again:
        pass
s.close()
ctx.term()
"""

RELAY = r"""
import os, signal, struct, sys, time, zmq
signal.signal(signal.SIGINT, signal.SIG_IGN)
front_addr, idle_limit, round_timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
REQ = struct.Struct("!IBB")
TAG = struct.Struct("!IB")             # seq, round: what an echo's reply must carry
parent = os.getppid()
ctx = zmq.Context()

def sock(kind):
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 1000)
    return s

front = sock(zmq.ROUTER)
front.bind(front_addr)
echoes = []
for addr in sys.argv[4:]:
    d = sock(zmq.DEALER)
    d.connect(addr)
    echoes.append(d)
fpoll = zmq.Poller()
fpoll.register(front, zmq.POLLIN)
bpoll = zmq.Poller()
for d in echoes:
    bpoll.register(d, zmq.POLLIN)
print("ready", flush=True)
last = time.monotonic()
while True:
    if not fpoll.poll(1000):
        if os.getppid() != parent or time.monotonic() - last > idle_limit:
            break
        continue
    ident, req = front.recv_multipart()
    last = time.monotonic()
    seq, rounds, mode = REQ.unpack_from(req)
    targets, need = (echoes, 2) if mode == 0 else (echoes[1:], 1)
    ok = 1
    for r in range(rounds):
        tag = TAG.pack(seq, r)
        frame = tag + req[TAG.size:]
        for d in targets:                  # in parallel: all sent before any is awaited
            try:
                d.send(frame)
            except zmq.Again:
                pass
        got, deadline = 0, time.monotonic() + round_timeout
        while got < need:
            left = deadline - time.monotonic()
            if left <= 0:
                ok = 0
                break
            for d, _ in bpoll.poll(left * 1000):
                while True:                # late replies of earlier rounds are dropped here
                    try:
                        m = d.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if m[:TAG.size] == tag:
                        got += 1
        if not ok:
            break
    try:
        front.send_multipart([ident, bytes([ok]) + req[1:]])
    except zmq.Again:
        pass
for s in [front] + echoes:
    s.close()
ctx.term()
"""


class RawMajority:
    """DEALER here -ipc-> relay -tcp-> 3 echoes; answered at a majority (see RELAY)."""

    SHAPES = {                                   # name -> (rounds, mode)
        "call": (0, 0),                          # the bare ipc call
        "round": (1, 0),                         # call + 1 round, 2 of 3: release
        "acquire": (2, 0),                       # call + 2 rounds, 2 of 3 each: acquire
        "voter": (1, 1),                         # call + 1 round, 1 of 2 remote (+ itself)
    }

    def __init__(self, tmp: str) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ctx = zmq.Context()
        self.dealer: zmq.Socket | None = None
        self.seq = 0
        try:
            endpoints = []
            for j in range(3):
                p = self._spawn(ECHO, [ECHO_HOST.format(60 + j), str(CHILD_IDLE_S)])
                ep = read_line(p, 10.0).strip().decode()
                if not ep.startswith("tcp://127.0.0."):
                    raise BenchError(f"raw echo {j} did not start (said {ep!r})")
                endpoints.append(ep)
            front = f"ipc://{tmp}/raw-relay.sock"
            p = self._spawn(RELAY, [front, str(CHILD_IDLE_S), str(RAW_TIMEOUT_S), *endpoints])
            if read_line(p, 10.0).strip() != b"ready":
                raise BenchError("raw relay did not start within 10 s")
            self.dealer = self.ctx.socket(zmq.DEALER)
            self.dealer.setsockopt(zmq.LINGER, 0)
            self.dealer.setsockopt(zmq.SNDTIMEO, 5000)
            self.dealer.setsockopt(zmq.RCVTIMEO, int((2 * RAW_TIMEOUT_S + 2) * 1000))
            self.dealer.connect(front)
        except BaseException:
            self.close()
            raise

    def _spawn(self, code: str, args: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                             env=ENV)
        self.procs.append(p)
        return p

    def measure(self, shape: str, n: int) -> tuple[list[int], int]:
        """n calls of one shape, one at a time: round-trip times (ns) and failures (no
        majority within RAW_TIMEOUT_S, or no answer at all)."""
        assert self.dealer is not None
        rounds, mode = self.SHAPES[shape]
        clock, lat, fails = time.perf_counter_ns, [], 0
        filler = b"x" * (PAYLOAD_LEN - REQ.size)
        for _ in range(n):
            self.seq = (self.seq + 1) & 0xFFFFFFFF
            req = REQ.pack(self.seq, rounds, mode) + filler
            t0 = clock()
            self.dealer.send(req)
            while True:
                try:
                    rep = self.dealer.recv()
                except zmq.Again:
                    rep = None
                    break
                if rep[1:REQ.size] == req[1:REQ.size]:    # seq (after the status byte)
                    break
            t1 = clock()
            if rep is None or rep[0] != 1:
                fails += 1
                if fails >= MAX_FAILURES:
                    break
            else:
                lat.append(t1 - t0)
        return lat, fails

    def close(self) -> list[str]:
        if self.dealer is not None:
            self.dealer.close(linger=0)
            self.dealer = None
        self.ctx.term()
        how = [stop_pid(p, 3) for p in self.procs]
        for p in self.procs:
            if p.stdout is not None:
                p.stdout.close()
        return how


# --- the daemons ----------------------------------------------------------------------------


def free_port(host: str) -> int:
    """A TCP port free on `host` now (the daemon binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ClaimNode(Node):
    """bench_routing's Node with a fixed address, --no-discovery and optional --voters."""

    def __init__(self, tmp: str, index: int, bind: str, voters: list[str] | None,
                 join: str | None) -> None:
        extra = ("--no-discovery", *(("--voters", ",".join(voters)) if voters else ()))
        super().__init__(tmp, index, join, PRESET, bind=bind, extra=extra,
                         unset=("MESHD_VOTERS", "MESHD_CLAIMS_MUTANT", "MESHD_PRESET"))

    def claims_stats(self) -> dict[str, Any]:
        return (self.registry().node_info().get("mesh") or {}).get("claims") or {}


def pairs(claims: Any, sid: str, n: int) -> dict[str, Any]:
    """n times acquire then release, one at a time: ns of each call and of the pair."""
    clock = time.perf_counter_ns
    acq: list[int] = []
    rel: list[int] = []
    pair: list[int] = []
    errors: Counter[str] = Counter()
    not_held = 0
    for _ in range(n):
        if sum(errors.values()) >= MAX_FAILURES:
            break
        t0 = clock()
        try:
            lease = claims.acquire(RESOURCE, sid, ttl=TTL)
        except Exception as exc:
            errors[f"acquire {type(exc).__name__}"] += 1
            continue
        t1 = clock()
        try:
            held = claims.release(lease)
        except Exception as exc:
            errors[f"release {type(exc).__name__}"] += 1
            continue
        t2 = clock()
        if not held:
            not_held += 1
        acq.append(t1 - t0)
        rel.append(t2 - t1)
        pair.append(t2 - t0)
    return {"acquire": acq, "release": rel, "pair": pair, "errors": errors,
            "not_held": not_held, "scope": lease.scope if acq else None}


def first_grant(claims: Any, sid: str, since: float, timeout: float) -> float:
    """Try acquire+release until one succeeds (the voters are out of quarantine); returns
    the seconds since `since`."""
    def ok() -> bool:
        claims.release(claims.acquire(RESOURCE, sid, ttl=TTL))
        return True
    eventually(ok, timeout, f"a claim granted to {sid}", interval=0.25)
    return time.monotonic() - since


# --- main ---------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None,
                    help="acquire+release pairs (and raw round trips) per row "
                         "(default 300, --quick 60)")
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    args = ap.parse_args()
    n = max(10, min(args.n if args.n is not None else (60 if args.quick else 300), 100_000))
    rounds, warm = (2, 10) if args.quick else (3, 30)
    signal.signal(signal.SIGTERM, _interrupt)         # stop like Ctrl-C: everything by pid

    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="mc", dir="/tmp")   # short: ipc paths <= 107 bytes
    raw: RawMajority | None = None
    host = Cluster(tmp, PRESET)                       # one daemon, no voters
    mesh = Cluster(tmp, PRESET)                       # 3 voters + 1 non-voter
    failure: BaseException | None = None
    setup: list[str] = []
    samples: dict[str, list[int]] = {}
    fails: Counter[str] = Counter()
    notes: list[str] = []
    stats: list[str] = []
    info: dict[str, Any] = {}
    try:
        from sessions import Claims
        # --- the raw ceiling's processes ----------------------------------------------------
        raw = RawMajority(tmp)
        # --- host scope: one daemon without --voters ----------------------------------------
        t0 = time.monotonic()
        addr = MESH_HOST.format(54)
        h = ClaimNode(tmp, 4, f"{addr}:{free_port(addr)}", None, None)
        host.nodes.append(h)
        h.wait_ready(time.monotonic() + START_TIMEOUT)
        info = h.info
        host.register({"bench-h": 0})
        setup.append(f"host-scope daemon (no --voters) up in {time.monotonic() - t0:.1f}s")
        # --- mesh scope: 3 voters and 1 non-voter -------------------------------------------
        t0 = time.monotonic()
        binds = []
        for i in range(4):
            a = MESH_HOST.format(50 + i)
            binds.append(f"{a}:{free_port(a)}")
        voters = binds[:3]
        for i in range(4):
            node = ClaimNode(tmp, i, binds[i], voters, binds[0] if i else None)
            mesh.nodes.append(node)
            if i == 0:                                 # the others join it
                node.wait_ready(time.monotonic() + START_TIMEOUT)
        deadline = time.monotonic() + START_TIMEOUT
        for node in mesh.nodes:
            node.wait_ready(deadline)
            if node.address != node.bind:
                raise BenchError(f"n{node.index} advertises {node.address}, not {node.bind}: "
                                 f"the voters list would not name it")
        eventually(mesh.converged, CONVERGE_TIMEOUT, "4 daemons seeing each other alive")
        mesh.register({"bench-v": 0, "bench-x": 3})
        setup.append(f"4 daemons (voters {', '.join(voters)}; non-voter {binds[3]}) up, "
                     f"alive to each other and sessions replicated in "
                     f"{time.monotonic() - t0:.1f}s")
        voters_started = max(node.started for node in mesh.nodes[:3])
        c_host = Claims(socket=h.sock, timeout=SDK_TIMEOUT)
        c_voter = Claims(socket=mesh.nodes[0].sock, timeout=SDK_TIMEOUT)
        c_other = Claims(socket=mesh.nodes[3].sock, timeout=SDK_TIMEOUT)
        took = first_grant(c_voter, "bench-v", voters_started, FIRST_GRANT_TIMEOUT)
        setup.append(f"first mesh grant (session on voter n0) {took:.1f}s after the last "
                     f"voter started (quarantine with preset {PRESET}: claim_max_ttl + "
                     f"claim_timeout = 5.5 s)")
        first_grant(c_other, "bench-x", voters_started, FIRST_GRANT_TIMEOUT)
        # --- warm-up, then rounds alternating every row -------------------------------------
        meshd_rows = [("host", c_host, "bench-h"), ("voter", c_voter, "bench-v"),
                      ("non-voter", c_other, "bench-x")]
        for shape in RawMajority.SHAPES:
            raw.measure(shape, warm)
        scopes: dict[str, str | None] = {}
        errors: Counter[str] = Counter()
        not_held = 0
        for name, claims, sid in meshd_rows:
            pairs(claims, sid, warm)
        per_round = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
        for k in per_round:
            for shape in RawMajority.SHAPES:
                lat, f = raw.measure(shape, k)
                samples.setdefault(f"raw {shape}", []).extend(lat)
                fails[f"raw {shape}"] += f
            for name, claims, sid in meshd_rows:
                # The first acquire after the other daemon's on the same resource carries a
                # ballot below the voters' promise: rejected, retried after a 5-50 ms
                # backoff. Kept out of the rows, reported on its own.
                first = pairs(claims, sid, 1)
                samples.setdefault(f"{name} first", []).extend(first["acquire"])
                errors.update({f"{name} (first): {e}": c for e, c in first["errors"].items()})
                got = pairs(claims, sid, k)
                for part in ("acquire", "release", "pair"):
                    samples.setdefault(f"{name} {part}", []).extend(got[part])
                for e, c in got["errors"].items():
                    fails[f"{name} {e.split()[0]}"] += c
                    fails[f"{name} pair"] += c
                errors.update({f"{name}: {e}": c for e, c in got["errors"].items()})
                not_held += got["not_held"]
                scopes[name] = got["scope"] or scopes.get(name)
        if errors:
            notes.append("failed calls: " + ", ".join(f"{e} x{c}" for e, c in errors.items()))
        if not_held:
            notes.append(f"release() said the lease was no longer held: {not_held} times")
        notes.append("grant scopes: " + ", ".join(f"{k} {v}" for k, v in scopes.items()))
        for node in [*mesh.nodes, h]:
            try:
                st = node.claims_stats()
            except Exception as exc:
                stats.append(f"n{node.index}: node.info failed: {type(exc).__name__}: {exc}")
                continue
            if not st:
                stats.append(f"n{node.index}: node.info has no claims section (host scope)")
                continue
            acc = st.get("acceptor") or {}
            counters = {k: v for k, v in sorted((st.get("counters") or {}).items()) if v}
            acc_counters = {k: v for k, v in sorted((acc.get("counters") or {}).items()) if v}
            stats.append(f"n{node.index} ({st.get('scope')}{', voter' if acc else ''}): "
                         f"counters {counters or '-'}"
                         + (f"; acceptor {acc_counters or '-'}" if acc else ""))
    except (Exception, KeyboardInterrupt) as exc:
        failure = exc
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # the cleanup is not interrupted
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stopped = [f"host {line}" for line in host.stop()] + mesh.stop()
        raw_stops = raw.close() if raw is not None else []
        logs = [(f"n{d.index}", d.log()[-2000:]) for d in [*mesh.nodes, *host.nodes]
                if "Traceback" in d.log() or "ERROR" in d.log()]
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"meshd claims benchmark {time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, pyzmq {zmq.__version__} / libzmq "
          f"{zmq.zmq_version()}, meshd {info.get('version', '?')}, preset {PRESET}, "
          f"ttl {TTL:g} (granted as claim_max_ttl)")
    for line in setup:
        print("  " + line)
    if samples:
        def p50(key: str) -> float:
            return pct_us(samples.get(key, []), 0.5)

        ceilings = {                                # row -> (ceiling p50 µs, what it is)
            "host acquire": (p50("raw call"), "raw ipc call"),
            "host release": (p50("raw call"), "raw ipc call"),
            "host pair": (2 * p50("raw call"), "2 x raw ipc call"),
        }
        for who in ("voter", "non-voter"):
            ceilings[f"{who} acquire"] = (p50("raw acquire"), "raw acquire shape")
            ceilings[f"{who} release"] = (p50("raw round"), "raw majority round trip")
            ceilings[f"{who} pair"] = (3 * p50("raw round"), "3 x raw majority round trip")
        print(f"\nround trips, {n} per row, one at a time after {warm} warm-up, in {rounds} "
              f"rounds alternating the rows (µs; x ceiling = p50 / the ceiling's p50)")
        head = (f"{'row':<58} {'n':>5} {'fail':>4} {'p50':>7} {'p90':>7} {'p99':>7} "
                f"{'x ceil':>6}  ceiling")
        print(head)
        print("-" * len(head))

        def line(label: str, key: str) -> None:
            lat = samples.get(key, [])
            ratio, what = "-", ""
            if key in ceilings and lat and ceilings[key][0] > 0:
                ratio = f"{p50(key) / ceilings[key][0]:.2f}"
                what = ceilings[key][1]
            print(f"{label:<58} {len(lat):>5} {fails.get(key, 0):>4} "
                  f"{pct_us(lat, 0.5):>7.0f} {pct_us(lat, 0.9):>7.0f} {pct_us(lat, 0.99):>7.0f} "
                  f"{ratio:>6}  {what}")

        line("raw majority round trip: ipc call + 2 of 3 echoes (tcp)", "raw round")
        rr = samples.get("raw round", [])
        if rr:
            print(f"{'raw ceiling acquire+release: 3 x majority round trip':<58} {'-':>5} "
                  f"{'-':>4} {3 * pct_us(rr, 0.5):>7.0f} {3 * pct_us(rr, 0.9):>7.0f} "
                  f"{3 * pct_us(rr, 0.99):>7.0f} {'-':>6}")
        line("raw acquire shape: ipc call + 2 majority rounds", "raw acquire")
        line("raw voter shape: ipc call + 1st of 2 echoes (+ itself)", "raw voter")
        line("raw ipc call, no round (host-scope shape)", "raw call")
        for who, label in (("host", "host scope (no voters)"),
                           ("voter", "mesh scope, session on a voter"),
                           ("non-voter", "mesh scope, session on the non-voter")):
            for part in ("acquire", "release", "pair"):
                line(f"{label}: {'acquire+release' if part == 'pair' else part}",
                     f"{who} {part}")
        print()
        ceiling = 3 * p50("raw round")
        for who in ("voter", "non-voter"):
            pv = p50(f"{who} pair")
            if ceiling > 0 and pv == pv:
                print(f"{who} pair p50 {pv:.0f} µs = {pv / ceiling:.2f}x the raw ceiling "
                      f"(3 x {p50('raw round'):.0f} µs)")
        for who in ("voter", "non-voter"):
            fl = samples.get(f"{who} first", [])
            if fl:
                print(f"{who}: first acquire after the other proposer's (one per round, not in "
                      f"the rows): {', '.join(f'{x / 1000:.0f}' for x in fl)} µs")
        pv, vshape = p50("voter pair"), 3 * p50("raw voter")
        if vshape > 0 and pv == pv:
            print(f"voter pair p50 against 3 x the raw voter shape ({p50('raw voter'):.0f} "
                  f"µs, its own acceptor answering in-process): {pv / vshape:.2f}x")
        for note in notes:
            print(note)
    if stats:
        print("claims counters (node.info mesh.claims; non-zero only):")
        for s in stats:
            print("  " + s)
    print(f"raw processes: {', '.join(sorted(set(raw_stops))) or '-'}")
    print("daemons: " + "; ".join(stopped))
    for name, tail in logs:
        print(f"daemon log {name}:")
        for ln in tail.splitlines():
            print("  " + ln)
    print(f"total bench time {time.monotonic() - t_start:.1f}s")
    if failure is not None:
        if isinstance(failure, KeyboardInterrupt):
            print("interrupted: everything started was stopped", file=sys.stderr)
            return 130
        print(f"bench failed: {type(failure).__name__}: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
