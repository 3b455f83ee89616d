"""The cluster key: one shared secret that authenticates and encrypts all peer traffic,
and the ZeroMQ authentication (ZAP) handler that enforces it.

A key file holds one CurveZMQ secret key, 40 Z85 characters on one line (`meshd
--gen-key FILE` writes a new one). Every daemon of a cluster is given the same file; each
derives the same long-term key pair from it and uses it on both ends of every peer
connection, and the daemon's authentication handler lets a peer in only if it proved,
in the CURVE handshake, that it holds that secret. So a host without the key can neither
read the traffic nor put a frame in, and anyone with the key is a full member (as with
Serf's or Consul's gossip key: the key is the membership, not a per-node identity).

The fingerprint (the first 16 hex digits of SHA-256 of the public key) names a key in
logs, `node.info` and mDNS announcements without revealing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import zmq
from zmq.utils import z85

from meshd.errors import InvalidArgument, MeshError
from meshd.mesh.drain import SocketDrain

log = logging.getLogger("meshd.mesh")

#: Where libzmq asks its authentication handler (RFC 27/ZAP), per context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_FAILED_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

KEY_CHARS = 40                 # Z85 text of a 32-byte Curve25519 secret key


@dataclass(frozen=True, slots=True)
class ClusterKey:
    secret: bytes = field(repr=False)     # Z85, 40 bytes
    public: bytes                          # Z85, 40 bytes
    fingerprint: str

    @property
    def public_raw(self) -> bytes:
        """The public key as the 32 bytes a ZAP request carries."""
        return z85.decode(self.public)


def parse_key(text: str, source: str = "key") -> ClusterKey:
    """A ClusterKey from the text of a key file; InvalidArgument says what is wrong."""
    if not zmq.has("curve"):
        raise InvalidArgument("this build of ZeroMQ has no CURVE support; a cluster key "
                              "cannot be used (install pyzmq's own wheel)")
    stripped = text.strip()
    if len(stripped) != KEY_CHARS:
        raise InvalidArgument(f"{source}: a cluster key is {KEY_CHARS} Z85 characters on one "
                              f"line (got {len(stripped)}); make one with `meshd --gen-key FILE`")
    # (The messages never quote the text: it is a secret, even when mistyped.)
    if not stripped.isascii() or not stripped.isprintable():
        raise InvalidArgument(f"{source}: not a Z85-encoded key (characters outside Z85)")
    secret = stripped.encode("ascii")
    try:
        raw = z85.decode(secret)
        public = zmq.curve_public(secret)
    except (ValueError, KeyError, TypeError, zmq.ZMQError):
        raise InvalidArgument(f"{source}: not a Z85-encoded key (characters outside Z85)") from None
    if len(raw) != 32:
        raise InvalidArgument(f"{source}: not a 32-byte key")
    return ClusterKey(secret, public, hashlib.sha256(public).hexdigest()[:16])


def load_key(path: str) -> tuple[ClusterKey, bool]:
    """The key in `path`, and whether users other than its owner may read the file (worth
    a warning: the group that may use the daemon's socket must not read the key)."""
    if not path or not path.strip():
        raise InvalidArgument("the cluster key file name is empty (unset it for no key)")
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            data = fh.read(4096)
    except OSError as exc:
        raise InvalidArgument(f"cannot read the cluster key file {path}: {exc.strerror}") from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{path}: not a Z85-encoded key (characters outside Z85)") from None
    return parse_key(text, path), bool(st.st_mode & (stat.S_IRGRP | stat.S_IROTH))


def generate_key_file(path: str) -> ClusterKey:
    """Write a new random key to `path` (mode 0600); never overwrites a file."""
    _public, secret = zmq.curve_keypair()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidArgument(f"{path} exists; not overwriting a key (remove it first)") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secret.decode("ascii") + "\n")
    return parse_key(secret.decode("ascii"), path)


class Authenticator:
    """Answers libzmq's ZAP requests on the daemon's loop: a CURVE client is let in when
    its long-term public key is the cluster's (so it holds the cluster secret), anything
    else is refused and counted. It must run before the peer socket binds: with no
    handler, libzmq would let any CURVE client in."""

    def __init__(self, ctx: zmq.Context, key: ClusterKey) -> None:
        self.key = key
        self.counters: Counter[str] = Counter()
        self._ctx = ctx
        self._sock: zmq.Socket | None = None
        self._allowed = key.public_raw
        self._last_denied_log = 0.0
        self._monitor: zmq.Socket | None = None
        self._drains: list[SocketDrain] = []

    def start(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise MeshError(f"cannot start peer authentication: {exc}") from exc
        self._sock = sock
        self._drain(sock, self._on_request, "peer authentication")

    def watch(self, sock: zmq.Socket) -> None:
        """Count the handshakes that fail on the peer socket: a host with another key (or
        none) never reaches the ZAP handler, its handshake fails before that."""
        self._monitor = sock.get_monitor_socket(_FAILED_EVENTS)
        self._drain(self._monitor, self._on_event, "handshake monitor")

    def _drain(self, sock: zmq.Socket, handle: Callable[[list[bytes]], None], name: str
               ) -> None:
        """Handle what `sock` has, a bounded batch per loop turn (see `SocketDrain`)."""
        drain = SocketDrain(sock, on_message=handle, max_count=256, name=name,
                            recv_log_level=logging.DEBUG)
        self._drains.append(drain)
        drain.start()

    def stop(self) -> None:
        for drain in self._drains:
            drain.stop()
        self._drains.clear()
        for sock in (self._monitor, self._sock):
            if sock is not None:
                sock.close(0)
        self._monitor = self._sock = None

    def _warn(self, what: str) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._last_denied_log > 10.0:    # one line per 10 s, not per attempt
            self._last_denied_log = now
            log.warning("refused a peer connection: %s", what)

    def _on_request(self, msg: list[bytes]) -> None:
        reply = self._answer(msg)
        if reply is not None and self._sock is not None:
            try:
                self._sock.send_multipart(reply, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("could not answer an authentication request: %s", exc)

    def _on_event(self, frames: list[bytes]) -> None:
        if len(frames) == 2 and len(frames[0]) == 6:
            if int.from_bytes(frames[0][:2], "little") & _FAILED_EVENTS:
                self.counters["handshake_failed"] += 1
                self._warn("a peer's handshake failed (another cluster key, or none)")

    def _answer(self, msg: list[bytes]) -> list[bytes] | None:
        # [routing id, b"", version, request id, domain, address, identity, mechanism,
        #  credentials...]
        if len(msg) < 8 or msg[1] != b"" or msg[2] != b"1.0":
            self.counters["bad_requests"] += 1
            return None if len(msg) < 4 else [msg[0], b"", b"1.0", msg[3], b"500",
                                              b"bad ZAP request", b"", b""]
        head, request_id, address, mechanism = msg[:2], msg[3], msg[5], msg[7]
        creds = msg[8:]
        if (mechanism == b"CURVE" and len(creds) == 1
                and hmac.compare_digest(creds[0], self._allowed)):
            self.counters["accepted"] += 1
            return [*head, b"1.0", request_id, b"200", b"OK", b"peer", b""]
        self.counters["denied"] += 1
        self._warn(f"{address.decode('ascii', 'replace') or '?'} presented another "
                   f"{mechanism.decode('ascii', 'replace')} key")
        return [*head, b"1.0", request_id, b"400", b"not the cluster key", b"", b""]


def curve_server(sock: zmq.Socket, key: ClusterKey) -> None:
    """Make `sock` (the peer ROUTER) accept only CURVE connections, authenticated by ZAP."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, key.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, key.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"meshd")
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)   # no handler: refuse, never admit
    except (AttributeError, zmq.ZMQError):           # (a libzmq without the option)
        pass


def curve_client(sock: zmq.Socket, key: ClusterKey) -> None:
    """Make `sock` (a DEALER to a peer) prove it holds the cluster key and encrypt."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, key.public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, key.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, key.secret)
