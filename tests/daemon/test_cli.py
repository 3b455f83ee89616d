"""The `sessions` CLI, command by command, against a real daemon.

Most cases run the real entry point (`sessions.cli:main`, which maps errors to exit codes)
in this process, to keep the file fast; the exit codes 0, 1 and 2, the daemon-not-running
message and `watch` are also checked through real `python -m sessions` subprocesses.
"""

from __future__ import annotations

import ast
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from unittest import mock

import pytest

from support.daemons import CHILD_CWD, eventually, run_cli, subprocess_env
from sessions import MemoryType, MessageType, SessionStatus
from sessions.cli import main

UUID_LEN = 36


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def invoke(*args: str) -> Result:
    """Run the CLI's real entry point in this process, as `sessions ARGS` would."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["sessions", *args]), \
            redirect_stdout(out), redirect_stderr(err):
        try:
            main()
            code = 0                               # pragma: no cover - main always exits
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    r = Result(code, out.getvalue(), err.getvalue())
    assert "Traceback" not in r.out + r.err, str(r)
    return r


def on(daemon, *args: str) -> Result:
    return invoke("--socket", daemon.socket, *args)


def ok(daemon, *args: str) -> Result:
    r = on(daemon, *args)
    assert r.code == 0, str(r)
    return r


def js(daemon, *args: str):
    r = ok(daemon, *args, "--json")
    return json.loads(r.out)


def assert_one_error_line(r: Result, code: int, *needles: str) -> None:
    assert r.code == code, str(r)
    lines = [x for x in r.err.splitlines() if x.strip()]
    assert len(lines) == 1, f"expected one error line:\n{r}"
    assert lines[0].startswith("❌"), str(r)
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert "Traceback" not in r.out + r.err


def assert_usage_error(r: Result | subprocess.CompletedProcess, *needles: str) -> None:
    code = r.code if isinstance(r, Result) else r.returncode
    out, err = r.out if isinstance(r, Result) else r.stdout, r.err if isinstance(r, Result) \
        else r.stderr
    assert code == 2, f"exit {code}\n{out}\n{err}"
    errors = [x for x in err.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1, err
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    assert "Traceback" not in out + err


def stats_block(lines: list[str], title: str) -> dict[str, str]:
    """The '   Name: value' lines under a heading of the human stats output."""
    start = lines.index(title)
    block: dict[str, str] = {}
    for line in lines[start + 1:]:
        if not line.startswith("   "):
            break
        name, _, value = line.strip().partition(": ")
        block[name] = value
    return block


# --- real subprocesses: one per exit code ------------------------------------------------------

def test_subprocess_exit_codes_0_1_2(daemon):
    env = daemon.env()                                  # MESHD_SOCKET points at the daemon
    r = run_cli(["register", "cece-001", "Cece", "Claude", "--user", "Alexa"], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "✅ Registered session: cece-001 (Cece, Claude)"
    assert daemon.registry().get("cece-001").human_user == "Alexa"

    r = run_cli(["ping", "nobody"], env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("❌") and "nobody" in lines[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert daemon.hub().get_stats()["total_messages"] == 0

    r = run_cli(["send", "cece-001", "cece-001", "s", "b", "--type", "bogus"], env)
    assert_usage_error(r, "bogus")
    assert daemon.hub().get_stats()["total_messages"] == 0


def test_subprocess_daemon_not_running_is_one_line_naming_the_socket(short_tmp):
    missing = str(short_tmp / "does-not-exist.sock")
    assert not os.path.exists(missing)
    r = run_cli(["--socket", missing, "list"], subprocess_env())
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert missing in lines[0] and "start it with `meshd`" in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout == ""
    # the same through the environment variable
    r = run_cli(["memory-get", "k"], subprocess_env(MESHD_SOCKET=missing))
    assert r.returncode == 1 and missing in r.stderr and "Traceback" not in r.stderr


def test_subprocess_directory_mode_needs_no_daemon(short_tmp):
    from sessions import SharedMemory
    d = str(short_tmp / "state")
    env = subprocess_env(MESHD_SOCKET=str(short_tmp / "none.sock"))
    # A directory that does not exist is a usage error (a typo must not start an empty
    # registry elsewhere), unless --create says to make it.
    r = run_cli(["--dir", d, "memory-set", "a", "k", '{"n": 1}'], env)
    assert r.returncode == 2 and "--create" in r.stderr and not os.path.exists(d), r.stderr
    r = run_cli(["--dir", d, "--create", "memory-set", "a", "k", '{"n": 1}'], env)
    assert r.returncode == 0, r.stderr
    assert SharedMemory(d).get("k") == {"n": 1}         # shared with the SDK on the same dir
    r = run_cli(["--dir", d, "memory-get", "k"], env)  # exists now: no --create needed
    assert r.returncode == 0 and '{"n": 1}' in r.stdout, r.stderr


# --- daemon not running / gone, in process -----------------------------------------------------

@pytest.mark.parametrize("args", [
    ["list"], ["list", "--json"], ["register", "a", "A", "T"], ["ping", "a"],
    ["status", "a", "idle"], ["send", "a", "b", "s", "b"], ["broadcast", "a", "s", "b"],
    ["messages", "a"], ["memory-set", "a", "k", "v"], ["memory-get", "k"],
    ["memory-search"], ["memory-delete", "k"], ["stats"], ["info"], ["unregister", "a"],
])
def test_every_command_without_a_daemon_fails_with_one_line(short_tmp, args):
    missing = str(short_tmp / "does-not-exist.sock")
    r = invoke("--socket", missing, *args)
    assert_one_error_line(r, 1, missing, "start it with")


def test_killed_daemon_leaves_a_socket_file_and_the_cli_says_nothing_listens(daemon):
    ok(daemon, "register", "a", "A", "T")
    daemon.kill9()
    assert os.path.exists(daemon.socket)               # the killed daemon's leftover
    t0 = time.monotonic()
    r = run_cli(["list"], daemon.env())                # a fresh process, as a user runs it
    assert time.monotonic() - t0 < 5                   # no waiting for a timeout
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("❌"), r.stderr
    assert daemon.socket in lines[0] and "nothing listens" in lines[0], lines[0]
    assert "start it with" in lines[0] and "Traceback" not in r.stdout + r.stderr


def test_a_stopped_daemon_times_out_with_one_line(daemon):
    ok(daemon, "register", "a", "A", "T")
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = on(daemon, "--timeout", "0.5", "ping", "a")
        elapsed = time.monotonic() - t0
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert_one_error_line(r, 1, daemon.socket, "did not answer")
    assert elapsed < 5, elapsed
    ok(daemon, "ping", "a")                            # and it serves again once resumed


# --- session management ----------------------------------------------------------------------

def test_register_list_and_stats_block_as_in_the_seed(daemon):
    reg = daemon.registry()
    r = ok(daemon, "register", "cece-001", "Cece", "Claude", "--user", "Alexa",
           "--capabilities", "python, review,,planning")
    assert r.out == "✅ Registered session: cece-001 (Cece, Claude)\n"
    s = reg.get("cece-001")
    assert (s.agent_name, s.agent_type, s.human_user, s.status) == \
        ("Cece", "Claude", "Alexa", SessionStatus.ACTIVE)
    assert s.capabilities == ["python", "review", "planning"]
    ok(daemon, "register", "agent-002", "Agent-2", "GPT-4", "--user", "Alexa")
    ok(daemon, "status", "agent-002", "working")

    import socket
    host = socket.gethostname()
    lines = [x.rstrip() for x in ok(daemon, "list").lines]
    # the seed document's table, verbatim, then the HOST column (where each runs)
    assert lines[0] == "SESSION ID           AGENT           TYPE       STATUS     USER" \
                       "           HOST"
    assert lines[1] == "=" * 82
    assert lines[2:4] == [
        f"cece-001             Cece            Claude     active     Alexa          {host}",
        f"agent-002            Agent-2         GPT-4      working    Alexa          {host}",
    ] or lines[2:4] == [
        f"agent-002            Agent-2         GPT-4      working    Alexa          {host}",
        f"cece-001             Cece            Claude     active     Alexa          {host}",
    ], lines
    assert lines[4] == ""
    assert lines[5] == "📊 Stats:"
    assert lines[6:8] == ["   Total: 2", "   Active: 2"]
    assert lines[8].startswith("   By status: ")
    assert ast.literal_eval(lines[8].split(": ", 1)[1]) == {"active": 1, "working": 1}

    # re-registering replaces
    ok(daemon, "register", "cece-001", "Cece2", "Claude")
    assert reg.get("cece-001").agent_name == "Cece2"
    assert reg.get_stats()["total_sessions"] == 2


def test_list_all_and_unregister(daemon):
    reg = daemon.registry()
    for sid in ("a", "b"):
        ok(daemon, "register", sid, sid.upper(), "T")
    r = ok(daemon, "unregister", "b")
    assert r.out.strip() == "✅ Unregistered session: b"
    # the plain list says what it left out
    assert "   (1 offline session not shown; --all lists them)" in ok(daemon, "list").lines
    assert not any("not shown" in x for x in ok(daemon, "list", "--all").lines)
    assert reg.get("b").status == SessionStatus.OFFLINE

    ids = [x.split()[0] for x in ok(daemon, "list").lines[2:] if x and x[0] not in " 📊"]
    assert ids == ["a"]
    ids_all = {x.split()[0] for x in ok(daemon, "list", "--all").lines[2:]
               if x and x[0] not in " 📊"}
    assert ids_all == {"a", "b"}

    assert js(daemon, "list") == [s.to_dict() for s in reg.list_sessions()]
    assert js(daemon, "list", "--all") == [s.to_dict() for s in
                                          reg.list_sessions(include_offline=True)]
    assert [s["session_id"] for s in js(daemon, "list")] == ["a"]
    assert_one_error_line(on(daemon, "unregister", "nobody"), 1, "nobody")


def test_ping_and_status(daemon):
    reg = daemon.registry()
    ok(daemon, "register", "a", "A", "T")
    before = reg.get("a").last_ping
    r = ok(daemon, "ping", "a")
    assert r.out.strip() == "✅ Pinged a"
    assert reg.get("a").last_ping > before

    r = ok(daemon, "status", "a", "working", "--task", "Code review")
    assert r.out.strip() == "✅ a is now working (Code review)"
    s = reg.get("a")
    assert (s.status, s.current_task) == (SessionStatus.WORKING, "Code review")
    r = ok(daemon, "status", "a", "IDLE")                # case-insensitive, task unchanged
    assert r.out.strip() == "✅ a is now idle"
    s = reg.get("a")
    assert (s.status, s.current_task) == (SessionStatus.IDLE, "Code review")

    assert_one_error_line(on(daemon, "ping", "nobody"), 1, "nobody")
    assert_one_error_line(on(daemon, "status", "nobody", "idle"), 1, "nobody")
    assert_usage_error(on(daemon, "status", "a", "bogus"), "bogus")
    assert reg.get("a").status == SessionStatus.IDLE      # the bad call changed nothing
    assert reg.get("nobody") is None


# --- collaboration ---------------------------------------------------------------------------

def test_send_with_type_and_data(daemon):
    reg, hub = daemon.registry(), daemon.hub()
    reg.register("cece-001", "Cece", "Claude")
    reg.register("agent-002", "Agent-2", "GPT-4")
    r = ok(daemon, "send", "cece-001", "agent-002", "Need code review",
           "Can you review my Python changes?", "--type", "request")
    assert r.lines[0] == "✅ Sent: ❓ cece-001 → agent-002 : [COLLABORATION] Need code review"
    assert r.lines[1].startswith("   Message ID: ")
    mid = r.lines[1].split(": ", 1)[1]
    assert len(mid) == UUID_LEN

    r = ok(daemon, "send", "agent-002", "cece-001", "Take over", "deploy", "--type", "HANDOFF",
           "--data", '{"task": "deploy-prod", "n": [1, 2]}')
    assert r.lines[0] == "✅ Sent: 🎯 agent-002 → cece-001 : [COLLABORATION] Take over"
    mid2 = r.lines[1].split(": ", 1)[1]

    (m,) = hub.get_messages("agent-002", include_broadcasts=False)
    assert (m.message_id, m.type, m.subject, m.body, m.data) == (
        mid, MessageType.REQUEST, "Need code review", "Can you review my Python changes?", {})
    (m2,) = hub.get_messages("cece-001")
    assert (m2.message_id, m2.type, m2.data) == \
        (mid2, MessageType.HANDOFF, {"task": "deploy-prod", "n": [1, 2]})

    # default type is request
    r = ok(daemon, "send", "cece-001", "agent-002", "s", "b")
    assert r.lines[0].startswith("✅ Sent: ❓ ")

    before = hub.get_stats()["total_messages"]
    for bad in (["--type", "bogus"], ["--data", "{not json"], ["--data", "[1, 2]"],
                ["--data", '"str"']):
        assert_usage_error(on(daemon, "send", "cece-001", "agent-002", "s", "b", *bad))
    assert_usage_error(on(daemon, "send", "cece-001", "agent-002", "only-subject"))
    assert hub.get_stats()["total_messages"] == before


def test_broadcast_reaches_everyone_but_the_sender(daemon):
    reg, hub = daemon.registry(), daemon.hub()
    for sid in ("a", "b", "c"):
        reg.register(sid, sid, "T")
    r = ok(daemon, "broadcast", "a", "Deployment starting", "in 5 minutes",
           "--data", '{"eta": 5}')
    assert r.lines[0] == "✅ Broadcast: 📡 a → ALL : [COLLABORATION] Deployment starting"
    mid = r.lines[1].split(": ", 1)[1]
    for sid in ("b", "c"):
        (m,) = hub.get_messages(sid)
        assert (m.message_id, m.type, m.to_session, m.data) == \
            (mid, MessageType.BROADCAST, None, {"eta": 5})
    assert hub.get_messages("a") == []
    assert_usage_error(on(daemon, "broadcast", "a", "s", "b", "--data", "nope"), "JSON")
    assert_usage_error(on(daemon, "broadcast", "a", "s"))
    assert hub.get_stats()["total_messages"] == 1


def test_messages_human_json_type_unread_and_mark_read(daemon):
    reg, hub = daemon.registry(), daemon.hub()
    reg.register("a", "A", "T")
    reg.register("b", "B", "T")
    m1 = hub.send("a", "b", "request", "first", "body one", data={"x": 1})
    m2 = hub.send("a", "b", "handoff", "second", "body two")
    m3 = hub.broadcast("a", "third", "to all")

    r = ok(daemon, "messages", "b")
    assert r.lines[0] == "📬 3 message(s) for b:"
    signals = [x for x in r.lines if " : [COLLABORATION] " in x]
    assert signals == [m1.format_signal(), m2.format_signal(), m3.format_signal()]  # oldest first
    assert "   body one" in r.lines and '   data: {"x": 1}' in r.lines
    assert any(x.strip().endswith(f"id={m1.message_id}") for x in r.lines)

    assert js(daemon, "messages", "b") == [m.to_dict() for m in hub.get_messages("b")]
    assert [m["message_id"] for m in js(daemon, "messages", "b")] == \
        [m1.message_id, m2.message_id, m3.message_id]
    assert js(daemon, "messages", "b", "--type", "handoff") == \
        [m.to_dict() for m in hub.get_messages("b", message_type="handoff")]
    assert [m["message_id"] for m in js(daemon, "messages", "b", "--type", "handoff")] == \
        [m2.message_id]

    # --unread --mark-read lists them and marks them; the next --unread shows none
    assert len(js(daemon, "messages", "b", "--unread")) == 3
    r = ok(daemon, "messages", "b", "--unread", "--type", "request", "--mark-read")
    assert r.lines[0] == "📬 1 message(s) for b:"
    assert [m.message_id for m in hub.get_messages("b", unread_only=True)] == \
        [m2.message_id, m3.message_id]
    ok(daemon, "messages", "b", "--unread", "--mark-read")
    r = ok(daemon, "messages", "b", "--unread")
    assert r.out.strip() == "📭 No messages for b"
    assert js(daemon, "messages", "b", "--unread") == []
    assert len(js(daemon, "messages", "b")) == 3            # read, not gone

    assert ok(daemon, "messages", "a").out.strip() == "📭 No messages for a"
    assert_one_error_line(on(daemon, "messages", "nobody"), 1, "nobody")
    assert_usage_error(on(daemon, "messages", "b", "--type", "bogus"), "bogus")


# --- shared memory ---------------------------------------------------------------------------

def test_memory_set_parses_json_when_it_can(daemon):
    mem = daemon.memory()
    cases = {
        "obj": ('{"name": "Build", "n": [1, 2]}', {"name": "Build", "n": [1, 2]}),
        "int": ("42", 42),
        "float": ("2.5", 2.5),
        "bool": ("true", True),
        "null": ("null", None),
        "quoted": ('"quoted"', "quoted"),
        "list": ("[1, \"two\"]", [1, "two"]),
        "text": ("Building collaboration system", "Building collaboration system"),
        "broken": ("{not json", "{not json"),
        "half": ("[1, 2", "[1, 2"),
    }
    for key, (raw, expected) in cases.items():
        r = ok(daemon, "memory-set", "s1", key, raw)
        assert r.lines[0].startswith(f"✅ Stored: {key} = "), str(r)
        got = js(daemon, "memory-get", key)
        assert got["value"] == expected and type(got["value"]) is type(expected), (key, got)
        assert mem.get(key) == expected
    assert ok(daemon, "memory-get", "text").out == "✅ Value: Building collaboration system\n"
    assert ok(daemon, "memory-get", "obj").out == \
        '✅ Value: {"name": "Build", "n": [1, 2]}\n'


def test_memory_set_type_tags_ttl_as_in_the_seed(daemon):
    mem = daemon.memory()
    r = ok(daemon, "memory-set", "cece-001", "current_task", "Building collaboration system",
           "--type", "state", "--tags", "task,active")
    assert r.out == "✅ Stored: current_task = Building collaboration system\n"
    r = ok(daemon, "memory-get", "current_task")
    assert r.out == "✅ Value: Building collaboration system\n"       # the seed's output
    e = mem.get_entry("current_task")
    assert (e.type, e.tags, e.session_id, e.ttl) == \
        (MemoryType.STATE, ["task", "active"], "cece-001", None)
    assert js(daemon, "memory-get", "current_task") == e.to_dict()

    ok(daemon, "memory-set", "s", "fact1", "x", "--type", "FACT", "--tags", " a , ,b ")
    e = mem.get_entry("fact1")
    assert (e.type, e.tags) == (MemoryType.FACT, ["a", "b"])

    ok(daemon, "memory-set", "s", "short", "gone soon", "--ttl", "0.3")
    assert mem.get_entry("short").ttl == pytest.approx(0.3)
    eventually(lambda: on(daemon, "memory-get", "short").code == 1, timeout=5,
               message="ttl entry expired")
    assert mem.get("short") is None

    total = mem.get_stats()["total_entries"]
    for bad in (["--type", "bogus"], ["--ttl", "0"], ["--ttl", "-1"], ["--ttl", "soon"]):
        assert_usage_error(on(daemon, "memory-set", "s", "k", "v", *bad))
    assert_usage_error(on(daemon, "memory-set", "s", "k"))
    assert mem.get_stats()["total_entries"] == total
    assert mem.get("k") is None


def test_memory_get_all_json_and_missing_keys(daemon):
    mem = daemon.memory()
    mem.set("a", "k", "old", tags=["t"])
    mem.set("b", "k", {"v": 2}, type="decision")
    r = ok(daemon, "memory-get", "k")
    assert r.out == '✅ Value: {"v": 2}\n'                 # the newest
    r = ok(daemon, "memory-get", "k", "--all")
    assert r.lines[0] == "✅ 2 entries for k:"
    assert r.lines[1] == '   k = {"v": 2}' and r.lines[3] == "   k = old"   # newest first
    assert r.lines[2].strip().startswith("decision by b at ")
    assert r.lines[4].strip().startswith("state by a at ") and r.lines[4].endswith("[t]")
    assert js(daemon, "memory-get", "k") == mem.get_entry("k").to_dict()
    assert js(daemon, "memory-get", "k", "--all") == [e.to_dict() for e in mem.get_all("k")]

    assert_one_error_line(on(daemon, "memory-get", "missing"), 1, "missing")
    assert_one_error_line(on(daemon, "memory-get", "missing", "--all"), 1, "missing")
    r = on(daemon, "memory-get", "missing", "--json")
    assert r.code == 1 and json.loads(r.out) is None
    assert_usage_error(on(daemon, "memory-get"))


def test_memory_get_all_json_of_a_missing_key_exits_1_like_the_other_forms(daemon):
    """`memory-get KEY` exits 1 for a missing key in human form, with --json and with --all;
    the exit status must not depend on the output format."""
    r = on(daemon, "memory-get", "missing", "--all", "--json")
    assert json.loads(r.out) == []
    assert r.code == 1, ("sdk/sessions/cli.py memory_get: `memory-get KEY --all --json` "
                         f"exits {r.code} for a missing key, while --all and --json alone "
                         "exit 1")


def test_memory_search_by_pattern_tags_session_and_combined(daemon):
    mem = daemon.memory()
    mem.set("s1", "task_a", 1, tags=["task", "active"])
    mem.set("s2", "task_b", 2, tags=["task"])
    mem.set("s1", "note", 3, tags=["active"])

    def keys(*args):
        return [e["key"] for e in js(daemon, "memory-search", *args)]

    assert js(daemon, "memory-search", "--pattern", "task_*") == \
        [e.to_dict() for e in mem.search("task_*")]
    assert keys("--pattern", "task_*") == ["task_b", "task_a"]          # newest first
    assert js(daemon, "memory-search", "--tags", "active") == \
        [e.to_dict() for e in mem.get_by_tags(["active"])]
    assert keys("--tags", "active") == ["note", "task_a"]
    assert js(daemon, "memory-search", "--session", "s1") == \
        [e.to_dict() for e in mem.get_by_session("s1")]
    assert keys("--session", "s1") == ["note", "task_a"]
    assert keys("--pattern", "task_?", "--tags", "active") == ["task_a"]
    assert keys("--pattern", "task_*", "--session", "s2") == ["task_b"]
    assert keys("--tags", "task", "--session", "s1", "--pattern", "note") == []
    assert keys() == ["note", "task_b", "task_a"]
    assert keys("--pattern", "nothing*") == []

    r = ok(daemon, "memory-search", "--pattern", "task_*")
    assert r.lines[0] == "🔍 2 entries found"
    assert r.lines[1] == "   task_b = 2" and r.lines[3] == "   task_a = 1"
    r = ok(daemon, "memory-search", "--session", "s2")
    assert r.lines[0] == "🔍 1 entry found"
    assert ok(daemon, "memory-search", "--tags", "zzz").out.strip() == "🔍 0 entries found"


def test_memory_delete(daemon):
    mem = daemon.memory()
    mem.set("a", "k", 1)
    mem.set("b", "k", 2)
    mem.set("b", "k", 3)
    mem.set("a", "other", 4)
    r = ok(daemon, "memory-delete", "k", "--session", "b")
    assert r.out.strip() == "✅ Deleted 2 entries of k"
    assert [e.value for e in mem.get_all("k")] == [1]
    r = ok(daemon, "memory-delete", "k")
    assert r.out.strip() == "✅ Deleted 1 entry of k"
    assert mem.get_all("k") == [] and mem.get("other") == 4
    assert_one_error_line(on(daemon, "memory-delete", "k"), 1, "k")
    assert mem.get_stats()["total_entries"] == 1


# --- statistics and info ---------------------------------------------------------------------

def test_stats_human_and_json(daemon):
    reg, hub, mem = daemon.registry(), daemon.hub(), daemon.memory()
    reg.register("a", "A", "Claude", human_user="Alexa")
    reg.register("b", "B", "GPT-4")
    reg.update_status("b", "working")
    hub.send("a", "b", "request", "s", "b")
    hub.broadcast("a", "s", "b")
    mem.set("a", "k", 1, type="fact", tags=["x", "y"])

    data = js(daemon, "stats")
    assert data == {"registry": reg.get_stats(), "messages": hub.get_stats(),
                    "memory": mem.get_stats()}
    assert data["registry"]["total_sessions"] == 2 and data["messages"]["total_messages"] == 2

    lines = ok(daemon, "stats").lines
    s = stats_block(lines, "📊 Sessions:")
    assert (s["Total"], s["Active"]) == ("2", "2")
    assert ast.literal_eval(s["By status"]) == {"active": 1, "working": 1}
    assert ast.literal_eval(s["By type"]) == {"Claude": 1, "GPT-4": 1}
    m = stats_block(lines, "💬 Messages:")
    assert m["Total"] == "2"
    assert ast.literal_eval(m["By type"]) == {"request": 1, "broadcast": 1}
    e = stats_block(lines, "🧠 Memory:")
    assert e["Entries"] == "1"
    assert ast.literal_eval(e["By type"]) == {"fact": 1}
    assert e["Keys"] == "1  Sessions: 1  Tags: 2"


def test_info_human_and_json(daemon):
    info = js(daemon, "info")
    sdk = daemon.registry().node_info()
    assert info["pid"] == daemon.pid == sdk["pid"]
    assert info["node_id"] == sdk["node_id"]
    assert info["socket"] == daemon.socket
    assert set(info) == set(sdk)
    assert isinstance(info["counters"], dict) and info["counters"]["requests"] >= 1
    out = ok(daemon, "info").out
    # readable sections, not Python dicts
    for section in ("Node", "Mesh", "Routing", "Local API", "Store"):
        assert any(line.endswith(section) for line in out.splitlines()), (section, out)
    fields = {k.strip(): v.strip() for k, _, v in
              (line.partition(":") for line in out.splitlines() if ":" in line)}
    assert fields["node id"] == sdk["node_id"] and fields["pid"] == str(daemon.pid)
    assert fields["security"].startswith("open (no cluster key), loopback only")
    assert "{" not in out and "[" not in out, out


def test_usage_errors_exit_2_and_change_nothing(daemon):
    reg = daemon.registry()
    reg.register("a", "A", "T")
    before = reg.node_info()["counters"]["requests"]
    for args in (["register", "only-one"], ["register"], ["ping"], ["status", "a"],
                 ["status", "a", "bogus"], ["send", "a", "a", "s", "b", "--type", "bogus"],
                 ["send", "a", "a", "s", "b", "--data", "{bad"], ["broadcast", "a"],
                 ["messages"], ["memory-set", "a", "k", "v", "--type", "bogus"],
                 ["memory-get"], ["memory-delete"], ["no-such-command"],
                 ["list", "--bogus-flag"], ["watch", "a", "--from-cursor", "-1"],
                 ["watch", "a", "--type", "bogus"]):
        assert_usage_error(on(daemon, *args))
    for args in (["--timeout", "0", "list"], ["--timeout", "soon", "list"]):
        assert_usage_error(invoke("--socket", daemon.socket, *args))
    # none of them reached the daemon (this node_info is the only new request)
    assert reg.node_info()["counters"]["requests"] == before + 1


# --- directory mode, no daemon at all --------------------------------------------------------

def test_directory_mode_every_command(short_tmp):
    from sessions import CollaborationHub, SessionRegistry, SharedMemory
    d = str(short_tmp / "state")
    other = str(short_tmp / "other")
    os.makedirs(d)
    os.makedirs(other)

    def at(*args, code=0):
        r = invoke("--socket", str(short_tmp / "none.sock"), "--dir", d, *args)
        assert r.code == code, str(r)
        return r

    assert at("register", "a", "A", "T").out.startswith("✅ Registered session: a")
    at("register", "b", "B", "T", "--user", "U")
    at("status", "b", "working", "--task", "x")
    at("ping", "a")
    r = at("send", "a", "b", "subj", "body", "--type", "sync", "--data", '{"k": 1}')
    assert r.lines[0] == "✅ Sent: 🔄 a → b : [COLLABORATION] subj"
    at("broadcast", "b", "all", "hello")
    at("memory-set", "a", "k", '{"n": 1}', "--tags", "t")
    assert at("memory-get", "k").out == '✅ Value: {"n": 1}\n'
    at("memory-get", "missing", code=1)
    assert "waits" in at("send", "a", "nobody", "s", "b").out     # accepted: it waits

    reg, hub, mem = SessionRegistry(d), CollaborationHub(messages_path=d), SharedMemory(d)
    assert json.loads(at("list", "--json").out) == [s.to_dict() for s in reg.list_sessions()]
    assert json.loads(at("messages", "b", "--json").out) == \
        [m.to_dict() for m in hub.get_messages("b")]
    assert [m["subject"] for m in json.loads(at("messages", "a", "--json").out)] == ["all"]
    assert json.loads(at("memory-search", "--tags", "t", "--json").out) == \
        [e.to_dict() for e in mem.get_by_tags(["t"])]
    assert json.loads(at("stats", "--json").out) == {
        "registry": reg.get_stats(), "messages": hub.get_stats(), "memory": mem.get_stats()}
    assert json.loads(at("info", "--json").out)["mode"] == "directory"
    assert reg.get("b").status == SessionStatus.WORKING
    at("unregister", "a")
    assert [s.session_id for s in reg.list_sessions()] == ["b"]
    assert at("memory-delete", "k").out.strip() == "✅ Deleted 1 entry of k"

    # another directory shares nothing
    r = invoke("--dir", other, "list", "--json")
    assert r.code == 0 and json.loads(r.out) == []


# --- watch -----------------------------------------------------------------------------------

class Watcher:
    """`python -m sessions watch ...` as a subprocess, its stdout read by a thread."""

    def __init__(self, daemon, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sessions", "watch", *args],
            env=daemon.env(PYTHONUNBUFFERED="1"), cwd=CHILD_CWD, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1)
        self.lines: list[str] = []
        self.err = ""
        self._lock = threading.Lock()
        self._out_reader = threading.Thread(target=self._read_out, daemon=True)
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._out_reader.start()
        self._err_reader.start()

    def _read_out(self) -> None:          # ends at EOF, i.e. when the process exits
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.err = self.proc.stderr.read()

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_for(self, pred, timeout: float, message: str):
        def check():
            if self.proc.poll() is not None and not pred(self.snapshot()):
                raise AssertionError(f"watch exited {self.proc.returncode}: {self.err}")
            return pred(self.snapshot())
        try:
            return eventually(check, timeout=timeout, message=message)
        except AssertionError:
            raise AssertionError(f"{message}; output so far: {self.snapshot()!r}, "
                                 f"stderr: {self.err!r}") from None

    def interrupt(self, timeout: float = 10) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self._out_reader.join(5)
        self._err_reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def test_watch_prints_messages_as_they_arrive_until_sigint(daemon):
    reg, hub = daemon.registry(), daemon.hub()
    for sid in ("a", "b", "c"):
        reg.register(sid, sid.upper(), "T")
    w = Watcher(daemon, "b")
    try:
        w.wait_for(lambda ls: any("Watching b" in x for x in ls), 15, "the Watching line")
        first = w.snapshot()[0]
        assert first.startswith("👀 Watching b from cursor ") and "Ctrl-C" in first
        first_msg = hub.send("a", "b", "request", "need review", "please", data={"pr": 1})
        hub.send("a", "c", "request", "not for b", "x")           # must not show
        sent = [first_msg, hub.send("c", "b", "handoff", "take over", "bye"),
                hub.broadcast("a", "all hands", "meeting")]
        signals = [m.format_signal() for m in sent]
        w.wait_for(lambda ls: sum(x in signals for x in ls) == 3, 15, "three messages shown")
        lines = w.snapshot()
        shown = [x for x in lines if " : [COLLABORATION] " in x]
        assert shown == signals, lines                               # in order, nothing else
        assert '   data: {"pr": 1}' in lines and "   please" in lines
        seqs = [int(x.split("=", 1)[1]) for x in lines if x.startswith("   seq=")]
        assert len(seqs) == 3 and seqs == sorted(seqs) and len(set(seqs)) == 3
        assert any(x.strip().endswith(f"id={sent[0].message_id}") for x in lines)
        t0 = time.monotonic()
        code = w.interrupt()
        assert time.monotonic() - t0 < 5
        assert code in (0, 130), (code, w.err)
        assert "Traceback" not in w.err + "\n".join(w.lines), w.err
    finally:
        w.kill()


def test_watch_json_lines_with_replay_and_type_filter(daemon):
    reg, hub = daemon.registry(), daemon.hub()
    reg.register("a", "A", "T")
    reg.register("b", "B", "T")
    old = hub.send("a", "b", "request", "before watch", "x")
    # replays from cursor 0, only requests
    w = Watcher(daemon, "b", "--json", "--from-cursor", "0", "--type", "request")
    try:
        w.wait_for(lambda ls: len(ls) >= 1, 15, "the replayed message")
        hub.send("a", "b", "handoff", "filtered out", "x")
        new = hub.send("a", "b", "request", "after", "y")
        w.wait_for(lambda ls: len(ls) >= 2, 15, "the new request")
        lines = w.snapshot()
        got = [json.loads(x) for x in lines]                        # every line is JSON
        assert all(set(g) == {"seq", "message"} for g in got), got
        assert [g["message"]["message_id"] for g in got] == [old.message_id, new.message_id]
        assert got[0]["message"] == old.to_dict() and got[1]["message"] == new.to_dict()
        assert got[0]["seq"] < got[1]["seq"]
        code = w.interrupt()
        assert code in (0, 130), (code, w.err)
        assert "Traceback" not in w.err
        assert len(w.lines) == 2, w.lines                  # the handoff never showed
    finally:
        w.kill()


def test_watch_without_a_session_sees_the_whole_node(daemon):
    reg, hub = daemon.registry(), daemon.hub()
    for sid in ("a", "b", "c"):
        reg.register(sid, sid, "T")
    w = Watcher(daemon, "--json")
    try:
        # --json prints no Watching line: wait until it has subscribed
        eventually(lambda: daemon.registry().node_info()["subscriptions"] >= 1, timeout=15,
                   message="watch subscribed")
        sent = [hub.send("a", "b", "request", "1", "x"), hub.send("b", "c", "sync", "2", "y"),
                hub.broadcast("c", "3", "z")]
        w.wait_for(lambda ls: len(ls) >= 3, 15, "three messages")
        got = [json.loads(x) for x in w.snapshot()]
        assert [g["message"]["message_id"] for g in got] == [m.message_id for m in sent]
        assert [g["seq"] for g in got] == sorted(g["seq"] for g in got)
        assert w.interrupt() in (0, 130)
        assert "Traceback" not in w.err
    finally:
        w.kill()


def test_watch_without_a_daemon_fails_with_one_line(short_tmp):
    missing = str(short_tmp / "does-not-exist.sock")
    r = invoke("--socket", missing, "watch", "b")
    assert_one_error_line(r, 1, missing)
