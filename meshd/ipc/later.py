"""Local commands answered later: those that wait on other daemons (claims ask the voters).

The server hands the awaitable to `LaterReplies.answer` and goes on serving; the reply goes
out when it is done. A client may have MAX_PENDING_PER_CLIENT such requests in flight,
all clients MAX_PENDING together: past that a request is refused at once, so a greedy
client cannot pile up tasks in the daemon.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from meshd.errors import MeshError, TooLarge
from meshd.wire.ipc import OK, encode_error, encode_reply

if TYPE_CHECKING:
    from meshd.mesh.claims import Claims

log = logging.getLogger("meshd.ipc")

MAX_PENDING_PER_CLIENT = 64
MAX_PENDING = 1024

#: A local command's handler: (client ident, req_id, validated args) -> result.
Handler = Callable[[bytes, int, dict[str, Any]], Any]


class LaterReplies:
    def __init__(self, send: Callable[[bytes, bytes], bool], counters: Counter[str],
                 after_send: Callable[[], None]) -> None:
        self._send = send
        self._counters = counters
        self._after_send = after_send
        self._per_client: dict[bytes, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def answer(self, ident: bytes, req_id: int, work: Awaitable[Any],
               command: str | None = None) -> None:
        """Reply to (ident, req_id) with what `work` gives, once it is done (counted as an
        ok of `command` when it succeeds)."""
        if (self._per_client.get(ident, 0) >= MAX_PENDING_PER_CLIENT
                or len(self._tasks) >= MAX_PENDING):
            if inspect.iscoroutine(work):
                work.close()
            raise TooLarge("too many requests waiting on other daemons: wait for answers first")
        self._per_client[ident] = self._per_client.get(ident, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run(ident, req_id, work, command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, ident: bytes, req_id: int, work: Awaitable[Any],
                   command: str | None) -> None:
        try:
            frame = encode_reply(req_id, OK, await work)
            if command is not None:
                self._counters[f"ok.{command}"] += 1
        except MeshError as exc:
            self._counters[f"error.{exc.code}"] += 1
            frame = encode_error(req_id, exc.code, str(exc))
        except Exception as exc:                     # a bug must not kill the server
            log.exception("a request answered later failed")
            self._counters["internal_errors"] += 1
            frame = encode_error(req_id, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            n = self._per_client.get(ident, 1) - 1
            if n > 0:
                self._per_client[ident] = n
            else:
                self._per_client.pop(ident, None)
        self._send(ident, frame)
        self._after_send()

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)


async def _view(work: Awaitable[Any], received: float | None = None) -> Any:
    """A grant for the wire. With `received` (when the request came in), also how long the
    daemon spent on it: the holder's deadline is then counted from its own send time plus
    that (a waiting acquire does not eat into the lease), still never past the deadline
    the daemon itself keeps (the client sent before the daemon received: same host, same
    monotonic clock)."""
    grant = await work
    if grant is None:
        return None
    elapsed = None if received is None else max(0.0, time.monotonic() - received)
    view = grant.view()                 # (valid_for read after elapsed: never too long)
    if elapsed is not None:
        view["elapsed"] = elapsed
    return view


async def _views(work: Awaitable[Any]) -> Any:
    return [g.view() for g in await work]


def claim_handlers(claims: "Claims") -> dict[str, Handler]:
    """The claim.* commands (`meshd.wire.ipc.REGISTRY`), served by the claims service."""
    return {
        "claim.acquire": lambda _i, _r, a: _view(claims.acquire(
            a["resource"], a["session_id"], a["ttl"], a["wait"]), time.monotonic()),
        "claim.renew": lambda _i, _r, a: _view(claims.renew(
            a["resource"], a["session_id"], a["token"]), time.monotonic()),
        "claim.release": lambda _i, _r, a: claims.release(
            a["resource"], a["session_id"], a["token"]),
        "claim.holder": lambda _i, _r, a: _view(claims.holder(a["resource"])),
        "claim.list": lambda _i, _r, a: _views(claims.list(a["prefix"])),
    }
