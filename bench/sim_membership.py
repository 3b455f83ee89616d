#!/usr/bin/env python3
"""meshd membership at scale, simulated: N daemons' SWIM in one process, in virtual time.

    python bench/sim_membership.py [--nodes 100,300,1000] [--preset lan|test] [--seed S]
                                   [--latency-ms L] [--jitter-ms J] [--loss P]
                                   [--steady S] [--trials K] [--no-codec] [--no-anti-entropy]

For each N, a fresh `meshd.mesh.simcluster.SimCluster`: N real `Membership`s (probes,
indirect probes, suspicion, piggybacked gossip, admission, and the membership half of
anti-entropy) over `meshd.mesh.fakenet` (every frame through the real peer codec, LAN
latency 0.5 ms) on a virtual-time loop, started as a cluster that formed long ago (each
node knows the other N-1 alive; `max_members` is raised to N when the default 512 is
smaller). The nodes start at random moments over one probe interval, run `--warmup`
virtual seconds, then a steady `--steady` seconds are measured; then one node, at
random, stops dead (a crash: no leave) and the run goes on until every other node holds
it dead (at most `--timeout` virtual seconds), `--settle` more, and again: `--trials`
crashes in all. Printed per N, times from the crash in virtual seconds (medians):

- first suspect: the first node to suspect it (SWIM expects a detection after e/(e-1)
  protocol periods, `probe_interval` each, plus the probe's own wait);
- all know down: the last node to hold it suspect or dead; all dead: the last node to
  hold it dead; dead spread: from the first node to declare it dead to the last;
- SWIM's dissemination bound next to it: an update is piggybacked `retransmit_mult` x
  log10(N+1) times, one protocol period apart at most, so an epidemic is expected to
  have reached everyone within that many periods (x `probe_interval`);
- frames and bytes sent per node per second in the steady window and from the crash to
  "all dead" (with the frame types of the latter), and the real wall time of the N.

It measures; it never asserts. Nothing is started outside this process and every wait is
bounded, in virtual time and by `--real-budget` real seconds per N.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from typing import Any

import _common  # noqa: F401  (the project on the path)

from meshd.config import Config
from meshd.mesh import simclock
from meshd.mesh.simcluster import SimCluster, SimNode
from meshd.wire.peer import FrameType, MemberState

TYPES = [t.name for t in FrameType if t <= FrameType.SYNC]
Totals = dict[str, int]


def _totals(nodes: list[SimNode]) -> Totals:
    """Frames and bytes sent by `nodes`, in all and by frame type."""
    out: dict[str, int] = {}
    for n in nodes:
        for k, v in n.transport.counters.items():
            if k.startswith("out.") or k in ("frames_out", "bytes_out"):
                out[k] = out.get(k, 0) + v
    return out


def _rate(after: Totals, before: Totals, key: str, node_seconds: float) -> float:
    return (after.get(key, 0) - before.get(key, 0)) / max(node_seconds, 1e-9)


async def crash(c: SimCluster, args: argparse.Namespace) -> dict[str, Any]:
    """Stop one live node at random and wait until every other holds it dead: the
    times (from the crash) and what the others sent meanwhile."""
    victim = c.rng.choice(c.live())
    others = [x for x in c.live() if x is not victim]
    before, t1 = _totals(others), c.loop.time()
    await victim.stop()
    await c.until(lambda: c.all_see(victim, MemberState.DEAD, observers=others),
                  args.timeout, 0.01)
    after, t2 = _totals(others), c.loop.time()
    down: dict[str, float] = {}
    dead: dict[str, float] = {}
    for ch in c.changes:
        if ch.subject == victim.node_id and ch.at >= t1:
            down.setdefault(ch.observer, ch.at - t1)
            if ch.new == MemberState.DEAD:
                dead.setdefault(ch.observer, ch.at - t1)
    suspected = c.first_change(victim, MemberState.SUSPECT, t1)
    await c.run_for(args.settle)
    everyone = len(others)
    return {"victim": victim.node_id, "before": before, "after": after,
            "node_seconds": everyone * (t2 - t1),
            "first_suspect": None if suspected is None else suspected - t1,
            "all_down": max(down.values()) if len(down) == everyone else None,
            "first_dead": min(dead.values()) if dead else None,
            "all_dead": max(dead.values()) if len(dead) == everyone else None}


async def one(n: int, cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    c = SimCluster(n, cfg, seed=args.seed, anti_entropy=not args.no_anti_entropy,
                   latency=args.latency_ms / 1000, jitter=args.jitter_ms / 1000,
                   loss=args.loss, codec=not args.no_codec)
    c.start()
    await c.run_for(cfg.probe_interval + args.warmup)
    before, t0 = _totals(c.nodes), c.loop.time()
    await c.run_for(args.steady)
    steady, t1 = _totals(c.nodes), c.loop.time()
    crashes = [await crash(c, args) for _ in range(args.trials)]
    victims = {t["victim"] for t in crashes}
    false = sum(1 for ch in c.changes if ch.subject not in victims
                and ch.new in (MemberState.SUSPECT, MemberState.DEAD))
    errors = len(c.net.errors)
    await c.close()
    ns_steady = n * (t1 - t0)
    ns_fail = sum(t["node_seconds"] for t in crashes)

    def fail_rate(key: str) -> float:
        return sum(t["after"].get(key, 0) - t["before"].get(key, 0) for t in crashes) \
            / max(ns_fail, 1e-9)

    def med(key: str) -> float | None:
        vals = [t[key] for t in crashes]
        return None if None in vals else statistics.median(vals)

    alls = [t["all_dead"] for t in crashes]
    period = cfg.probe_interval
    return {
        "N": n, "complete": None not in alls,
        "first_suspect": med("first_suspect"), "all_down": med("all_down"),
        "first_dead": med("first_dead"), "all_dead": med("all_dead"),
        "all_dead_range": None if None in alls else (min(alls), max(alls)),
        "spread": (None if None in alls else statistics.median(
            t["all_dead"] - t["first_dead"] for t in crashes)),
        "swim_detect": math.e / (math.e - 1) * period,
        "swim_spread": cfg.retransmit_mult * math.log10(n + 1) * period,
        "msgs_steady": _rate(steady, before, "frames_out", ns_steady),
        "msgs_fail": fail_rate("frames_out"),
        "bytes_steady": _rate(steady, before, "bytes_out", ns_steady),
        "bytes_fail": fail_rate("bytes_out"),
        "types_fail": {t: fail_rate(f"out.{t}") for t in TYPES},
        "types_steady": {t: _rate(steady, before, f"out.{t}", ns_steady) for t in TYPES},
        "false": false, "errors": errors,
    }


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def report(rows: list[dict[str, Any]], cfg: Config, args: argparse.Namespace) -> None:
    print(f"\npreset {args.preset}: probe_interval {cfg.probe_interval} s, probe_timeout "
          f"{cfg.probe_timeout} s, suspicion_timeout {cfg.suspicion_timeout} s, "
          f"retransmit_mult {cfg.retransmit_mult}, indirect_checks {cfg.indirect_checks}, "
          f"sync_interval {cfg.sync_interval} s{' (off)' if args.no_anti_entropy else ''}; "
          f"latency {args.latency_ms} ms (+{args.jitter_ms} jitter), loss {args.loss:.1%}, "
          f"codec {'off' if args.no_codec else 'on'}, seed {args.seed}\n")
    print(f"times: virtual seconds from the crash, median of {args.trials} crash(es); "
          "rates: per node per second\n")
    print("| N | first suspect | SWIM e/(e-1)·T | all know down | first dead | all dead "
          "| (range) | dead spread | SWIM mult·log10(N+1)·T | msgs/s steady | msgs/s failure "
          "| bytes/s steady | bytes/s failure | wall s |")
    print("|---:" * 14 + "|")
    for r in rows:
        rng = r["all_dead_range"]
        print(f"| {r['N']} | {_s(r['first_suspect'])} | {r['swim_detect']:.2f} "
              f"| {_s(r['all_down'])} | {_s(r['first_dead'])} | {_s(r['all_dead'])} "
              f"| {'n/a' if rng is None else f'{rng[0]:.2f}-{rng[1]:.2f}'} "
              f"| {_s(r['spread'])} | {r['swim_spread']:.2f} | {r['msgs_steady']:.2f} "
              f"| {r['msgs_fail']:.2f} | {r['bytes_steady']:,.0f} | {r['bytes_fail']:,.0f} "
              f"| {r['wall']:.1f} |")
    print("\nframes sent per node per second, by type (steady / failure)\n")
    print("| N | " + " | ".join(TYPES) + " | false suspicions | handler errors |")
    print("|---:" * (len(TYPES) + 3) + "|")
    for r in rows:
        cells = [f"{r['types_steady'][t]:.2f} / {r['types_fail'][t]:.2f}" for t in TYPES]
        print(f"| {r['N']} | " + " | ".join(cells) + f" | {r['false']} | {r['errors']} |")
    incomplete = [r["N"] for r in rows if not r["complete"]]
    if incomplete:
        print(f"\nnot every node held the crashed one dead within {args.timeout} virtual s "
              f"for N = {incomplete}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="100,300,1000")
    ap.add_argument("--preset", choices=("lan", "test"), default="lan")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--latency-ms", type=float, default=0.5)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--warmup", type=float, default=2.0, help="virtual s before measuring")
    ap.add_argument("--steady", type=float, default=5.0, help="virtual s of steady state")
    ap.add_argument("--trials", type=int, default=3,
                    help="crashes per N, one after the other (the times are medians)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="virtual s after one crash is known before the next")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="virtual s to wait for every node to hold the crashed one dead")
    ap.add_argument("--real-budget", type=float, default=600.0, help="real s per N at most")
    ap.add_argument("--no-codec", action="store_true",
                    help="pass frames as objects, not bytes (faster; bytes then read 0)")
    ap.add_argument("--no-anti-entropy", action="store_true",
                    help="no periodic SYNC rounds (reconnection SYNCs to dead members stay)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    base = Config.lan() if args.preset == "lan" else Config.test()
    rows = []
    for n in sizes:
        cfg = base.with_(max_members=max(base.max_members, n))
        started = time.perf_counter()
        row = simclock.run(lambda: one(n, cfg, args), real_budget=args.real_budget)
        row["wall"] = time.perf_counter() - started
        rows.append(row)
        print(f"N={n}: all dead after {_s(row['all_dead'])} virtual s, "
              f"{row['wall']:.1f} s wall", file=sys.stderr, flush=True)
    report(rows, base, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of the simulation: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
