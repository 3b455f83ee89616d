"""Every script in examples/ runs: against a real meshd (MESHD_SOCKET), again against the same
daemon (they say a re-run works), and in directory mode (a directory argument, no daemon).

Modules whose name starts with "_" (examples/_common.py) are helpers the scripts import,
not examples; they are left out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import ROOT, subprocess_env

EXAMPLES_DIR = ROOT / "examples"
ALL_PY = sorted(EXAMPLES_DIR.glob("*.py"))
EXAMPLES = [p for p in ALL_PY if not p.name.startswith("_")]
TIMEOUT = 60.0


def run_example(path: Path, env: dict[str, str], cwd: Path,
                *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(path), *args], env=env, cwd=str(cwd),
                          capture_output=True, text=True, timeout=TIMEOUT)


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
    # It did something the daemon kept (sessions, messages or memory).
    info = daemon.registry().node_info()
    reg, hub, mem = daemon.registry(), daemon.hub(), daemon.memory()
    assert (reg.get_stats()["total_sessions"] or hub.get_stats()["total_messages"]
            or mem.get_stats()["total_entries"]), f"{script.name} left no state: {info}"
    # A second run against the same daemon works too.
    r2 = run_example(script, daemon.env(), work)
    assert r2.returncode == 0, f"{script.name}, second run: {describe(r2)}\n{daemon.log()}"
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
    assert state.is_dir() and any(state.iterdir()), f"{script.name} kept nothing in {state}"
    assert not (short_tmp / "no-daemon-here.sock").exists()
