"""`node.monitor` / `SessionRegistry.monitor`: the daemon's live events, filtered by level,
bounded for a slow reader (which is told how many it lost), refused on bad arguments and
past the per-connection bound."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import msgpack
import pytest
import zmq

from meshd.wire.ipc import ERROR, EVENT, OK, encode_request
from sessions import SessionRegistry
from sessions._monitor import MonitorEvent
from sessions.aio import AsyncSessionRegistry
from sessions.errors import SessionsError
from support.daemons import CHILD_CWD, collect_events, eventually


def collect(mon: Any, until: Any, timeout: float = 10.0) -> list[MonitorEvent]:
    """Events from `mon` until `until(events)` holds (or the timeout)."""
    return collect_events(mon, until, timeout)


def kinds(events: list[MonitorEvent]) -> list[str]:
    return [e.event for e in events]


def raw_dealer(path: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{path}")
    return sock


def recv_all(sock: zmq.Socket, wait: float, count: int | None = None) -> list[list[Any]]:
    """Replies read within `wait` seconds (or until `count` of them)."""
    out: list[list[Any]] = []
    deadline = time.monotonic() + wait
    while (count is None or len(out) < count) and sock.poll(
            max(0, deadline - time.monotonic()) * 1000, zmq.POLLIN):
        out.append(msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False))
    return out


def test_events_arrive_with_their_fields(daemon) -> None:
    reg = SessionRegistry(socket=daemon.socket)
    with reg.monitor("debug") as mon:
        with pytest.raises(SessionsError):
            reg.force_leave("nosuchnode")          # a client error (not_found: debug)
        with pytest.raises(SessionsError):
            reg.join("no:such:address")            # invalid argument, refused by the SDK
        reg.join("127.0.0.1:9")                    # nobody there: attempts, then retries
        got = collect(mon, lambda evs: {"client.error", "join.attempt"} <= set(kinds(evs)))
    assert "client.error" in kinds(got), kinds(got)
    err = next(e for e in got if e.event == "client.error")
    assert err.fields["code"] == "not_found" and err.level == "debug"
    attempt = next(e for e in got if e.event == "join.attempt")
    assert attempt.fields["address"] == "127.0.0.1:9" and attempt.fields["attempts"] >= 1
    assert attempt.source.startswith("meshd") and attempt.time > time.time() - 60
    assert all(set(e.to_dict()) == {"time", "level", "source", "event", "message", "fields",
                                    "id"} for e in got)
    # Debug records were made for the monitor only: the daemon's log stays at info.
    assert "join attempt" not in daemon.log()


def test_cli_human_lines(daemon) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "sessions", "monitor", "--backlog", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=CHILD_CWD, env=daemon.env())
    try:
        assert select.select([proc.stdout], [], [], 15)[0], "no output from the CLI"
        line = proc.stdout.readline()
        assert " INFO  " in line and "log" in line, line
    finally:
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode in (0, 130) and "Monitoring meshd at level info" in err, err


def test_level_filter(daemon) -> None:
    reg = SessionRegistry(socket=daemon.socket)
    warn = reg.monitor("warning")
    info = reg.monitor("info")
    try:
        reg.join("127.0.0.1:9")
        # The second attempt (a backoff later) logs a warning; attempts are debug.
        w = collect(warn, lambda evs: "join.retry" in kinds(evs))
        assert "join.retry" in kinds(w), kinds(w)
        assert all(e.level in ("warning", "error") for e in w), [e.to_dict() for e in w]
        i = collect(info, lambda evs: "join.retry" in kinds(evs))
        assert "join.retry" in kinds(i)
        assert all(e.level != "debug" for e in i) and "join.attempt" not in kinds(i)
    finally:
        warn.close()
        info.close()


def test_backlog_gives_recent_events(daemon) -> None:
    reg = SessionRegistry(socket=daemon.socket)
    with reg.monitor("info", backlog=50) as mon:
        got = collect(mon, lambda evs: any("local API" in e.message for e in evs), timeout=3)
    assert any("serving the local API" in e.message for e in got), [e.message for e in got]


def test_slow_subscriber_is_bounded_and_told_what_it_lost(daemon) -> None:
    sock = raw_dealer(daemon.socket)
    try:
        sock.send(encode_request(1, "node.monitor", {"level": "info"}))
        replies = recv_all(sock, 2.0, count=1)
        ok = [r for r in replies if r[0] == 1 and r[1] == OK]
        assert ok, replies
        sub = ok[0][2]["sub"]
        # Thousands of client errors (each an info event), the monitor never acking.
        noisy = raw_dealer(daemon.socket)
        for i in range(3000):
            noisy.send(encode_request(100 + i, "no.such.command", {}))
        assert len(recv_all(noisy, 3.0, count=3000)) == 3000
        noisy.close()
        events = [r for r in recv_all(sock, 0.5) if r[1] == EVENT]
        assert 0 < len(events) <= 128            # the window: nothing beyond it unacked
        # Acking lets the rest come: first a "dropped N" notice, then the queue (bounded).
        seq = events[-1][2]["seq"]
        rest: list[list[Any]] = []
        for _ in range(20):
            sock.send(encode_request(2, "stream.ack", {"sub": sub, "cursor": seq}))
            got = recv_all(sock, 0.3)
            more = [r for r in got if r[1] == EVENT]
            if not more:
                break
            rest += more
            seq = more[-1][2]["seq"]
        first = rest[0][2]["message"]
        assert first["event"] == "monitor.dropped", first
        assert first["fields"]["dropped"] > 1000
        assert len(events) + len(rest) <= 128 + 512 + 2
        assert SessionRegistry(socket=daemon.socket).node_info()["node_id"]
        sock.send(encode_request(3, "stream.close", {"sub": sub}))
        assert any(r[0] == 3 and r[1] == OK for r in recv_all(sock, 1.0))
    finally:
        sock.close()


def test_bad_arguments_and_too_many_are_refused(daemon, tmp_path) -> None:
    reg = SessionRegistry(socket=daemon.socket)
    with pytest.raises(SessionsError, match="level"):
        reg.monitor("loud")
    sock = raw_dealer(daemon.socket)
    try:
        for i, args in enumerate([{"level": "trace"}, {"backlog": -1}, {"backlog": 10**6},
                                  {"level": "info", "extra": 1}]):
            sock.send(encode_request(10 + i, "node.monitor", args))
        replies = recv_all(sock, 1.0)
        assert len(replies) == 4 and all(r[1] != OK for r in replies), replies
        assert {r[2]["code"] for r in replies} == {"invalid_argument"}
        # A handful per connection: the fifth is refused, and closing one makes room.
        for i in range(5):
            sock.send(encode_request(20 + i, "node.monitor", {}))
        replies = [r for r in recv_all(sock, 1.0) if r[0] in range(20, 25)]
        oks = [r for r in replies if r[1] == OK]
        refused = [r for r in replies if r[1] == ERROR]
        assert len(oks) == 4 and len(refused) == 1 and refused[0][2]["code"] == "too_large"
        sock.send(encode_request(30, "stream.close", {"sub": oks[0][2]["sub"]}))
        sock.send(encode_request(31, "node.monitor", {}))
        assert any(r[0] == 31 and r[1] == OK for r in recv_all(sock, 1.0))
    finally:
        sock.close()
    with pytest.raises(SessionsError, match="daemon"):
        SessionRegistry(tmp_path).monitor()


def test_asyncio_monitor(daemon) -> None:
    async def main() -> list[str]:
        reg = AsyncSessionRegistry(socket=daemon.socket)
        mon = await reg.monitor("debug")
        try:
            with pytest.raises(SessionsError):
                await reg.force_leave("nosuchnode")
            seen: list[str] = []
            for _ in range(40):
                ev = await mon.next(timeout=0.25)
                if ev is not None:
                    seen.append(ev.event)
                if "client.error" in seen:
                    break
            return seen
        finally:
            mon.close()
            await reg.close()

    assert "client.error" in asyncio.run(main())


def test_idle_monitor_goes_away(daemon) -> None:
    sock = raw_dealer(daemon.socket)
    try:
        sock.send(encode_request(1, "node.monitor", {}))
        sub = next(r for r in recv_all(sock, 1.0) if r[0] == 1)[2]["sub"]

        def gone() -> bool:
            sock.send(encode_request(2, "stream.ack", {"sub": sub, "cursor": 0}))
            return any(r[0] == 2 and r[1] != OK for r in recv_all(sock, 0.2))
        time.sleep(1.0)
        assert not gone()                        # an ack renews it
        time.sleep(7.5)                          # past the idle timeout (5 s in tests)
        eventually(gone, timeout=5, message="the idle monitor expired")
    finally:
        sock.close()


def test_error_replies_inside_a_batch_frame_are_client_errors(daemon) -> None:
    """A batch frame's replies go out as one frame: its items' errors are events too."""
    reg = SessionRegistry(socket=daemon.socket)
    with reg.monitor("debug") as mon:
        sock = raw_dealer(daemon.socket)
        try:
            items = [[1, "memory.get", {"key": "k"}],                      # fine (None)
                     [2, "session.get", {"session_id": 5}],                # invalid_argument
                     [3, "no.such.command", {}]]                           # unknown command
            sock.send(msgpack.packb([1, 0, "batch", items]))
            (reply,) = recv_all(sock, 5.0, count=1)
        finally:
            sock.close(linger=0)
        kinds_by_id = {r[0]: r[1] for r in reply[2]}
        assert kinds_by_id == {1: OK, 2: ERROR, 3: ERROR}, reply
        codes = {r[0]: r[2]["code"] for r in reply[2] if r[1] == ERROR}
        got = collect(mon, lambda evs: sum(e.event == "client.error" for e in evs) >= 2)
    errors = {e.fields["req_id"]: e.fields["code"] for e in got if e.event == "client.error"}
    assert errors == codes, (errors, codes)


def test_monitor_counters_are_in_node_info(daemon) -> None:
    reg = SessionRegistry(socket=daemon.socket)
    with reg.monitor("info"):
        info = reg.node_info()
        assert info["monitor"]["subscriptions"] == 1
        assert info["counters"]["ok.node.monitor"] >= 1       # local commands count too
    out = subprocess.run([sys.executable, "-m", "sessions", "--socket", daemon.socket, "info"],
                         capture_output=True, text=True, timeout=30, cwd=CHILD_CWD)
    assert out.returncode == 0, out.stderr
    assert "monitors" in out.stdout and "ok.node.info" in out.stdout, out.stdout
