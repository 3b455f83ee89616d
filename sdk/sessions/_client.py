"""The blocking connection to the local daemon: one DEALER socket, requests correlated by
id, one deadline per call.

ZeroMQ's connect() to an ipc:// path succeeds even when nobody listens, so before the
first call we check the path ourselves and fail fast with a message that names the socket
and says how to start the daemon. A call never waits past its deadline; a reply that
arrives after its call gave up is recognised by its id and discarded.
"""

from __future__ import annotations

import itertools
import os
import socket as pysocket
import threading
import time
from typing import Any

import zmq

from meshd.config import Config, candidate_socket_paths, socket_dir_problem
from meshd.errors import DaemonUnavailable, MeshError, ProtocolError, Timeout, TooLarge, from_code
from meshd.wire.ipc import ERROR, EVENT, OK, decode_reply, encode_request

DEFAULT_TIMEOUT = Config().client_timeout
MAX_REPLY_BYTES = 1 << 30
_START_HINT = ("start it with `meshd` (or `systemctl start meshd`), or point MESHD_SOCKET "
               "at a running daemon's socket")

_ctx_lock = threading.Lock()
_ctx: tuple[int, zmq.Context] | None = None


def context() -> zmq.Context:
    """One ZeroMQ context per process (a forked child gets its own)."""
    global _ctx
    with _ctx_lock:
        if _ctx is None or _ctx[0] != os.getpid():
            _ctx = (os.getpid(), zmq.Context())
        return _ctx[1]


def default_timeout() -> float:
    try:
        return float(os.environ.get("MESHD_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def resolve_socket(path: str | None = None) -> str:
    """The socket to use: the one given, else the first candidate that exists."""
    if path:
        return str(path)
    candidates = candidate_socket_paths()
    for p in candidates:
        if os.path.exists(p):
            return p
    return candidates[0]


def check_listening(path: str) -> None:
    """Raise DaemonUnavailable unless a process accepts connections on `path`, in a
    directory no other user controls (else whoever does could be listening there in the
    daemon's place: see `socket_dir_problem`)."""
    problem = socket_dir_problem(os.path.dirname(os.path.abspath(path)))
    if problem:
        raise DaemonUnavailable(f"refusing to connect to meshd: {problem}")
    if not os.path.exists(path):
        raise DaemonUnavailable(f"meshd is not running: no socket at {path}; {_START_HINT}")
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except PermissionError as exc:
        raise DaemonUnavailable(f"no permission to use the meshd socket {path} "
                                f"(join the 'meshd' group?): {exc}") from exc
    except OSError as exc:
        raise DaemonUnavailable(f"meshd is not running: nothing listens on {path} "
                                f"({exc.strerror}); {_START_HINT}") from exc
    finally:
        probe.close()


def raise_error(body: Any) -> None:
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        raise from_code(body["code"], str(body.get("message", "")))
    raise ProtocolError(f"malformed error reply: {body!r}")


def new_dealer(path: str) -> zmq.Socket:
    sock = context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)       # never queue a request on a dead connection
    sock.connect(f"ipc://{path}")
    return sock


class Client:
    """A thread-safe blocking client of one daemon socket."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = None,
                 max_frame_bytes: int = Config().max_frame_bytes) -> None:
        self.path = resolve_socket(socket_path)
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self.max_frame_bytes = max_frame_bytes
        self._lock = threading.Lock()
        self._sock: zmq.Socket | None = None
        self._pid = os.getpid()
        self._ids = itertools.count(1)

    def _socket(self) -> zmq.Socket:
        if self._sock is None or self._pid != os.getpid():
            check_listening(self.path)
            self._sock = new_dealer(self.path)
            self._pid = os.getpid()
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            self._sock.close(linger=0)
        self._sock = None

    def call(self, command: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        """Send one request and wait for its reply, at most `timeout` seconds in all."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._lock:
            req_id = next(self._ids)
            frame = encode_request(req_id, command, args)
            if len(frame) > self.max_frame_bytes:
                raise TooLarge(f"request of {len(frame)} bytes is over the "
                               f"{self.max_frame_bytes}-byte limit")
            sock = self._socket()
            try:
                self._send(sock, frame, deadline)
                return self._wait(sock, req_id, deadline)
            except Timeout:
                self._reset()
                check_listening(self.path)       # a dead daemon is a clearer error
                raise Timeout(f"meshd on {self.path} did not answer {command} "
                              f"within {limit:g}s") from None
            except zmq.ZMQError as exc:
                self._reset()
                raise DaemonUnavailable(f"lost the connection to meshd on {self.path}: {exc}") from exc

    @staticmethod
    def _send(sock: zmq.Socket, frame: bytes, deadline: float) -> None:
        while True:
            try:
                sock.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout("send") from None
                sock.poll(min(remaining, 0.05) * 1000, zmq.POLLOUT)

    @staticmethod
    def _wait(sock: zmq.Socket, req_id: int, deadline: float) -> Any:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(remaining * 1000, zmq.POLLIN):
                raise Timeout("recv")
            try:
                rid, kind, body = decode_reply(sock.recv(zmq.NOBLOCK), MAX_REPLY_BYTES)
            except zmq.Again:
                continue
            except MeshError:
                continue                          # not a reply we can read: not ours
            if rid == req_id:
                if kind == OK:
                    return body
                if kind == ERROR:
                    raise_error(body)
            elif rid is None and kind == ERROR:
                raise_error(body)                 # the daemon could not even read our request
            # else: a late reply to a call that already timed out, or a stray event

    def close(self) -> None:
        with self._lock:
            self._reset()


_clients: dict[tuple[str, float], Client] = {}
_clients_lock = threading.Lock()


def shared_client(socket_path: str | None = None, timeout: float | None = None) -> Client:
    """One client per (socket, timeout) per process, shared by the API objects."""
    path = resolve_socket(socket_path)
    t = default_timeout() if timeout is None else float(timeout)
    with _clients_lock:
        client = _clients.get((path, t))
        if client is None:
            client = _clients[(path, t)] = Client(path, t)
        return client


__all__ = ["Client", "shared_client", "check_listening", "resolve_socket", "new_dealer",
           "raise_error", "EVENT", "OK", "ERROR"]
