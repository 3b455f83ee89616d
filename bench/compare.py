#!/usr/bin/env python3
"""Before/after: bench_ipc, bench_routing and bench_catchup against two versions of meshd,
in the same run, interleaved, with the medians side by side.

    python bench/compare.py                # before 7735feb, after the working tree: ~10 min
    python bench/compare.py --quick        # the benches' --quick settings, 2 rounds: ~1 min
    python bench/compare.py --after 7735feb --rounds 5 --only ipc   # A/A: what noise looks like
    python bench/compare.py --markdown     # the tables as markdown, for bench/README.md

"Before" is a git revision (default 7735feb, the code before issue 15's renovation); "after"
the working tree as it is when the run starts (tracked and untracked, not ignored, files) or
a revision. Each is copied into a temporary directory first (git archive, or a copy of the
files), so edits during the run change neither side; the checkout is never touched.

Both sides are measured by the same scripts (this directory's bench_*.py and _common.py,
copied at the start) run with MESHD_BENCH_ROOT set to one side's copy: the bench process
imports that side's SDK, and starts that side's daemons (`python -m meshd`, PYTHONPATH and
cwd the copy). Each run's --json names where its own process and a child started like its
daemons imported meshd and sessions from; a file from outside the side's copy stops the
comparison. The python (this one, or --python) and its libraries are the same for both.

Runs alternate bench by bench, and which side goes first alternates too, so that drift in
the VM's speed weighs on both sides. A row is the median over the rounds with the range of
the runs; after/before is the ratio of the medians; "~" means the after median is within the
range of the before runs (or within 3 %), "better"/"worse" that it is outside. The ratios
to a raw ceiling (p50/raw, x raw) are measured in the same bench run: the machine's speed
moves them least. Each run is a process group with a time limit: then SIGINT (the bench
stops its daemons by pid), after a grace period SIGKILL to the group, and whatever is left
in the group is stopped too. The copies are removed at the end, also on failure or Ctrl-C.
Exits 1 if a run failed or its checks (entries, routing counters, losses) did not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPTS = ["_common.py", "bench_ipc.py", "bench_routing.py", "bench_catchup.py"]
BENCHES = ["ipc", "routing", "catchup"]
# Per run: (seconds allowed, seconds it usually takes), full and --quick.
# The usual times are bench/README.md's on the 2-core VM, and --quick runs measured there.
LIMITS = {"ipc": ((300, 22), (120, 4)), "routing": ((480, 35), (180, 3)),
          "catchup": ((720, 32), (240, 5))}
GRACE = 45.0                       # s after SIGINT before SIGKILL to the run's group
GIT_TIMEOUT = 120.0
NOISE_MIN = 0.03                   # below this relative difference it is "~" anyway
PROBE = ("import json, meshd, sessions; "
         "print(json.dumps({'meshd': meshd.__file__, 'sessions': sessions.__file__}))")


class CompareError(RuntimeError):
    pass


class Stop(BaseException):
    """SIGTERM: unwind like Ctrl-C, through every finally."""


# --- the two versions ------------------------------------------------------------------------


def git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                       timeout=GIT_TIMEOUT)
    if r.returncode != 0:
        raise CompareError(f"git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def export_rev(rev: str, dest: Path) -> str:
    """The tracked files of `rev`, into dest (git archive: reads the repository, changes
    nothing in it); returns a description."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    dest.mkdir(parents=True)
    with tempfile.TemporaryFile() as tar:
        r = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha], stdout=tar,
                           stderr=subprocess.PIPE, timeout=GIT_TIMEOUT)
        if r.returncode != 0:
            raise CompareError(f"git archive {rev}: {r.stderr.decode(errors='replace').strip()}")
        tar.seek(0)
        with tarfile.open(fileobj=tar) as tf:
            tf.extractall(dest, filter="data")
    return f"{rev} = {git('log', '-1', '--format=%h %ad %s', '--date=short', sha).strip()}"


def export_worktree(dest: Path) -> str:
    """The working tree's files now (tracked, and untracked but not ignored), into dest."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    copied = 0
    for name in sorted(set(n for n in names if n)):
        src = REPO / name
        if not (src.is_file() or src.is_symlink()):       # deleted in the working tree
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name, follow_symlinks=False)
        copied += 1
    changed = [ln for ln in git("status", "--porcelain").splitlines() if ln.strip()]
    head = git("log", "-1", "--format=%h %ad %s", "--date=short").strip()
    return (f"working tree ({copied} files copied at {time.strftime('%H:%M:%S')}): HEAD {head}"
            f" + {len(changed)} uncommitted change(s)")


def child_env(tree: Path) -> dict[str, str]:
    # TMPDIR: what a bench makes with tempfile's defaults lands in our temp dir, so it goes
    # with it even if a run had to be killed (sockets dirs are made in /tmp by name).
    env = dict(os.environ, MESHD_BENCH_ROOT=str(tree), TMPDIR=str(tree.parent / "tmp"))
    env.pop("PYTHONPATH", None)          # _common.ENV puts the tree first for the daemons
    return env


def check_paths(side: str, tree: Path, where: str, paths: dict[str, Any]) -> None:
    """Every imported package file must be inside this side's own copy."""
    for pkg in ("meshd", "sessions"):
        f = str(paths.get(pkg) or "")
        if not f.startswith(str(tree) + os.sep):
            raise CompareError(f"{side}: {where} imported {pkg} from {f or '?'} "
                               f"({paths.get('error', '')}), not from {tree}: the versions "
                               "would be mixed")


def probe(python: str, side: str, tree: Path) -> dict[str, str]:
    """Import both packages as the daemons will (PYTHONPATH and cwd = the copy)."""
    env = dict(child_env(tree), PYTHONPATH=os.pathsep.join([str(tree), str(tree / "sdk")]))
    env.pop("MESHD_BENCH_ROOT")
    r = subprocess.run([python, "-c", PROBE], env=env, cwd=str(tree), capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        raise CompareError(f"{side}: importing meshd and sessions from {tree} failed:\n"
                           f"{r.stderr[-2000:]}")
    paths = json.loads(r.stdout)
    check_paths(side, tree, "a probe child", paths)
    return paths


# --- one bench run ---------------------------------------------------------------------------


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def end_group(proc: subprocess.Popen[bytes]) -> str:
    """Stop a bench run: SIGINT to the bench (it stops its daemons by pid), then, past the
    grace period, SIGKILL to its process group; then anything else left in the group."""
    note = ""
    pgid = proc.pid                      # started with start_new_session: pgid == pid
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(GRACE)
            note = "stopped by SIGINT"
        except subprocess.TimeoutExpired:
            pass
        if proc.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(10)
            note = "killed (SIGKILL to its group)"
    if group_alive(pgid):                # a child the bench did not stop
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        note += ("; " if note else "") + "left processes in its group: stopped"
    return note


class Runner:
    def __init__(self, python: str, scripts: Path, logs: Path, quick: bool) -> None:
        self.python, self.scripts, self.logs, self.quick = python, scripts, logs, quick
        self.current: subprocess.Popen[bytes] | None = None
        self.count = 0

    def run(self, bench: str, side: str, tree: Path, extra: list[str]) -> dict[str, Any]:
        """One bench run; returns its JSON with 'ok', 'seconds', 'log' and 'problem' added."""
        self.count += 1
        stem = f"{self.count:02d}-{bench}-{side}"
        out, log = self.logs / f"{stem}.json", self.logs / f"{stem}.log"
        limit = LIMITS[bench][1 if self.quick else 0][0]
        cmd = [self.python, str(self.scripts / f"bench_{bench}.py"), *extra, "--json", str(out)]
        t0 = time.monotonic()
        with open(log, "wb") as f:
            self.current = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=child_env(tree),
                                            cwd=str(self.scripts), start_new_session=True)
            note = ""
            try:
                self.current.wait(limit)
            except subprocess.TimeoutExpired:
                note = f"no end within {limit}s: "
            finally:
                note += end_group(self.current)
            rc = self.current.returncode
            self.current = None
        res: dict[str, Any] = {}
        if out.exists():
            res = json.loads(out.read_text())
        res.update(seconds=time.monotonic() - t0, log=str(log), rc=rc, note=note)
        if "code" in res:
            check_paths(side, tree, f"bench_{bench}'s own process", res["code"]["bench"])
            check_paths(side, tree, f"bench_{bench}'s daemon-like child", res["code"]["child"])
        problems = []
        if rc != 0 or not out.exists():
            problems.append(f"exit {rc}{', no results' if not out.exists() else ''}")
        if res.get("failure"):
            problems.append(res["failure"])
        problems += check_problems(bench, res) if out.exists() else []
        if note:
            problems.append(note)
        res["problem"] = "; ".join(problems)
        res["ok"] = rc == 0 and out.exists()
        return res

    def stop(self) -> None:
        if self.current is not None:
            end_group(self.current)
            self.current = None


def check_problems(bench: str, r: dict[str, Any]) -> list[str]:
    """The benches' own correctness checks, which must hold on both sides."""
    out = []
    if bench == "ipc":
        if not r.get("entries_ok"):
            out.append(f"entries check failed: {r.get('check')}")
        errs = {k: v for d in r.get("durable", []) for k, v in d.get("errors", {}).items()}
        if errs:
            out.append(f"failed sets {errs}")
    elif bench == "routing":
        lost = sum(row["lost"] for row in r.get("latency", []) if not row["raw"])
        missing = sum(x.get("missing") or 0 for row in r.get("throughput", []) if not row["raw"]
                      for x in row["runs"])
        if lost or missing:
            out.append(f"messages lost {lost}, missing {missing}")
        if r.get("dups") or r.get("reordered"):
            out.append(f"duplicates {r.get('dups')}, out of order {r.get('reordered')}")
        if not r.get("routing_ok"):
            out.append("routing check: MISMATCH")
    elif bench == "catchup":
        if not all(row.get("entries_ok") for row in r.get("rows", [])):
            out.append("a fresh daemon did not hold all entries")
    return out


# --- what is compared --------------------------------------------------------------------------

Row = tuple[str, str, str]                 # label, which is better ("lower"/"higher"), format


def flatten(bench: str, r: dict[str, Any]) -> dict[Row, float | None]:
    """One run's JSON as the rows of its bench's table (labels follow the run's settings)."""
    out: dict[Row, float | None] = {}
    if bench == "ipc":
        lat, w = r["latency"], r["window"]
        out[("raw pyzmq round trip, p50 µs", "lower", "{:,.1f}")] = lat["raw"]["p50_us"]
        for op in ("memory set", "memory get", "message send"):
            out[(f"{op} (blocking SDK), p50 µs", "lower", "{:,.1f}")] = lat[op]["p50_us"]
            out[(f"{op} (blocking SDK), p50/raw", "lower", "{:.2f}")] = lat[op]["p50_ratio"]
        out[(f"raw pyzmq echo, {w} in flight, /s", "higher", "{:,.0f}")] = r["raw_rate"]
        for d in r["durable"]:
            out[(f"durable memory-set, P={d['clients']} x W={w}, sets/s", "higher",
                 "{:,.0f}")] = d["rate"]
    elif bench == "routing":
        for row in r["latency"]:
            name = row["name"].replace(" relay to", " to").replace(", all have it", "")
            out[(f"{name}, p50 µs", "lower", "{:,.0f}")] = row["p50_us"]
            if not row["raw"]:
                out[(f"{name}, x raw", "lower", "{:.2f}")] = row["ratio"]
            if row.get("call_p50_us") is not None:
                out[("  its blocking send() call (node 0's ack), p50 µs", "lower",
                     "{:,.0f}")] = row["call_p50_us"]
        for row in r["throughput"]:
            out[(f"{row['name']}, msgs/s", "higher", "{:,.0f}")] = row["rate"]
            if not row["raw"]:
                out[(f"{row['name']}, x raw", "higher", "{:.3f}")] = row["ratio"]
    elif bench == "catchup":
        out[("raw pyzmq pull, no storage, records/s", "higher", "{:,.0f}")] = \
            (r.get("raw") or {}).get("rate")
        for row in r["rows"]:
            name = f"meshd, {row['sources']} source(s) -> fresh daemon"
            out[(f"{name}, start->all s", "lower", "{:.2f}")] = row["start_all"]
            out[(f"{name}, alive->all s", "lower", "{:.2f}")] = row["alive_all"]
            out[(f"{name}, records/s", "higher", "{:,.0f}")] = row["rate"]
            out[(f"{name}, x ceiling", "higher", "{:.3f}")] = row["ratio"]
    return out


def verdict(better: str, before: list[float], after: list[float]) -> str:
    if not before or not after:
        return "?"
    b, a = median(before), median(after)
    if b == 0 or abs(a - b) / abs(b) < NOISE_MIN or min(before) <= a <= max(before):
        return "~"
    return "better" if (a < b) == (better == "lower") else "worse"


def table(bench: str, results: dict[str, list[dict[str, Any]]], markdown: bool) -> list[str]:
    flat: dict[str, list[dict[Row, float | None]]] = {}
    for side in ("before", "after"):
        flat[side] = []
        for r in results[side]:
            try:
                flat[side].append(flatten(bench, r) if r.get("ok") else {})
            except (KeyError, TypeError) as exc:
                flat[side].append({})
                print(f"bench_{bench} {side}: results not understood ({exc!r})")
    keys = list(dict.fromkeys(k for side in ("before", "after") for f in flat[side] for k in f))
    if not keys:
        return [f"bench_{bench}: no run succeeded"]
    rows = []
    for key in keys:
        label, better, fmt = key
        b, a = ([float(v) for f in flat[side] if (v := f.get(key)) is not None and v == v]
                for side in ("before", "after"))
        med = lambda xs: fmt.format(median(xs)) if xs else "-"  # noqa: E731
        rng = lambda xs: f"{fmt.format(min(xs))}-{fmt.format(max(xs))}" if xs else "-"  # noqa: E731
        ratio = f"{median(a) / median(b):.3f}" if a and b and median(b) else "-"
        rows.append([label, better, med(b), med(a), ratio, verdict(better, b, a), rng(b), rng(a)])
    head = ["row", "better", "before", "after", "after/before", "", "before runs", "after runs"]
    if markdown:
        return (["| " + " | ".join(h or "within noise?" for h in head) + " |",
                 "|---|---|---:|---:|---:|---|---:|---:|"]
                + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(  # noqa: E731
        c.ljust(widths[i]) if i in (0, 1, 5) else c.rjust(widths[i])
        for i, c in enumerate(r)).rstrip()
    return [line(head), "-" * len(line(head))] + [line(r) for r in rows]


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="7735feb", help="git revision (default 7735feb)")
    ap.add_argument("--after", default="worktree",
                    help="git revision, or 'worktree' (default): the working tree as it is now")
    ap.add_argument("--quick", action="store_true",
                    help="the benches' --quick settings and 2 rounds: a smoke run (~1 min)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="runs per bench and side, interleaved (default 3, --quick 2)")
    ap.add_argument("--only", default=",".join(BENCHES),
                    help="benches to run, e.g. ipc,routing (default ipc,routing,catchup)")
    ap.add_argument("--python", default=sys.executable,
                    help="the python for both sides (default: this one); it needs pyzmq and "
                         "msgpack, and the project's other dependencies")
    ap.add_argument("--ipc-args", default="", help="extra arguments for bench_ipc.py")
    ap.add_argument("--routing-args", default="", help="extra arguments for bench_routing.py")
    ap.add_argument("--catchup-args", default="", help="extra arguments for bench_catchup.py")
    ap.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    ap.add_argument("--keep", metavar="DIR", default=None,
                    help="copy every run's log and JSON into DIR (new or empty)")
    args = ap.parse_args()
    benches = [b.strip() for b in args.only.split(",") if b.strip()]
    if not benches or any(b not in BENCHES for b in benches):
        ap.error(f"--only takes names from {','.join(BENCHES)}")
    rounds = max(1, min(args.rounds or (2 if args.quick else 3), 20))
    extra = {b: (["--quick"] if args.quick else []) + getattr(args, f"{b}_args").split()
             for b in benches}
    if args.keep and Path(args.keep).exists() and any(Path(args.keep).iterdir()):
        ap.error(f"--keep {args.keep}: not empty")

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Stop()
    signal.signal(signal.SIGTERM, on_sigterm)
    t_start = time.monotonic()
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="mcmp", dir="/tmp"))
    runner: Runner | None = None
    results = {b: {"before": [], "after": []} for b in benches}
    failures: list[str] = []
    desc: dict[str, str] = {}
    try:
        trees = {"before": tmp / "before", "after": tmp / "after"}
        desc["before"] = export_rev(args.before, trees["before"])
        if args.after == "worktree":
            trees["after"].mkdir()
            desc["after"] = export_worktree(trees["after"])
        else:
            desc["after"] = export_rev(args.after, trees["after"])
        scripts, logs = tmp / "scripts", tmp / "logs"
        for d in (scripts, logs, tmp / "tmp"):
            d.mkdir()
        for name in SCRIPTS:
            shutil.copy2(HERE / name, scripts / name)
        for side, tree in trees.items():           # no side pays for compiling in its first run
            subprocess.run([args.python, "-m", "compileall", "-q", "meshd", "sdk"], cwd=str(tree),
                           capture_output=True, timeout=180)
            paths = probe(args.python, side, tree)
            desc[side] += f"\n    imports {paths['meshd']}, {paths['sessions']}"
        expect = sum(LIMITS[b][1 if args.quick else 0][1] for b in benches) * 2 * rounds
        print(f"meshd before/after, {time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} cores, "
              f"{args.python} (Python {sys.version.split()[0]}), load average {load0[0]:.2f}",
              flush=True)
        print(f"  before: {desc['before']}\n  after:  {desc['after']}", flush=True)
        print(f"  {rounds} round(s) of {', '.join('bench_' + b for b in benches)}"
              f"{' --quick' if args.quick else ''}, interleaved; about {expect / 60:.1f} min",
              flush=True)
        runner = Runner(args.python, scripts, logs, args.quick)
        k = 0
        for rnd in range(rounds):
            for b in benches:
                order = ("before", "after") if k % 2 == 0 else ("after", "before")
                k += 1
                for side in order:
                    r = runner.run(b, side, trees[side], extra[b])
                    results[b][side].append(r)
                    status = "ok" if r["ok"] and not r["problem"] else f"PROBLEM: {r['problem']}"
                    print(f"  round {rnd + 1}/{rounds} bench_{b:<8}{side:<7}{r['seconds']:6.1f}s  "
                          f"{status}", flush=True)
                    if r["problem"]:
                        failures.append(f"bench_{b} {side} round {rnd + 1}: {r['problem']}")
                        tail = Path(r["log"]).read_text(errors="replace").splitlines()[-15:]
                        print("\n".join("      | " + ln for ln in tail), flush=True)
    except (KeyboardInterrupt, Stop) as exc:
        failures.append("interrupted" if isinstance(exc, KeyboardInterrupt) else "SIGTERM")
    except CompareError as exc:
        failures.append(str(exc))
        print(f"FAILED: {exc}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if runner is not None:
            runner.stop()
        if args.keep and (tmp / "logs").exists():
            shutil.copytree(tmp / "logs", args.keep, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)

    for b in benches:
        if not any(results[b].values()):
            continue
        n = {s: sum(1 for r in results[b][s] if r.get("ok")) for s in ("before", "after")}
        print(f"\nbench_{b}.py {' '.join(extra[b])}".rstrip()
              + f": medians of {n['before']} before and {n['after']} after run(s); "
              "~ = the after median lies within the range of the before runs")
        print("\n".join(table(b, results[b], args.markdown)))
    load1 = os.getloadavg()
    print(f"\nload average at the start {load0[0]:.2f}, at the end {load1[0]:.2f} (1 min); "
          f"total {(time.monotonic() - t_start) / 60:.1f} min")
    if failures:
        print("problems:\n" + "\n".join("  " + f for f in failures))
        return 1
    print("checks: every run's own checks held on both sides (entries, routing counters, "
          "nothing lost, duplicated or reordered, catch-up complete)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
