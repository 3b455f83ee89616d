"""Hostile frames on the peer port (issue 13, items 1-5): each test speaks raw ZeroMQ to
real daemons on loopback and checks that the frames cost a bounded amount, are counted,
and cannot take a node out of the cluster or stop its replication."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq

from support.daemons import Daemon, eventually, peer_states, wait_converged

PING, ACK, PING_REQ, GOSSIP, SYNC, RECORDS = 1, 2, 3, 4, 5, 6
ALIVE, SUSPECT, DEAD = 0, 1, 2
FAKE = "f" * 32                       # a node id nobody has
NOWHERE = "127.0.0.99:9"              # an address nobody listens on


class Peer:
    """A raw DEALER to a daemon's peer port, on its own context, speaking as `sender`."""

    def __init__(self, d: Daemon, sender: str = FAKE, reply_to: str = NOWHERE) -> None:
        self.sender, self.reply_to = sender, reply_to
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 5000)      # close() waits (bounded) until sent
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.connect(f"tcp://{d.peer_address}")

    def send(self, ftype: int, body: Any, sender: str | None = None,
             reply_to: str | None = None) -> None:
        self.raw(msgpack.packb([1, ftype, sender or self.sender, reply_to or self.reply_to,
                                body]))

    def raw(self, frame: bytes) -> None:
        self.sock.send(frame)

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.sock.close()
        self.ctx.term()


class Listener:
    """A ROUTER on loopback: where a daemon's answers to our frames arrive."""

    def __init__(self, host: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://{host}:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT).split("//")[1]

    def frames(self, want: Callable[[list[Any]], bool], n: int, timeout: float) -> list[Any]:
        """Up to `n` frames that `want` accepts, within `timeout` seconds."""
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            if self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                frame = msgpack.unpackb(self.sock.recv_multipart()[-1], raw=False)
                if want(frame):
                    got.append(frame)
        return got

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def handled(d: Daemon, p: Peer, host: str = "127.0.0.98") -> bool:
    """Wait until `d` has handled what `p` sent so far: it answers a PING sent after it
    (the frames of one connection are handled in order). False if it never does."""
    box = Listener(host)
    try:
        p.send(PING, {"seq": 4242, "updates": [], "node": d.node_id}, reply_to=box.address)
        return bool(box.frames(lambda f: f[1] == ACK and f[4]["seq"] == 4242, 1, timeout=20))
    finally:
        box.close()


def mesh(d: Daemon) -> dict[str, Any]:
    return d.registry(timeout=5).node_info()["mesh"]


def counter(d: Daemon, part: str, name: str) -> int:
    return mesh(d)[part]["counters"].get(name, 0)


def incarnation_of(observer: Daemon, node: Daemon) -> int:
    return next(p["incarnation"] for p in observer.registry(timeout=5).peers()
                if p["node_id"] == node.node_id)


def consistently(pred: Callable[[], bool], seconds: float, message: str) -> None:
    """`pred` holds at every look for `seconds` (a bounded watch, not a wait)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pred(), message
        time.sleep(0.05)


def rss_mib(d: Daemon) -> float:
    pages = int(Path(f"/proc/{d.pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def entry(origin: str, version: int, key: str) -> dict[str, Any]:
    return {"kind": "entry", "entry_id": f"forged-{key}", "key": key, "type": "fact",
            "value": 1, "session_id": "x", "timestamp": "t", "ttl": None, "tags": [],
            "metadata": {}, "origin": origin, "version": version,
            "hlc": int(time.time() * 1000) << 16}


# --- 1: incarnations ---------------------------------------------------------------------------

def test_an_absurd_incarnation_cannot_evict_a_node(make_cluster):
    a, b, c = make_cluster(3)
    wait_converged([a, b, c])
    inc_b = incarnation_of(a, b)
    with Peer(a) as p:                                   # gossip that b is suspect ...
        p.send(GOSSIP, {"updates": [[b.node_id, b.peer_address, SUSPECT, 2**62]]})
    with Peer(b) as p:                                   # ... and, to b itself, dead
        p.send(GOSSIP, {"updates": [[b.node_id, b.peer_address, DEAD, 2**62]]})
    # Three suspicion timeouts (test preset): b is never declared dead (a false suspicion
    # under load would be refuted at once, so it is not the point here).
    consistently(lambda: "dead" not in (peer_states(a).get(b.node_id),
                                        peer_states(c).get(b.node_id)), 3.0,
                 "b declared dead over one gossip frame")
    for d in (a, b):
        eventually(lambda d=d: counter(d, "membership", "dropped.incarnation_ahead") >= 1,
                   timeout=10, message="the absurd update dropped and counted")
    assert mesh(b)["incarnation"] < 2**62
    assert max(incarnation_of(a, b), incarnation_of(c, b)) < 2**62
    # A plausible rumour is still refuted, in range, and the refutation believed.
    with Peer(a) as p:
        p.send(GOSSIP, {"updates": [[b.node_id, b.peer_address, SUSPECT, inc_b + 1000]]})
    eventually(lambda: all(peer_states(x).get(b.node_id) == "alive"
                           and inc_b + 1000 < incarnation_of(x, b) < 2**62 for x in (a, c)),
               timeout=10, message="b's refutation believed by a and c")
    b.restart()                                          # and a restarted node comes back
    wait_converged([a, b, c], timeout=20)


# --- 2: addresses named by frames ----------------------------------------------------------------

def test_addresses_named_by_frames_get_few_connections_that_expire(make_daemon):
    a = make_daemon("a", args=["--bind", "127.0.0.50:0"])
    before = counter(a, "transport", "frames_in")
    n = 1250
    with Peer(a) as p:
        for i in range(n):
            port = 20000 + i
            if i % 2:
                p.send(PING_REQ, {"seq": i, "target": f"{i:032x}",
                                  "target_addr": f"127.0.0.51:{port}"},
                       reply_to=f"127.0.0.52:{port}")
            else:
                p.send(PING, {"seq": i, "updates": []}, reply_to=f"127.0.0.52:{port}")
    eventually(lambda: counter(a, "transport", "frames_in") >= before + n, timeout=20,
               message="every frame received")
    t = mesh(a)["transport"]
    assert t["connections"] <= 64 + 1, t          # transient_max, and no member
    # A real peer joining afterwards is heard, and answered.
    b = make_daemon("b", args=["--bind", "127.0.0.53:0", "--join", a.peer_address])
    wait_converged([a, b], timeout=20)
    # What the frames opened is closed once idle; the member's connection stays.
    eventually(lambda: mesh(a)["transport"]["connections"] == 1, timeout=15,
               message="the strays' connections closed")
    assert mesh(a)["members"] == 1


# --- 3: forged knowledge ----------------------------------------------------------------------

def test_forged_knowledge_of_an_origin_does_not_stop_its_catch_up(make_daemon):
    b1 = make_daemon("b1", args=["--bind", "127.0.0.61:0"])
    b2 = make_daemon("b2", args=["--bind", "127.0.0.62:0"])
    for d, tag in ((b1, "b1"), (b2, "b2")):
        for i in range(20):
            d.memory().set("w", f"{tag}-{i}", i)
    a = make_daemon("a", args=["--bind", "127.0.0.60:0"])
    jump = 999_999_999
    with Peer(a) as p:
        # b1's version "jumped", in b1's own name, with nothing behind it ...
        p.send(RECORDS, {"origin": b1.node_id, "after": 0, "through": jump, "records": [],
                         "more": False}, sender=b1.node_id, reply_to=b1.peer_address)
        # ... and b2's, with one forged record that seems to back it.
        p.send(RECORDS, {"origin": b2.node_id, "after": 0, "through": jump,
                         "records": [entry(b2.node_id, jump, "forged")], "more": False})
        assert handled(a, p), "a did not answer a PING sent after the forged frames"
    for d in (b1, b2):
        d.args += ["--join", a.peer_address]
        d.restart()
    for tag in ("b1", "b2"):
        try:
            eventually(lambda tag=tag: len(a.memory().search(f"{tag}-*")) == 20, timeout=60,
                       message=f"the 20 writes of {tag} that a missed")
        except AssertionError as exc:       # (failed once in ~7 full CI-like runs: say why)
            info = a.registry().node_info()["mesh"]["replication"]
            raise AssertionError(f"{exc}\na's replication: {info}\na's log: "
                                 f"{a.log()[-3000:]}\nb2's log: {b2.log()[-2000:]}") from None
    # What a passes on claims no more of an origin than the origin made.
    for d in (b1, b2):
        eventually(lambda d=d: [p["ahead"] for p in d.registry().peers()
                                if p["node_id"] == a.node_id] == [0], timeout=20,
                   message="a's summary no longer ahead of the origins")


def test_a_new_node_catches_up_with_an_origin_past_a_billion_versions(make_daemon):
    b = make_daemon("b", args=["--bind", "127.0.0.63:0"])
    b.stop()
    db = sqlite3.connect(Path(b.data_dir) / "meshd.db")
    try:
        with db:
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('version', ?)",
                       (2_000_000_000,))
    finally:
        db.close()
    b.start()
    for i in range(5):
        b.memory().set("w", f"big-{i}", i)
    a = make_daemon("a", args=["--bind", "127.0.0.64:0", "--join", b.peer_address])
    eventually(lambda: len(a.memory().search("big-*")) == 5, timeout=20,
               message="the new node caught up")


# --- 4: invented members --------------------------------------------------------------------------

def test_invented_members_neither_fill_the_table_nor_slow_failure_detection(make_cluster):
    a, b, c = make_cluster(3)
    wait_converged([a, b, c])
    rss_before = rss_mib(a)
    with Peer(a) as p:
        for k in range(3):
            invented = [[uuid.uuid4().hex, f"127.0.0.{70 + k}:{20000 + i}", ALIVE, 1]
                        for i in range(3000)]
            p.send(SYNC, {"digest": {}, "members": invented, "reply": False})
        answered = handled(a, p)
    m = mesh(a)
    assert m["members"] == 2, m["members"]
    assert answered, "a did not answer a PING sent after the invented members"
    assert m["membership"]["candidates"] <= 64
    assert m["transport"]["connections"] <= 64 + 2
    assert m["membership"]["counters"].get("candidates.refused_hearsay", 0) >= 8000
    started = time.monotonic()
    c.kill9()
    eventually(lambda: peer_states(a).get(c.node_id) == "dead", timeout=30, interval=0.05,
               message="the killed member declared dead")
    took = time.monotonic() - started
    assert took < 5.0, f"a real member's death took {took:.1f}s to detect (1.4 s normally)"
    assert rss_mib(a) - rss_before < 30
    assert mesh(a)["members"] == 2


# --- 5: poison frames ------------------------------------------------------------------------------

def test_poison_frames_are_counted_and_frames_behind_them_answered(make_daemon):
    a = make_daemon("a", args=["--bind", "127.0.0.80:0"])
    box = Listener("127.0.0.81")
    other = "e" * 32

    def frame(ftype: Any, body: Any, version: Any = 1, reply_to: str = NOWHERE) -> bytes:
        return msgpack.packb([version, ftype, FAKE, reply_to, body])

    poison = [
        frame(1, {}, version=[]),
        frame([], {}),
        frame({}, {}),
        frame(1, {}, version={}),
        frame(PING, {"seq": 1, "updates": [[other, NOWHERE, [], 1]]}),
        frame(GOSSIP, {"updates": [[other, NOWHERE, {}, 1]]}),
        frame(PING, {"seq": 1, "updates": []}, reply_to="127.0.0.1:\u00b2"),
    ]
    bad_record = frame(RECORDS, {"origin": other, "after": 0, "through": 1,
                                 "records": [{"kind": []}], "more": False})
    before = mesh(a)
    try:
        with Peer(a) as p:
            for rnd in range(3):
                for f in [*poison, bad_record]:
                    p.raw(f)
                p.send(PING, {"seq": 100 + rnd, "updates": [], "node": a.node_id},
                       reply_to=box.address)
        acks = box.frames(lambda f: f[1] == ACK and f[4]["seq"] >= 100, 3, timeout=10)
        assert sorted(f[4]["seq"] for f in acks) == [100, 101, 102]
    finally:
        box.close()
    t0, r0 = before["transport"]["counters"], before["replication"]["counters"]

    def delta(part: str, name: str) -> int:
        now = mesh(a)[part]["counters"]
        return now.get(name, 0) - (t0 if part == "transport" else r0).get(name, 0)

    eventually(lambda: delta("transport", "frames_in") >= 3 * (len(poison) + 2), timeout=10,
               message="every frame received")
    c = mesh(a)["transport"]["counters"]
    assert c["frames_in"] == c.get("frames_handled", 0) + c.get("frames_dropped", 0), c
    assert delta("transport", "frames_dropped") == 3 * len(poison), c
    assert delta("replication", "dropped.invalid_record") == 3
    assert c.get("dropped.decode_error", 0) == 0 and c.get("dropped.handler_error", 0) == 0
    assert a.alive()
