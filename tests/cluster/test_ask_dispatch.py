"""Ask-and-wait, dispatch by capability, and the inbox reminder for hook runners: SDK
(blocking and asyncio), CLI, across two daemons."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from support.daemons import eventually, run_cli
from sessions import MessageType, NotFound, Session, SessionStatus, Timeout
from sessions import asking


def s(sid: str, status: str = "idle", host_state: str | None = "alive") -> Session:
    return Session(sid, sid.upper(), "T", status=SessionStatus(status), host_state=host_state)


def test_the_dispatch_rule() -> None:
    pool = [s("w1", "working"), s("a1", "active", "local"), s("i2", "idle", "suspect"),
            s("i1", "idle", "alive"), s("o1", "offline"), s("me", "idle")]
    assert asking.choose(pool, "me", {}).session_id == "i1"          # idle, alive < suspect
    assert asking.choose(pool, "me", {"i1": 10.0}).session_id == "i2"  # least recently
    assert asking.choose(pool, "me", {"i1": 10.0, "i2": 5.0}).session_id == "i2"
    assert asking.choose([s("a2", "active"), s("a1", "active", "local")], "x",
                         None).session_id == "a1"                    # local host first
    assert asking.choose([s("w1", "working"), s("me")], "me", {}) is None
    now = 100.0 + asking.DISPATCH_TTL
    rec = asking.record({"old": 1.0, "x": 100.5, "bad": "?"}, "y", now=now)
    assert rec == {"x": 100.5, "y": now}                    # older than the TTL: forgotten
    assert "busy or offline: w1 (working)" in asking.nobody("c", [s("w1", "working")], "me")


def test_ask_gets_the_reply_from_another_host_or_times_out(make_cluster) -> None:
    a, b = make_cluster(2)
    a.registry().register("asker", "A", "Claude")
    b.registry().register("expert", "E", "GPT-4", capabilities=["sql"])
    hub_b = b.hub()
    hub_b.register_handler(MessageType.REQUEST,
                           lambda m: hub_b.reply("expert", m, f"answer to {m.subject}"),
                           session_id="expert")
    try:
        eventually(lambda: a.registry().get("expert") is not None, timeout=10,
                   message="expert known on a")
        hub_a = a.hub()
        answer = hub_a.ask("asker", "expert", "Q1", "what is 6*7?", timeout=20)
        assert answer.body == "answer to Q1" and answer.type == MessageType.RESPONSE
        assert hub_a.get_conversation(answer.in_reply_to)[0].subject == "Q1"

        async def aask() -> str:
            from sessions.aio import AsyncCollaborationHub
            h = AsyncCollaborationHub(socket=a.socket)
            try:
                return (await h.ask("asker", "expert", "Q2", "again", timeout=20)).body
            finally:
                await h.close()

        assert asyncio.run(aask()) == "answer to Q2"
        r = run_cli(["ask", "asker", "expert", "Q3", "cli", "--timeout", "20"], a.env())
        assert r.returncode == 0 and "answer to Q3" in r.stdout, r.stdout + r.stderr
    finally:
        hub_b.close()
    a.registry().register("mute", "M", "T")
    with pytest.raises(Timeout, match="request was delivered"):
        hub_a.ask("asker", "mute", "Q4", "anyone?", timeout=0.5)
    assert [m.subject for m in a.hub().get_messages("mute")] == ["Q4"]
    r = run_cli(["ask", "asker", "mute", "Q5", "x", "--timeout", "0.3"], a.env())
    assert r.returncode == 1 and "no reply" in r.stderr


def test_dispatch_rotates_over_idle_sessions_and_says_who(make_cluster) -> None:
    a, b = make_cluster(2)
    ra, rb = a.registry(), b.registry()
    ra.register("boss", "B", "Claude")
    for reg, sid, status in ((ra, "r1", "idle"), (rb, "r2", "idle"), (rb, "r3", "active"),
                             (ra, "r4", "working")):
        reg.register(sid, sid, "GPT-4", capabilities=["review"])
        reg.update_status(sid, status)
    eventually(lambda: len(ra.find_sessions(capability="review")) == 4, timeout=10,
               message="the reviewers known on a")
    hub = a.hub()
    picked = [hub.dispatch("boss", "review", f"PR {i}", "please").to_session for i in range(3)]
    assert picked == ["r1", "r2", "r1"], picked       # idle first, least recently dispatched
    r = run_cli(["dispatch", "boss", "review", "PR 9", "x"], a.env())
    assert r.returncode == 0 and "Dispatched to r2" in r.stdout, r.stdout + r.stderr
    ra.update_status("r1", "working")
    eventually(lambda: rb.get("r1").status.value == "working", timeout=10,
               message="r1 working, seen from b")
    assert b.hub().dispatch("boss", "review", "PR 10", "x").to_session in ("r2", "r3")
    with pytest.raises(NotFound, match="no session has capability 'haskell'"):
        hub.dispatch("boss", "haskell", "s", "b")
    r = run_cli(["dispatch", "boss", "haskell", "s", "b"], a.env())
    assert r.returncode == 1 and "haskell" in r.stderr


def test_inbox_hook_reminds_of_new_unread_mail_once(daemon, short_tmp) -> None:
    env = daemon.env(XDG_STATE_HOME=str(short_tmp / "state"))
    reg, hub = daemon.registry(), daemon.hub()
    reg.register("agent", "A", "Claude")
    hook = ["inbox", "--session", "agent", "--hook"]
    r = run_cli(hook, env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")         # nothing: silent
    hub.send("peer", "agent", "request", "Build it", "now")
    hub.send("peer2", "agent", "notification", "FYI", "x")
    r = run_cli(hook, env)
    assert r.returncode == 0 and "2 new unread message(s)" in r.stdout, r.stdout
    assert "peer, peer2" in r.stdout and "check_inbox" in r.stdout
    assert run_cli(hook, env).stdout == ""                            # not twice
    hub.send("peer", "agent", "request", "And this", "x")
    r = run_cli(hook + ["--block"], env)
    assert r.returncode == 2 and "1 new unread message(s) (of 3 unread)" in r.stderr
    hub.mark_read("agent")
    assert run_cli(hook + ["--block"], env).returncode == 0           # read: nothing
    r = run_cli(["inbox", "--session", "agent"], env)
    assert r.returncode == 0 and "0 unread" in r.stdout
    state = short_tmp / "state" / "meshd" / "hook" / "agent.json"
    assert isinstance(json.loads(state.read_text()), list)
    assert oct(os.stat(state.parent).st_mode & 0o777) == "0o700"
