"""Packaging, layering and the README/CI contract."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from support import ROOT
from support.daemons import subprocess_env


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT), env=subprocess_env())


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_cmds = [b.strip() for b in blocks if "pytest" in b]
    assert len(test_cmds) == 1, "README must give one test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmds[0] in [line.strip() for line in ci.splitlines()]


def test_layering_rules_hold():
    tool = ROOT.parent / "shared" / "tools" / "layers.py"
    if not tool.exists():
        pytest.skip(f"{tool} is not beside the project")
    result = run(sys.executable, str(tool))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_module_imports_on_its_own():
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts)
               for p in (ROOT / "meshd").rglob("*.py")]
    modules += ["sessions." + p.stem for p in (ROOT / "sdk" / "sessions").glob("*.py")]
    modules = [m.removesuffix(".__init__").replace("sessions.__init__", "sessions")
               for m in modules if not m.endswith("__main__")]
    for m in modules:
        r = run(sys.executable, "-c", f"import {m}")
        assert r.returncode == 0, f"import {m} failed: {r.stderr}"


@pytest.mark.parametrize("module", ["meshd", "sessions"])
def test_python_m_entry_points(module):
    r = run(sys.executable, "-m", module, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout


def test_console_scripts_are_declared():
    import tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["scripts"] == {"meshd": "meshd.main:main",
                                          "sessions": "sessions.cli:main"}
    assert data["project"]["requires-python"] == ">=3.11"
    deps = {re.split(r"[<>=!~ ]", d)[0].lower() for d in data["project"]["dependencies"]}
    assert deps == {"pyzmq", "zeroconf", "msgpack", "click"}


def test_systemd_unit_verifies():
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    unit = ROOT / "systemd" / "meshd.service"
    text = unit.read_text()
    assert "Type=notify" in text and "StateDirectory=meshd" in text
    assert "RuntimeDirectory=meshd" in text and "Restart=on-failure" in text
    r = run(tool, "verify", str(unit))
    # verify checks ExecStart's binary exists; a machine without the install of
    # docs/systemd.md lacks it, which says nothing about the unit itself.
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if line.strip() and "/opt/meshd/venv/bin/meshd" not in line]
    assert not problems, "\n".join(problems)
