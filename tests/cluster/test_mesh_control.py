"""Runtime mesh control, as Serf's: `sessions join`, `leave`, `force-leave`; joins that
do not answer are visible (why, in `sessions peers`); the security mode is shown."""

from __future__ import annotations

import socket

from support.daemons import eventually, peer_states, run_cli, wait_converged


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pending(d) -> dict[str, dict]:
    info = d.registry(timeout=5).node_info()
    return {p["address"]: p for p in info["mesh"]["pending_joins"]}


def test_join_at_run_time_and_pending_joins_say_why(make_daemon):
    a = make_daemon("a", args=["--bind", "127.0.0.21:0"])
    b = make_daemon("b", args=["--bind", "127.0.0.22:0"])
    r = run_cli(["join", b.peer_address], a.env())
    assert r.returncode == 0 and "Joining" in r.stdout, r.stdout + r.stderr
    wait_converged([a, b])
    assert run_cli(["join", b.peer_address], a.env()).stdout.startswith("✅")   # member
    a.registry().register("on-a", "A", "T")
    eventually(lambda: b.registry().get("on-a") is not None, timeout=10,
               message="replication after the join")

    # Nobody there, and a name that does not resolve: pending, with the reason.
    silent = f"127.0.0.23:{free_port()}"
    for target in (silent, "no-such-host.invalid:7747"):
        assert run_cli(["join", target], a.env()).returncode == 0
    eventually(lambda: "nothing listens there" in pending(a).get(silent, {}).get("reason", ""),
               timeout=15, message="the silent address found closed")
    assert pending(a)[silent]["attempts"] >= 2
    eventually(lambda: "does not resolve" in pending(a).get(
        "no-such-host.invalid:7747", {}).get("reason", ""), timeout=10,
        message="the name failure")
    out = run_cli(["peers"], a.env()).stdout
    assert f"pending join {silent}" in out and "does not resolve" in out, out
    assert "Security: open (no cluster key), loopback only" in out, out
    assert "joining no-such-host.invalid:7747" in a.log()       # logged on the joining side
    # bad addresses are usage-level errors, not pending joins
    r = run_cli(["join", "not-an-address"], a.env())
    assert r.returncode == 1 and "HOST:PORT" in r.stderr, r.stderr


def test_leave_stops_the_daemon_and_peers_see_it_left(make_cluster):
    a, b = make_cluster(2)
    wait_converged([a, b])
    r = run_cli(["leave"], b.env())
    assert r.returncode == 0 and "leaving" in r.stdout, r.stdout + r.stderr
    assert b.proc is not None and b.proc.wait(15) == 0
    eventually(lambda: peer_states(a).get(b.node_id) == "left", timeout=10,
               message="the peer seeing it left (not dead)")


def test_force_leave_a_dead_member(make_cluster):
    a, b = make_cluster(2)
    wait_converged([a, b])
    hub_a = a.hub()
    a.registry().register("alice", "A", "T")
    b.registry().register("bob", "B", "T")
    eventually(lambda: a.registry().get("bob") is not None, timeout=10, message="bob on a")
    r = run_cli(["force-leave", b.node_id[:8]], a.env())
    assert r.returncode == 1 and "alive" in r.stderr, r.stderr      # up: refused
    b.kill9()
    eventually(lambda: peer_states(a).get(b.node_id) == "dead", timeout=20,
               message="b declared dead")
    m = hub_a.send("alice", "bob", "request", "are you there", "?")
    assert hub_a.get_message_status(m.message_id)["state"] == "queued"
    r = run_cli(["force-leave", b.node_id[:8]], a.env())
    assert r.returncode == 0 and "marked left" in r.stdout, r.stdout + r.stderr
    assert peer_states(a)[b.node_id] == "left"
    assert hub_a.get_message_status(m.message_id)["state"] == "expired"
    r = run_cli(["force-leave", "zzzzzzzz"], a.env())
    assert r.returncode == 1 and "no member" in r.stderr, r.stderr


def test_mesh_control_without_a_mesh_is_a_clear_error(make_daemon):
    d = make_daemon(args=["--no-mesh"])
    for argv in (["join", "127.0.0.1:7747"], ["leave"], ["force-leave", "abcdef12"]):
        r = run_cli(argv, d.env())
        assert r.returncode == 1 and "--no-mesh" in r.stderr, (argv, r.stderr)
    assert d.alive()


def test_sdk_errors_say_sessions_in_tracebacks(daemon):
    import traceback
    from sessions import NotFound
    try:
        daemon.registry().force_leave("abcdef123")
    except NotFound:
        text = traceback.format_exc()
    assert "sessions.NotFound: " in text, text


def test_a_join_refused_for_a_key_mismatch_says_so(make_daemon, short_tmp):
    import subprocess
    import sys
    from support.daemons import subprocess_env
    keys = []
    for name in ("one", "two"):
        path = short_tmp / f"{name}.key"
        r = subprocess.run([sys.executable, "-m", "meshd", "--gen-key", str(path)],
                           capture_output=True, text=True, timeout=30, env=subprocess_env())
        assert r.returncode == 0, r.stderr
        keys.append(str(path))
    a = make_daemon("a", args=["--bind", "127.0.0.31:0", "--key-file", keys[0]])
    for name, extra in (("b", ["--key-file", keys[1]]), ("c", [])):   # another key; none
        d = make_daemon(name, args=["--bind", f"127.0.0.{32 + (name == 'c')}:0",
                                    "--join", a.peer_address, *extra])
        eventually(lambda d=d: "handshake is refused" in pending(d).get(
            a.peer_address, {}).get("reason", ""), timeout=20,
            message=f"{name} saying why its join is pending")
        assert "handshake is refused" in d.log() and "--key-file" in d.log()
        out = run_cli(["peers"], d.env()).stdout
        assert f"pending join {a.peer_address}" in out and "cluster key" in out, out
        assert peer_states(a) == {}
