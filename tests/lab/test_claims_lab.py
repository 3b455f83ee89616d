"""The proof of claims (issue 16): five hosts (network namespaces on a bridge, see
support/netlab.py), three of them voters, a client on every host that keeps holding,
using and releasing a few resources (support/claims_client.py) while a nemesis cuts hosts
off and heals them, SIGKILLs daemons and restarts them, and SIGSTOPs and SIGCONTs them
(voters included). Every client records its grants, uses and losses on the host's monotonic
clock, which all namespaces share, and support/lease_checker.py then checks the histories:
no two holders at once, tokens strictly increasing, every loss reported, and a grant on the
majority side soon after a holder's host went down.

The schedule comes from a seed, printed (MESHD_LAB_SEED=N) and settable by that variable
for a replay; MESHD_LAB_CLAIMS_SECONDS sets how long the clients run (default 60);
MESHD_LAB_HISTORY_DIR=DIR keeps a copy of the histories and logs of every run. The second
test runs deliberately broken builds (MESHD_CLAIMS_MUTANT) under a schedule that exposes
each, and the checker must catch them: no-majority (voters grant without a majority) under
a partition that splits the voters, no-floor (no durable promise floor) with every daemon
killed at once.

Needs root (CI runs as root) and skips with the reason otherwise; also skipped while the
claims service is not built (no `Claims` in the SDK or no `--voters` on meshd).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import lease_checker, netlab, script
from support.daemons import CHILD_CWD, Daemon, eventually, subprocess_env, wait_converged

HOSTS = 5
VOTERS = (0, 1, 2)
PORT = 7747
TTL = 3.0               # s, the clients' lease TTL (the test preset allows up to 5)
QUARANTINE = 5.0        # s a restarted voter sits out in the test preset (claim_max_ttl)
RESOURCES = ["job/a", "job/b", "job/c"]


def claims_missing() -> str | None:
    try:
        import sessions
        sessions.Claims                                   # noqa: B018
    except (ImportError, AttributeError):
        return "claims not built yet (no sessions.Claims)"
    r = subprocess.run([sys.executable, "-m", "meshd", "--help"], capture_output=True,
                       text=True, timeout=60, env=subprocess_env(), cwd=CHILD_CWD)
    if "--voters" not in r.stdout:
        return "claims not built yet (meshd has no --voters)"
    return None


REASON = netlab.skip_reason() or claims_missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def seed() -> int:
    value = os.environ.get("MESHD_LAB_SEED")
    return int(value) if value else random.SystemRandom().randrange(1, 2**31)


def seconds(default: float) -> float:
    return float(os.environ.get("MESHD_LAB_CLAIMS_SECONDS", default))


# --- the nemesis ------------------------------------------------------------------------------

HOLDER = -1               # a fault's host: one whose client holds a lease at that moment


@dataclass
class Fault:
    at: float              # s after the clients started
    op: str                # cut, kill, stop
    hosts: list[int]       # HOLDER: chosen when the fault starts, among the holders
    duration: float        # s until heal, restart, cont


def plan(rng: random.Random, run_for: float) -> list[Fault]:
    """One fault at a time, each short (shorter than a TTL) or long (past the lease's lapse
    plus the grace the checker gives a new grant), apart by more than the time the checker
    lets a host recover. The first takes a lease holder's host down for long (so the
    liveness check has a case); then every kind on a voter and on a non-voter comes up
    early in the run, the rest at random."""
    long_ = TTL + 2.0
    first = [("stop", rng.choice(VOTERS), long_), ("kill", rng.choice((3, 4)), long_),
             ("cut", rng.choice(range(HOSTS)), long_), ("stop", rng.choice((3, 4)), 1.5),
             ("kill", rng.choice(VOTERS), 1.0), ("cut", rng.choice(VOTERS), 2.0),
             ("kill", list(VOTERS), 1.0)]         # every voter at once: the floors hold
    rng.shuffle(first)
    first.append((rng.choice(["kill", "stop", "cut"]), HOLDER, long_))     # popped first
    faults: list[Fault] = []
    t = rng.uniform(3.0, 5.0)
    while True:
        if first:
            op, host, dur = first.pop()
        else:
            op = rng.choice(["cut", "kill", "stop"])
            host = rng.choice([HOLDER, *range(HOSTS)])
            dur = rng.choice([rng.uniform(0.3, TTL * 0.8), rng.uniform(long_, long_ + 6)])
        dur = round(dur + rng.uniform(0, 1.0), 2)
        if t + dur > run_for - 2.0:
            break
        hosts = host if isinstance(host, list) else [host]
        faults.append(Fault(round(t, 2), op, hosts, dur))
        t += dur + rng.uniform(2.5, 4.0)
        if op == "kill" and set(hosts) & {*VOTERS, HOLDER}:
            t += QUARANTINE            # let its quarantine pass before the next fault
    return faults


class Nemesis:
    """Runs a plan in a thread, recording each step to a JSONL history of its own."""

    def __init__(self, lab: netlab.Lab, nodes: list[Daemon], path: Path,
                 rng: random.Random) -> None:
        self.lab, self.nodes, self.rng = lab, nodes, rng
        self.dir = path.parent
        self._f = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.down: dict[tuple[str, int], bool] = {}
        self.thread: threading.Thread | None = None

    def record(self, op: str, hosts: list[int], **kw: Any) -> None:
        with self._lock:
            self._f.write(json.dumps({"t": time.monotonic_ns(), "ev": "nemesis", "op": op,
                                      "hosts": hosts, **kw}) + "\n")
            self._f.flush()

    def _do(self, op: str, h: int) -> None:
        d = self.nodes[h]
        if op == "cut":
            self.lab.cut(h)
        elif op == "heal":
            self.lab.heal(h)
        elif op == "kill":
            d.kill9()
        elif op == "restart":
            try:
                d.start(timeout=20)
            except Exception as err:          # once more, then it is the test's failure
                self.errors.append(f"restart of host {h}: {err}")
                d.start(timeout=20)
        elif op == "stop":
            os.kill(d.pid, signal.SIGSTOP)
        elif op == "cont":
            os.kill(d.pid, signal.SIGCONT)

    def holder(self) -> int:
        """A host whose client holds a lease now (by its history so far), else any."""
        holding = []
        for path in sorted(self.dir.glob("c*.jsonl")):
            state = None
            for line in path.read_text(errors="replace").splitlines():
                if '"acq.ok"' in line:
                    state = line
                elif '"lost"' in line or '"release.invoke"' in line:
                    state = None
            if state is not None:
                try:
                    holding.append(int(json.loads(state)["host"]))
                except ValueError:
                    pass
        return self.rng.choice(holding or list(range(HOSTS)))

    def step(self, op: str, hosts: list[int], **kw: Any) -> None:
        undo = {"cut": "heal", "kill": "restart", "stop": "cont"}
        for h in hosts:
            if op in undo:                    # stamped before the fault takes effect
                self.record(op, [h], **{k: v for k, v in kw.items() if v is not None})
                self._do(op, h)
                self.down[(undo[op], h)] = True
            else:                             # stamped once it is over
                self._do(op, h)
                self.record(op, [h])
                self.down.pop((op, h), None)

    def run(self, t0: float, faults: list[Fault]) -> None:
        try:
            for f in faults:
                if self.stop_event.wait(max(0.0, t0 + f.at - time.monotonic())):
                    return
                hosts = [self.holder() if h == HOLDER else h for h in f.hosts]
                self.step(f.op, hosts, target="holder" if HOLDER in f.hosts else None)
                self.stop_event.wait(f.duration)
                self.step({"cut": "heal", "kill": "restart", "stop": "cont"}[f.op], hosts)
        except Exception as err:
            self.errors.append(f"nemesis: {err!r}")
        finally:
            self.undo_all()

    def undo_all(self) -> None:
        """Every host back: healed, running, not stopped (also when the test failed)."""
        for (op, h) in list(self.down):
            try:
                self.step(op, [h])
            except Exception as err:
                self.errors.append(f"undo {op} {h}: {err!r}")

    def start(self, t0: float, faults: list[Fault]) -> None:
        self.thread = threading.Thread(target=self.run, args=(t0, faults), daemon=True,
                                       name="nemesis")
        self.thread.start()

    def close(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout)
        self.undo_all()
        with self._lock:
            self._f.close()


# --- the lab ----------------------------------------------------------------------------------

@dataclass
class ClaimsLab:
    lab: netlab.Lab
    dir: Path
    nodes: list[Daemon] = field(default_factory=list)
    clients: list[subprocess.Popen[bytes]] = field(default_factory=list)
    nemesis: Nemesis | None = None

    def histories(self) -> list[Path]:
        return sorted(self.dir.glob("*.jsonl"))


@pytest.fixture
def claims_lab(short_tmp: Path, tmp_path: Path) -> Iterator[Callable[..., ClaimsLab]]:
    """claims_lab(mutant=None) -> 5 daemons on 5 hosts, voters on hosts 0-2, all joined.
    Everything it started is stopped by pid at the end, also when the test fails."""
    made: list[ClaimsLab] = []

    def make(mutant: str | None = None) -> ClaimsLab:
        cl = ClaimsLab(netlab.Lab(HOSTS), tmp_path)
        made.append(cl)
        lab = cl.lab
        voters = ",".join(f"{lab.address(v)}:{PORT}" for v in VOTERS)
        env = ["env", f"MESHD_CLAIMS_MUTANT={mutant}"] if mutant else []
        for i, ns in enumerate(lab.hosts):
            args = ["--bind", f"{lab.address(i)}:{PORT}", "--voters", voters]
            for j in VOTERS:
                if j != i:
                    args += ["--join", f"{lab.address(j)}:{PORT}"]
            d = Daemon(socket=str(short_tmp / f"h{i}.sock"), data_dir=str(tmp_path / f"h{i}-data"),
                       log_path=str(tmp_path / f"h{i}.log"), args=args,
                       wrap=["ip", "netns", "exec", ns, *env])
            cl.nodes.append(d)
            d.start(timeout=30)
        wait_converged(cl.nodes, timeout=60)
        return cl

    try:
        yield make
    finally:
        for cl in made:
            if cl.nemesis is not None:
                cl.nemesis.close()
            for d in cl.nodes:                # a stopped daemon cannot hear SIGTERM
                if d.alive():
                    os.kill(d.pid, signal.SIGCONT)
            stop_clients(cl, timeout=5)
            for d in cl.nodes:
                d.stop(timeout=10)
            cl.lab.close()


def start_clients(cl: ClaimsLab, run_seed: int, resources: list[str]) -> None:
    for i, d in enumerate(cl.nodes):
        log = open(cl.dir / f"client{i}.log", "ab")
        cl.clients.append(cl.lab.popen(i, [
            sys.executable, str(script("claims_client.py")), "--socket", d.socket,
            "--host", str(i), "--out", str(cl.dir / f"c{i}.jsonl"),
            "--resources", ",".join(resources), "--ttl", str(TTL), "--seed", str(run_seed),
            "--hold-max", str(2 * TTL)],
            stdout=log, stderr=log, env=subprocess_env(), cwd=CHILD_CWD))
        log.close()


def stop_clients(cl: ClaimsLab, timeout: float) -> list[int | None]:
    """SIGTERM: each client releases what it holds and exits; SIGKILL past the timeout."""
    for p in cl.clients:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes = []
    for p in cl.clients:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            codes.append(None)
    return codes


def wait_first_grant(cl: ClaimsLab, timeout: float) -> None:
    def granted() -> bool:
        return any('"acq.ok"' in p.read_text(errors="replace") for p in cl.histories())
    eventually(granted, timeout=timeout, interval=0.2, message="a first grant to a client")


def run_schedule(cl: ClaimsLab, run_seed: int, faults: list[Fault], run_for: float,
                 resources: list[str]) -> lease_checker.Report:
    print(f"\nMESHD_LAB_SEED={run_seed}  ({run_for:.0f} s; replay with that variable set)")
    for f in faults:
        who = "a holder's host" if HOLDER in f.hosts else f"hosts {f.hosts}"
        print(f"  at {f.at:6.2f}s {f.op:4} {who} for {f.duration:.2f}s")
    start_clients(cl, run_seed, resources)
    # Fresh voters sit out their quarantine first: the schedule starts with the first grant.
    wait_first_grant(cl, timeout=30)
    t0 = time.monotonic()
    cl.nemesis = Nemesis(cl.lab, cl.nodes, cl.dir / "nemesis.jsonl",
                         random.Random(run_seed + 1))
    cl.nemesis.start(t0, faults)
    time.sleep(run_for)
    cl.nemesis.close()
    # Everything is back up: let the clients notice, then stop them (each releases first).
    wait_converged(cl.nodes, timeout=60)
    time.sleep(TTL)
    codes = stop_clients(cl, timeout=30)
    assert codes == [0] * len(codes), (
        f"clients exited with {codes} (seed {run_seed}); logs in {cl.dir}:\n"
        + "\n".join((cl.dir / f"client{i}.log").read_text(errors="replace")[-1500:]
                    for i in range(len(codes))))
    report = lease_checker.check_files(cl.histories(), lease_checker.Config(
        eps=0.001, slack=1.0, grace=5.0, recovery=2.0, recovery_restart=QUARANTINE + 2.0,
        voters=VOTERS))
    print(report.format(limit=30))
    keep = os.environ.get("MESHD_LAB_HISTORY_DIR")
    if keep:                                  # kept past pytest's clean-up of tmp dirs
        dest = Path(keep) / f"{cl.lab.tag}-seed{run_seed}"
        dest.mkdir(parents=True, exist_ok=True)
        for p in [*cl.histories(), *cl.dir.glob("*.log")]:
            shutil.copy(p, dest / p.name)
        print(f"histories and logs copied to {dest}")
    print(f"histories and daemon logs: {cl.dir}")
    return report


def test_claims_stay_exclusive_under_partitions_kills_and_pauses(claims_lab):
    run_seed, run_for = seed(), seconds(60.0)
    faults = plan(random.Random(run_seed), run_for)
    cl = claims_lab()
    report = run_schedule(cl, run_seed, faults, run_for, RESOURCES)
    assert cl.nemesis is not None and not cl.nemesis.errors, cl.nemesis.errors
    assert report.ok, f"MESHD_LAB_SEED={run_seed}: {len(report.violations)} violations\n" \
                      + report.format(limit=30)
    grants = len(report.grants)
    assert grants >= 10, f"only {grants} grants in {run_for} s (seed {run_seed})"
    assert {g.resource for g in report.grants} == set(RESOURCES)
    # The faults reached holders: a lease lost, or a holder's renewal or release refused
    # while its daemon was stopped, cut off or killed (which of these a seed gives varies).
    hit = [e for g in report.grants for e in g.terminals if e["ev"] in ("lost", "release.fail")]
    assert hit or any('"renew.fail"' in h.read_text() for h in cl.histories()), \
        "no fault ever reached a holder: no loss, no failed renewal or release"
    assert report.liveness_checked >= 1, \
        f"no fault of a holder's host was judged for liveness (seed {run_seed})"


def split_the_voters(rng: random.Random) -> list[Fault]:
    """One voter cut off, then another, while the clients on both sides ask for the same
    resource: a build that grants without a majority grants it on both sides."""
    first = rng.choice(VOTERS)
    return [Fault(3.0, "cut", [first], 8.0), Fault(13.0, "cut", [(first + 1) % len(VOTERS)], 8.0)]


def kill_everything(rng: random.Random) -> list[Fault]:
    """Every daemon killed at once and restarted: a build whose voters keep no durable
    promise floor starts its ballots from 0 again, so tokens go backwards. Late in the run,
    so that the tokens granted before are well above what the attempts made during the
    restarted voters' quarantine raise the counters to (killed at 5-8 s, a run once got
    back past its old tokens that way and showed nothing)."""
    return [Fault(round(rng.uniform(14.0, 16.0), 2), "kill", list(range(HOSTS)), 1.0)]


MUTANTS = {"no-majority": split_the_voters, "no-floor": kill_everything}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_the_checker_catches_a_broken_build(claims_lab, mutant):
    """A deliberately broken build (MESHD_CLAIMS_MUTANT) under a schedule that exposes it:
    the checker must report two holders at once or tokens going backwards."""
    run_seed = seed()
    faults = MUTANTS[mutant](random.Random(run_seed))
    cl = claims_lab(mutant=mutant)
    report = run_schedule(cl, run_seed, faults, 32.0, RESOURCES[:1])
    found = {v.check for v in report.violations}
    assert found & {"exclusion", "tokens"}, (
        f"MESHD_LAB_SEED={run_seed}: the checker found no overlap nor token error in the "
        f"{mutant} build ({found or 'no violations'})\n" + report.format())
