"""Hostile and broken clients, spoken to a real daemon over raw ZeroMQ DEALER sockets.

For every malformed request: an error reply with the right code (echoing the req_id when
it was readable), the daemon stays alive and keeps serving (the same connection and the
SDK), the rejection is counted in node_info()["counters"], and no half record is written.
Also: floods of garbage, clients that vanish without reading, and the SDK's own checks,
which must refuse bad input before anything is sent.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Iterator

import msgpack
import pytest
import zmq

from support.daemons import Daemon, eventually

REPLY_TIMEOUT_MS = 5000
SEED_VALUE = {"seed": [1, 2, 3]}


# --- helpers ---------------------------------------------------------------------------------

class Raw:
    """A bare DEALER connection to the daemon, with its own ZeroMQ context."""

    def __init__(self, socket_path: str, linger: int = 0) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, linger)
        self.sock.setsockopt(zmq.SNDTIMEO, 10_000)        # a send never blocks for ever
        self.sock.connect(f"ipc://{socket_path}")

    def send(self, frame: bytes | list[bytes]) -> None:
        self.sock.send_multipart(frame if isinstance(frame, list) else [frame])

    def recv(self, timeout_ms: int = REPLY_TIMEOUT_MS) -> list[Any] | None:
        if not self.sock.poll(timeout_ms):
            return None
        return msgpack.unpackb(self.sock.recv(), raw=False, strict_map_key=False)

    def ask(self, frame: bytes | list[bytes], timeout_ms: int = REPLY_TIMEOUT_MS) -> list[Any]:
        self.send(frame)
        reply = self.recv(timeout_ms)
        assert reply is not None, f"no reply within {timeout_ms} ms"
        return reply

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def req(req_id: Any, command: Any, args: Any, version: Any = 1) -> bytes:
    return msgpack.packb([version, req_id, command, args])


def counters(d: Daemon) -> dict[str, int]:
    return d.registry().node_info()["counters"]


def rejected(c: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in c.items() if k.startswith("rejected.")}


def state(d: Daemon) -> dict[str, Any]:
    """Everything a rejected request could have half-written."""
    reg, hub, mem = d.registry(), d.hub(), d.memory()
    return {
        "sessions": [s.to_dict() for s in reg.list_sessions(include_offline=True)],
        "registry": reg.get_stats(),
        "messages": hub.get_stats(),
        "inbox_b": [m.to_dict() for m in hub.get_messages("b")],
        "memory": mem.get_stats(),
        "entries": [e.to_dict() for e in mem.search("*")],
    }


def nested(depth: int, leaf: Any = 1, as_map: bool = False) -> Any:
    v = leaf
    for _ in range(depth):
        v = {"k": v} if as_map else [v]
    return v


ENTRY = {"entry_id": "e-raw-1", "type": "state", "key": "raw-key", "value": 1,
         "session_id": "a", "timestamp": "2024-01-01T00:00:00+00:00", "ttl": None,
         "tags": [], "metadata": {}}
MESSAGE = {"message_id": "m-raw-1", "type": "request", "from_session": "a", "to_session": "b",
           "subject": "s", "body": "b", "data": {}, "timestamp": "2024-01-01T00:00:00+00:00",
           "in_reply_to": None}
REGISTER = {"session_id": "a", "agent_name": "A2", "agent_type": "T2"}


def mset(req_id: int, **entry: Any) -> bytes:
    return req(req_id, "memory.set", {"entry": {**ENTRY, **entry}})


def msend(req_id: int, **message: Any) -> bytes:
    return req(req_id, "message.send", {"message": {**MESSAGE, **message}})


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


# --- one daemon for the table of bad frames (each case checks exact deltas) ------------------

@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    tmp = tempfile.mkdtemp(prefix="mm", dir="/tmp")
    d = Daemon(socket=f"{tmp}/d.sock", data_dir=f"{tmp}/data", log_path=f"{tmp}/d.log")
    try:
        d.start()
        reg, hub, mem = d.registry(), d.hub(), d.memory()
        reg.register("a", "A", "T", capabilities=["x"])
        reg.register("b", "B", "T")
        hub.send("a", "b", "request", "hello", "world")
        mem.set("a", "seed", SEED_VALUE, tags=["t"])
        yield d
    finally:
        d.stop(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def raw_shared(shared_daemon: Daemon) -> Iterator[Raw]:
    r = Raw(shared_daemon.socket)
    try:
        yield r
    finally:
        r.close()


NONE = None   # req_id of a reply to a frame whose req_id could not be read

BAD_FRAMES: list[tuple[str, bytes | list[bytes], Any, str]] = [
    # not a request at all
    ("not-msgpack", b"\xc1\xc1 this is not msgpack", NONE, "bad_request"),
    ("empty-frame", b"", NONE, "bad_request"),
    ("truncated", req(5, "node.info", {})[:-1], NONE, "bad_request"),
    ("trailing-bytes", req(5, "node.info", {}) + b"\x00", NONE, "bad_request"),
    ("map-not-array", msgpack.packb({"version": 1, "req_id": 5, "command": "node.info"}),
     NONE, "bad_request"),
    ("int-not-array", msgpack.packb(7), NONE, "bad_request"),
    ("str-not-array", msgpack.packb("node.info"), NONE, "bad_request"),
    ("nil-not-array", msgpack.packb(None), NONE, "bad_request"),
    ("empty-array", msgpack.packb([]), NONE, "bad_request"),
    ("arity-3", msgpack.packb([1, 5, "node.info"]), NONE, "bad_request"),
    ("arity-5", msgpack.packb([1, 5, "node.info", {}, {}]), NONE, "bad_request"),
    # req_id
    ("req-id-str", req("5", "node.info", {}), NONE, "bad_request"),
    ("req-id-float", req(5.0, "node.info", {}), NONE, "bad_request"),
    ("req-id-bool", req(True, "node.info", {}), NONE, "bad_request"),
    ("req-id-nil", req(None, "node.info", {}), NONE, "bad_request"),
    ("req-id-negative", req(-1, "node.info", {}), NONE, "bad_request"),
    ("req-id-2**63", req(2**63, "node.info", {}), NONE, "bad_request"),
    ("req-id-uint64-max", req(2**64 - 1, "node.info", {}), NONE, "bad_request"),
    ("req-id-on-a-write", msgpack.packb([1, "x", "memory.set", {"entry": ENTRY}]), NONE,
     "bad_request"),
    # protocol version
    ("version-99", req(21, "node.info", {}, version=99), 21, "unsupported_version"),
    ("version-0", req(22, "node.info", {}, version=0), 22, "unsupported_version"),
    ("version-2-write", msgpack.packb([2, 23, "memory.set", {"entry": ENTRY}]), 23,
     "unsupported_version"),
    ("version-str", req(24, "node.info", {}, version="1"), 24, "bad_request"),
    ("version-nil", req(25, "node.info", {}, version=None), 25, "bad_request"),
    ("version-bool-true", req(26, "node.info", {}, version=True), 26, "bad_request"),
    ("version-float", req(27, "node.info", {}, version=1.0), 27, "bad_request"),
    # command
    ("command-int", req(30, 42, {}), 30, "bad_request"),
    ("command-nil", req(31, None, {}), 31, "bad_request"),
    ("command-bytes", req(32, b"node.info", {}), 32, "bad_request"),
    ("unknown-command", req(33, "no.such.command", {}), 33, "unknown_command"),
    ("empty-command", req(34, "", {}), 34, "unknown_command"),
    ("command-wrong-case", req(35, "NODE.INFO", {}), 35, "unknown_command"),
    ("command-dunder", req(36, "__class__", {}), 36, "unknown_command"),
    # args of the wrong shape
    ("args-list", req(40, "node.info", []), 40, "invalid_argument"),
    ("args-nil", req(41, "session.list", None), 41, "invalid_argument"),
    ("args-str", req(42, "memory.get", "seed"), 42, "invalid_argument"),
    ("args-bytes-keys", req(43, "session.ping", {b"session_id": "a"}), 43, "invalid_argument"),
    ("unknown-extra-arg", req(44, "session.ping", {"session_id": "a", "extra": 1}), 44,
     "invalid_argument"),
    ("missing-arg", req(45, "memory.get", {}), 45, "invalid_argument"),
    # memory.set
    ("entry-str", req(50, "memory.set", {"entry": "not a map"}), 50, "invalid_argument"),
    ("entry-list", req(51, "memory.set", {"entry": [ENTRY]}), 51, "invalid_argument"),
    ("entry-nil", req(52, "memory.set", {"entry": None}), 52, "invalid_argument"),
    ("entry-extra-arg", req(53, "memory.set", {"entry": ENTRY, "x": 1}), 53,
     "invalid_argument"),
    ("entry-no-key", req(54, "memory.set", {"entry": without(ENTRY, "key")}), 54,
     "invalid_argument"),
    ("entry-empty-key", mset(55, key=""), 55, "invalid_argument"),
    ("entry-key-int", mset(56, key=5), 56, "invalid_argument"),
    ("entry-key-too-long", mset(57, key="k" * 1025), 57, "invalid_argument"),
    ("entry-empty-id", mset(58, entry_id=""), 58, "invalid_argument"),
    ("entry-session-list", mset(59, session_id=["a"]), 59, "invalid_argument"),
    ("entry-session-empty", mset(60, session_id=""), 60, "invalid_argument"),
    ("entry-type-bogus", mset(61, type="bogus"), 61, "invalid_argument"),
    ("entry-ttl-negative", mset(62, ttl=-1), 62, "invalid_argument"),
    ("entry-ttl-zero", mset(63, ttl=0), 63, "invalid_argument"),
    ("entry-ttl-nan", mset(64, ttl=float("nan")), 64, "invalid_argument"),
    ("entry-ttl-str", mset(65, ttl="60"), 65, "invalid_argument"),
    ("entry-ttl-bool", mset(66, ttl=True), 66, "invalid_argument"),
    ("entry-tags-str", mset(67, tags="a,b"), 67, "invalid_argument"),
    ("entry-tags-ints", mset(68, tags=[1, 2]), 68, "invalid_argument"),
    ("entry-metadata-list", mset(69, metadata=[1]), 69, "invalid_argument"),
    ("entry-value-bytes-key", mset(70, value={b"k": 1}), 70, "invalid_argument"),
    ("entry-value-nested-100", mset(71, value=nested(100)), 71, "invalid_argument"),
    ("entry-value-nested-maps-100", mset(72, value=nested(100, as_map=True)), 72,
     "invalid_argument"),
    ("entry-value-nested-33", mset(73, value=nested(33)), 73, "invalid_argument"),
    ("entry-metadata-nested", mset(74, metadata=nested(40, as_map=True)), 74,
     "invalid_argument"),
    # things msgpack can carry that the daemon must not even decode
    ("entry-value-int-key", msgpack.packb([1, 75, "memory.set",
                                           {"entry": {**ENTRY, "value": {1: "x"}}}]),
     NONE, "bad_request"),
    ("entry-value-ext", mset(76, value=msgpack.ExtType(5, b"abc")), NONE, "bad_request"),
    # msgpack decodes its timestamp extension (-1) itself: refused as a value, not a frame
    ("entry-value-timestamp-ext", msgpack.packb(
        [1, 77, "memory.set", {"entry": {**ENTRY, "value": msgpack.Timestamp(1, 0)}}]),
     77, "invalid_argument"),
    ("version-ext", req(78, "node.info", {}, version=msgpack.ExtType(1, b"x")), NONE,
     "bad_request"),
    ("nested-beyond-the-decoder", b"\x94\x01\x4f" + msgpack.packb("memory.set") + b"\x81"
     + msgpack.packb("entry") + b"\x91" * 200_000 + b"\x01", NONE, "bad_request"),
    # sessions
    ("register-id-list", req(80, "session.register", {**REGISTER, "session_id": ["x"]}), 80,
     "invalid_argument"),
    ("register-id-empty", req(81, "session.register", {**REGISTER, "session_id": ""}), 81,
     "invalid_argument"),
    ("register-id-blank", req(82, "session.register", {**REGISTER, "session_id": "   "}), 82,
     "invalid_argument"),
    ("register-id-control", req(83, "session.register", {**REGISTER, "session_id": "a\x00b"}),
     83, "invalid_argument"),
    ("register-id-too-long", req(84, "session.register", {**REGISTER, "session_id": "x" * 257}),
     84, "invalid_argument"),
    ("register-existing-bad-name", req(85, "session.register", {**REGISTER, "agent_name": 5}),
     85, "invalid_argument"),
    ("register-missing-type", req(86, "session.register", without(REGISTER, "agent_type")), 86,
     "invalid_argument"),
    ("register-capabilities-str", req(87, "session.register",
                                      {**REGISTER, "capabilities": "python"}), 87,
     "invalid_argument"),
    ("register-metadata-list", req(88, "session.register", {**REGISTER, "metadata": [1]}), 88,
     "invalid_argument"),
    ("status-bogus", req(89, "session.update_status", {"session_id": "a", "status": "bogus"}),
     89, "invalid_argument"),
    ("status-int", req(90, "session.update_status", {"session_id": "a", "status": 1}), 90,
     "invalid_argument"),
    ("status-task-int", req(91, "session.update_status",
                            {"session_id": "a", "status": "idle", "current_task": 7}), 91,
     "invalid_argument"),
    ("list-offline-str", req(92, "session.list", {"include_offline": "yes"}), 92,
     "invalid_argument"),
    ("unregister-id-int", req(93, "session.unregister", {"session_id": 5}), 93,
     "invalid_argument"),
    # messages
    ("send-to-list", msend(100, to_session=["b"]), 100, "invalid_argument"),
    ("send-type-bogus", msend(101, type="bogus"), 101, "invalid_argument"),
    ("send-id-empty", msend(102, message_id=""), 102, "invalid_argument"),
    ("send-from-empty", msend(103, from_session=""), 103, "invalid_argument"),
    ("send-data-list", msend(104, data=[1]), 104, "invalid_argument"),
    ("send-data-nested", msend(105, data=nested(50, as_map=True)), 105, "invalid_argument"),
    ("send-body-int", msend(106, body=5), 106, "invalid_argument"),
    ("list-id-empty", req(107, "message.list", {"session_id": ""}), 107, "invalid_argument"),
    ("list-type-bogus", req(108, "message.list", {"session_id": "b", "message_type": "x"}), 108,
     "invalid_argument"),
    ("mark-read-ids-str", req(109, "message.mark_read", {"session_id": "b",
                                                         "message_ids": "all"}), 109,
     "invalid_argument"),
    # memory reads and deletes
    ("get-key-int", req(110, "memory.get", {"key": 5}), 110, "invalid_argument"),
    ("get-key-empty", req(111, "memory.get", {"key": ""}), 111, "invalid_argument"),
    ("by-tags-str", req(112, "memory.by_tags", {"tags": "t"}), 112, "invalid_argument"),
    ("delete-session-empty", req(113, "memory.delete", {"key": "seed", "session_id": ""}), 113,
     "invalid_argument"),
    ("clear-session-list", req(114, "memory.clear", {"session_id": ["a"]}), 114,
     "invalid_argument"),
    # streams
    ("subscribe-cursor-negative", req(120, "stream.subscribe", {"cursor": -1}), 120,
     "invalid_argument"),
    ("subscribe-cursor-uint64-max", req(121, "stream.subscribe", {"cursor": 2**64 - 1}), 121,
     "invalid_argument"),
    ("subscribe-types-bogus", req(122, "stream.subscribe", {"types": ["bogus"]}), 122,
     "invalid_argument"),
    ("ack-sub-str", req(123, "stream.ack", {"sub": "1", "cursor": 0}), 123, "invalid_argument"),
    # several frames in one message
    ("two-frames", [mset(130, entry_id="e-mf", key="mf"), b"extra"], NONE, "bad_request"),
    ("empty-then-request", [b"", mset(131, entry_id="e-mf2", key="mf")], NONE, "bad_request"),
    ("five-frames", [req(132, "node.info", {})] * 5, NONE, "bad_request"),
]


@pytest.mark.parametrize("frame,req_id,code", [c[1:] for c in BAD_FRAMES],
                         ids=[c[0] for c in BAD_FRAMES])
def test_bad_frame_gets_a_typed_error_and_writes_nothing(shared_daemon, raw_shared, frame,
                                                         req_id, code):
    d = shared_daemon
    before_state = state(d)
    before = counters(d)
    rid, kind, body = raw_shared.ask(frame)
    assert kind == 1, body                                     # ERROR
    assert rid == req_id, (rid, body)
    assert isinstance(body, dict) and body.get("code") == code, body
    assert isinstance(body.get("message"), str) and body["message"]
    assert d.alive(), d.log()

    after = counters(d)
    assert after.get(f"rejected.{code}", 0) == before.get(f"rejected.{code}", 0) + 1
    delta = {k: v - rejected(before).get(k, 0) for k, v in rejected(after).items()
             if v != rejected(before).get(k, 0)}
    assert delta == {f"rejected.{code}": 1}, delta           # counted once, as that code
    assert after.get("internal_errors", 0) == 0, d.log()
    assert state(d) == before_state                           # no half record anywhere

    # the same connection still works, and so does the SDK
    rid, kind, body = raw_shared.ask(req(999, "memory.get", {"key": "seed"}))
    assert (rid, kind, body["value"]) == (999, 0, SEED_VALUE)
    assert d.memory().get("seed") == SEED_VALUE
    assert d.registry().get("a").agent_name == "A"


def test_boundary_values_are_accepted(shared_daemon, raw_shared):
    """The limits are where they are documented: 32 levels of nesting, 64-bit ints."""
    d = shared_daemon
    mem = d.memory()
    cases = {"deep32": nested(32), "uint64max": 2**64 - 1, "int64min": -(2**63),
             "maps32": nested(32, as_map=True)}
    try:
        for i, (key, value) in enumerate(cases.items()):
            rid, kind, body = raw_shared.ask(mset(500 + i, entry_id=f"e-bound-{i}", key=key,
                                                  value=value))
            assert (rid, kind) == (500 + i, 0), body
            assert mem.get(key) == value
    finally:
        for key in cases:
            mem.delete(key)


# --- sizes -----------------------------------------------------------------------------------

def frame_of_size(size: int, req_id: int) -> bytes:
    """A valid memory.set request frame of exactly `size` bytes."""
    base = len(mset(req_id, value=""))
    n = size - base
    for _ in range(8):                        # the str header grows with the length
        frame = mset(req_id, entry_id=f"e-size-{req_id}", key=f"size-{req_id}", value="x" * n)
        if len(frame) == size:
            return frame
        n += size - len(frame)
    raise AssertionError(f"could not build a frame of {size} bytes")


def test_frames_over_the_size_limit(make_daemon):
    d = make_daemon("big", args=["--max-frame", "65536"])
    mem = d.memory()
    raw = Raw(d.socket)
    try:
        # exactly at the limit: accepted; one byte more: too_large
        rid, kind, body = raw.ask(frame_of_size(65536, 1))
        assert (rid, kind) == (1, 0), body
        assert mem.get("size-1") is not None
        before_mem = mem.get_stats()
        before = counters(d)
        rid, kind, body = raw.ask(frame_of_size(65537, 2))
        assert (rid, kind, body["code"]) == (None, 1, "too_large"), body
        assert "65536" in body["message"]
        for size in (100_000, 150_000):           # both under ZeroMQ's hard cap
            rid, kind, body = raw.ask(frame_of_size(size, 3))
            assert (rid, kind, body["code"]) == (None, 1, "too_large"), body
        after = counters(d)
        assert after["rejected.too_large"] == before.get("rejected.too_large", 0) + 3
        assert mem.get_stats() == before_mem and mem.get("size-2") is None
        assert mem.get("size-3") is None

        # the SDK's write that the daemon finds too large raises TooLarge
        from sessions import TooLarge
        with pytest.raises(TooLarge):
            mem.set("a", "sdk-big", "x" * 100_000)
        assert counters(d)["rejected.too_large"] == after["rejected.too_large"] + 1
        assert mem.get("sdk-big") is None

        # something enormous: the daemon may drop the connection, but it must stay up
        raw.send(b"\x00" * (10 * 1024 * 1024))
        raw.send(mset(4, entry_id="e-enormous", key="enormous", value="x" * 10 * 1024 * 1024))
        fresh = Raw(d.socket)
        try:
            rid, kind, body = fresh.ask(req(5, "node.info", {}))
            assert (rid, kind, body["pid"]) == (5, 0, d.pid)
        finally:
            fresh.close()
        assert d.alive(), d.log()
        assert mem.get("enormous") is None
        mem.set("a", "after", "fine")
        assert mem.get("after") == "fine"
        assert mem.get_stats()["total_entries"] == before_mem["total_entries"] + 1
    finally:
        raw.close()
    assert d.alive()


# --- floods and vanishing clients ------------------------------------------------------------

def test_a_garbage_flood_does_not_stop_other_clients(daemon):
    """5,000 garbage frames from one client while another keeps making SDK calls."""
    n = 5000
    reg, hub, mem = daemon.registry(timeout=10), daemon.hub(timeout=10), daemon.memory(timeout=10)
    reg.register("a", "A", "T")
    reg.register("b", "B", "T")
    before = counters(daemon)
    garbage = [b"\xc1garbage", msgpack.packb({"x": 1}), msgpack.packb([1, 2]),
               msgpack.packb([1, "id", "node.info", {}])]
    flood_done = threading.Event()
    flood_errors: list[BaseException] = []
    replies: list[Any] = []

    def flood() -> None:
        raw = Raw(daemon.socket)
        try:
            for i in range(n):
                raw.send(garbage[i % len(garbage)])
            flood_done.set()
            deadline = time.monotonic() + 30
            while len(replies) < n and time.monotonic() < deadline:
                r = raw.recv(1000)
                if r is not None:
                    replies.append(r)
        except BaseException as exc:            # reported by the main thread
            flood_errors.append(exc)
        finally:
            flood_done.set()
            raw.close()

    t = threading.Thread(target=flood, daemon=True)
    latencies: list[float] = []
    t.start()
    try:
        i = 0
        deadline = time.monotonic() + 60
        while (t.is_alive() or i < 20) and time.monotonic() < deadline:
            t0 = time.monotonic()
            mem.set("a", f"k{i}", i)
            assert mem.get(f"k{i}") == i
            hub.send("a", "b", "request", f"m{i}", "x")
            latencies.append(time.monotonic() - t0)
            i += 1
    finally:
        t.join(40)
    assert not t.is_alive(), "the flooding client did not finish"
    assert not flood_errors, flood_errors
    assert max(latencies) < 5, f"a normal call took {max(latencies):.1f}s during the flood"
    assert daemon.alive(), daemon.log()
    eventually(lambda: counters(daemon).get("rejected.bad_request", 0)
               == before.get("rejected.bad_request", 0) + n, timeout=20,
               message="every garbage frame counted")
    # every garbage frame was answered, with an error and no req_id
    assert len(replies) == n
    assert all(r[0] is None and r[1] == 1 and r[2]["code"] == "bad_request" for r in replies)
    assert len(mem.search("k*")) == i and len(hub.get_messages("b")) == i
    assert counters(daemon).get("internal_errors", 0) == 0


def test_clients_that_vanish_without_reading_do_not_hurt(daemon):
    reg, hub, mem = daemon.registry(), daemon.hub(), daemon.memory()
    reg.register("a", "A", "T")
    reg.register("b", "B", "T")
    for round_ in range(3):
        raw = Raw(daemon.socket)
        for i in range(300):
            raw.send(req(i, "memory.get", {"key": "k"}))
        for i in range(30):
            raw.send(mset(1000 + i, entry_id=f"e-gone-{round_}-{i}", key=f"gone-{round_}-{i}",
                          value=[round_, i]))
        raw.send(req(2000, "stream.subscribe", {"session_id": "b"}))
        raw.send(req(2001, "stream.subscribe", {}))
        raw.close()                                        # linger 0: gone at once
    assert daemon.alive(), daemon.log()
    # whatever of theirs arrived was applied whole
    for e in mem.search("gone-*"):
        r, i = e.value
        assert e.key == f"gone-{r}-{i}" and e.entry_id == f"e-gone-{r}-{i}"
    # messages to a subscribed-then-vanished client do not hurt either; its subscriptions go
    for i in range(5):
        hub.send("a", "b", "request", f"s{i}", "x")
    eventually(lambda: daemon.registry().node_info()["subscriptions"] == 0, timeout=15,
               message="the vanished clients' subscriptions dropped")
    mem.set("a", "k", "still here")
    assert mem.get("k") == "still here"
    assert len(hub.get_messages("b")) == 5
    assert daemon.alive(), daemon.log()
    assert counters(daemon).get("internal_errors", 0) == 0, (
        "the daemon hit an internal error serving vanished clients (see "
        "test_a_subscriber_gone_before_its_reply_does_not_cost_others_their_replies):\n"
        + daemon.log())


def test_a_subscriber_gone_before_its_reply_does_not_cost_others_their_replies(daemon):
    """A client sends stream.subscribe and disconnects before the daemon answers; another
    client's request handled in the same batch must still be answered.

    The daemon is paused (SIGSTOP) so that both requests and the disconnect are waiting
    when it resumes, which puts them in one batch."""
    other = Raw(daemon.socket)
    try:
        assert other.ask(req(1, "node.info", {}))[1] == 0
        gone_seen = False
        for attempt in range(20):
            before = counters(daemon)
            ctx = zmq.Context()
            x = ctx.socket(zmq.DEALER)
            x.setsockopt(zmq.LINGER, 2000)
            x.connect(f"ipc://{daemon.socket}")
            x.send(req(1, "session.list", {}))
            assert x.poll(REPLY_TIMEOUT_MS) and x.recv()           # connected for real
            os.kill(daemon.pid, signal.SIGSTOP)
            try:
                x.send(req(2, "stream.subscribe", {}))
                x.close()
                ctx.term()                     # returns once the request is in the kernel
                other.send(req(100 + attempt, "node.info", {}))
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
            reply = other.recv(3000)
            assert reply is not None, (
                "meshd/ipc/server.py _run_local: after the stream.subscribe reply to a "
                "vanished client fails, `self.streams.subs[result['sub']]` raises KeyError "
                "(forget_client already dropped the subscription), and the other requests "
                f"of the batch are never answered. counters: {counters(daemon)}")
            assert reply[:2] == [100 + attempt, 0], reply
            after = counters(daemon)
            assert after.get("internal_errors", 0) == 0, daemon.log()
            if after.get("dropped.client_gone", 0) > before.get("dropped.client_gone", 0):
                gone_seen = True
                break
        assert gone_seen, "could not make the daemon answer a vanished subscriber"
        assert daemon.alive()
        eventually(lambda: daemon.registry().node_info()["subscriptions"] == 0, timeout=15,
                   message="no subscription left behind")
    finally:
        other.close()


# --- the SDK refuses bad input before sending ------------------------------------------------

def test_sdk_rejects_bad_input_before_anything_is_sent(daemon):
    from sessions import InvalidArgument, MemoryType, TooLarge
    reg, hub, mem = daemon.registry(), daemon.hub(), daemon.memory()
    reg.register("a", "A", "T")
    reg.register("b", "B", "T")

    class Weird:
        pass

    bad_calls = {
        "status bogus": lambda: reg.update_status("a", "bogus"),
        "status int": lambda: reg.update_status("a", 3),
        "find status bogus": lambda: reg.find_sessions(status="bogus"),
        "register empty id": lambda: reg.register("", "A", "T"),
        "register blank id": lambda: reg.register("  ", "A", "T"),
        "register id list": lambda: reg.register(["a"], "A", "T"),
        "register control id": lambda: reg.register("a\nb", "A", "T"),
        "register caps str": lambda: reg.register("c", "C", "T", capabilities="python"),
        "register metadata set": lambda: reg.register("c", "C", "T", metadata={"s": {1}}),
        "ping empty": lambda: reg.ping(""),
        "get empty": lambda: reg.get(""),
        "send type bogus": lambda: hub.send("a", "b", "bogus-type", "s", "b"),
        "send to empty": lambda: hub.send("a", "", "request", "s", "b"),
        "send from empty": lambda: hub.send("", "b", "request", "s", "b"),
        "send data object": lambda: hub.send("a", "b", "request", "s", "b",
                                             data={"o": object()}),
        "send data list": lambda: hub.send("a", "b", "request", "s", "b", data=[1]),
        "send body int": lambda: hub.send("a", "b", "request", "s", 5),
        "broadcast data int keys": lambda: hub.broadcast("a", "s", "b", data={1: 2}),
        "messages empty": lambda: hub.get_messages(""),
        "messages type bogus": lambda: hub.get_messages("b", message_type="bogus"),
        "subscribe type bogus": lambda: hub.subscribe("b", types=["bogus"]),
        "reply to str": lambda: hub.reply("a", "not a message", "b"),
        "value object": lambda: mem.set("a", "k", object()),
        "value custom class": lambda: mem.set("a", "k", Weird()),
        "value set": lambda: mem.set("a", "k", {1, 2}),
        "value frozenset in list": lambda: mem.set("a", "k", [frozenset()]),
        "value int keys": lambda: mem.set("a", "k", {1: "int key"}),
        "value tuple keys": lambda: mem.set("a", "k", {(1, 2): "x"}),
        "value nested 100": lambda: mem.set("a", "k", nested(100)),
        "value int 2**64": lambda: mem.set("a", "k", 2**64),
        "value int -2**63-1": lambda: mem.set("a", "k", -(2**63) - 1),
        "value huge int": lambda: mem.set("a", "k", 10**100),
        "value huge int nested": lambda: mem.set("a", "k", {"n": [1, 2**70]}),
        "value complex": lambda: mem.set("a", "k", 1j),
        "memory type bogus": lambda: mem.set("a", "k", 1, type="bogus"),
        "memory type enum of other kind": lambda: mem.set("a", "k", 1, type="request"),
        "memory empty session": lambda: mem.set("", "k", 1),
        "memory empty key": lambda: mem.set("a", "", 1),
        "memory ttl negative": lambda: mem.set("a", "k", 1, ttl=-5),
        "memory ttl nan": lambda: mem.set("a", "k", 1, ttl=float("nan")),
        "memory tags str": lambda: mem.set("a", "k", 1, tags="a,b"),
        "memory metadata object": lambda: mem.set("a", "k", 1, metadata={"o": object()}),
        "get empty key": lambda: mem.get(""),
        "search empty": lambda: mem.search(""),
        "by tags str": lambda: mem.get_by_tags("active"),
        "by session empty": lambda: mem.get_by_session(""),
        "delete empty session": lambda: mem.delete("k", session_id=""),
    }
    before_state = state(daemon)
    before = counters(daemon)["requests"]
    for name, call in bad_calls.items():
        with pytest.raises(InvalidArgument):
            call()
            pytest.fail(f"{name}: accepted")
    with pytest.raises(TooLarge):
        mem.set("a", "k", "x" * (2 * 1024 * 1024))
    with pytest.raises(TooLarge):
        hub.send("a", "b", "request", "s", "x" * (2 * 1024 * 1024))
    with pytest.raises(TooLarge):
        mem.set("a", "k", [b"\x00" * 1024] * 2048, type=MemoryType.NOTE)
    # nothing was sent: this node_info is the only new request since `before`
    assert counters(daemon)["requests"] == before + 1
    assert state(daemon) == before_state
    assert daemon.alive()
    assert mem.set("a", "k", "fine").value == "fine" and mem.get("k") == "fine"


# --- batch frames (several requests in one frame, see meshd.wire.ipc) -----------------------

def batch(items: Any, version: Any = 1) -> bytes:
    return msgpack.packb([version, 0, "batch", items])


def entry_item(req_id: int, key: str) -> list[Any]:
    return [req_id, "memory.set", {"entry": {
        "entry_id": f"batch-{key}", "type": "state", "key": key, "value": 1, "session_id": "a",
        "timestamp": "t", "ttl": None, "tags": ["batch"], "metadata": {}}}]


def test_a_batch_answers_each_item_alone(daemon):
    raw = Raw(daemon.socket)
    try:
        reply = raw.ask(batch([
            entry_item(1, "b-ok1"),
            [2, "memory.get", {"key": "b-ok1"}],
            [3, "memory.set", {"entry": {"key": "no-id"}}],       # invalid: only this fails
            [4, "nope.command", {}],
            [5, "stream.subscribe", {}],                           # not allowed in a batch
            ["x", "memory.get", {"key": "b-ok1"}],                 # unreadable req_id
            [6, 7, {}],                                            # command not a string
            "not an item",
            entry_item(8, "b-ok2"),
        ]))
        assert reply[0] is None and reply[1] == 3, reply        # [nil, BATCH, [...]]
        by_id = {}
        for rid, kind, body in reply[2]:
            by_id.setdefault(rid, []).append((kind, body))
        assert len(reply[2]) == 9
        assert by_id[1] == [(0, {"entry_id": "batch-b-ok1"})]
        assert by_id[8] == [(0, {"entry_id": "batch-b-ok2"})]
        assert by_id[2][0][0] == 0                               # answered (before or after
        assert by_id[3][0][0] == 1 and by_id[3][0][1]["code"] == "invalid_argument"  # the set)
        assert by_id[4][0][1]["code"] == "unknown_command"
        assert by_id[5][0][1]["code"] == "bad_request"
        assert by_id[6][0][1]["code"] == "bad_request"
        assert [k for k, _ in by_id[None]] == [1, 1]
        mem = daemon.memory()
        assert mem.get("b-ok1") == 1 and mem.get("b-ok2") == 1
        assert mem.get("no-id") is None
        c = counters(daemon)
        assert c["rejected.bad_request"] >= 4 and c["rejected.unknown_command"] >= 1
        # Broken batches as a whole: an error for the frame, and the daemon goes on.
        for bad, code in [(batch([]), "bad_request"), (batch({"a": 1}), "bad_request"),
                          (batch([entry_item(i, f"x{i}") for i in range(1025)]), "bad_request"),
                          (batch([entry_item(1, "v9")], version=9), "unsupported_version")]:
            r = raw.ask(bad)
            assert r[1] == 1 and r[2]["code"] == code, (r, code)
        assert mem.get("x0") is None and mem.get("v9") is None
        assert raw.ask(req(77, "memory.get", {"key": "b-ok2"}))[:2] == [77, 0]
    finally:
        raw.close()


def test_big_batch_answers_are_split_under_the_frame_limit(make_daemon):
    """Many large answers to one batch come back in several frames, none over the limit."""
    d = make_daemon(args=["--max-frame", str(64 * 1024)])
    d.memory().set("a", "big", "v" * 30_000)
    raw = Raw(d.socket)
    try:
        raw.send(batch([[i, "memory.get", {"key": "big"}] for i in range(1, 11)]))
        seen, frames = [], 0
        while len(seen) < 10:
            raw.sock.poll(REPLY_TIMEOUT_MS)
            frame = raw.sock.recv(zmq.NOBLOCK)
            assert len(frame) <= 64 * 1024 + 64
            reply = msgpack.unpackb(frame, raw=False)
            assert reply[1] == 3
            frames += 1
            seen += [rid for rid, kind, body in reply[2] if kind == 0
                     and body["value"] == "v" * 30_000]
        assert sorted(seen) == list(range(1, 11)) and frames >= 5
    finally:
        raw.close()
