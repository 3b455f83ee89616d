#!/usr/bin/env python3
"""meshd catch-up benchmark: how fast a daemon that was away gets the shared memory back.

    python bench/bench_catchup.py [--quick] [--entries N] [--runs R] [--sources 1,2]
                                  [--preset test|lan]

A daemon that was down, is new, or was cut off catches up through anti-entropy: it
exchanges digests with a peer and PULLs each origin's records chunk by chunk (500 records
or 256 KiB per RECORDS frame, one chunk prefetched; meshd/mesh/replicator.py). This is
the path that decides how long a host rejoining a busy mesh serves stale data, so it
gets its own number. Per scenario: S source daemons (n0, n1, ...; 127.0.0.20+i, as in
bench_routing.py) are filled with N entries in all, N/S of each one's own origin
(asyncio SDK, many sets in flight), and wait until every source holds all N; then a
fresh daemon n<S> with an empty data dir joins n0, and the clock runs until it holds all
N: from its start, and from when it and n0 see each other alive (read from n0's
`peers()`). Each run starts a
new fresh daemon against the same sources. Its progress is read from its own `peers()`
(cheap: `ahead` is what a peer holds beyond it, per that peer's last digest; 0 for every
source = caught up), and one `get_stats()` then confirms the entry count. A time is the
end of the poll that showed it, an upper bound; the poll before bounds it from below.

Next to it, in the same run, the ceiling of the same transfer shape in raw pyzmq: a
DEALER in this process pulls chunks of 500 records (msgpack frames built like meshd's
RECORDS frames, with records shaped like its memory entries) from a ROUTER in a child
process that serves them from memory, one request per chunk; the DEALER unpacks each
chunk and stores nothing. It is a measurement, not a test: it never asserts a time.
Loopback only; every wait is bounded; every process it starts is stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median as med
from typing import Any, Iterator

import _common as c
import bench_routing as br
import msgpack
import zmq

CHUNK = 500                      # records per RECORDS frame (Config.sync_chunk_records)
FILL_WINDOW = 128                # sets in flight per source during the fill
FILL_TIMEOUT = 300.0             # s for the fill and for the sources to hold all N
CATCHUP_TIMEOUT = 300.0          # s from the fresh daemon's start to all N entries
ALIVE_POLL = 0.02                # s between peers() polls until n0 is seen alive
POLL = 0.1                       # s between peers() polls after that
STATS_POLL = 0.25                # s between get_stats() polls (a COUNT over the table)
RAW_HOST = "127.0.0.60"

# The ROUTER of the raw ceiling (child process): all chunks packed before it says ready.
RAW_SERVER = r"""
import os, signal, sys, time, uuid, msgpack, zmq
signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the bench's: it stops us by pid
host, n, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
origin = uuid.uuid4().hex
stamp = int(time.time() * 1000) << 16
def rec(i):
    return {"kind": "entry", "entry_id": str(uuid.uuid4()), "key": f"k{i}", "type": "state",
            "value": {"i": i, "pad": "x" * 100}, "session_id": "bench",
            "timestamp": "2026-12-01T14:07:00.123456+00:00", "ttl": None,
            "tags": ["t1", "t2"], "metadata": {}, "origin": origin, "version": i + 1,
            "hlc": stamp + i}
chunks = []
for a in range(0, n, chunk):
    b = min(n, a + chunk)
    body = {"origin": origin, "after": a, "through": b, "records": [rec(i) for i in range(a, b)],
            "more": b < n}
    chunks.append(msgpack.packb([1, 6, origin, f"{host}:7747", body], use_bin_type=True))
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.RCVTIMEO, 1000)                 # only so that an orphan notices
port = s.bind_to_random_port(f"tcp://{host}")
print(f"tcp://{host}:{port} {len(chunks[0])}", flush=True)
parent = os.getppid()
while os.getppid() == parent:
    try:
        ident, req = s.recv_multipart()
    except zmq.Again:
        continue
    s.send_multipart([ident, chunks[int(req) % len(chunks)]])
s.close()
ctx.term()
"""


def raw_pull(endpoint: str, n: int, server_pid: int) -> dict[str, Any]:
    """Pull n records chunk by chunk, one request in flight, unpacking each chunk."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    for opt, v in ((zmq.LINGER, 0), (zmq.RCVTIMEO, 5000), (zmq.SNDTIMEO, 5000)):
        s.setsockopt(opt, v)
    try:
        s.connect(endpoint)
        s.send(b"0")
        s.recv()                                     # connected and warm
        got, cpu0, srv0 = 0, time.process_time_ns(), c.cpu_ns(server_pid) or 0
        t0 = time.perf_counter()
        for k in range((n + CHUNK - 1) // CHUNK):
            s.send(str(k).encode())
            got += len(msgpack.unpackb(s.recv(), raw=False)[4]["records"])
        secs = time.perf_counter() - t0
        return {"records": got, "seconds": secs, "rate": got / secs,
                "cpu": time.process_time_ns() - cpu0,
                "server_cpu": (c.cpu_ns(server_pid) or 0) - srv0}
    finally:
        s.close()
        ctx.term()


async def _fill(socks: list[str], n: int) -> tuple[int, dict[str, int]]:
    """n sets spread evenly over the sources, FILL_WINDOW in flight on each."""
    from sessions.aio import AsyncSharedMemory
    acked, errors, share = [0], dict[str, int](), n // len(socks)

    async def worker(m: Any, todo: Iterator[int]) -> None:
        for k in todo:                               # a shared iterator: W sets in flight
            try:
                await m.set("bench", f"k{k}", {"i": k, "pad": "x" * 100}, tags=["t1", "t2"])
                acked[0] += 1
            except Exception as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    mems = [AsyncSharedMemory(socket=s, timeout=br.SDK_TIMEOUT) for s in socks]
    todos = [iter(range(i * share, n if i == len(socks) - 1 else (i + 1) * share))
             for i in range(len(socks))]
    await asyncio.gather(*(worker(m, t) for m, t in zip(mems, todos) for _ in range(FILL_WINDOW)))
    for m in mems:
        await m.close()
    return acked[0], errors


def entries(node: br.Node) -> int:
    from sessions import SharedMemory
    return int(SharedMemory(socket=node.sock, timeout=br.SDK_TIMEOUT).get_stats()["total_entries"])


def repl_counters(node: br.Node) -> dict[str, int]:
    mesh = node.registry().node_info().get("mesh") or {}
    return dict(((mesh.get("replication") or {}).get("counters")) or {})


def catch_up(cluster: br.Cluster, idx: int, n: int, preset: str,
             fresh: list[br.Node]) -> dict[str, Any]:
    """Start a fresh daemon joining n0; time until it holds all n entries."""
    shutil.rmtree(f"{cluster.tmp}/n{idx}-data", ignore_errors=True)   # a fresh data dir
    srcs = {d.node_id for d in cluster.nodes}
    reg0 = cluster.nodes[0].registry()
    old = {p["node_id"] for p in reg0.peers()}      # earlier runs' fresh daemons (left)
    src_cpu0 = sum(c.cpu_ns(d.pid) or 0 for d in cluster.nodes)
    served0 = sum(repl_counters(d).get("served_chunks", 0) for d in cluster.nodes)
    t0 = time.monotonic()
    node = br.Node(cluster.tmp, idx, cluster.nodes[0].address, preset)
    fresh.append(node)
    r: dict[str, Any] = {}
    # The fresh daemon's loop may drain RECORDS frames for seconds before it answers its
    # own clients, so the moment the two see each other alive is read from n0.
    while "alive" not in r:
        if node.proc.poll() is not None or time.monotonic() - t0 > br.DAEMON_START_TIMEOUT:
            raise c.BenchError(f"fresh daemon n{idx} never alive on n0:\n{node.log()[-2000:]}")
        if any(p["state"] == "alive" and p["node_id"] not in old | srcs for p in reg0.peers()):
            r["alive"], r["cpu_alive"] = time.monotonic() - t0, c.cpu_ns(node.pid) or 0
        time.sleep(ALIVE_POLL)
    node.wait_ready(t0 + CATCHUP_TIMEOUT)
    r["ready"], prev = time.monotonic() - t0, r["alive"]    # prev: the previous poll's end
    calls: list[float] = []                          # how long each peers() call took
    reg = node.registry()
    while True:                                      # until its digests say caught up
        if time.monotonic() - t0 > CATCHUP_TIMEOUT:
            raise c.BenchTimeout(f"fresh daemon n{idx} not caught up in {CATCHUP_TIMEOUT:g}s "
                                 f"({entries(node)} of {n} entries)")
        t_call = time.monotonic()
        try:
            peers = {p["node_id"]: p for p in reg.peers()}
        except Exception:                            # the SDK's 10 s timeout: poll again
            peers = {}
        now = time.monotonic() - t0                  # a time is the end of the poll that saw it
        calls.append(now - (t_call - t0))
        # `ahead`: what that peer has beyond this node, per the peer's last digest.
        if all((peers.get(s) or {}).get("state") == "alive"
               and (peers.get(s) or {}).get("ahead") == 0 for s in srcs):
            r["all"], r["gap"] = now, now - prev
            break
        prev = now
        time.sleep(POLL)
    r["cpu"] = (c.cpu_ns(node.pid) or 0) - r["cpu_alive"]
    r["src_cpu"] = sum(c.cpu_ns(d.pid) or 0 for d in cluster.nodes) - src_cpu0
    t_call = time.monotonic()                        # confirm: one COUNT over the table
    r["entries"], r["stats_s"] = entries(node), time.monotonic() - t_call
    if r["entries"] < n:                             # the digests said otherwise: report it
        r["late"] = c.eventually(lambda: entries(node) >= n, 30.0, f"all {n} entries",
                                 interval=STATS_POLL)
    r["calls"], r["counters"] = calls, repl_counters(node)
    r["served"] = sum(repl_counters(d).get("served_chunks", 0) for d in cluster.nodes) - served0
    r["rate"] = n / max(1e-6, r["all"] - r["alive"])
    r["stop"] = f"n{idx}: {node.stop()}"
    log, node.log_path = node.log_path, node.log_path[:-4] + f"-run{len(fresh)}.log"
    os.replace(log, node.log_path)                   # the next run's daemon reuses the name
    return r


def chunk_bytes(data_dir: str) -> int | None:
    """Size of the first RECORDS frame meshd would send from a stopped source's store."""
    try:
        from meshd.state import replication
        from meshd.state.store import Store
        from meshd.wire.peer import FrameType, encode
        store = Store(data_dir)
        try:
            with store.read(fold=False):
                recs, through = replication.export(store, store.node_id, 0, CHUNK)
            return len(encode(FrameType.RECORDS, store.node_id, "127.0.0.20:7747",
                              {"origin": store.node_id, "after": 0, "through": through,
                               "records": recs, "more": True}))
        finally:
            store.close()
    except Exception:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=3, help="fresh daemons per scenario")
    ap.add_argument("--sources", default="1,2", help="scenarios: source daemons, e.g. 1,2,3")
    ap.add_argument("--preset", choices=("test", "lan"), default="test")
    ap.add_argument("--quick", action="store_true", help="5,000 entries, 1 run: a smoke run")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help="also write the results to PATH as JSON (for bench/compare.py)")
    args = ap.parse_args()
    n = 5_000 if args.quick and args.entries == 50_000 else args.entries
    runs = 1 if args.quick else max(1, args.runs)
    sizes = [int(x) for x in args.sources.split(",")]
    if n < CHUNK or any(not 1 <= s <= 10 for s in sizes):
        ap.error(f"--entries must be at least {CHUNK}, --sources each 1..10")
    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="mcatch")
    clusters: list[br.Cluster] = []
    fresh: list[br.Node] = []
    server: subprocess.Popen[bytes] | None = None
    setup, stops, logs = list[str](), list[str](), list[tuple[str, str]]()
    rows: list[tuple[int, list[dict[str, Any]]]] = []
    raw: list[dict[str, Any]] = []
    info, sizes_b = dict[str, Any](), dict[str, Any]()
    failure: BaseException | None = None
    try:
        server = subprocess.Popen([sys.executable, "-c", RAW_SERVER, RAW_HOST, str(n), str(CHUNK)],
                                  stdout=subprocess.PIPE, env=c.ENV)
        line = c.read_line(server, 60.0).decode().split()
        if len(line) != 2 or not line[0].startswith("tcp://127.0.0."):
            raise c.BenchError(f"raw ROUTER did not start (said {line!r})")
        endpoint, sizes_b["raw"] = line[0], int(line[1])
        raw_pull(endpoint, n, server.pid)            # warm-up, not counted
        for k, s in enumerate(sizes):
            cluster = br.Cluster(f"{tmp}/s{k}", args.preset)
            os.mkdir(cluster.tmp)
            clusters.append(cluster)
            took = cluster.grow(s)
            info = info or cluster.nodes[0].info
            t0 = time.monotonic()
            acked, errors = asyncio.run(_fill([d.sock for d in cluster.nodes], n))
            t_fill = time.monotonic() - t0
            if errors or acked != n:
                raise c.BenchError(f"fill: {acked} of {n} sets acknowledged, errors {errors}")
            c.eventually(lambda: all(entries(d) >= n for d in cluster.nodes), FILL_TIMEOUT,
                         f"all {s} sources holding {n} entries", interval=STATS_POLL)
            t_all = time.monotonic() - t0
            setup.append(f"{s} source(s) up and alive in {took:.1f}s; {n} sets "
                         f"({FILL_WINDOW} in flight per source) acknowledged in {t_fill:.1f}s "
                         f"({n / t_fill:,.0f}/s), all sources hold all {n} after {t_all:.1f}s")
            time.sleep(0.5)                          # let the sources' folds settle
            results: list[dict[str, Any]] = []
            for _ in range(runs):                    # alternate meshd and the raw ceiling
                results.append(catch_up(cluster, s, n, args.preset, fresh))
                stops.append(results[-1]["stop"])
                raw.append(raw_pull(endpoint, n, server.pid))
            rows.append((s, results))
            stops += cluster.stop()
            sizes_b.setdefault("meshd", chunk_bytes(cluster.nodes[0].data_dir))
    except BaseException as exc:                     # Ctrl-C too: report what we have
        failure = exc
    finally:
        for d in [*fresh, *(x for cl in clusters for x in cl.nodes)]:
            if d.proc.poll() is None:
                stops.append(f"n{d.index}: {d.stop()}")
            text = d.log()
            if "Traceback" in text or "ERROR" in text:
                logs.append((os.path.relpath(d.log_path, tmp), "\n".join(text.splitlines()[-40:])))
        if server is not None:
            stops.append(f"raw ROUTER: {c.stop_pid(server, 3)}")
            if server.stdout is not None:
                server.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"meshd catch-up benchmark {time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}, pyzmq {zmq.__version__} / libzmq "
          f"{zmq.zmq_version()}, meshd {info.get('version', '?')}, preset {args.preset}, "
          f"durability {info.get('durability', '?')}")
    print(f"{n} entries {{'i': i, 'pad': 100 x 'x'}}, tags t1,t2; a chunk of {CHUNK} records: "
          f"meshd RECORDS frame {sizes_b.get('meshd') or '?'} bytes, raw frame "
          f"{sizes_b.get('raw', '?')} bytes")
    for ln in setup:
        print("  " + ln)
    if failure is not None:
        print(f"\nFAILED: {type(failure).__name__}: {failure}")
    if rows:
        ceiling = med([r["rate"] for r in raw])
        print(f"\ncatch-up of a fresh daemon to all {n} entries (median of {runs} run(s) per row; "
              f"a time is the end of the fresh daemon's peers() poll that showed it, polled every "
              f"{POLL:g}s)")
        print(f"{'path':<50}{'start->all s':>13}{'alive->all s':>13}{'records/s':>11}"
              f"{'x ceiling':>10}")
        print("-" * 97)
        print(f"{'raw pyzmq DEALER<-ROUTER, 500/chunk, no storage':<50}{'-':>13}"
              f"{med([r['seconds'] for r in raw]):>13.2f}{ceiling:>11,.0f}{1.0:>10.2f}")
        for s, res in rows:
            rate = med([r["rate"] for r in res])
            print(f"{f'meshd, {s} source(s) -> fresh daemon':<50}{med([r['all'] for r in res]):>13.2f}"
                  f"{med([r['all'] - r['alive'] for r in res]):>13.2f}{rate:>11,.0f}"
                  f"{rate / ceiling:>10.3f}")
        print("\n  per run: s from the fresh daemon's start until n0 lists it alive, it answers "
              "node.info, it has all (and when the poll before said not yet); CPU µs per record, "
              "alive to all")
        for s, res in rows:
            for r in res:
                k = r["counters"]
                print(f"  {s} source(s): {r['alive']:.2f} / {r['ready']:.2f} / {r['all']:.2f} "
                      f"(not at {r['all'] - r['gap']:.2f}) s, {r['rate']:,.0f}/s; CPU fresh "
                      f"{r['cpu'] / n / 1000:.0f}, sources {r['src_cpu'] / n / 1000:.0f} µs; "
                      f"received {k.get('records_in', 0):,} records in {k.get('pulls', 0)} pulls "
                      f"({r['served']} chunks served)")
                late = f", all {r['late']:.2f}s later" if "late" in r else ""
                print(f"      peers() polls {len(r['calls'])}, slowest {max(r['calls']) * 1000:.0f} "
                      f"ms; get_stats then: {r['entries']:,} entries ({r['stats_s']:.2f}s){late}")
        for r in raw:
            print(f"  raw: {r['records']:,} records in {r['seconds']:.3f}s, {r['rate']:,.0f}/s; CPU "
                  f"puller {r['cpu'] / r['records'] / 1000:.1f}, ROUTER "
                  f"{r['server_cpu'] / r['records'] / 1000:.1f} µs per record")
    print("\nprocesses: " + "; ".join(stops))
    for name, tail in logs:
        print(f"daemon log {name}:\n" + "\n".join("  " + ln for ln in tail.splitlines()))
    print(f"total bench time {time.monotonic() - t_start:.1f}s")
    c.write_json(args.json, {
        "bench": "catchup", "quick": args.quick, "version": info.get("version"),
        "durability": info.get("durability"), "preset": args.preset, "entries": n,
        "runs": runs, "setup": setup,
        "failure": None if failure is None else f"{type(failure).__name__}: {failure}",
        "raw": {"rate": med([r["rate"] for r in raw]), "seconds": med([r["seconds"] for r in raw]),
                "runs": [{"rate": r["rate"], "seconds": r["seconds"]} for r in raw]} if raw else None,
        "rows": [{"sources": s, "start_all": med([r["all"] for r in res]),
                  "alive_all": med([r["all"] - r["alive"] for r in res]),
                  "rate": med([r["rate"] for r in res]),
                  "ratio": med([r["rate"] for r in res]) / med([r["rate"] for r in raw])
                  if raw else None,
                  "entries_ok": all(r["entries"] >= n or "late" in r for r in res),
                  "runs": [{k: r.get(k) for k in ("alive", "ready", "all", "rate", "entries",
                                                   "late")} for r in res]}
                 for s, res in rows],
        "bench_seconds": time.monotonic() - t_start})
    if failure is not None:
        return 130 if isinstance(failure, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
