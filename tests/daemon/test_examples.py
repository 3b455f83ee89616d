"""Every script in examples/ runs: against a real meshd (MESHD_SOCKET), again against the same
daemon (they say a re-run works), and in directory mode (a directory argument, no daemon).

Modules whose name starts with "_" (examples/_common.py) are helpers the scripts import,
not examples; they are left out. three_hosts.py starts (and stops) three daemons of its
own, so it has a test of its own instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from support import ROOT
from support.daemons import eventually, subprocess_env

EXAMPLES_DIR = ROOT / "examples"
ALL_PY = sorted(EXAMPLES_DIR.glob("*.py"))
OWN_DAEMONS = {"three_hosts.py"}
EXAMPLES = [p for p in ALL_PY if not p.name.startswith("_") and p.name not in OWN_DAEMONS]
TIMEOUT = 60.0
# Options a script is run with (after the directory, if any), to keep the runs short.
OPTIONS = {"keepalive.py": ["--interval", "0.2", "--seconds", "0.6"]}
# Lines (or parts of lines) a script must print, against a daemon and in a directory.
PRINTS = {
    "push_handlers.py": ["[calculator thread] 'multiply 12 by 12': 12 x 12 -> replying 144",
                         "asker got: 'multiply 6 by 7' -> 6 x 7 = 42",
                         "asker got: 'multiply 3 by 14' -> 3 x 14 = 42",
                         "All requests answered by the push handler."],
    "asyncio_agents.py": ["ada asked bob 2 questions", "bob answered: Which database?",
                          "ada got: Re: Which database? -> sqlite (from ada's notes)",
                          "ada got: Re: Which port? -> 7070 (from ada's notes)"],
    "keepalive.py": ["keeping worker-001 alive: a ping every 0.2 s",
                     "worker-001 stayed ACTIVE throughout"],
}


def run_example(path: Path, env: dict[str, str], cwd: Path, *args: str,
                timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(path), *args, *OPTIONS.get(path.name, [])],
                          env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)


def assert_prints(r: subprocess.CompletedProcess[str], script: Path) -> None:
    for line in PRINTS.get(script.name, []):
        assert line in r.stdout, f"{script.name} did not print {line!r}: {describe(r)}"


def describe(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\n--- stdout:\n{r.stdout}\n--- stderr:\n{r.stderr}"


def test_examples_exist() -> None:
    """No examples must fail, not pass vacuously."""
    assert EXAMPLES, f"no example scripts in {EXAMPLES_DIR} (found {[p.name for p in ALL_PY]})"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_against_daemon(script: Path, make_daemon: Callable[..., Any],
                                short_tmp: Path) -> None:
    daemon = make_daemon("d")
    work = short_tmp / "work"
    work.mkdir()
    r = run_example(script, daemon.env(), work)
    assert r.returncode == 0, f"{script.name} against meshd: {describe(r)}\n{daemon.log()}"
    assert r.stdout.strip(), f"{script.name} printed nothing: {describe(r)}"
    assert "Traceback" not in r.stderr, describe(r)
    assert_prints(r, script)
    # It did something the daemon kept (sessions, messages or memory).
    info = daemon.registry().node_info()
    reg, hub, mem = daemon.registry(), daemon.hub(), daemon.memory()
    assert (reg.get_stats()["total_sessions"] or hub.get_stats()["total_messages"]
            or mem.get_stats()["total_entries"]), f"{script.name} left no state: {info}"
    # A second run against the same daemon works too.
    r2 = run_example(script, daemon.env(), work)
    assert r2.returncode == 0, f"{script.name}, second run: {describe(r2)}\n{daemon.log()}"
    assert_prints(r2, script)
    assert daemon.alive(), daemon.log()


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_directory_mode(script: Path, short_tmp: Path) -> None:
    state = short_tmp / "state"
    work = short_tmp / "work"
    work.mkdir()
    env = subprocess_env(MESHD_SOCKET=str(short_tmp / "no-daemon-here.sock"))
    r = run_example(script, env, work, str(state))
    assert r.returncode == 0, f"{script.name} {state}: {describe(r)}"
    assert r.stdout.strip(), f"{script.name} printed nothing: {describe(r)}"
    assert "Traceback" not in r.stderr, describe(r)
    assert_prints(r, script)
    assert state.is_dir() and any(state.iterdir()), f"{script.name} kept nothing in {state}"
    assert not (short_tmp / "no-daemon-here.sock").exists()


def test_keepalive_holds_the_session_active_past_staleness(make_daemon: Callable[..., Any],
                                                            short_tmp: Path) -> None:
    """With a daemon that calls a session OFFLINE after 1 s without a ping, the script's 3 s of
    work still show it active at every look; once the script is gone, it goes offline."""
    daemon = make_daemon("d", args=["--stale-after", "1"])
    r = subprocess.run([sys.executable, str(EXAMPLES_DIR / "keepalive.py"), "--interval", "0.25",
                        "--seconds", "3"], env=daemon.env(), cwd=str(short_tmp),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"{describe(r)}\n{daemon.log()}"
    looks = re.findall(r"worker-001 is (\w+), last ping", r.stdout)
    assert len(looks) >= 5 and set(looks) == {"active"}, describe(r)
    assert "worker-001 stayed ACTIVE throughout" in r.stdout, describe(r)
    reg = daemon.registry()
    eventually(lambda: reg.get("worker-001").status.value == "offline", timeout=10,
               message="worker-001 going offline once nobody pings it")


def test_three_hosts_runs_a_mesh_and_stops_its_daemons(short_tmp: Path) -> None:
    """three_hosts.py starts three meshd on loopback, shows messages and memory crossing
    them, and leaves no daemon and no temp directory behind. It ignores a directory
    argument and MESHD_SOCKET (which point nowhere here)."""
    ignored = short_tmp / "not-used"
    env = subprocess_env(MESHD_SOCKET=str(short_tmp / "no-daemon-here.sock"))
    try:
        r = run_example(EXAMPLES_DIR / "three_hosts.py", env, short_tmp, str(ignored),
                        timeout=60.0)
    except subprocess.TimeoutExpired as exc:     # stop what it started before failing
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        for pid in map(int, re.findall(r"started meshd pid (\d+)", out)):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        raise
    pids = [int(p) for p in re.findall(r"started meshd pid (\d+)", r.stdout)]
    assert r.returncode == 0, describe(r)
    assert len(pids) == 3, describe(r)
    for line in ["registered beta-002 on host 2",
                 "host 2 received: ❓ gamma-003 → beta-002 : [COLLABORATION] Hello from host 3",
                 "host 3 received: 📡 alpha-001 → ALL : [COLLABORATION] Standup",
                 "host 3 reads 'build', set on host 2: {'status': 'green'}",
                 "host 1's peers:"]:
        assert line in r.stdout, f"no {line!r}: {describe(r)}"
    assert len(re.findall(r"at 127\.0\.0\.1:\d+: alive", r.stdout)) == 2, describe(r)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    tmp = re.search(r"logs in (\S+)", r.stdout)
    assert tmp and not os.path.exists(tmp.group(1)), describe(r)
    assert not ignored.exists() and not (short_tmp / "no-daemon-here.sock").exists()
