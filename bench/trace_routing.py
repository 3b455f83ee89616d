#!/usr/bin/env python3
"""Where the time of one routed message goes: a step-by-step trace across two daemons.

Two daemons (as in bench_routing.py: node 0 and node 1 on 127.0.0.20/.21, test preset),
`s0` on node 0 and `s1` on node 1. Messages go s0 -> s1 one at a time with the blocking
SDK; a thread of this process reads `s1`'s live stream. Each daemon is started with a
`sitecustomize` (written to a temp dir put first on its PYTHONPATH) that wraps a few
methods to note CLOCK_MONOTONIC timestamps (`time.perf_counter_ns`, the same clock in
every process on Linux) and writes them out when the daemon exits. The table gives, per
step, the p50/p90 time since the start of `send()`. The wrapping adds a few µs per step.

    python bench/trace_routing.py [--messages 500] [--warmup 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _common as c

#: (node, step, class or module path, method, when): per step, the first such event on
#: that node after a send's start.
PROBES = [
    (0, "node 0 reads the request", "meshd.ipc.server.IPCServer", "_drain", "entry"),
    (0, "node 0 has journaled it", "meshd.state.journal.Journal", "append", "exit"),
    (0, "node 0 has answered the client", "meshd.ipc.server.IPCServer", "_send", "exit"),
    (0, "the ROUTE frame leaves node 0", "meshd.mesh.transport.Transport", "send_frame",
     "exit"),
    (1, "node 1 reads the frame", "meshd.mesh.transport.Transport", "_drain", "entry"),
    (1, "node 1 starts storing it", "meshd.state.messages", "deliver_routed", "entry"),
    (1, "node 1 has stored it (in the transaction)", "meshd.state.messages",
     "deliver_routed", "exit"),
    (1, "node 1 pushes it to the stream", "meshd.ipc.streams.Streams", "_push", "exit"),
]

SITE = '''
import atexit, functools, importlib, json, os, sys, time
_out = os.environ.get("MESHD_TRACE_OUT")
if _out and "--socket" in sys.argv:
    _ev = []
    _clock = time.perf_counter_ns
    def _wrap(path, name, tag, when):
        mod, _, cls = path.rpartition(".")
        try:
            owner = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError):
            owner = importlib.import_module(path)
        f = getattr(owner, name)
        @functools.wraps(f)
        def w(*a, **k):
            if when == "entry":
                _ev.append((tag, _clock()))
            r = f(*a, **k)
            if when == "exit":
                _ev.append((tag, _clock()))
            return r
        setattr(owner, name, w)
    for _tag, _path, _name, _when in json.loads(os.environ["MESHD_TRACE_PROBES"]):
        _wrap(_path, _name, _tag, _when)
    def _dump():
        with open(os.path.join(_out, "trace-%d.json" % os.getpid()), "w") as fh:
            json.dump(_ev, fh)
    atexit.register(_dump)
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=200)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mtr")
    site = Path(tmp, "site")
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    out = Path(tmp, "out")
    out.mkdir()
    # The daemons get their environment from _common.ENV (bench_routing uses that dict).
    c.ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), c.ENV.get("PYTHONPATH")) if p)
    c.ENV["MESHD_TRACE_OUT"] = str(out)
    c.ENV["MESHD_TRACE_PROBES"] = json.dumps([[t, p, m, w] for _, t, p, m, w in PROBES])
    import bench_routing as br
    from sessions import CollaborationHub

    cluster = br.Cluster(tmp, "test")
    rows: list[tuple[int, int]] = []
    try:
        cluster.grow(2)
        cluster.register({"s0": 0, "s1": 1})
        rx = br.Receiver(cluster.nodes[1], "s1")
        hub = CollaborationHub(socket=cluster.nodes[0].sock, timeout=br.SDK_TIMEOUT)
        br.sdk_direct(hub, rx, "warm", args.warmup)
        for i in range(args.messages):
            subj = br.subject("trace", i)
            t0 = time.perf_counter_ns()
            hub.send("s0", "s1", "notification", subj, br.BODY)
            t = rx.arrival(subj, br.ARRIVAL_TIMEOUT)
            rows.append((t0, t if t is not None else -1))
        rx.close()
        hub.close()
    finally:
        print("daemons:", "; ".join(cluster.stop()))
    events: dict[int, list[tuple[str, int]]] = {}
    for f in out.glob("trace-*.json"):
        events[int(f.stem.split("-")[1])] = [tuple(e) for e in json.loads(f.read_text())]
    n0, n1 = cluster.nodes[0].pid, cluster.nodes[1].pid
    if n0 not in events or n1 not in events:
        print("no trace from the daemons (did they exit cleanly?)", file=sys.stderr)
        return 1
    node_of = {t: (n0, n1)[node] for node, t, *_ in PROBES}
    at: dict[str, list[int]] = {t: [] for _, t, *_ in PROBES}
    at["the receiving SDK hands it out"] = []
    for i, (t0, arrived) in enumerate(rows):
        end = rows[i + 1][0] if i + 1 < len(rows) else t0 + 10**9
        for _, tag, *_ in PROBES:
            ts = next((ts for tg, ts in events[node_of[tag]] if tg == tag and t0 <= ts < end),
                      None)
            if ts is not None:
                at[tag].append(ts - t0)
        if arrived >= 0:
            at["the receiving SDK hands it out"].append(arrived - t0)
    print(f"\none routed message, step by step ({args.messages} direct messages s0 -> s1, "
          "one at a time; µs since send() began)")
    print(f"{'step':46s} {'n':>5s} {'p50':>7s} {'p90':>7s}")
    print("-" * 68)
    for tag, samples in at.items():
        if samples:
            print(f"{tag:46s} {len(samples):5d} {c.pct_us(samples, 0.5):7.0f} "
                  f"{c.pct_us(samples, 0.9):7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
