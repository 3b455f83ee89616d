"""The CLI for conversations: reply, thread, send --priority, messages --limit, and a
`watch` that says when its daemon went away and came back."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

from support.daemons import CHILD_CWD, eventually, run_cli


def mid_of(out: str) -> str:
    return re.search(r"Message ID: (\S+)", out).group(1)


def test_reply_thread_priority_and_limit(daemon):
    env = daemon.env()
    for sid in ("a", "b"):
        assert run_cli(["register", sid, sid.upper(), "T"], env).returncode == 0
    r = run_cli(["send", "a", "b", "Question", "What now?"], env)
    root = mid_of(r.stdout)
    r = run_cli(["reply", "b", root, "This, then that."], env)
    assert r.returncode == 0 and "Re: Question" in r.stdout, r.stderr
    answer = mid_of(r.stdout)
    r = run_cli(["reply", "a", answer, "Thanks", "--data", '{"ok": true}'], env)
    assert r.returncode == 0, r.stderr
    r = run_cli(["thread", answer], env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("🧵 3 message(s)")
    signals = [x for x in lines if "[COLLABORATION]" in x]
    assert signals[0].startswith("❓ a → b") and signals[1].startswith("    ✅ b → a")
    assert signals[2].startswith("        ✅ a → b : [COLLABORATION] Re: Re: Question")
    hub = daemon.hub()
    assert [m.message_id for m in hub.get_conversation(root)][:2] == [root, answer]
    for argv, what in ((["thread", "no-such-id"], "Message not found: no-such-id"),
                       (["reply", "a", "no-such-id", "x"], "Message not found: no-such-id"),
                       (["ping", "nobody"], "Session not found: nobody"),
                       (["memory-get", "nokey"], "Key not found: nokey")):
        r = run_cli(argv, env)
        assert r.returncode == 1 and r.stderr.strip() == f"❌ {what}", (argv, r.stderr)

    for i in range(3):
        run_cli(["send", "a", "b", f"normal {i}", "x"], env)
    r = run_cli(["send", "a", "b", "urgent", "x", "--priority", "high"], env)
    assert r.returncode == 0, r.stderr
    assert hub.get_messages("b")[0].subject == "urgent"          # high comes first
    r = run_cli(["messages", "b", "--limit", "2"], env)
    assert r.returncode == 0 and "the last 2;" in r.stdout, r.stdout
    assert r.stdout.count("[COLLABORATION]") == 2
    assert run_cli(["messages", "b", "--limit", "0"], env).returncode == 2
    r = run_cli(["broadcast", "a", "all", "x", "--priority", "high"], env)
    assert r.returncode == 0, r.stderr


def test_watch_says_when_its_daemon_goes_away_and_comes_back(daemon):
    daemon.registry().register("w", "W", "T")
    proc = subprocess.Popen([sys.executable, "-m", "sessions", "watch", "w"], env=daemon.env(
        PYTHONUNBUFFERED="1"), cwd=CHILD_CWD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, bufsize=1)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda s=s, acc=acc: acc.extend(iter(s.readline, "")),
                                daemon=True) for s, acc in ((proc.stdout, out), (proc.stderr, err))]
    for t in readers:
        t.start()
    try:
        eventually(lambda: any("Watching w" in x for x in out), timeout=10, message="watching")
        daemon.hub().send("x", "w", "notification", "before", "b")
        eventually(lambda: any("before" in x for x in out), timeout=10, message="first message")
        daemon.stop()
        eventually(lambda: any("went away" in x for x in err), timeout=15,
                   message="the watcher noticing the daemon gone")
        daemon.start()
        daemon.hub().send("x", "w", "notification", "after", "b")
        eventually(lambda: any("after" in x for x in out), timeout=20,
                   message="the message after the restart")
        assert any("is back" in x for x in err), err
        assert sum("before" in x for x in out) == 1              # nothing twice
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
