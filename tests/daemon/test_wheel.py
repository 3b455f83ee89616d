"""The product as a user installs it: build the wheel, install it (not editable) into a fresh
venv outside the checkout, and run the installed `meshd` and `sessions` from elsewhere.

An explicit package list once left `meshd.mesh` out of the wheel; the installed daemon died
with ModuleNotFoundError while every other test, run from the tree, passed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

from support import ROOT

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                                reason="builds from the git checkout's tracked files")


def clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH, no meshd variables: nothing from the checkout leaks in."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("MESHD_") and k != "VIRTUAL_ENV"}
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=str(cwd), env=clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=str(ROOT), capture_output=True,
                         check=True).stdout.decode()
    return [f for f in out.split("\0") if f]


@pytest.fixture(scope="module")
def installed() -> Iterator[tuple[Path, Path, Path]]:
    """(wheel, venv bin dir, a work dir outside the checkout)."""
    top = Path(tempfile.mkdtemp(prefix="mw", dir="/tmp"))
    try:
        whl_dir, venv, work = top / "whl", top / "venv", top / "work"
        work.mkdir()
        # Build from a copy of the tracked files, as a clean clone would.
        src = top / "src"
        for f in tracked_files():
            if (ROOT / f).is_file():
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, src / f)
        r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(whl_dir),
                 str(src)], work)
        assert r.returncode == 0, r.stdout + r.stderr
        wheels = list(whl_dir.glob("meshd-*.whl"))
        assert len(wheels) == 1, wheels
        base = getattr(sys, "_base_executable", sys.executable)
        r = run([base, "-m", "venv", str(venv)], work)
        assert r.returncode == 0, r.stderr
        r = run([str(venv / "bin" / "pip"), "install", "-q", str(wheels[0])], work)
        assert r.returncode == 0, r.stdout + r.stderr
        yield wheels[0], venv / "bin", work
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_the_wheel_carries_every_source_file_of_the_tree(installed) -> None:
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    in_wheel = {n for n in names if n.endswith(".py")}
    tracked = tracked_files()
    tree = {f for f in tracked if f.startswith("meshd/") and f.endswith(".py")}
    tree |= {f.removeprefix("sdk/") for f in tracked
             if f.startswith("sdk/sessions/") and f.endswith(".py")}
    assert tree - in_wheel == set(), f"missing from the wheel: {sorted(tree - in_wheel)}"
    assert in_wheel - tree == set(), f"in the wheel but not the tree: {sorted(in_wheel - tree)}"
    # Non-Python files the package ships (e.g. static pages) are in the wheel too.
    data = {f for f in tracked if f.startswith("meshd/") and not f.endswith(".py")}
    assert data - names == set(), f"package data missing from the wheel: {sorted(data - names)}"


def test_installed_meshd_and_sessions_work_from_outside_the_checkout(installed) -> None:
    _, bindir, work = installed
    meshd, sessions = str(bindir / "meshd"), str(bindir / "sessions")
    where = run([str(bindir / "python"), "-c", "import meshd, sessions; "
                 "print(meshd.__file__); print(sessions.__file__)"], work)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).resolve().is_relative_to(bindir.parent), f"not the installed copy: {line}"

    sock, data = work / "d.sock", work / "data"
    log = open(work / "meshd.log", "wb")
    proc = subprocess.Popen([meshd, "--no-discovery", "--bind", "127.0.0.1:0", "--socket",
                             str(sock), "--data-dir", str(data)], cwd=str(work),
                            env=clean_env(), stdout=log, stderr=log)
    log.close()
    try:
        env = {"MESHD_SOCKET": str(sock)}
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (work / "meshd.log").read_text()
            r = run([sessions, "info", "--json"], work, timeout=30, **env)
            if r.returncode == 0:
                break
            assert time.monotonic() < deadline, r.stderr + (work / "meshd.log").read_text()
            time.sleep(0.1)
        info = json.loads(r.stdout)
        assert info["peer_address"].startswith("127.0.0.1:")

        r = run([sessions, "register", "cece-001", "Cece", "Claude", "--user", "Alexa",
                 "--capabilities", "python,review"], work, timeout=30, **env)
        assert r.returncode == 0, r.stderr
        r = run([sessions, "list", "--json"], work, timeout=30, **env)
        assert r.returncode == 0, r.stderr
        assert [s["session_id"] for s in json.loads(r.stdout)] == ["cece-001"]
        r = run([sessions, "memory-set", "cece-001", "current_task",
                 "Building collaboration system", "--tags", "task,active"], work, timeout=30, **env)
        assert r.returncode == 0, r.stderr
        r = run([sessions, "memory-get", "current_task"], work, timeout=30, **env)
        assert r.returncode == 0 and "Building collaboration system" in r.stdout, r.stdout + r.stderr

        key = work / "cluster.key"
        r = run([meshd, "--gen-key", str(key)], work, timeout=30)
        assert r.returncode == 0, r.stderr
        assert len(key.read_text().strip()) == 40 and (key.stat().st_mode & 0o777) == 0o600
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert proc.returncode == 0, (work / "meshd.log").read_text()
