"""`meshd --config FILE` (docs/configuration.md, "Config file"): every option from a TOML
file, precedence flag > environment > file > default as `--print-config` shows it, the
[tuning] table, the default file's location, and the errors (exit 2, naming the key).

`--print-config` runs as a real `python -m meshd` subprocess and exits before serving, so
most of these need no daemon; one test starts a real daemon with `--config`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from support.daemons import CHILD_CWD, subprocess_env


def meshd(*args: str, env: dict[str, str] | None = None,
          xdg: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m meshd ARGS` with no MESHD_* settings but those given, and a config home
    of its own (never the user's own ~/.config/meshd/meshd.toml)."""
    base = subprocess_env()
    for k in [k for k in base if k.startswith("MESHD_")]:
        del base[k]
    base["XDG_CONFIG_HOME"] = str(xdg) if xdg else "/nonexistent-meshd-test-config"
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "meshd", *args], env=base, cwd=CHILD_CWD,
                          capture_output=True, text=True, timeout=30)


LINE = re.compile(r"^(#\s*)?([A-Za-z0-9_-]+) = (.*?)\s+# (.*)$")


def printed(*args: str, **kw) -> tuple[dict, dict[str, str], str]:
    """--print-config: (its TOML, parsed; key -> where the value came from; the text)."""
    r = meshd(*args, "--print-config", **kw)
    assert r.returncode == 0, r.stderr
    sources = {}
    for line in r.stdout.splitlines():
        m = LINE.match(line)
        if m:
            sources.setdefault(m.group(2), m.group(4))
    return tomllib.loads(r.stdout), sources, r.stdout


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


FILE = """\
cluster = "from-file"
join = ["10.0.0.1:7001", "10.0.0.2:7002"]
discovery = false
stale_after = 60          # `_` or `-`: the same key
log-level = "warning"

[tuning]
probe_interval = 0.7
session_stale_after = 90.0   # stale-after, an option, wins over [tuning]
"""


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    conf = write(tmp_path / "meshd.toml", FILE)
    env = {"MESHD_CLUSTER": "from-env", "MESHD_JOIN": "10.0.1.1:7001 10.0.1.2:7002",
           "MESHD_DISCOVERY": "1", "MESHD_STALE_AFTER": "70"}
    flags = ["--cluster", "from-flag", "--join", "10.0.2.1:7001", "--join", "10.0.2.2:7002",
             "--no-discovery", "--stale-after", "80"]

    # default: no file at all
    cfg, src, _ = printed()
    assert "cluster" not in cfg and src["cluster"] == "default"
    assert cfg["join"] == [] and src["join"] == "default"
    assert cfg["discovery"] is True and src["discovery"] == "default"
    assert cfg["tuning"]["session_stale_after"] == 300.0
    assert cfg["tuning"]["probe_interval"] == 0.5 and src["probe_interval"] == "default"
    assert cfg["log-level"] == "info"

    # the file over the defaults
    cfg, src, out = printed("--config", str(conf))
    where = f"file {conf}"
    assert f"# Config file: {conf}" in out
    assert cfg["cluster"] == "from-file" and src["cluster"] == where
    assert cfg["join"] == ["10.0.0.1:7001", "10.0.0.2:7002"] and src["join"] == where
    assert cfg["discovery"] is False and src["discovery"] == where
    assert cfg["stale-after"] == 60.0 and src["stale-after"] == where
    assert cfg["log-level"] == "warning" and src["log-level"] == where
    assert cfg["tuning"]["probe_interval"] == 0.7
    assert src["probe_interval"] == f"{where} [tuning]"
    assert cfg["tuning"]["session_stale_after"] == 60.0      # the option key wins
    assert src["session_stale_after"] == "from the options above"
    assert cfg["tuning"]["mesh"] is True and src["mesh"] == "default"

    # the environment over the file
    cfg, src, _ = printed("--config", str(conf), env=env)
    assert cfg["cluster"] == "from-env" and src["cluster"] == "env MESHD_CLUSTER"
    assert cfg["join"] == ["10.0.1.1:7001", "10.0.1.2:7002"] and src["join"] == "env MESHD_JOIN"
    assert cfg["discovery"] is True and src["discovery"] == "env MESHD_DISCOVERY"
    assert cfg["stale-after"] == 70.0 and src["stale-after"] == "env MESHD_STALE_AFTER"
    assert cfg["log-level"] == "warning" and src["log-level"] == where   # not in env

    # flags over everything
    cfg, src, _ = printed("--config", str(conf), *flags, env=env)
    assert cfg["cluster"] == "from-flag" and src["cluster"] == "flag"
    assert cfg["join"] == ["10.0.2.1:7001", "10.0.2.2:7002"] and src["join"] == "flag"
    assert cfg["discovery"] is False and src["discovery"] == "flag"
    assert cfg["stale-after"] == 80.0 and src["stale-after"] == "flag"
    assert cfg["tuning"]["session_stale_after"] == 80.0
    assert cfg["tuning"]["probe_interval"] == 0.7             # still from the file


def test_boolean_flags_and_presets_from_the_file(tmp_path):
    conf = write(tmp_path / "m.toml", 'no-mesh = true\npreset = "test"\ndurability = "fsync"\n')
    cfg, src, _ = printed("--config", str(conf))
    assert cfg["no-mesh"] is True and src["no-mesh"] == f"file {conf}"
    assert cfg["tuning"]["mesh"] is False
    assert cfg["tuning"]["probe_interval"] == 0.2 and src["probe_interval"] == "preset test"
    assert cfg["durability"] == "fsync"
    cfg, src, _ = printed("--config", str(conf), "--durability", "process")
    assert cfg["durability"] == "process" and src["durability"] == "flag"


def test_print_config_output_is_a_config_file_meshd_reads_back(tmp_path):
    conf = write(tmp_path / "a.toml", FILE)
    first, _, _ = printed("--config", str(conf))
    again = write(tmp_path / "b.toml", printed("--config", str(conf))[2])
    second, src, _ = printed("--config", str(again))
    assert second == first
    assert src["cluster"] == f"file {again}"


def test_default_file_is_under_xdg_config_home(tmp_path):
    write(tmp_path / "meshd" / "meshd.toml", 'cluster = "xdg"\n')
    cfg, src, out = printed(xdg=tmp_path)
    default = tmp_path / "meshd" / "meshd.toml"
    assert cfg["cluster"] == "xdg" and src["cluster"] == f"file {default}"
    assert f"# Config file: {default}" in out
    # --config (or MESHD_CONFIG) replaces the default file, it is not merged with it
    other = write(tmp_path / "other.toml", 'bind = "127.0.0.1:7001"\n')
    for args, env in ((["--config", str(other)], None), ([], {"MESHD_CONFIG": str(other)})):
        cfg, src, _ = printed(*args, xdg=tmp_path, env=env)
        assert "cluster" not in cfg and cfg["bind"] == "127.0.0.1:7001"


def test_missing_default_file_is_fine_but_a_missing_explicit_one_is_an_error(tmp_path):
    cfg, _, out = printed(xdg=tmp_path)
    assert f"# Config file: none ({tmp_path}/meshd/meshd.toml does not exist)" in out
    missing = tmp_path / "nope.toml"
    r = meshd("--config", str(missing), "--print-config")
    assert r.returncode == 2 and str(missing) in r.stderr and "no such file" in r.stderr
    r = meshd("--print-config", env={"MESHD_CONFIG": str(missing)})
    assert r.returncode == 2 and str(missing) in r.stderr


@pytest.mark.skipif(os.path.exists("/etc/meshd/meshd.toml"),
                    reason="this machine has an /etc/meshd/meshd.toml of its own")
def test_system_reads_etc_meshd(tmp_path):
    write(tmp_path / "meshd" / "meshd.toml", 'cluster = "xdg"\n')
    cfg, _, out = printed("--system", xdg=tmp_path)
    assert "# Config file: none (/etc/meshd/meshd.toml does not exist)" in out
    assert "cluster" not in cfg


@pytest.mark.parametrize("text, needles", [
    ('bindd = "127.0.0.1:7001"\n', ["unknown key 'bindd'", "did you mean 'bind'"]),
    ('gen-key = "/tmp/k"\n', ["unknown key 'gen-key'"]),          # acts, never configures
    ('print-config = true\n', ["unknown key 'print-config'"]),
    ('[tuning]\nprobe_intervall = 1.0\n', ["unknown key 'probe_intervall' in [tuning]",
                                           "did you mean 'probe_interval'"]),
    ('[tuning]\ndurability = "fsync"\n', ["[tuning] durability is an option",
                                          "durability = ..."]),
    ('[memory]\nhistory = 3\n', ["unknown key 'memory'"]),
    ('cluster = "a"\ncluster_x = 1\n', ["unknown key 'cluster_x'"]),
    ('stale-after = 1.0\nstale_after = 2.0\n', ["'stale_after' is given twice"]),
])
def test_unknown_keys_exit_2_naming_the_key(tmp_path, text, needles):
    conf = write(tmp_path / "meshd.toml", text)
    r = meshd("--config", str(conf), "--print-config")
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(conf) in r.stderr and r.stdout == ""
    for needle in needles:
        assert needle in r.stderr, r.stderr


@pytest.mark.parametrize("text, needles", [
    ('max-frame = "big"\n', ["max-frame must be an integer", "'big'"]),
    ('max-frame = 5\n', ["max-frame", "5 is not in the range"]),
    ('discovery = "no"\n', ["discovery must be true or false"]),
    ('no-mesh = 1\n', ["no-mesh must be true or false"]),
    ('join = "10.0.0.1:7001"\n', ["join must be a list"]),
    ('join = [7001]\n', ["join must be a string in a list"]),
    ('stale-after = "5m"\n', ["stale-after must be a number"]),
    ('durability = "sometimes"\n', ["durability", "sometimes"]),
    ('cluster = 3\n', ["cluster must be a string"]),
    ('[tuning]\nprobe_interval = "fast"\n', ["[tuning] probe_interval must be a number"]),
    ('[tuning]\nmax_batch = 1.5\n', ["[tuning] max_batch must be an integer"]),
    ('[tuning]\nsuspicion_timeout = -1\n', ["suspicion_timeout must be a finite number >= 0"]),
    ('[tuning]\nmesh = "no"\n', ["[tuning] mesh must be true or false"]),
    ('tuning = 3\n', ["tuning must be a table"]),
    ('join = [\n', ["is not valid TOML"]),
])
def test_bad_values_are_clear_errors(tmp_path, text, needles):
    conf = write(tmp_path / "meshd.toml", text)
    r = meshd("--config", str(conf), "--print-config")
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(conf) in r.stderr and "Traceback" not in r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


def test_a_value_from_the_file_is_checked_as_a_flag_would_be(tmp_path):
    conf = write(tmp_path / "meshd.toml", 'interface = ["not-an-address"]\n')
    r = meshd("--config", str(conf), "--print-config")
    assert r.returncode == 2 and "not-an-address" in r.stderr


def test_every_option_of_meshd_help_is_a_key_of_the_example_file():
    """systemd/meshd.toml, the example file, shows every option the file takes."""
    from meshd.main import _file_options, main
    root = Path(__file__).resolve().parents[2]
    example = tomllib.loads((root / "systemd" / "meshd.toml").read_text())
    keys = set(_file_options(main))
    commented = set(re.findall(r"^#\s*([a-z][a-z0-9-]*) = ",
                               (root / "systemd" / "meshd.toml").read_text(), re.M))
    missing = keys - set(example) - commented
    assert not missing, f"add these keys (commented out) to systemd/meshd.toml: {sorted(missing)}"
    r = meshd("--config", str(root / "systemd" / "meshd.toml"), "--print-config")
    assert r.returncode == 0, r.stderr


def test_a_real_daemon_runs_with_the_file(make_daemon, short_tmp):
    conf = write(short_tmp / "meshd.toml",
                 'durability = "fsync"\n'
                 'data-dir = "/nonexistent/not-used"   # the Daemon helper passes --data-dir\n'
                 'memory-history = 3\n'
                 '[tuning]\nclient_timeout = 7.0\n')
    d = make_daemon(args=["--config", str(conf)])
    info = d.registry().node_info()
    assert info["durability"] == "fsync"                       # from the file
    assert info["data_dir"] == d.data_dir                      # the flag beats the file
    assert f"read the config file {conf}" in d.log()
    mem = d.memory()
    for i in range(5):
        mem.set("s1", "k", i)
    assert len(mem.history("k")) == 3                          # memory-history from the file
