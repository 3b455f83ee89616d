"""Why a seed stays silent, as ZeroMQ's handshake sees it.

A `--join` target that never answers could be down, unreachable, not a meshd, or a meshd
with another cluster key: with CurveZMQ a key mismatch looks like silence to the frames we
send. A probe opens one extra connection to the seed, with this node's own security, and
reads the socket monitor's events, so the joining side can say which it is (as Serf says
"key mismatch" rather than "no response").
"""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from meshd.mesh.security import ClusterKey, curve_client

_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
           | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

KEY_MISMATCH = ("the handshake is refused: the peer has another cluster key, or none where "
                "this node has one (or the other way round); check --key-file on both")
NOTHING_LISTENS = "nothing listens there (connection refused): is meshd running on that port?"
NO_TCP = "no TCP answer at all: the host is down or a firewall drops the traffic"
SILENT_PEER = ("the handshake succeeds but nothing answers our frames: is it a meshd of "
               "a compatible version?")


class HandshakeProbe:
    """One probe of `addr`; `verdict()` is None until it knows (or its time runs out)."""

    def __init__(self, ctx: zmq.Context, addr: str, key: ClusterKey | None,
                 timeout: float = 3.0) -> None:
        host, _, port = addr.rpartition(":")
        self.addr = addr
        self.deadline = time.monotonic() + timeout
        self.seen = 0
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 200)
        if key is not None:
            curve_client(self._sock, key)
        self._mon = self._sock.get_monitor_socket(_EVENTS)
        if ":" in host.strip("[]"):
            self._sock.setsockopt(zmq.IPV6, 1)
        self._sock.connect(f"tcp://{host}:{port}")

    def verdict(self) -> str | None:
        """Why the seed is silent, "" when the handshake works (then it is not the
        transport), or None while it cannot tell yet."""
        for _ in range(64):                       # bounded: a handful of events per try
            try:
                event = recv_monitor_message(self._mon, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            except zmq.ZMQError:
                return None
            self.seen |= int(event)
            if event & _FAILED:
                return KEY_MISMATCH
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return ""
        if time.monotonic() < self.deadline:
            return None
        if self.seen & zmq.EVENT_CONNECTED:       # TCP works, the handshake never did
            return KEY_MISMATCH
        if self.seen & zmq.EVENT_CONNECT_RETRIED:
            return NOTHING_LISTENS
        return NO_TCP

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(0)
        self._sock.close(0)
