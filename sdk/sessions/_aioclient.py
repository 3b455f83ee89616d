"""The asyncio connection to the local daemon: a shell over `_core.Exchange` that watches
the DEALER socket with the event loop's reader, so calls from one loop share one socket
and may be in flight together (e.g. `asyncio.gather`), which pipelines them; each still
has its own deadline."""

from __future__ import annotations

import asyncio
from typing import Any

import zmq

from meshd.config import Config
from meshd.errors import DaemonUnavailable
from sessions._client import check_listening, default_timeout, new_dealer, resolve_socket
from sessions._core import Exchange, OverExchange

_SWEEP = 0.05      # s between deadline checks: a call's timeout is honoured to within this

# Plain ints: pyzmq's enum-typed getsockopt costs microseconds per call.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


class _Expired(Exception):
    """A call's deadline passed (becomes Timeout for the caller)."""


class AsyncClient(OverExchange):
    """One asyncio connection to the daemon, bound to the loop that first uses it.

    The socket is watched with the loop's own reader on ZeroMQ's file descriptor and read
    with non-blocking calls, so many calls in flight cost one future each and no task per
    reply; sends that cannot go out at once (not yet connected) wait in the exchange's
    queue, and requests queued in the same loop turn share a batch frame.
    """

    def __init__(self, socket_path: str | None = None, timeout: float | None = None) -> None:
        self.path = resolve_socket(socket_path)
        self.timeout = default_timeout() if timeout is None else float(timeout)
        self._exchange = Exchange(Config().max_frame_bytes, batching=True)
        self._sock: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._retry: asyncio.Handle | None = None     # a pending send pass
        self._sweeper: asyncio.TimerHandle | None = None

    def _ensure(self) -> zmq.Socket:
        if self._sock is None:
            check_listening(self.path)
            self._sock = new_dealer(self.path)
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._sock.getsockopt(zmq.FD), self._drain)
        return self._sock

    def _drain(self) -> None:
        sock, waiting = self._sock, self._waiting
        while sock is not None and sock.get(_EVENTS) & _POLLIN:
            try:
                frame = sock.recv(_NOBLOCK)
            except zmq.Again:
                break
            for rid, answer, error in self._exchange.receive(frame):
                fut = waiting.pop(rid, None) if rid is not None else None
                if fut is None or fut.done():
                    continue                 # (an error tied to no request: not ours to take)
                if error is None:
                    fut.set_result(answer)
                else:
                    fut.set_exception(error)

    def _flush(self) -> None:
        """Send what is queued, a frame at a time; retry shortly while the connection is
        not up yet."""
        self._retry = None
        sock = self._sock
        if sock is None:
            return
        while (out := self._exchange.next_frame()) is not None:
            frame, taken = out
            try:
                sock.send(frame, _NOBLOCK)
            except zmq.Again:
                assert self._loop is not None
                self._retry = self._loop.call_later(0.002, self._flush)
                break
            self._exchange.sent(taken)
        self._drain()                 # a send can consume the FD's edge: look for replies

    async def call(self, command: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        limit = self.timeout if timeout is None else timeout
        self._ensure()
        loop = self._loop
        assert loop is not None
        call = self._exchange.start(command, args, loop.time(), limit)
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting[call.req_id] = fut
        if self._retry is None:
            # One send pass per loop turn: calls started together (gather) go out together.
            self._retry = loop.call_soon(self._flush)
        if self._sweeper is None:
            self._sweeper = loop.call_later(_SWEEP, self._sweep)
        try:
            return await fut
        except _Expired:
            check_listening(self.path)
            raise self._exchange.timeout_error(call, self.path) from None
        except zmq.ZMQError as exc:
            raise DaemonUnavailable(f"lost the connection to meshd on {self.path}: {exc}") from exc
        finally:
            self._waiting.pop(call.req_id, None)
            self._exchange.forget(call.req_id)

    def _sweep(self) -> None:
        """Fail the calls whose deadline has passed. One timer for all calls in flight is
        much cheaper than a timeout handle per call when thousands are pipelined."""
        assert self._loop is not None
        for call in self._exchange.expire(self._loop.time()):
            fut = self._waiting.get(call.req_id)
            if fut is not None and not fut.done():
                fut.set_exception(_Expired())
        self._sweeper = (self._loop.call_later(_SWEEP, self._sweep)
                         if self._exchange.calls else None)

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
            self._sock.close(linger=0)
        self._sock = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._waiting.clear()
        self._exchange.clear()


__all__ = ["AsyncClient"]
