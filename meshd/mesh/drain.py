"""Reading a ZeroMQ socket from the asyncio loop: one drain, bounded per loop turn.

A ZeroMQ socket's file descriptor is *edge-triggered*: it becomes readable when messages
arrive, and says nothing more until ZeroMQ's `EVENTS` is read again. So whoever reads it
must read until it is empty, or, to leave the loop to others (a node catching up receives
chunks of records that take ~20 ms each to merge; its clients and probes must not wait
for the whole catch-up), read a bounded batch and come back on the next loop turn, *and
come back whatever happened meanwhile*: a drain that stops on an exception leaves the
messages after it waiting for the next one to arrive, which on a quiet socket is never.

`SocketDrain` is that loop, written once for the peer transport, the ZAP authenticator
(and its handshake monitor) and the local API server:

- per loop turn it reads at most `max_count` messages, for at most `budget` seconds (at
  least one message is always read), and at most `max_bytes` (counted on each message's
  last part, its payload);
- each message goes to `on_message`, or the turn's messages together to `on_batch`;
  whatever that raises is counted (`counters["failed"]`) and logged, and the drain goes
  on (a poison frame costs itself, or its batch, and nothing after it);
- it reschedules itself (`call_soon`) whenever the socket still has input, after a full
  batch, an exception or a receive error alike;
- `ready()`, when given, is asked first: False means "not now" (the owner's queue is
  full); nothing is read and nothing is rescheduled until the owner calls `wake()`.
  `recheck()` is for an owner that sent on the socket outside the drain: a send may
  consume the readability edge, so it looks for waiting input itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Callable

import zmq

_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)

Message = list[bytes]
_log = logging.getLogger("meshd.mesh")


class SocketDrain:
    """Reads `sock` on the running loop (see the module docstring). Give exactly one of
    `on_message` (each message) and `on_batch` (a turn's messages at once)."""

    def __init__(self, sock: zmq.Socket, *,
                 on_message: Callable[[Message], None] | None = None,
                 on_batch: Callable[[list[Message]], None] | None = None,
                 max_count: int = 256, budget: float | None = None,
                 max_bytes: int | None = None, ready: Callable[[], bool] | None = None,
                 on_error: Callable[[Exception], None] | None = None,
                 name: str = "socket", recv_log_level: int = logging.WARNING,
                 logger: logging.Logger = _log) -> None:
        if (on_message is None) == (on_batch is None):
            raise ValueError("give exactly one of on_message and on_batch")
        self.on_message = on_message
        self.on_batch = on_batch
        self.max_count = max_count
        self.budget = budget
        self.max_bytes = max_bytes
        self.ready = ready
        self.on_error = on_error
        self.name = name
        self.recv_log_level = recv_log_level
        self.log = logger
        self.counters: Counter[str] = Counter()   # received, failed, recv_errors, turns
        self._sock: zmq.Socket | None = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._scheduled = False

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the socket's descriptor and drain once now (input may be waiting)."""
        assert self._sock is not None, "a stopped drain does not start again"
        self._loop = asyncio.get_running_loop()
        self._fd = self._sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self.drain)
        self.wake()

    def stop(self) -> None:
        """Stop watching (the socket is its owner's to close, after this)."""
        if self._loop is not None and self._fd is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._fd = None
        self._sock = None

    # --- scheduling --------------------------------------------------------------------------

    def wake(self) -> None:
        """Drain on the next loop turn (coalesced: once however often it is asked)."""
        if not self._scheduled and self._sock is not None and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self.drain)

    def recheck(self) -> None:
        """After a send outside the drain: drain again if input is waiting."""
        if self._pending():
            self.wake()

    def _pending(self) -> bool:
        sock = self._sock
        try:
            return sock is not None and not sock.closed and bool(sock.get(_EVENTS) & _POLLIN)
        except zmq.ZMQError:
            return False

    # --- reading -----------------------------------------------------------------------------

    def drain(self) -> None:
        """One turn: read a bounded batch, hand it on, come back if more waits."""
        self._scheduled = False
        if self._sock is None or (self.ready is not None and not self.ready()):
            return                    # (the owner wakes us when it has room again)
        self.counters["turns"] += 1
        try:
            batch = self._read()
            if batch and self.on_batch is not None:
                self._hand(self.on_batch, batch)
        finally:
            if self._pending():
                self.wake()

    def _read(self) -> list[Message]:
        """Read up to the turn's bounds; each message goes to `on_message` at once, or is
        collected for `on_batch`."""
        batch: list[Message] = []
        n, room = 0, self.max_bytes
        until = None if self.budget is None else time.monotonic() + self.budget
        while n < self.max_count and self._pending():
            if n and until is not None and time.monotonic() >= until:
                break
            sock = self._sock
            assert sock is not None
            try:
                msg = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                self.counters["recv_errors"] += 1
                self.log.log(self.recv_log_level, "%s receive failed: %s", self.name, exc)
                break
            n += 1
            self.counters["received"] += 1
            if self.on_message is not None:
                self._hand(self.on_message, msg)
            else:
                batch.append(msg)
            if room is not None:
                room -= len(msg[-1]) if msg else 0
                if room <= 0:
                    break
        return batch

    def _hand(self, fn: Callable[[Message], None] | Callable[[list[Message]], None],
              arg: Message | list[Message]) -> None:
        try:
            fn(arg)  # type: ignore[arg-type]
        except Exception as exc:      # a poison message costs itself, never the drain
            self.counters["failed"] += 1
            if self.on_error is not None:
                self.on_error(exc)
            else:
                self.log.exception("%s: handling a message failed", self.name)
