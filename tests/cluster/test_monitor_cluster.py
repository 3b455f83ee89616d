"""`sessions monitor` on a mesh: a monitor on one daemon sees a member join and, killed
with SIGKILL, go suspect then dead; the CLI (`sessions monitor --json`, a subprocess)
prints the same as JSON lines; a node that joins late reports its catch-up progress."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from support.daemons import CHILD_CWD, collect_events, eventually, subprocess_env
from sessions import SessionRegistry, SharedMemory


def collect(mon: Any, until: Any, timeout: float = 20.0) -> list[Any]:
    return collect_events(mon, until, timeout)


def states_of(events: list[Any], node_id: str) -> list[str]:
    return [e.event for e in events if e.fields.get("node_id") == node_id]


def test_monitor_sees_join_suspect_dead_and_the_cli_prints_json(make_cluster, make_daemon,
                                                                  short_tmp) -> None:
    (a,) = make_cluster(1, args=["--no-discovery"])
    mon = SessionRegistry(socket=a.socket).monitor("info")
    out_path, err_path = short_tmp / "monitor.out", short_tmp / "monitor.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        cli = subprocess.Popen([sys.executable, "-m", "sessions", "monitor", "--json"],
                               stdout=out, stderr=err, cwd=CHILD_CWD,
                               env=subprocess_env(MESHD_SOCKET=a.socket))
    try:
        eventually(lambda: b"Monitoring" in err_path.read_bytes(), timeout=20,
                   message="the CLI monitor subscribed")
        b = make_daemon("n1", args=["--bind", "127.0.0.11:0", "--no-discovery",
                                    "--join", a.peer_address])
        got = collect(mon, lambda evs: "member.join" in states_of(evs, b.node_id))
        join = next(e for e in got if e.event == "member.join"
                    and e.fields.get("node_id") == b.node_id)
        assert join.fields["address"] == b.peer_address and join.fields["state"] == "alive"
        b.kill9()
        got += collect(mon, lambda evs: "member.dead" in states_of(evs, b.node_id))
        seen = states_of(got, b.node_id)
        assert "member.suspect" in seen and "member.dead" in seen, seen
        assert seen.index("member.suspect") < seen.index("member.dead")

        def cli_lines() -> list[dict[str, Any]]:
            return [json.loads(line) for line in out_path.read_text().splitlines() if line]

        def cli_saw_death() -> bool:
            return any(ev["event"] == "member.dead" and ev["fields"].get("node_id") == b.node_id
                       for ev in cli_lines())
        eventually(cli_saw_death, timeout=10, message="the CLI printed the member's death")
    finally:
        mon.close()
        if cli.poll() is None:
            os.kill(cli.pid, signal.SIGINT)       # Ctrl-C: it stops cleanly
            try:
                cli.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(cli.pid, signal.SIGKILL)
                cli.wait(10)
    assert cli.returncode in (0, 130), err_path.read_text()
    lines = cli_lines()
    kinds = {(ev["event"], ev["fields"].get("node_id")) for ev in lines}
    assert ("member.join", b.node_id) in kinds and ("member.suspect", b.node_id) in kinds
    assert all({"time", "level", "source", "event", "message", "fields"} <= set(ev)
               for ev in lines)


def test_a_late_joiner_reports_catch_up_progress(make_cluster, make_daemon) -> None:
    (a,) = make_cluster(1, args=["--no-discovery"])
    mem = SharedMemory(socket=a.socket)
    for i in range(300):
        mem.set("w", f"k/{i}", i)
    b = make_daemon("n1", args=["--bind", "127.0.0.11:0", "--no-discovery",
                                "--join", a.peer_address])
    eventually(lambda: SharedMemory(socket=b.socket).get("k/299") == 299, timeout=20,
               message="b caught up")
    # The events happened as b started: its recent events hold them.
    with SessionRegistry(socket=b.socket).monitor("info", backlog=256) as mon:
        got = collect(mon, lambda evs: any(e.event == "replication.caught_up" for e in evs),
                      timeout=5)
    done = [e for e in got if e.event == "replication.caught_up"]
    assert done, [e.to_dict() for e in got]
    assert done[-1].fields["origin"] == a.node_id and done[-1].fields["progress"] == 1.0
    assert done[-1].fields["known"] >= done[-1].fields["target"]
    # `peers` carries the catch-up state (None once done).
    peers = SessionRegistry(socket=b.socket).peers()
    assert peers and all("catching_up" in p for p in peers)
