"""A client of the daemon's own local API, from its event loop: what the dashboard writes
(a human session registering, a message sent) goes through the same socket, validation,
journal and routing as any SDK client's request."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import zmq
import zmq.asyncio

from meshd.errors import MeshError
from meshd.wire.ipc import ERROR, OK, decode_reply, encode_request


class LocalAPIError(MeshError):
    """The daemon refused a request; `code` is the daemon's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LocalAPI:
    """One DEALER socket on the daemon's ipc:// socket; requests are matched to replies by id."""

    def __init__(self, ctx: zmq.asyncio.Context, socket_path: str, max_bytes: int,
                 timeout: float = 10.0) -> None:
        self._ctx = ctx
        self._path = socket_path
        self._max = max_bytes
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{self._path}")
        self._sock = sock
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
            self._reader = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(LocalAPIError("unavailable", "the daemon is stopping"))
        self._waiting.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def call(self, command: str, args: dict[str, Any]) -> Any:
        if self._sock is None:
            raise LocalAPIError("unavailable", "the dashboard is not running")
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        try:
            await self._sock.send(encode_request(req_id, command, args))
            return await asyncio.wait_for(fut, self._timeout)
        except asyncio.TimeoutError:
            raise LocalAPIError("timeout", f"{command}: no answer in {self._timeout}s") from None
        finally:
            self._waiting.pop(req_id, None)

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            try:
                req_id, kind, body = decode_reply(frames[-1], 4 * self._max)
            except MeshError:
                continue
            fut = self._waiting.get(req_id) if isinstance(req_id, int) else None
            if fut is None or fut.done():
                continue
            if kind == OK:
                fut.set_result(body)
            elif kind == ERROR:
                body = body if isinstance(body, dict) else {}
                fut.set_exception(LocalAPIError(str(body.get("code", "internal")),
                                                str(body.get("message", ""))))
