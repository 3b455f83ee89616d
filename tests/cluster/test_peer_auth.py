"""The cluster key (`--key-file`): only peers holding it get in, and peer traffic is
CurveZMQ-encrypted. Real daemons, real keys written by `meshd --gen-key`, and raw pyzmq
peers (plaintext, wrong key, right key) standing in for hosts on the LAN."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.utils.monitor

from support.daemons import CHILD_CWD, Daemon, eventually, peer_states, subprocess_env, \
    wait_converged
from meshd.mesh.security import load_key

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE")


def gen_key(path: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "meshd", "--gen-key", str(path)],
                         capture_output=True, text=True, timeout=30, env=subprocess_env(),
                         cwd=CHILD_CWD)
    assert out.returncode == 0, out.stderr
    return path.read_text().strip()


def security(d: Daemon) -> dict[str, Any]:
    mesh = d.registry(timeout=5).node_info()["mesh"]
    return {**mesh["transport"]["security"], "auth": mesh.get("auth") or {}}


def test_gen_key_writes_a_private_key_and_never_overwrites(short_tmp: Path) -> None:
    path = short_tmp / "cluster.key"
    secret = gen_key(path)
    assert len(secret) == 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key, readable = load_key(str(path))
    assert not readable and len(key.fingerprint) == 16
    again = subprocess.run([sys.executable, "-m", "meshd", "--gen-key", str(path)],
                           capture_output=True, text=True, timeout=30, env=subprocess_env(),
                           cwd=CHILD_CWD)
    assert again.returncode != 0 and "not overwriting" in again.stderr
    assert path.read_text().strip() == secret
    os.chmod(path, 0o640)                   # the socket's group must not read it: warned
    assert load_key(str(path))[1]


@pytest.mark.parametrize("content, expect", [
    ("short\n", "40 Z85 characters"),
    ("~" * 40 + "\n", "not a Z85-encoded key"),
    ("Q" * 39 + "\u00e9\n", "not a Z85-encoded key"),     # not silently another key
    (None, "cannot read the cluster key file"),
    ("", "file name is empty"),                             # MESHD_KEY_FILE= : not "no key"
])
def test_a_bad_key_file_stops_the_daemon_with_a_clear_error(short_tmp: Path, content: str | None,
                                                            expect: str) -> None:
    path = short_tmp / "bad.key"
    if content:
        path.write_text(content, encoding="utf-8")
    env = subprocess_env(MESHD_KEY_FILE="" if content == "" else str(path))
    out = subprocess.run([sys.executable, "-m", "meshd", "--socket", str(short_tmp / "x.sock"),
                          "--data-dir", str(short_tmp / "x-data"), "--bind", "127.0.0.1:0",
                          "--no-discovery"],
                         capture_output=True, text=True, timeout=30, env=env, cwd=CHILD_CWD)
    assert out.returncode != 0
    assert expect in out.stderr and "--key-file" in out.stderr, out.stderr
    if content:
        assert content.strip() not in out.stderr            # a secret is never echoed
    assert not (short_tmp / "x.sock").exists()


def test_members_with_the_key_talk_and_others_stay_out(make_daemon, short_tmp: Path) -> None:
    key_a, key_b = short_tmp / "a.key", short_tmp / "b.key"
    gen_key(key_a)
    gen_key(key_b)
    n0 = make_daemon("n0", args=["--bind", "127.0.0.50:0", "--key-file", str(key_a)])
    n1 = make_daemon("n1", args=["--bind", "127.0.0.51:0", "--key-file", str(key_a),
                                 "--join", n0.peer_address])
    wait_converged([n0, n1])
    sec = security(n0)
    assert sec["mode"] == "curve" and sec["key"] == load_key(str(key_a))[0].fingerprint
    assert sec["auth"].get("accepted", 0) >= 1

    # Everything works through the encrypted transport: replication and routing.
    n1.registry().register("bob", "bob", "claude")
    n0.registry().register("alice", "alice", "claude")
    eventually(lambda: n0.registry().get("bob") is not None, timeout=15,
               message="bob's session replicated to n0")
    n0.hub().send("alice", "bob", "request", "hi", "over CURVE")
    eventually(lambda: [m.body for m in n1.hub().get_messages("bob")] == ["over CURVE"],
               timeout=15, message="message routed to bob")

    # A daemon with another key, and one with none, knock at n0 and never get in.
    stranger = make_daemon("n2", args=["--bind", "127.0.0.52:0", "--key-file", str(key_b),
                                       "--join", n0.peer_address])
    plain = make_daemon("n3", args=["--bind", "127.0.0.53:0", "--join", n0.peer_address])
    stranger.registry().register("mallory", "m", "custom")
    plain.registry().register("eve", "e", "custom")
    # Their joins are retried with backoff: wait until n0 refused them a few times.
    eventually(lambda: security(n0)["auth"].get("handshake_failed", 0) >= 4, timeout=20,
               message="n0 refusing the strangers' handshakes")
    members = {n1.node_id}
    for d in (n0, n1):
        assert set(peer_states(d)) == members - {d.node_id} | ({n0.node_id} - {d.node_id})
        sessions = {s.session_id for s in d.registry().list_sessions(include_offline=True)}
        assert sessions == {"alice", "bob"}, sessions
    for d in (stranger, plain):
        assert not [s for s in peer_states(d).values() if s == "alive"]
        assert {s.session_id for s in d.registry().list_sessions(include_offline=True)} <= {"mallory", "eve"}
    assert security(plain)["mode"] == "none"


class RawPeer:
    """A raw pyzmq DEALER to a daemon's peer port, with a socket monitor to see how its
    handshakes end."""

    def __init__(self, ctx: zmq.Context, address: str, key: Any = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 50)
        if key is not None:
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, key[0])
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, key[1])
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, key[2])
        self.monitor = self.sock.get_monitor_socket()
        self.sock.connect(f"tcp://{address}")
        self.events: list[int] = []

    def handshake_failures(self) -> int:
        while self.monitor.poll(0):
            self.events.append(zmq.utils.monitor.recv_monitor_message(self.monitor)["event"])
        failed = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                  zmq.EVENT_HANDSHAKE_FAILED_AUTH}
        return sum(1 for e in self.events if e in failed)

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


def test_frames_without_the_key_never_reach_the_daemon(make_daemon, short_tmp: Path) -> None:
    key_path, other_path = short_tmp / "a.key", short_tmp / "b.key"
    gen_key(key_path)
    gen_key(other_path)
    key, other = load_key(str(key_path))[0], load_key(str(other_path))[0]
    d = make_daemon("victim", args=["--bind", "127.0.0.54:0", "--key-file", str(key_path)])
    origin = "a" * 32
    now_hlc = int(time.time() * 1000) << 16

    def inject(value: str, version: int) -> bytes:
        """A well-formed RECORDS frame that sets memory key `value` (from a made-up node)."""
        entry = {"kind": "entry", "entry_id": f"inj-{version}", "key": value, "type": "fact",
                 "value": value, "session_id": "x", "timestamp": "t", "ttl": None, "tags": [],
                 "metadata": {}, "origin": origin, "version": version, "hlc": now_hlc + version}
        body = {"origin": origin, "after": version - 1, "through": version,
                "records": [entry], "more": False}
        return msgpack.packb([1, 6, "f" * 32, "127.0.0.55:9", body])

    ctx = zmq.Context()
    peers = [RawPeer(ctx, d.peer_address),                                     # plaintext
             RawPeer(ctx, d.peer_address, (key.public, other.public, other.secret)),  # wrong key
             RawPeer(ctx, d.peer_address, (other.public, other.public, other.secret))]  # wrong server
    try:
        for p in peers:
            p.sock.send(inject("evil", 1), zmq.NOBLOCK)     # queued until a handshake passes
        # (Each is refused at its first handshake; libzmq retries some, gives up on others.)
        try:
            eventually(lambda: all(p.handshake_failures() >= 1 for p in peers),
                       timeout=15, message="every keyless peer's handshake failing")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; monitor events (last 8 per peer): "
                                 f"{[p.events[-8:] for p in peers]}") from None
        assert d.memory().get("evil") is None
        assert d.alive()
        counters = d.registry(timeout=5).node_info()["mesh"]["transport"]["counters"]
        assert counters.get("frames_in", 0) == 0, counters
        auth = security(d)["auth"]
        assert auth.get("denied", 0) == 1, auth                   # the wrong client key
        assert auth.get("handshake_failed", 0) >= 3, auth         # all three

        # The same frame from a peer holding the key gets in: the frame was never the problem.
        good = RawPeer(ctx, d.peer_address, (key.public, key.public, key.secret))
        peers.append(good)
        good.sock.send(inject("good", 1), zmq.NOBLOCK)
        eventually(lambda: d.memory().get("good") == "good", timeout=15,
                   message="the keyed peer's record applied")
        assert d.memory().get("evil") is None
    finally:
        for p in peers:
            p.close()
        ctx.term()
