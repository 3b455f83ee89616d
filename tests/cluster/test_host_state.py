"""A session's host state: every session the daemon answers with says how that daemon sees
the node hosting it ("local", "alive", "suspect", "dead", "left"), and a session whose host
is dead or gone reads OFFLINE at once, not after the 300 s staleness, without its
replicated row being rewritten: when the host comes back, so does the real status.

Real daemons on loopback (the test preset); the host is killed with SIGKILL by its pid and
restarted on the same data directory. Every wait is an `eventually` with a deadline."""

from __future__ import annotations

import json
from pathlib import Path

from support.daemons import Daemon, eventually, run_cli, wait_converged
from sessions import Session, SessionRegistry, SessionStatus

REMOTE = ("n2-working", "n2-active")


def view(d: Daemon, session_id: str) -> tuple[str, str | None] | None:
    """(status, host_state) of a session as daemon `d` answers it."""
    s = d.registry(timeout=5).get(session_id)
    return None if s is None else (s.status.value, s.host_state)


def host_on_node_2(nodes: list[Daemon]) -> None:
    """Two sessions on node 2 (one working on a task), one on node 0, seen everywhere."""
    reg2 = nodes[2].registry()
    reg2.register("n2-working", "W", "claude", human_user="ann")
    assert reg2.update_status("n2-working", SessionStatus.WORKING, current_task="build")
    reg2.register("n2-active", "A", "gpt", human_user="ann")
    nodes[0].registry().register("n0-local", "L", "claude", human_user="bob")
    for d in nodes[:2]:
        eventually(lambda d=d: view(d, "n2-working") == ("working", "alive")
                   and view(d, "n2-active") == ("active", "alive"), timeout=15,
                   message=f"node 2's sessions replicated to {d.peer_address}")


def assert_gone_with_host(d: Daemon, state: str) -> None:
    """Node 2's sessions read OFFLINE on `d` everywhere a client looks, with `state`."""
    reg = d.registry(timeout=5)
    for sid in REMOTE:
        s = reg.get(sid)
        assert (s.status, s.host_state) == (SessionStatus.OFFLINE, state), s
    assert [s.session_id for s in reg.list_sessions()] == ["n0-local"]
    every = {s.session_id: (s.status.value, s.host_state)
             for s in reg.list_sessions(include_offline=True)}
    assert every == {"n0-local": ("active", "local"), "n2-working": ("offline", state),
                     "n2-active": ("offline", state)}
    assert reg.find_sessions(status=SessionStatus.WORKING) == []
    assert [s.session_id for s in reg.find_sessions(human_user="ann")] == []
    found = reg.find_sessions(status=SessionStatus.OFFLINE)
    assert {(s.session_id, s.host_state) for s in found} == {(sid, state) for sid in REMOTE}
    stats = reg.get_stats()
    assert stats["total_sessions"] == 3 and stats["active_sessions"] == 1
    assert stats["by_status"] == {"active": 1, "offline": 2}


def test_dead_host_reads_offline_and_its_sessions_come_back_with_it(make_cluster):
    nodes = make_cluster(3)
    wait_converged(nodes)
    host_on_node_2(nodes)
    assert view(nodes[0], "n0-local") == ("active", "local")
    assert view(nodes[2], "n2-working") == ("working", "local")
    eventually(lambda: view(nodes[1], "n0-local") == ("active", "alive"), timeout=15,
               message="node 0's session on node 1")

    nodes[2].kill9()
    eventually(lambda: view(nodes[0], "n2-working") == ("offline", "dead"), timeout=20,
               message="node 0 seeing node 2 dead and its sessions offline")
    assert_gone_with_host(nodes[0], "dead")

    # The CLI says why a session is offline; rows of hosts up or local stay as they were.
    r = run_cli(["--socket", nodes[0].socket, "list", "--all"], env=nodes[0].env())
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.rstrip() for line in r.stdout.splitlines()[2:]
            if line and line[0] not in " 📊"}
    assert rows["n2-working"].endswith(" (host dead)") and " offline " in rows["n2-working"]
    assert "(host" not in rows["n0-local"]
    r = run_cli(["--socket", nodes[0].socket, "list", "--all", "--json"], env=nodes[0].env())
    assert r.returncode == 0, r.stderr
    assert {s["session_id"]: s["host_state"] for s in json.loads(r.stdout)} == {
        "n0-local": "local", "n2-working": "dead", "n2-active": "dead"}

    nodes[2].start()                    # same data dir, port and --join: the rows are intact
    for d in nodes[:2]:
        eventually(lambda d=d: view(d, "n2-working") == ("working", "alive")
                   and view(d, "n2-active") == ("active", "alive"), timeout=20,
                   message=f"node 2's sessions back on {d.peer_address}")
    assert nodes[0].registry().get("n2-working").current_task == "build"
    assert view(nodes[2], "n2-working") == ("working", "local")
    stats = nodes[0].registry().get_stats()
    assert stats["active_sessions"] == 3 and stats["by_status"] == {"active": 2, "working": 1}

    # A graceful stop is "left", not "dead", and reads the same way.
    assert nodes[2].stop() == 0
    eventually(lambda: view(nodes[0], "n2-working") == ("offline", "left"), timeout=10,
               message="node 0 seeing node 2 leave")
    assert_gone_with_host(nodes[0], "left")


def test_a_lone_daemon_hosts_every_session_itself(daemon):
    reg = daemon.registry()
    assert reg.register("solo", "S", "claude", capabilities=["x"]).host_state == "local"
    assert reg.get("solo").host_state == "local"
    assert [s.host_state for s in reg.list_sessions()] == ["local"]
    assert [s.host_state for s in reg.find_sessions(capability="x")] == ["local"]
    r = run_cli(["list"], env=daemon.env())
    assert r.returncode == 0 and "(host" not in r.stdout, (r.stdout, r.stderr)


def test_directory_mode_has_no_host_state_and_records_tolerate_its_absence(short_tmp: Path):
    reg = SessionRegistry(str(short_tmp / "dir"))
    assert reg.register("d1", "D", "claude").host_state is None
    assert reg.get("d1").host_state is None
    old = reg.get("d1").to_dict()
    old.pop("host_state")                       # a daemon that does not send it
    assert Session.from_dict(old).host_state is None
    s = Session("x", "X", "t", host_state="suspect")
    assert s.to_dict()["host_state"] == "suspect"
    assert Session.from_dict(s.to_dict()) == s
