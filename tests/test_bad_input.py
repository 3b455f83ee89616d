"""Malformed input from clients: every bad frame gets an error reply (or is dropped) and is
counted; the daemon stays up, keeps serving others, and writes no half record."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from conftest import eventually

REPLY_TIMEOUT_MS = 5000


@pytest.fixture
def raw(daemon):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{daemon.socket}")
    yield sock
    sock.close()
    ctx.term()


def ask(sock, frame) -> list:
    frames = frame if isinstance(frame, list) else [frame]
    sock.send_multipart(frames)
    assert sock.poll(REPLY_TIMEOUT_MS), "no reply"
    return msgpack.unpackb(sock.recv(), raw=False)


def counters(daemon) -> dict:
    return daemon.registry().node_info()["counters"]


ENTRY = {"entry_id": "e1", "type": "state", "key": "k", "value": 1, "session_id": "s",
         "timestamp": "t", "ttl": None, "tags": [], "metadata": {}}


@pytest.mark.parametrize("frame,req_id,code", [
    (b"\xc1not msgpack", None, "bad_request"),
    (msgpack.packb({"a": 1}), None, "bad_request"),
    (msgpack.packb([1, 2, 3]), None, "bad_request"),
    (msgpack.packb([1, "id", "node.info", {}]), None, "bad_request"),
    (msgpack.packb([1, -5, "node.info", {}]), None, "bad_request"),
    (msgpack.packb([msgpack.ExtType(1, b"x"), 1, "node.info", {}]), None, "bad_request"),
    (msgpack.packb([99, 7, "node.info", {}]), 7, "unsupported_version"),
    (msgpack.packb(["1", 8, "node.info", {}]), 8, "bad_request"),
    (msgpack.packb([1, 9, 42, {}]), 9, "bad_request"),
    (msgpack.packb([1, 10, "no.such.command", {}]), 10, "unknown_command"),
    (msgpack.packb([1, 11, "memory.set", {"entry": "not a map"}]), 11, "invalid_argument"),
    (msgpack.packb([1, 12, "memory.set", [1, 2]]), 12, "invalid_argument"),
    (msgpack.packb([1, 13, "session.register", {"session_id": ["x"], "agent_name": "a",
                                                "agent_type": "t"}]), 13, "invalid_argument"),
    (msgpack.packb([1, 14, "session.update_status", {"session_id": "a", "status": "bogus"}]),
     14, "invalid_argument"),
    (msgpack.packb([1, 15, "session.register", {"session_id": "", "agent_name": "a",
                                                "agent_type": "t"}]), 15, "invalid_argument"),
    (msgpack.packb([1, 16, "session.ping", {"session_id": "a", "extra": 1}]), 16,
     "invalid_argument"),
    (msgpack.packb([1, 17, "memory.set", {"entry": dict(ENTRY, ttl=-1)}]), 17,
     "invalid_argument"),
    (msgpack.packb([1, 18, "memory.set", {"entry": dict(ENTRY, type="bogus")}]), 18,
     "invalid_argument"),
])
def test_bad_frames_get_a_typed_error_and_nothing_is_written(daemon, raw, frame, req_id, code):
    before_mem = daemon.memory().get_stats()["total_entries"]
    before_reg = daemon.registry().get_stats()["total_sessions"]
    rid, kind, body = ask(raw, frame)
    assert (rid, kind, body["code"]) == (req_id, 1, code), body
    assert body["message"]
    assert daemon.alive()
    assert daemon.memory().get_stats()["total_entries"] == before_mem
    assert daemon.registry().get_stats()["total_sessions"] == before_reg
    assert counters(daemon).get(f"rejected.{code}", 0) >= 1


def test_deeply_nested_values_are_rejected(daemon, raw):
    deep = 1
    for _ in range(100):
        deep = [deep]
    frame = msgpack.packb([1, 1, "memory.set", {"entry": dict(ENTRY, value=deep)}])
    rid, kind, body = ask(raw, frame)
    assert (rid, kind, body["code"]) == (1, 1, "invalid_argument")
    assert "nested" in body["message"]
    assert daemon.memory().get_stats()["total_entries"] == 0


def test_multi_frame_request_is_rejected(daemon, raw):
    rid, kind, body = ask(raw, [msgpack.packb([1, 1, "node.info", {}]), b"extra"])
    assert (kind, body["code"]) == (1, "bad_request")
    assert counters(daemon)["rejected.bad_request"] >= 1


def test_oversized_frames(make_daemon):
    d = make_daemon(args=["--max-frame", "65536"])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{d.socket}")
    try:
        big = msgpack.packb([1, 5, "memory.set", {"entry": dict(ENTRY, value="x" * 100_000)}])
        rid, kind, body = ask(sock, big)
        assert (rid, kind, body["code"]) == (None, 1, "too_large")
        # far beyond the hard cap ZeroMQ drops the connection; the daemon does not notice
        sock.send(b"\x00" * (10 * 1024 * 1024))
        assert d.alive()
        assert d.memory().get_stats()["total_entries"] == 0
        assert counters(d)["rejected.too_large"] == 1
        d.memory().set("s", "after", "fine")
        assert d.memory().get("after") == "fine"
    finally:
        sock.close()
        ctx.term()


def test_sdk_rejects_bad_input_before_sending(daemon):
    from sessions import InvalidArgument, TooLarge
    mem, hub, reg = daemon.memory(), daemon.hub(), daemon.registry()
    reg.register("a", "A", "T")
    before = counters(daemon)["requests"]
    bad_calls = [
        lambda: reg.update_status("a", "bogus"),
        lambda: reg.register("", "A", "T"),
        lambda: hub.send("a", "a", "bogus-type", "s", "b"),
        lambda: hub.send("a", "", "request", "s", "b"),
        lambda: mem.set("a", "k", object()),
        lambda: mem.set("a", "k", {1, 2}),
        lambda: mem.set("a", "k", {1: "int key"}),
        lambda: mem.set("a", "k", 1, type="bogus"),
    ]
    for call in bad_calls:
        with pytest.raises(InvalidArgument):
            call()
    with pytest.raises(TooLarge):
        mem.set("a", "k", "x" * (2 * 1024 * 1024))
    assert counters(daemon)["requests"] == before + 1     # only this node_info call itself


def test_a_garbage_flood_does_not_stop_other_clients(daemon, raw):
    mem = daemon.memory(timeout=10)
    for i in range(5000):
        raw.send(b"\xc1garbage %d" % i)
    for i in range(50):
        mem.set("s", f"k{i}", i)
        assert mem.get(f"k{i}") == i
    eventually(lambda: counters(daemon).get("rejected.bad_request", 0) == 5000, timeout=20,
               message="all garbage frames counted")
    assert daemon.alive()


def test_a_client_that_vanishes_without_reading_does_not_hurt(daemon):
    ctx = zmq.Context()
    for round_ in range(3):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"ipc://{daemon.socket}")
        for i in range(500):
            s.send(msgpack.packb([1, i, "memory.get", {"key": "k"}]))
        s.close()
    ctx.term()
    mem = daemon.memory()
    mem.set("s", "k", "still here")
    assert mem.get("k") == "still here" and daemon.alive()
