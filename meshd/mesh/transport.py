"""Peer transport: one ROUTER bound on the peer address for what comes in, one DEALER per
peer address for what goes out, all driven by the daemon's event loop.

Nothing here ever waits on a peer: every send is non-blocking into a bounded queue
(`peer_queue` frames per peer); when that queue is full (a slow or dead peer) the frame is
dropped and counted, and the protocols above recover (probes time out, anti-entropy
re-ships records). Incoming frames are size-checked by ZeroMQ and again by the decoder;
bad ones are dropped and counted, never answered: every frame received is counted once
as `frames_handled` or as `frames_dropped` (and under its `dropped.<reason>`), whatever
it holds.

Frames name addresses (`reply_to`, a PING_REQ's target) and anyone who reaches the port
can send them, so only the connections to members that are up (`pin`) are kept for good.
Any other address gets a *transient* connection with a short queue: at most
`transient_max` of them, the least recently used closed to make room, each closed after
`transient_idle` without a frame, and at most `transient_rate` new ones a second. A
flood of frames naming addresses thus costs a bounded number of sockets and connection
attempts, and a real peer joining meanwhile still gets its answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from typing import Any, Callable, Iterable

import zmq

from meshd.config import Config
from meshd.errors import MeshError
from meshd.mesh.drain import SocketDrain
from meshd.mesh.security import ClusterKey, curve_client, curve_server
from meshd.wire.peer import FrameType, decode, encode, frame_limit, parse_address

log = logging.getLogger("meshd.mesh")

_NOBLOCK = int(zmq.NOBLOCK)

#: s of frame handling per loop turn at most; then other callbacks get their turn.
DRAIN_BUDGET = 0.005
#: ms a transient connection that became a member's keeps to send what it queued.
UPGRADE_LINGER_MS = 1000

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
        self._pinned: frozenset[str] = frozenset()        # up members' addresses
        self._transient: OrderedDict[str, float] = OrderedDict()   # the others: last use,
        self._tokens = float(config.transient_max)                  # least recent first
        self._tokens_at = time.monotonic()
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: SocketDrain | None = None
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
        # Bounded in count and in time: merging a chunk of records takes ~20 ms, and a
        # node catching up always has the next chunk waiting, so without a time budget
        # its own clients (and probes) would wait for the whole catch-up.
        self._drain = SocketDrain(sock, on_message=self._receive, max_count=512,
                                  budget=DRAIN_BUDGET, name="peer")
        self._drain.start()
        self._sweeper = self._loop.call_later(self._sweep_every(), self._sweep)
        log.info("listening for peers on %s (advertised as %s)", self.bound, self.address)

    @property
    def socket(self) -> zmq.Socket | None:
        """The peer ROUTER (for the authenticator's handshake monitor)."""
        return self._router

    def stop(self, linger_ms: int = 0) -> None:
        """Close everything; with `linger_ms`, frames still queued (a leave announcement)
        get that long to go out."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for sock in self._peers.values():
            sock.close(linger_ms)
        self._peers.clear()
        self._transient.clear()
        if self._drain is not None:
            self._drain.stop()
            self._drain = None
        if self._router is not None:
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
        elif addr in self._transient:
            self._transient[addr] = time.monotonic()
            self._transient.move_to_end(addr)
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
        transient = addr not in self._pinned
        if transient and not self._admit_transient():
            return None
        try:
            sock = self._ctx.socket(zmq.DEALER)
        except zmq.ZMQError as exc:                # out of sockets or descriptors
            self.counters["dropped.no_socket"] += 1
            log.warning("cannot open a connection to %s: %s", addr, exc)
            return None
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.transient_queue if transient
                        else self.config.peer_queue)
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
        if transient:
            self._transient[addr] = time.monotonic()
        return sock

    def forget(self, addr: str, linger_ms: int = 0) -> None:
        """Close the queue to a peer that is gone (frees whatever waited for it)."""
        self._transient.pop(addr, None)
        sock = self._peers.pop(addr, None)
        if sock is not None:
            sock.close(linger_ms)

    # --- which connections are kept ------------------------------------------------------

    def pin(self, addresses: Iterable[str]) -> None:
        """Set the addresses of the members that are up: their connections are kept, with
        the full queue; every other connection is transient (see the module docstring)."""
        pinned = frozenset(addresses)
        for addr in pinned & self._transient.keys():
            # Opened for a node that was not a member yet (its join, our ping to it), with
            # a short queue: it gets a moment to send what it holds, and the next frame
            # opens a connection with the full queue.
            self.forget(addr, UPGRADE_LINGER_MS)
        now = time.monotonic()
        for addr in self._pinned - pinned:
            if addr in self._peers and addr not in self._transient:
                self._transient[addr] = now       # no longer a member's: expires when idle
        self._pinned = pinned
        while len(self._transient) > self.config.transient_max:
            self._evict_oldest()

    def pinned(self, addr: str) -> bool:
        """Whether `addr` is the address of a member that is up."""
        return addr in self._pinned

    def _admit_transient(self) -> bool:
        """Room and budget for one more transient connection (a token bucket refilled at
        `transient_rate`, holding `transient_max`); the least recently used one goes."""
        cfg = self.config
        now = time.monotonic()
        self._tokens = min(float(cfg.transient_max),
                           self._tokens + (now - self._tokens_at) * cfg.transient_rate)
        self._tokens_at = now
        if self._tokens < 1.0:
            self.counters["dropped.connect_rate"] += 1
            return False
        self._tokens -= 1.0
        while self._transient and len(self._transient) >= cfg.transient_max:
            self._evict_oldest()
        return True

    def _evict_oldest(self) -> None:
        addr = next(iter(self._transient))
        self.forget(addr)
        self.counters["transient_evicted"] += 1

    def _sweep_every(self) -> float:
        return max(0.1, self.config.transient_idle / 4)

    def _sweep(self) -> None:
        """Close the transient connections idle for `transient_idle` (a reply sent to an
        address nobody listens on would otherwise be retried for ever)."""
        now = time.monotonic()
        while self._transient:
            addr, used = next(iter(self._transient.items()))
            if now - used < self.config.transient_idle:
                break
            self.forget(addr)
            self.counters["transient_expired"] += 1
        if self._loop is not None and not self._loop.is_closed():
            self._sweeper = self._loop.call_later(self._sweep_every(), self._sweep)

    # --- receiving -------------------------------------------------------------------------

    def _receive(self, parts: list[bytes]) -> None:
        """One message off the ROUTER (read by `SocketDrain`)."""
        if len(parts) != 2:
            self.counters["frames_in"] += 1
            drop(self.counters, "bad_frame")
            return
        hand_frame(parts[1], self._frame_limit, self.node_id, self.handler, self.counters,
                   _log_handler_error)

    def stats(self) -> dict[str, Any]:
        return {"address": self.address, "bound": self.bound, "counters": dict(self.counters),
                "connections": len(self._peers), "transient": len(self._transient),
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


#: A decoded peer frame: (type, sender node id, reply-to address, body).
Decoded = tuple[FrameType, str, str, dict[str, Any]]


def drop(counters: Counter[str], reason: str) -> None:
    counters[f"dropped.{reason}"] += 1
    counters["frames_dropped"] += 1


def _log_handler_error(exc: Exception, ftype: FrameType, sender: str) -> None:
    log.error("handling a %s frame from %s failed", ftype.name, sender, exc_info=exc)


def hand_frame(payload: bytes | Decoded, limit: int, node_id: str, handler: Handler,
               counters: Counter[str], failed: Callable[[Exception, FrameType, str], None]
               ) -> None:
    """Decode a peer frame, check it and hand it to `handler`: the one receive path of the
    real transport and of the fake network (`fakenet`), which may pass a frame already
    decoded. Every failure is counted here, so a frame costs only itself."""
    counters["frames_in"] += 1
    if isinstance(payload, tuple):
        ftype, sender, reply_to, body = payload
    else:
        try:
            ftype, sender, reply_to, body = decode(payload, limit)
        except MeshError as exc:
            drop(counters, exc.code)
            return
        except Exception:                         # a checker's bug costs one frame only
            drop(counters, "decode_error")
            log.debug("a peer frame failed to decode", exc_info=True)
            return
    if sender == node_id:
        drop(counters, "from_self")
        return
    try:
        handler(ftype, sender, reply_to, body)
    except Exception as exc:                      # one bad frame must never stop the loop
        drop(counters, "handler_error")
        failed(exc, ftype, sender)
    else:
        counters["frames_handled"] += 1
