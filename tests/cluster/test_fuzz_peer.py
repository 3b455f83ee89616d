"""Fuzzing the peer port of a real daemon that has an honest peer.

Frames are made from the protocol's own shapes (every frame type, member updates,
replicated records, routed items) and then broken: fields swapped for values of any
msgpack type, keys dropped or added, numbers at and beyond their limits, bytes cut or
flipped, and some plain garbage. They name invented nodes and origins, and sometimes the
two real ones. Throughout, a local client keeps writing and reading; afterwards the daemon
must have counted every frame (as handled or dropped), kept its memory bounded, its
database intact, and must still converge with the honest peer.

Records are forged only in invented origins' names (and ours, which the daemon refuses):
without a cluster key a record in a real node's name, at a version it has not made yet,
takes that version's place (records carry no signature), which is impersonation, not a
malformed frame. Claims in the honest node's name (a batch's range) are fuzzed.

10,000 frames by default (CI); MESHD_FUZZ_FRAMES=100000 for a longer run, and
MESHD_FUZZ_SEED replays a run (the seed is printed).
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import zmq

from support.daemons import Daemon, eventually, wait_converged

FRAMES = int(os.environ.get("MESHD_FUZZ_FRAMES") or 10_000)
SEED = int(os.environ.get("MESHD_FUZZ_SEED") or random.randrange(2**32))
#: Drops counted on the send side; every other `dropped.*` is a frame received.
SEND_SIDE = {"unencodable", "too_large_out", "peer_queue_full", "send_error", "bad_address",
             "connect_rate", "no_socket"}
EDGE_INTS = [0, 1, -1, 2**31, 2**62, 2**62 + 1, 2**63 - 1, 2**64 - 1, -(2**63)]


class Fuzzer:
    def __init__(self, rng: random.Random, victim: Daemon, honest: Daemon) -> None:
        self.rng = rng
        fakes = [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(12)]
        self.nodes = fakes + [victim.node_id, honest.node_id]
        self.origins = fakes[:6] + [victim.node_id, honest.node_id]
        self.addrs = [f"127.0.0.97:{20000 + i}" for i in range(40)] + [str(honest.peer_address)]
        self.now_ms = int(time.time() * 1000)
        self.honest = honest.node_id

    # --- values -----------------------------------------------------------------------------

    def junk(self, depth: int = 0) -> Any:
        r = self.rng
        kind = r.randrange(10 if depth < 3 else 7)
        if kind == 0:
            return r.choice(EDGE_INTS)
        if kind == 1:
            return r.randint(-1000, 1000)
        if kind == 2:
            return r.choice([0.5, -1.0, 1e308, float("inf"), float("nan")])
        if kind == 3:
            return r.choice(["", "x", "\x00", "127.0.0.1:\u00b2", "a:b:c", "h:99999", "١:1",
                             " :1", "*:5", "y" * 300, r.choice(self.nodes)])
        if kind == 4:
            return r.randbytes(r.randrange(8))
        if kind == 5:
            return r.choice([True, False])
        if kind == 6:
            return None
        if kind == 7:
            return [self.junk(depth + 1) for _ in range(r.randrange(4))]
        if kind == 8:
            return {str(self.junk(depth + 1))[:10]: self.junk(depth + 1)
                    for _ in range(r.randrange(4))}
        return self.update()

    def num(self, lo: int = 0, hi: int = 1000) -> Any:
        return self.rng.randint(lo, hi) if self.rng.random() < 0.97 else self.rng.choice(EDGE_INTS)

    def update(self) -> list[Any]:
        r = self.rng
        inc = r.choice([0, 1, self.now_ms, self.now_ms + r.randrange(10**9), 2**40, 2**62])
        return [r.choice(self.nodes), r.choice(self.addrs), r.randrange(4), inc]

    def record(self, origin: str, version: int) -> dict[str, Any]:
        r = self.rng
        stamp = {"origin": origin, "version": version,
                 "hlc": (self.now_ms + r.choice([0, -5000, 10**8])) << 16}
        kind = r.choice(["entry", "deletion", "session"])
        if kind == "entry":
            return {"kind": kind, "entry_id": f"fz-{r.randrange(500)}",
                    "key": f"fz-{r.randrange(50)}", "type": "fact", "value": self.junk(),
                    "session_id": "fz", "timestamp": "t", "ttl": r.choice([None, 1, 60]),
                    "tags": [], "metadata": {}, **stamp}
        if kind == "deletion":
            return {"kind": kind, "key": f"fz-{r.randrange(50)}", "session_id": None, **stamp}
        return {"kind": kind, "session_id": f"fz-s{r.randrange(20)}", "agent_name": "F",
                "agent_type": "fuzz", "status": "active", "started_at": "t", "last_ping": 1.0,
                "human_user": None, "location": None, "capabilities": [],
                "current_task": None, "metadata": {}, "host": r.choice(self.nodes),
                "deleted": r.random() < 0.2, **stamp}

    # --- frames ----------------------------------------------------------------------------

    def body(self, ftype: int) -> dict[str, Any]:
        r = self.rng
        updates = [self.update() for _ in range(r.randrange(6))]
        origin = r.choice(self.origins)
        after = min(self.num(0, 40), 2**63)
        through = min(2**64 - 1, after + r.choice([0, 1, 5, 30, 999_999_999, 10**12]))
        if ftype in (1, 2):
            return {"seq": self.num(), "updates": updates, "node": r.choice(self.nodes)}
        if ftype == 3:
            return {"seq": self.num(), "target": r.choice(self.nodes),
                    "target_addr": r.choice(self.addrs)}
        if ftype == 4:
            return {"updates": updates}
        if ftype == 5:
            return {"digest": {o: self.num(0, 10**6) for o in r.sample(self.origins, 3)},
                    "members": [self.update() for _ in range(r.randrange(60))],
                    "reply": r.random() < 0.5}
        if ftype == 6:
            recs = [self.record(origin, r.randint(after + 1, max(after + 1, min(through,
                                                                             after + 30))))
                    for _ in range(0 if origin == self.honest else r.randrange(8))]
            return {"origin": origin, "after": after, "through": through, "records": recs,
                    "more": r.random() < 0.3}
        if ftype == 7:
            return {"origin": origin, "after": after}
        if ftype == 8:
            msg = {"message_id": f"fz-m{r.randrange(10**6)}", "type": "request",
                   "from_session": "fz", "to_session": f"fz-s{r.randrange(20)}",
                   "subject": "s", "body": "b", "data": {}, "timestamp": "t",
                   "in_reply_to": None, "origin": r.choice(self.nodes), "hlc": self.now_ms << 16}
            return {"lane": r.randrange(2), "first": self.num(1, 50),
                    "items": [[self.num(1, 50), r.choice(["msg", "read", "fwd", "x"]),
                               msg if r.random() < 0.7 else "fz-m1"]
                              for _ in range(r.randrange(4))]}
        return {"lane": r.randrange(2), "through": self.num()}

    def mutate(self, v: Any, depth: int = 0) -> Any:
        """`v` with one thing somewhere in it broken."""
        r = self.rng
        if depth > 4 or not isinstance(v, (list, dict)) or not v or (depth and r.random() < 0.25):
            return self.junk()
        if isinstance(v, list):
            v = list(v)
            # (a frame's own fields break less often than its body: more of it to break)
            i = 4 if depth == 0 and len(v) == 5 and r.random() < 0.7 else r.randrange(len(v))
            v[i] = self.mutate(v[i], depth + 1)
            return v
        v = dict(v)
        k = r.choice(list(v))
        choice = r.random()
        if choice < 0.15:
            del v[k]
        elif choice < 0.25:
            v[str(self.junk())[:12]] = self.junk()
        else:
            v[k] = self.mutate(v[k], depth + 1)
        return v

    def frame(self) -> bytes:
        r = self.rng
        if r.random() < 0.03:
            return r.randbytes(r.randrange(1, 200))
        ftype = r.randint(1, 9)
        msg: Any = [1, ftype, r.choice(self.nodes), r.choice(self.addrs), self.body(ftype)]
        if r.random() < 0.5:
            msg = self.mutate(msg)
        data = msgpack.packb(msg)
        if r.random() < 0.03:
            cut = r.randrange(len(data))
            data = data[:cut] + bytes([r.randrange(256)]) + data[cut + 1:]
        return data


def counters(d: Daemon) -> dict[str, int]:
    return d.registry(timeout=10).node_info()["mesh"]["transport"]["counters"]


def rss_mib(d: Daemon) -> float:
    pages = int(Path(f"/proc/{d.pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_the_peer_port_survives_a_fuzz(make_cluster):
    print(f"MESHD_FUZZ_SEED={SEED} MESHD_FUZZ_FRAMES={FRAMES}")
    victim, honest = make_cluster(2)
    wait_converged([victim, honest])
    victim.memory().set("s", "before", 1)
    eventually(lambda: honest.memory().get("before") == 1, timeout=15, message="replicated")
    rss_before = rss_mib(victim)
    received_before = counters(victim).get("frames_in", 0)

    latencies: list[float] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def client() -> None:                       # the daemon's own user, meanwhile
        mem = victim.memory(timeout=10)
        try:
            for i in range(1_000_000):
                if done.is_set():
                    return
                t0 = time.monotonic()
                mem.set("s", "client", i)
                assert mem.get("client") == i
                latencies.append(time.monotonic() - t0)
        except BaseException as exc:            # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    fuzz = Fuzzer(random.Random(SEED), victim, honest)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.setsockopt(zmq.SNDTIMEO, 10_000)
    try:
        sock.connect(f"tcp://{victim.peer_address}")
        started = time.monotonic()
        for _ in range(FRAMES):
            sock.send(fuzz.frame())
        eventually(lambda: counters(victim).get("frames_in", 0) >= received_before + FRAMES,
                   timeout=60 + FRAMES / 500, interval=0.2, message="every frame received")
        took = time.monotonic() - started
    finally:
        sock.close()
        ctx.term()
        done.set()
        thread.join(15)
    assert not thread.is_alive() and not errors, errors
    assert victim.alive(), victim.log()

    # The local client was served as usual throughout.
    latencies.sort()
    assert len(latencies) >= 10
    median, worst = latencies[len(latencies) // 2], latencies[-1]
    print(f"{FRAMES} frames in {took:.1f}s; {len(latencies)} client calls meanwhile, "
          f"median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    assert median < 0.1 and worst < 3.0, f"client calls: median {median:.3f}s, max {worst:.3f}s"

    # Every frame received was handled or dropped, and every drop has its reason.
    c = counters(victim)
    assert c["frames_in"] == c.get("frames_handled", 0) + c.get("frames_dropped", 0), c
    reasons = sum(v for k, v in c.items()
                  if k.startswith("dropped.") and k[8:] not in SEND_SIDE)
    assert reasons == c.get("frames_dropped", 0), c
    assert c.get("dropped.decode_error", 0) == 0 and c.get("dropped.handler_error", 0) == 0, c
    mesh = victim.registry(timeout=10).node_info()["mesh"]
    assert mesh["members"] <= 512 and mesh["membership"]["candidates"] <= 64
    assert mesh["transport"]["connections"] <= 64 + mesh["members"]
    rss_after = rss_mib(victim)
    print(f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    assert rss_after - rss_before < 60, f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"

    # The honest peer still converges with it, both ways.
    wait_converged([victim, honest], timeout=30)
    victim.memory().set("s", "after-v", 1)
    honest.memory().set("s", "after-h", 2)
    for d in (victim, honest):
        eventually(lambda d=d: d.memory().get("after-v") == 1 and d.memory().get("after-h") == 2,
                   timeout=30, message=f"writes after the fuzz on {d.peer_address}")

    assert victim.stop() == 0
    db = sqlite3.connect(Path(victim.data_dir) / "meshd.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()
