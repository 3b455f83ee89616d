"""The blocking connection to the local daemon: one DEALER socket, requests correlated by
id, one deadline per call. What is said and how answers are read is `_core.Exchange`;
this module owns the socket and the waiting.

ZeroMQ's connect() to an ipc:// path succeeds even when nobody listens, so before the
first call we check the path ourselves and fail fast with a message that names the socket
and says how to start the daemon. A call never waits past its deadline; a reply that
arrives after its call gave up is recognised by its id and discarded.
"""

from __future__ import annotations

import os
import socket as pysocket
import threading
import time
from collections import OrderedDict
from typing import Any

import zmq

from meshd.config import Config, candidate_socket_paths, socket_dir_problem
from meshd.errors import DaemonUnavailable, Timeout
from meshd.wire.ipc import ERROR, EVENT, OK
from sessions._core import MAX_REPLY_BYTES, Call, Exchange, OverExchange, error_from

DEFAULT_TIMEOUT = Config().client_timeout
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
    """Raise the exception an error reply names (see `_core.error_from`)."""
    raise error_from(body)


def new_dealer(path: str) -> zmq.Socket:
    sock = context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)       # never queue a request on a dead connection
    sock.connect(f"ipc://{path}")
    return sock


class Client(OverExchange):
    """A thread-safe blocking client of one daemon socket: a shell over `_core.Exchange`
    that sends one request at a time and polls for its reply."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = None,
                 max_frame_bytes: int = Config().max_frame_bytes) -> None:
        self.path = resolve_socket(socket_path)
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self._exchange = Exchange(max_frame_bytes)
        self._lock = threading.Lock()
        self._sock: zmq.Socket | None = None
        self._pid = os.getpid()

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
        """Send one request and wait for its reply, at most `timeout` seconds in all (the
        clock starts before waiting for the lock: the time queued behind other threads
        counts)."""
        limit = self.timeout if timeout is None else timeout
        start = time.monotonic()
        with self._lock:
            call = self._exchange.start(command, args, start, limit)
            try:
                sock = self._socket()
                try:
                    self._send(sock, call.deadline)
                    return self._wait(sock, call)
                except Timeout:
                    self._reset()
                    check_listening(self.path)       # a dead daemon is a clearer error
                    raise self._exchange.timeout_error(call, self.path) from None
                except zmq.ZMQError as exc:
                    self._reset()
                    raise DaemonUnavailable(f"lost the connection to meshd on {self.path}: "
                                            f"{exc}") from exc
            finally:
                self._exchange.forget(call.req_id)

    def _send(self, sock: zmq.Socket, deadline: float) -> None:
        while (out := self._exchange.next_frame()) is not None:
            frame, taken = out
            while True:
                try:
                    sock.send(frame, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Timeout("send") from None
                    sock.poll(min(remaining, 0.05) * 1000, zmq.POLLOUT)
            self._exchange.sent(taken)

    def _wait(self, sock: zmq.Socket, call: Call) -> Any:
        while True:
            remaining = call.remaining(time.monotonic())
            if remaining <= 0 or not sock.poll(remaining * 1000, zmq.POLLIN):
                raise Timeout("recv")
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            # Late replies to calls that gave up, and strays, settle nothing. An error the
            # daemon could not tie to a request (req_id nil) is ours: we have one in flight.
            for rid, answer, error in self._exchange.receive(frame):
                if rid == call.req_id or rid is None:
                    if error is not None:
                        raise error
                    return answer

    def close(self) -> None:
        with self._lock:
            self._reset()


#: Shared clients kept open at most; past it the least recently used one closes its
#: socket (it opens one again if its objects call once more). A process that talks to
#: many daemons in turn (a test suite, a tool walking hosts) must not pile up sockets
#: until ZeroMQ's limit (1023 per context) refuses new ones.
MAX_SHARED_CLIENTS = 64

_clients: "OrderedDict[tuple[str, float], Client]" = OrderedDict()
_clients_lock = threading.Lock()


def shared_client(socket_path: str | None = None, timeout: float | None = None) -> Client:
    """One client per (socket, timeout) per process, shared by the API objects."""
    path = resolve_socket(socket_path)
    t = default_timeout() if timeout is None else float(timeout)
    with _clients_lock:
        client = _clients.get((path, t))
        if client is None:
            client = _clients[(path, t)] = Client(path, t)
            while len(_clients) > MAX_SHARED_CLIENTS:
                _clients.popitem(last=False)[1].close()
        else:
            _clients.move_to_end((path, t))
        return client


__all__ = ["Client", "shared_client", "check_listening", "resolve_socket", "new_dealer",
           "raise_error", "EVENT", "OK", "ERROR", "MAX_REPLY_BYTES"]
