"""The CLI as a user runs it: exit codes, one-line errors, --json, --dir, and watch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, eventually, run_cli, subprocess_env


def test_exit_codes_and_one_line_errors(daemon, short_tmp):
    env = daemon.env()
    ok = run_cli(["register", "a", "A", "Claude"], env)
    assert ok.returncode == 0 and ok.stdout.startswith("✅")
    for args in (["ping", "nobody"], ["status", "nobody", "idle"],
                 ["send", "a", "nobody", "s", "b"], ["memory-get", "missing"],
                 ["messages", "nobody"]):
        r = run_cli(args, env)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("❌") and len(r.stderr.strip().splitlines()) == 1
        assert "Traceback" not in r.stdout + r.stderr
    for args in (["register", "only-one-arg"], ["status", "a", "bogus"],
                 ["send", "a", "a", "s", "b", "--type", "bogus"],
                 ["send", "a", "a", "s", "b", "--data", "{not json"], ["no-such-command"]):
        r = run_cli(args, env)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stdout + r.stderr
    missing = str(short_tmp / "nobody.sock")
    r = run_cli(["--socket", missing, "list"], subprocess_env())
    assert r.returncode == 1 and missing in r.stderr and "start it with" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_json_output_matches_the_sdk(daemon):
    env = daemon.env()
    reg, hub, mem = daemon.registry(), daemon.hub(), daemon.memory()
    reg.register("a", "A", "Claude", human_user="Alexa")
    reg.register("b", "B", "GPT-4")
    m = hub.send("a", "b", "request", "subj", "body", data={"x": 1})
    assert run_cli(["memory-set", "a", "k", '{"n": [1, 2]}', "--tags", "t1,t2"], env).returncode == 0
    assert run_cli(["memory-set", "a", "s", "plain text"], env).returncode == 0

    def js(*args):
        r = run_cli([*args, "--json"], env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    assert js("list") == [s.to_dict() for s in reg.list_sessions()]
    assert js("messages", "b") == [x.to_dict() for x in hub.get_messages("b")]
    assert js("messages", "b")[0]["message_id"] == m.message_id
    assert js("memory-get", "k")["value"] == {"n": [1, 2]}       # JSON parsed
    assert js("memory-get", "s")["value"] == "plain text"        # else kept as a string
    assert [e["key"] for e in js("memory-search", "--tags", "t2")] == ["k"]
    assert [e["key"] for e in js("memory-get", "k", "--all")] == ["k"]
    stats = js("stats")
    assert stats["registry"]["total_sessions"] == 2 and stats["memory"]["total_entries"] == 2
    assert js("info")["node_id"] == reg.node_info()["node_id"]


def test_directory_mode_needs_no_daemon(short_tmp):
    env = subprocess_env(MESHD_SOCKET=str(short_tmp / "none.sock"))
    d = str(short_tmp / "state")
    assert run_cli(["--dir", d, "register", "a", "A", "T"], env).returncode == 0
    assert run_cli(["--dir", d, "memory-set", "a", "k", "v"], env).returncode == 0
    r = run_cli(["--dir", d, "memory-get", "k"], env)
    assert (r.returncode, r.stdout.strip()) == (0, "✅ Value: v")


def test_watch_prints_messages_as_they_arrive_until_ctrl_c(daemon):
    reg, hub = daemon.registry(), daemon.hub()
    reg.register("a", "A", "T")
    reg.register("b", "B", "T")
    proc = subprocess.Popen([sys.executable, "-m", "sessions", "watch", "b", "--json"],
                            env=daemon.env(PYTHONUNBUFFERED="1"), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        # the stream starts at the head when watch subscribes: wait for it to be subscribed
        eventually(lambda: daemon.registry().node_info()["subscriptions"] >= 1, timeout=15,
                   message="watch subscribed")
        sent = [hub.send("a", "b", "request", f"s{i}", "body").message_id for i in range(3)]
        eventually(lambda: len(lines) >= 3, timeout=15, message="watch output")
        got = [json.loads(line) for line in lines[:3]]
        assert [g["message"]["message_id"] for g in got] == sent
        assert [g["seq"] for g in got] == [1, 2, 3]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) in (0, 130)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
