"""Peer transport: one ROUTER bound on the peer address for what comes in, one DEALER per
peer address for what goes out, all driven by the daemon's event loop.

Nothing here ever waits on a peer: every send is non-blocking into a bounded queue
(`peer_queue` frames per peer); when that queue is full (a slow or dead peer) the frame is
dropped and counted, and the protocols above recover (probes time out, anti-entropy
re-ships records). Incoming frames are size-checked by ZeroMQ and again by the decoder;
bad ones are dropped and counted, never answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any, Callable

import zmq

from meshd.config import Config
from meshd.errors import MeshError
from meshd.mesh.security import ClusterKey, curve_client, curve_server
from meshd.wire.peer import FrameType, decode, encode, frame_limit, parse_address

log = logging.getLogger("meshd.mesh")

_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)

#: s of frame handling per loop turn at most; then other callbacks get their turn.
DRAIN_BUDGET = 0.005

#: (type, sender node id, sender's reply address, validated body)
Handler = Callable[[FrameType, str, str, dict[str, Any]], None]


class Transport:
    def __init__(self, config: Config, ctx: zmq.Context, node_id: str, handler: Handler,
                 key: ClusterKey | None = None) -> None:
        self.config = config
        self.key = key                        # None: plaintext, unauthenticated peers
        self.node_id = node_id
        self.handler = handler
        self.counters: Counter[str] = Counter()
        self.address = ""                     # "host:port" peers reach us on
        self.bound = ""                       # the endpoint actually bound
        self._ctx = ctx
        self._router: zmq.Socket | None = None
        self._peers: dict[str, zmq.Socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._frame_limit = frame_limit(config.max_frame_bytes)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        host, port = parse_address(self.config.bind)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.config.peer_queue * 16)
        sock.setsockopt(zmq.MAXMSGSIZE, frame_limit(self.config.max_frame_bytes) + 4096)
        endpoint = f"tcp://{'[' + host + ']' if ':' in host else host}:{port or '*'}"
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        if self.key is not None:
            curve_server(sock, self.key)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise MeshError(f"cannot listen for peers on {self.config.bind}: {exc}") from exc
        self.bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        real_port = int(self.bound.rsplit(":", 1)[1])
        adv = self.config.advertise
        if adv:
            ahost, aport = parse_address(adv, real_port)
            self.address = f"{ahost}:{aport or real_port}"
        else:
            self.address = f"{advertise_host(host)}:{real_port}"
        self._router = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain)
        self._wake()
        log.info("listening for peers on %s (advertised as %s)", self.bound, self.address)

    @property
    def socket(self) -> zmq.Socket | None:
        """The peer ROUTER (for the authenticator's handshake monitor)."""
        return self._router

    def stop(self, linger_ms: int = 0) -> None:
        """Close everything; with `linger_ms`, frames still queued (a leave announcement)
        get that long to go out."""
        for sock in self._peers.values():
            sock.close(linger_ms)
        self._peers.clear()
        if self._router is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._router.getsockopt(zmq.FD))
            self._router.close(0)
            self._router = None

    # --- sending ---------------------------------------------------------------------------

    def send(self, addr: str, ftype: FrameType, body: dict[str, Any]) -> bool:
        """Queue one frame for `addr`; False (and counted) when it had to be dropped."""
        try:
            frame = encode(ftype, self.node_id, self.address, body)
        except MeshError as exc:
            self.counters["dropped.unencodable"] += 1
            log.warning("cannot encode a %s frame: %s", ftype.name, exc)
            return False
        return self.send_frame(addr, frame)

    def send_frame(self, addr: str, frame: bytes) -> bool:
        if len(frame) > frame_limit(self.config.max_frame_bytes):
            self.counters["dropped.too_large_out"] += 1
            return False
        sock = self._peers.get(addr)
        if sock is None:
            sock = self._connect(addr)
            if sock is None:
                return False
        try:
            sock.send(frame, _NOBLOCK)
        except zmq.Again:
            self.counters["dropped.peer_queue_full"] += 1
            return False
        except zmq.ZMQError as exc:
            self.counters["dropped.send_error"] += 1
            log.debug("send to %s failed: %s", addr, exc)
            return False
        self.counters["frames_out"] += 1
        return True

    def _connect(self, addr: str) -> zmq.Socket | None:
        try:
            host, port = parse_address(addr)
        except MeshError:
            self.counters["dropped.bad_address"] += 1
            return None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.peer_queue)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self.key is not None:
            curve_client(sock, self.key)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
            host = f"[{host}]"
        try:
            sock.connect(f"tcp://{host}:{port}")
        except zmq.ZMQError as exc:
            sock.close(0)
            self.counters["dropped.bad_address"] += 1
            log.warning("cannot connect to peer %s: %s", addr, exc)
            return None
        self._peers[addr] = sock
        return sock

    def forget(self, addr: str) -> None:
        """Close the queue to a peer that is gone (frees whatever waited for it)."""
        sock = self._peers.pop(addr, None)
        if sock is not None:
            sock.close(0)

    # --- receiving -------------------------------------------------------------------------

    def _wake(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self._router
        n = 0
        # Bounded in count and in time: merging a chunk of records takes ~20 ms, and a
        # node catching up always has the next chunk waiting, so without a time budget
        # its own clients (and probes) would wait for the whole catch-up.
        until = time.monotonic() + DRAIN_BUDGET
        while (sock is not None and n < 512 and sock.get(_EVENTS) & _POLLIN
               and (n == 0 or time.monotonic() < until)):
            try:
                parts = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                log.warning("peer receive failed: %s", exc)
                break
            n += 1
            self.counters["frames_in"] += 1
            if len(parts) != 2:
                self.counters["dropped.bad_frame"] += 1
                continue
            try:
                ftype, sender, reply_to, body = decode(parts[1], self._frame_limit)
            except MeshError as exc:
                self.counters[f"dropped.{exc.code}"] += 1
                continue
            if sender == self.node_id:
                self.counters["dropped.from_self"] += 1
                continue
            try:
                self.handler(ftype, sender, reply_to, body)
            except Exception:                     # one bad frame must never stop the loop
                self.counters["dropped.handler_error"] += 1
                log.exception("handling a %s frame from %s failed", ftype.name, sender)
            sock = self._router
        if sock is not None and sock.get(_EVENTS) & _POLLIN:
            self._wake()

    def stats(self) -> dict[str, Any]:
        return {"address": self.address, "bound": self.bound, "counters": dict(self.counters),
                "connections": len(self._peers),
                "security": ({"mode": "curve", "key": self.key.fingerprint}
                             if self.key is not None else {"mode": "none"})}


def advertise_host(bind_host: str) -> str:
    """The host to tell peers when bound to a wildcard: this host's primary address."""
    if bind_host not in ("0.0.0.0", "::", "*", ""):
        return bind_host
    import socket
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))     # no packet is sent: this only picks a route
            return str(s.getsockname()[0])
    except OSError:
        pass
    # No route out (a LAN without a default gateway): the first non-loopback address.
    import ifaddr                                 # comes with zeroconf
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and not str(ip.ip).startswith(("127.", "169.254.")):
                return str(ip.ip)
    return "127.0.0.1"
