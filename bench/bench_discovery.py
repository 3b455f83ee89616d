#!/usr/bin/env python3
"""How fast N fresh hosts on one LAN find each other with mDNS alone (issue 6).

Each host is a network namespace on a bridge (tests/support/netlab.py: nothing touches this
machine's own network); each runs a real `meshd --bind 0.0.0.0:7747` with a fresh data
directory. All N daemons are started at once; the clock runs from just before the first
start until every daemon lists every other one as alive (polled over each daemon's local
socket every 20 ms). In the same run, as ceilings of the same shape:

- "daemons ready": the same N starts, until every local socket answers (no peer involved:
  no discovery can beat this);
- "static --join": every host joins host 0 by address (no mDNS): how long membership
  alone takes once the addresses are known.

Target (issue 6): mDNS alone under 2 s for N = 10. Needs root and iproute2; every process
it starts is stopped by pid and every namespace deleted, also on failure or Ctrl-C.

    sudo python bench/bench_discovery.py [--nodes 3,10] [--runs 3] [--preset lan|test]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c

sys.path.insert(0, str(c.ROOT / "tests"))
from support import netlab  # noqa: E402

from sessions import SessionRegistry  # noqa: E402

ENV = dict(c.ENV)
POLL = 0.02


def start_all(lab: netlab.Lab, tmp: Path, mode: str, preset: str) -> list[subprocess.Popen]:
    procs = []
    for i in range(len(lab.hosts)):
        args = [sys.executable, "-m", "meshd", "--socket", str(tmp / f"h{i}.sock"),
                "--data-dir", str(tmp / f"h{i}-data"), "--bind", "0.0.0.0:7747",
                "--preset", preset, "--log-level", "warning"]
        if mode == "mdns":
            args += ["--discovery"]
        else:
            args += ["--no-discovery"]
        if mode == "join" and i:
            args += ["--join", f"{lab.address(0)}:7747"]
        log = open(tmp / f"h{i}.log", "ab")
        procs.append(lab.popen(i, args, stdout=log, stderr=log, env=ENV))
        log.close()
    return procs


class Watcher:
    """Polls every daemon's local socket (cheaply: no call before its socket file exists,
    one client per daemon, a node once done is not asked again) and notes when each first
    answered and when each first saw all the others alive."""

    def __init__(self, socks: list[Path]) -> None:
        self.socks = socks
        self.clients: list[SessionRegistry | None] = [None] * len(socks)
        self.ids: list[str | None] = [None] * len(socks)
        self.ready_at: list[float | None] = [None] * len(socks)
        self.alive_at: list[float | None] = [None] * len(socks)

    def poll(self, t0: float) -> None:
        for i, sock in enumerate(self.socks):
            if self.ids[i] is None:
                if not sock.exists():
                    continue
                try:
                    client = SessionRegistry(socket=str(sock), timeout=0.5)
                    self.ids[i] = client.node_info()["node_id"]
                except Exception:
                    continue
                self.clients[i], self.ready_at[i] = client, time.monotonic() - t0
        if any(x is None for x in self.ids):
            return
        for i, client in enumerate(self.clients):
            if self.alive_at[i] is not None or client is None:
                continue
            try:
                states = {p["node_id"]: p["state"] for p in client.peers()}
            except Exception:
                continue
            if all(states.get(o) == "alive" for o in self.ids if o != self.ids[i]):
                self.alive_at[i] = time.monotonic() - t0

    def done(self, mode: str) -> bool:
        marks = self.ready_at if mode == "ready" else self.alive_at
        return all(m is not None for m in marks)


def one_run(n: int, mode: str, preset: str, timeout: float) -> float:
    lab = netlab.Lab(n)
    tmp = Path(tempfile.mkdtemp(prefix="mbd", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    try:
        socks = [tmp / f"h{i}.sock" for i in range(n)]
        watch = Watcher(socks)
        t0 = time.monotonic()
        procs = start_all(lab, tmp, mode, preset)

        def finished() -> bool:
            watch.poll(t0)
            return watch.done(mode)
        c.eventually(finished, timeout, f"{n} hosts: {mode}", interval=POLL)
        marks = watch.ready_at if mode == "ready" else watch.alive_at
        took = max(m for m in marks if m is not None)
        for i, p in enumerate(procs):
            if p.poll() is not None:
                raise c.BenchError(f"host {i} exited: {(tmp / f'h{i}.log').read_text()[-800:]}")
        return took
    except c.BenchError:
        for i in range(n):
            text = (tmp / f"h{i}.log").read_text(errors="replace") if (tmp / f"h{i}.log").exists() else ""
            if "Traceback" in text or "ERROR" in text:
                print(f"--- host {i} log tail:\n{text[-1500:]}", file=sys.stderr)
        raise
    finally:
        for p in procs:
            c.stop_pid(p, 10)
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="3,10")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--preset", choices=["lan", "test"], default="lan",
                    help="daemon timers (default lan: what a user runs)")
    ap.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args()
    reason = netlab.skip_reason()
    if reason:
        print(f"bench_discovery cannot run here: {reason}")
        return 2
    ns = [int(x) for x in a.nodes.split(",")]
    import zeroconf
    from meshd import __version__
    print(f"meshd discovery benchmark {time.strftime('%Y-%m-%d %H:%M')}: "
          f"{len(__import__('os').sched_getaffinity(0))} cores, Python "
          f"{platform.python_version()}, zeroconf {zeroconf.__version__}, meshd {__version__}, "
          f"preset {a.preset}, {a.runs} run(s) per row, fresh data dirs every run")
    print("time from starting N hosts at once until every node sees all N alive "
          "(ready: until every local socket answers)\n")
    head = f"{'N':>3}  {'path':<34} {'median s':>9} {'max s':>7}  {'x ready':>7}  target   verdict"
    print(head)
    print("-" * len(head))
    for n in ns:
        rows = {}
        for mode in ("ready", "join", "mdns"):
            rows[mode] = [one_run(n, mode, a.preset, a.timeout) for _ in range(a.runs)]
        base = statistics.median(rows["ready"])
        for mode, label in (("ready", "daemons ready (ceiling)"),
                            ("join", "static --join to host 0"),
                            ("mdns", "mDNS alone, no --join")):
            med, mx = statistics.median(rows[mode]), max(rows[mode])
            target, verdict = "-", "-"
            if mode == "mdns" and n >= 10:
                target, verdict = "< 2 s", "met" if mx < 2.0 else "NOT MET"
            print(f"{n:>3}  {label:<34} {med:>9.2f} {mx:>7.2f}  {med / base:>7.2f}  "
                  f"{target:<7}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
