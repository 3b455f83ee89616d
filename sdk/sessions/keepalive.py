"""Keeping a session alive: a session with no ping for 300 s reads OFFLINE, and an agent
busy thinking pings nobody. `registry.keepalive(session_id)` pings for it in the
background for as long as the block (or `start()`..`stop()`) lasts.

The first ping happens at once, so a session that does not exist is an error right away
rather than a silent thread; later failures (the daemon restarting, say) are logged and
retried at the next interval, since the point is to outlive such hiccups.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Awaitable, Callable

from meshd.errors import MeshError, NotFound

log = logging.getLogger("sessions.keepalive")

#: Seconds between pings: well inside the daemon's 300 s staleness, cheap for it.
DEFAULT_INTERVAL = 60.0


def _missing(session_id: str) -> NotFound:
    return NotFound(f"no session {session_id} to keep alive (register it first)")


class _Pinging:
    """What a keep-alive decides, apart from how it waits (a thread or a task): the
    arguments it accepts, that a first ping finding no session is an error, and that a
    later failure is logged and counted, never raised (the point is to outlive it)."""

    def __init__(self, session_id: str, interval: float) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.session_id = session_id
        self.interval = float(interval)
        self.pings = 0

    def _first(self, found: bool) -> None:
        """The first ping's answer: the session must exist."""
        if not found:
            raise _missing(self.session_id)
        self.pings += 1

    def _later(self, found: bool | MeshError) -> None:
        """A later ping's answer, or the error it ran into."""
        if isinstance(found, MeshError):
            log.warning("keep-alive ping for %s failed, retrying: %s", self.session_id, found)
        elif found:
            self.pings += 1
        else:
            log.warning("keep-alive: session %s is not registered any more", self.session_id)


class KeepAlive(_Pinging):
    """Pings `session_id` every `interval` seconds from a daemon thread."""

    def __init__(self, ping: Callable[[str], bool], session_id: str,
                 interval: float = DEFAULT_INTERVAL) -> None:
        super().__init__(session_id, interval)
        self._ping = ping
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "KeepAlive":
        self._first(self._ping(self.session_id))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"sessions-keepalive-{self.session_id}")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                found: bool | MeshError = self._ping(self.session_id)
            except MeshError as exc:
                found = exc
            self._later(found)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "KeepAlive":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AsyncKeepAlive(_Pinging):
    """The asyncio twin: a task on the running loop; `async with registry.keepalive(id):`."""

    def __init__(self, ping: Callable[[str], Awaitable[bool]], session_id: str,
                 interval: float = DEFAULT_INTERVAL) -> None:
        super().__init__(session_id, interval)
        self._ping = ping
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> "AsyncKeepAlive":
        self._first(await self._ping(self.session_id))
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                found: bool | MeshError = await self._ping(self.session_id)
            except MeshError as exc:
                found = exc
            self._later(found)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def __aenter__(self) -> "AsyncKeepAlive":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
