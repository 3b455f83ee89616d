"""The README's quick starts run as written: each block marked `# quick start: ...` runs
verbatim with bash -e, with the installed `meshd` and `sessions` first on PATH.

They use fixed paths (/tmp/qs) and ports (127.0.0.1:7800-7803), as a reader's copy would;
the test skips when a port is taken, runs each block in its own process group and kills
that group afterwards, so a failing block leaves no daemon behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

README = ROOT / "README.md"
QS_DIR = Path("/tmp/qs")


def quick_starts() -> dict[str, str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    out = {}
    for b in blocks:
        m = re.match(r"# quick start: (.+)\n", b)
        if m:
            out[m.group(1).strip()] = b
    return out


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def bin_dir() -> str:
    """Where this interpreter's console scripts are (the installed meshd and sessions)."""
    d = Path(sys.executable).parent
    if not (d / "meshd").exists() or not (d / "sessions").exists():
        pytest.skip(f"no meshd/sessions console scripts beside {sys.executable}")
    return str(d)


def test_the_readme_has_both_quick_starts() -> None:
    assert set(quick_starts()) == {"one host", "three daemons"}


@pytest.mark.parametrize("name", ["one host", "three daemons"])
def test_quick_start_runs_as_written(name: str) -> None:
    block = quick_starts()[name]
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", block)]
    busy = [p for p in set(ports) if not port_free(p)]
    if busy:
        pytest.skip(f"ports {busy} are in use on this machine")
    shutil.rmtree(QS_DIR, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")
           and k != "PYTHONPATH"}
    env["PATH"] = bin_dir() + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    proc = subprocess.Popen(["bash", "-e", "-c", block], env=env, cwd=str(Path.home()),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)          # whatever the block left running
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait(10)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err
    if name == "one host":
        assert "✅ Value: Building collaboration system" in out
        assert "Need code review" in out and "cece-001" in out
    else:
        assert out.count("alive") >= 2, out                     # b and c seen from a
        assert "Review PR 7" in out and '"state": "started"' in out, out
    shutil.rmtree(QS_DIR, ignore_errors=True)


def test_the_python_snippet_runs_as_written(daemon, short_tmp: Path) -> None:
    (block,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    script = short_tmp / "snippet.py"
    script.write_text(block)
    r = subprocess.run([sys.executable, str(script)], env=daemon.env(), cwd=str(short_tmp),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['Need help', 'Re: Need help']"
    assert daemon.memory().get("current_task") == {"name": "Build"}
