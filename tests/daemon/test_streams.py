"""Live push: handlers and message streams, in order, resumable, across daemon restarts,
for slow consumers, broadcasts, and in directory mode (polling)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any


from support.daemons import eventually, subprocess_env
from sessions import CollaborationHub, MessageType, SessionRegistry

# Sends the messages listed in a JSON file, from another process; prints their ids.
SENDER = textwrap.dedent('''
    import json, sys
    from sessions import CollaborationHub, SessionRegistry
    spec = json.load(open(sys.argv[1]))
    if spec.get("dir"):
        hub = CollaborationHub(registry=SessionRegistry(spec["dir"]))
    else:
        hub = CollaborationHub()
    ids = []
    for m in spec["messages"]:
        if m["to"] is None:
            ids.append(hub.broadcast(m["from"], m["subject"], "b").message_id)
        else:
            ids.append(hub.send(m["from"], m["to"], m["type"], m["subject"], "b").message_id)
    print(json.dumps(ids))
''')

# Keeps sending to one session until a stop file appears, riding out daemon restarts:
# a failed call is simply tried again later (as a new message). Logs each acknowledged id.
STEADY_SENDER = textwrap.dedent('''
    import os, sys, time
    from sessions import CollaborationHub, MessageType
    to, log_path, stop_path, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    hub = CollaborationHub(timeout=1.0)
    failures = 0
    with open(log_path, "a", buffering=1) as log:
        for i in range(limit):
            if os.path.exists(stop_path):
                break
            try:
                m = hub.send("steady", to, MessageType.NOTIFICATION, f"n{i}", "b")
            except Exception:
                failures += 1
                time.sleep(0.02)
                continue
            log.write(m.message_id + "\\n")
            log.flush()
            time.sleep(0.002)
    print(f"failures={failures}", file=sys.stderr)
''')


def _send_from_other_process(tmp: Path, env: dict[str, str], messages: list[dict[str, Any]],
                             directory: str | None = None) -> list[str]:
    script = tmp / "sender.py"
    script.write_text(SENDER)
    spec = tmp / f"spec-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps({"messages": messages, "dir": directory}))
    r = subprocess.run([sys.executable, str(script), str(spec)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _msg(frm: str, to: str | None, subject: str, type: str = "request") -> dict[str, Any]:
    return {"from": frm, "to": to, "subject": subject, "type": type}


def _read(stream: Any, n: int, timeout: float = 15.0) -> tuple[list[Any], list[int]]:
    """Read n messages (bounded in time); returns them and the stream cursor after each."""
    msgs, cursors = [], []
    deadline = time.monotonic() + timeout
    while len(msgs) < n:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"stream delivered only {len(msgs)} of {n} messages in {timeout}s"
        m = stream.next(timeout=min(remaining, 2.0))
        if m is not None:
            msgs.append(m)
            cursors.append(stream.cursor)
    return msgs, cursors


def _register(registry: Any, *ids: str) -> None:
    for sid in ids:
        registry.register(sid, sid.capitalize(), "Test")


# --- handlers ------------------------------------------------------------------------------

def test_handler_gets_only_its_type_from_another_process(daemon, short_tmp):
    reg = daemon.registry()
    _register(reg, "a", "b", "c")
    hub = daemon.hub()
    got: list[Any] = []
    got_b: list[Any] = []
    lock = threading.Lock()

    def on_request(m: Any) -> None:
        with lock:
            got.append(m)

    def on_b_request(m: Any) -> None:
        with lock:
            got_b.append(m)

    try:
        hub.register_handler(MessageType.REQUEST, on_request)
        hub.register_handler(MessageType.REQUEST, on_b_request, session_id="b")
        ids = _send_from_other_process(short_tmp, daemon.env(), [
            _msg("a", "b", "ping", "ping"),
            _msg("a", "b", "note", "notification"),
            _msg("a", "c", "req-to-c"),                   # a REQUEST, but not in b's inbox
            _msg("a", None, "bc"),                        # broadcast type
            _msg("a", "b", "req-to-b"),
            _msg("c", "b", "req-to-b-2"),
        ])
        req_c, req_b, req_b2 = ids[2], ids[4], ids[5]
        # The last message sent is a REQUEST to b: once both handlers have it, everything
        # sent before it has been through the same (ordered) streams.
        eventually(lambda: req_b2 in [m.message_id for m in list(got)]
                   and req_b2 in [m.message_id for m in list(got_b)],
                   timeout=15, message="handlers called for the last request")
        with lock:
            assert [m.message_id for m in got] == [req_c, req_b, req_b2]
            assert all(m.type == MessageType.REQUEST for m in got)
            assert [m.message_id for m in got_b] == [req_b, req_b2]
            assert all(m.to_session == "b" for m in got_b)
    finally:
        hub.close()


def test_handler_that_raises_does_not_stop_delivery(daemon):
    _register(daemon.registry(), "a", "b")
    hub = daemon.hub()
    calls: list[str] = []

    def flaky(m: Any) -> None:
        calls.append(m.subject)
        if m.subject == "boom":
            raise RuntimeError("handler bug")

    try:
        hub.register_handler("notification", flaky, session_id="b")
        sender = daemon.hub()
        for subject in ("one", "boom", "three"):
            sender.send("a", "b", MessageType.NOTIFICATION, subject, "x")
        eventually(lambda: calls == ["one", "boom", "three"], timeout=10,
                   message=f"handler calls (got {calls})")
    finally:
        hub.close()


# --- streams --------------------------------------------------------------------------------

def test_stream_delivers_500_in_order_with_consecutive_seq(daemon):
    _register(daemon.registry(), "a", "b", "z")
    hub = daemon.hub()
    stream = hub.subscribe("b")
    try:
        start = stream.cursor
        sent = [hub.send("a", "b", MessageType.REQUEST, f"m{i}", "x").message_id
                for i in range(500)]
        hub.send("a", "z", MessageType.REQUEST, "other inbox", "x")    # not b's
        msgs, cursors = _read(stream, 500)
        assert [m.message_id for m in msgs] == sent
        assert cursors == list(range(start + 1, start + 501)), "seq not consecutive"
        assert stream.next(timeout=0.3) is None, "a message delivered twice or from z's inbox"
    finally:
        stream.close()


def test_stream_resumes_from_cursor_exactly(daemon):
    _register(daemon.registry(), "a", "r")
    hub = daemon.hub()
    first = hub.subscribe("r")
    sent = [hub.send("a", "r", MessageType.NOTIFICATION, f"m{i}", "x").message_id
            for i in range(500)]
    try:
        head, _ = _read(first, 200)
        cursor = first.cursor
    finally:
        first.close()
    assert [m.message_id for m in head] == sent[:200]
    second = hub.subscribe("r", cursor=cursor)
    try:
        more = [hub.send("a", "r", MessageType.NOTIFICATION, f"m{i}", "x").message_id
                for i in range(500, 520)]
        rest, cursors = _read(second, 320)
        assert [m.message_id for m in rest] == sent[200:] + more, "missed or repeated"
        assert cursors == list(range(cursor + 1, cursor + 321))
        assert second.next(timeout=0.3) is None
    finally:
        second.close()
    # A stream from "now" starts after everything already stored.
    fresh = hub.subscribe("r")
    try:
        assert fresh.cursor == cursor + 320
        last = hub.send("a", "r", MessageType.NOTIFICATION, "last", "x")
        (m,), _ = _read(fresh, 1)
        assert m.message_id == last.message_id
    finally:
        fresh.close()


def test_stream_survives_sigterm_and_kill9_restarts(daemon, short_tmp):
    _register(daemon.registry(), "steady", "r")
    hub = daemon.hub()
    stream = hub.subscribe("r")
    start = stream.cursor
    received: list[Any] = []
    cursors: list[int] = []
    stop_reader = threading.Event()
    reader_errors: list[BaseException] = []

    def reader() -> None:
        deadline = time.monotonic() + 120
        try:
            while not stop_reader.is_set() and time.monotonic() < deadline:
                m = stream.next(timeout=0.2)
                if m is not None:
                    received.append(m)
                    cursors.append(stream.cursor)
        except BaseException as exc:                 # surfaced by the asserts below
            reader_errors.append(exc)

    script = short_tmp / "steady.py"
    script.write_text(STEADY_SENDER)
    acks, stop = short_tmp / "steady.acks", short_tmp / "steady.stop"
    sender = subprocess.Popen([sys.executable, str(script), "r", str(acks), str(stop), "5000"],
                              env=daemon.env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        def more_than(n: int) -> Any:
            return lambda: not reader_errors and len(received) >= n
        eventually(more_than(80), timeout=20, message="messages before the restarts")
        assert daemon.stop() == 0                    # SIGTERM with the stream open
        daemon.start()
        n = len(received)
        eventually(more_than(n + 80), timeout=30, message="messages after the SIGTERM restart")
        daemon.kill9()
        daemon.start()
        n = len(received)
        eventually(more_than(n + 80), timeout=30, message="messages after the kill -9 restart")
        stop.touch()
        _, err = sender.communicate(timeout=30)
        assert sender.returncode == 0, err
        acked = acks.read_text().split()
        inbox = [m.message_id for m in daemon.hub().get_messages("r")]
        eventually(lambda: len(received) >= len(inbox) or reader_errors, timeout=20,
                   message="the stream catching up with the inbox")
    finally:
        stop.touch()
        stop_reader.set()
        thread.join(10)
        if sender.poll() is None:
            sender.kill()
            sender.wait(10)
        stream.close()
    assert not reader_errors, f"stream raised: {reader_errors[0]!r}"
    ids = [m.message_id for m in received]
    assert len(ids) == len(set(ids)), "a message delivered twice"
    assert ids == inbox, "stream differs from the inbox (lost, extra or out of order)"
    assert set(acked) <= set(ids), f"{len(set(acked) - set(ids))} acknowledged sends missing"
    assert cursors == list(range(start + 1, start + 1 + len(ids))), "seq not consecutive"


def test_slow_consumer_misses_nothing(daemon):
    _register(daemon.registry(), "a", "slow")
    hub = daemon.hub()
    stream = hub.subscribe("slow")
    try:
        start = stream.cursor
        sent = [hub.send("a", "slow", MessageType.NOTIFICATION, f"m{i}", "x" * 200).message_id
                for i in range(2000)]
        # The consumer has not read a single message while 2,000 arrived (far beyond the
        # push window); now it reads them all.
        msgs, cursors = _read(stream, 2000, timeout=60)
        assert [m.message_id for m in msgs] == sent
        assert cursors == list(range(start + 1, start + 2001))
        assert stream.next(timeout=0.3) is None
    finally:
        stream.close()
    info = daemon.registry().node_info()
    assert info["counters"].get("dropped.client_queue_full", 0) == 0, info["counters"]


def test_stream_expired_by_the_daemon_resubscribes_from_its_cursor(daemon):
    """A consumer that stays away longer than the idle timeout loses its subscription on
    the daemon; on its next read the stream resubscribes and nothing is missed."""
    _register(daemon.registry(), "a", "idle")
    hub = daemon.hub()
    registry = daemon.registry()
    stream = hub.subscribe("idle")
    try:
        start = stream.cursor
        assert registry.node_info()["subscriptions"] == 1
        sent = [hub.send("a", "idle", MessageType.NOTIFICATION, f"m{i}", "x").message_id
                for i in range(300)]
        eventually(lambda: registry.node_info()["dropped_subscriptions"] >= 1, timeout=30,
                   interval=0.2, message="the daemon expiring the idle subscription")
        assert registry.node_info()["subscriptions"] == 0
        sent += [hub.send("a", "idle", MessageType.NOTIFICATION, f"m{i}", "x").message_id
                 for i in range(300, 600)]
        msgs, cursors = _read(stream, 600, timeout=30)
        assert [m.message_id for m in msgs] == sent
        assert cursors == list(range(start + 1, start + 601))
        assert stream.next(timeout=0.3) is None
        assert registry.node_info()["subscriptions"] == 1, "stream did not resubscribe"
        late = hub.send("a", "idle", MessageType.NOTIFICATION, "late", "x")
        (m,), _ = _read(stream, 1)
        assert m.message_id == late.message_id
    finally:
        stream.close()


def test_broadcast_reaches_every_other_stream_not_the_senders(daemon):
    _register(daemon.registry(), "a", "b", "c")
    hub = daemon.hub()
    streams = {sid: hub.subscribe(sid) for sid in ("a", "b", "c")}
    try:
        sent = [hub.broadcast("a", f"bc{i}", "x").message_id for i in range(5)]
        for sid in ("b", "c"):
            msgs, _ = _read(streams[sid], 5)
            assert [m.message_id for m in msgs] == sent
            assert all(m.to_session is None and m.type == MessageType.BROADCAST for m in msgs)
        # Marker: a direct message to the sender. Streams are ordered, so if any broadcast
        # had reached a's stream it would come before the marker.
        marker = hub.send("b", "a", MessageType.PING, "marker", "x")
        (first,), _ = _read(streams["a"], 1)
        assert first.message_id == marker.message_id, f"sender got {first.subject}"
    finally:
        for s in streams.values():
            s.close()


def test_stream_type_filter(daemon):
    _register(daemon.registry(), "a", "b")
    hub = daemon.hub()
    stream = hub.subscribe("b", types=[MessageType.HANDOFF])
    try:
        want = []
        for i in range(30):
            t = MessageType.HANDOFF if i % 3 == 0 else MessageType.NOTIFICATION
            m = hub.send("a", "b", t, f"m{i}", "x")
            if t == MessageType.HANDOFF:
                want.append(m.message_id)
        msgs, _ = _read(stream, len(want))
        assert [m.message_id for m in msgs] == want
        assert stream.next(timeout=0.3) is None
    finally:
        stream.close()


def test_directory_mode_stream_polls(short_tmp):
    directory = str(short_tmp / "dir")
    registry = SessionRegistry(directory)
    _register(registry, "a", "b")
    hub = CollaborationHub(registry=registry)
    stream = hub.subscribe("b")
    try:
        start = stream.cursor
        env = subprocess_env(MESHD_SOCKET=str(short_tmp / "none.sock"))
        ids = _send_from_other_process(short_tmp, env, [_msg("a", "b", f"m{i}") for i in range(50)]
                                       + [_msg("a", None, "bc")], directory=directory)
        msgs, cursors = _read(stream, 51)
        assert [m.message_id for m in msgs] == ids
        assert cursors == list(range(start + 1, start + 52))
        assert stream.next(timeout=0.2) is None
        cursor = cursors[19]
    finally:
        stream.close()
    resumed = hub.subscribe("b", cursor=cursor)
    try:
        msgs, _ = _read(resumed, 31)
        assert [m.message_id for m in msgs] == ids[20:]
    finally:
        resumed.close()
