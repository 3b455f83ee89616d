"""Claims: leases on named resources, with fencing tokens, for agents that share work.

    from sessions import Claims

    claims = Claims()
    with claims.hold("task/42", "agent-a", ttl=30) as lease:
        do_the_work(fencing_token=lease.token)     # the resource rejects older tokens

A lease is granted to one session at a time; its fencing token is higher than that of any
earlier holder of the resource, so the resource itself can refuse a late write from a
holder that was paused past its lease. With voters configured (`meshd --voters`), a
majority of them grants (scope "mesh"); without, this host's daemon grants for its own
sessions (scope "host"). See docs/claims.md for the guarantees and the clock bound.

The holder's side of safety is here: a lease is valid until its `deadline`, counted on
this process's monotonic clock from *before* the request that got or renewed it, so a
process that was paused (or whose daemon is cut off) stops believing it holds the lease
when the time is up, whether or not anybody told it. `hold()` renews in the background and
tells the holder at once when the lease is lost: a callback, or else `LeaseLost` raised in
the block's own thread (or, with asyncio, the block's task is cancelled and `LeaseLost`
raised from it).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from meshd.errors import MeshError
from meshd.wire.ipc import validate_args
from sessions._aioclient import AsyncClient
from sessions._client import Client, shared_client
from sessions.errors import LeaseLost

log = logging.getLogger("sessions.claims")

__all__ = ["Claims", "AsyncClaims", "Lease", "Held", "AsyncHeld", "LeaseLost"]

#: A lease is renewed when this part of its validity is left.
RENEW_AT = 2 / 3
#: Seconds an answer may take beyond the wait an acquire asks for.
ROUND_TRIP = 10.0

OnLost = Callable[["Lease", str], None]


@dataclass(frozen=True)
class Lease:
    resource: str
    holder: str
    token: int            # fencing token: strictly increasing per resource
    ttl: float
    scope: str            # "mesh" (a majority of voters granted) or "host"
    valid_for: float      # seconds the daemon vouched for, from before the request
    expires_at: str       # wall time, for display only
    deadline: float = 0.0  # time.monotonic() after which the holder must stop acting

    @classmethod
    def from_view(cls, d: dict[str, Any], sent_at: float) -> "Lease":
        """`sent_at`: this process's monotonic time before the request went out. The daemon
        says how long it spent on the request (`elapsed`, e.g. waiting for a busy resource)
        and how long the lease is valid from its answer (`valid_for`): the deadline counts
        from our send time plus that, which is never later than the daemon's own deadline
        (we sent before it received; one host, one monotonic clock)."""
        valid_for = float(d["valid_for"])
        elapsed = float(d.get("elapsed") or 0.0)
        return cls(resource=d["resource"], holder=d["holder"], token=int(d["token"]),
                   ttl=float(d["ttl"]), scope=d["scope"], valid_for=valid_for,
                   expires_at=d.get("expires_at", ""), deadline=sent_at + elapsed + valid_for)

    @property
    def remaining(self) -> float:
        """Seconds this process may still act on the lease (<= 0: it must not)."""
        return self.deadline - time.monotonic()

    @property
    def valid(self) -> bool:
        return self.remaining > 0


def _usable(lease: Lease) -> Lease:
    """A grant that arrived after its own deadline (this process, or its daemon, was paused
    while the request was out) must not be acted on: the session holds the lease (its
    daemon renews it while it is registered), so acquiring again gives it back, with a
    fresh deadline and the same token."""
    if not lease.valid:
        raise LeaseLost(f"the lease on {lease.resource!r} (token {lease.token}) was granted "
                        f"too late to act on: acquire again")
    return lease


def _args(command: str, **kw: Any) -> dict[str, Any]:
    return validate_args(command, kw)


class Claims:
    """Claims through this host's meshd (claims need a daemon: there is no directory mode)."""

    def __init__(self, *, socket: str | None = None, timeout: float | None = None) -> None:
        self._client: Client = shared_client(socket, timeout)

    def _call(self, command: str, args: dict[str, Any], extra: float = 0.0) -> Any:
        return self._client.call(command, args, timeout=self._client.timeout + extra)

    def acquire(self, resource: str, session_id: str, ttl: float = 30, wait: float = 0) -> Lease:
        """Claim `resource` for `session_id`. Raises ClaimBusy (naming the holder and how
        long its lease may still run) when another session holds it and `wait` seconds
        passed without it being freed."""
        args = _args("claim.acquire", resource=resource, session_id=session_id, ttl=ttl,
                     wait=wait)
        sent = time.monotonic()
        return _usable(Lease.from_view(self._call("claim.acquire", args,
                                                  args["wait"] + ROUND_TRIP), sent))

    def renew(self, lease: Lease) -> Lease:
        """Extend a lease by its TTL; the token stays. Raises LeaseLost when it is gone."""
        args = _args("claim.renew", resource=lease.resource, session_id=lease.holder,
                     token=lease.token)
        sent = time.monotonic()
        return Lease.from_view(self._call("claim.renew", args), sent)

    def release(self, lease: Lease) -> bool:
        """Give the lease back now (False: it was not held any more)."""
        return bool(self._call("claim.release", _args(
            "claim.release", resource=lease.resource, session_id=lease.holder,
            token=lease.token)))

    def holder(self, resource: str) -> Lease | None:
        """Who holds `resource` now, as the granting side knows it (None: nobody)."""
        sent = time.monotonic()
        view = self._call("claim.holder", _args("claim.holder", resource=resource))
        return None if view is None else Lease.from_view(view, sent)

    def list(self, prefix: str | None = None) -> list[Lease]:
        sent = time.monotonic()
        return [Lease.from_view(v, sent) for v in self._call(
            "claim.list", _args("claim.list", prefix=prefix))]

    def hold(self, resource: str, session_id: str, ttl: float = 30, wait: float = 0,
             on_lost: OnLost | None = None) -> "Held":
        """A context manager: acquire, renew in the background, release at the end. When
        the lease is lost (not renewed in time, taken back, the daemon gone past the
        deadline) the holder is told at once: `on_lost(lease, reason)` in the renewing
        thread, or without a callback LeaseLost raised in the block's thread."""
        return Held(self, resource, session_id, ttl, wait, on_lost)

    def close(self) -> None:
        """Nothing to release (the connection is shared per process)."""


class _Holding:
    """What a held lease decides, with no I/O: when to renew, when it is lost, what the
    holder is told. `Held` (a thread) and `AsyncHeld` (a task) only do the waiting."""

    def __init__(self, resource: str, session_id: str, ttl: float, wait: float,
                 on_lost: OnLost | None) -> None:
        self._want = (resource, session_id, ttl, wait)
        self._on_lost = on_lost
        self.lease: Lease | None = None
        self.reason = ""

    @property
    def token(self) -> int:
        assert self.lease is not None
        return self.lease.token

    def _is_lost(self) -> bool:
        raise NotImplementedError

    def check(self) -> None:
        """Raise LeaseLost when the lease is lost or its deadline passed: call before an
        action that needs the lease (and hand the token to the resource)."""
        if self._is_lost() or self.lease is None or not self.lease.valid:
            raise LeaseLost(f"lease on {self._want[0]!r} lost: {self.reason or 'expired'}")

    def _next_wait(self) -> float:
        """Seconds until the next renewal: a third of the validity, never past the deadline."""
        lease = self.lease
        assert lease is not None
        return max(0.0, min(lease.deadline - time.monotonic(), lease.valid_for * (1 - RENEW_AT)))

    def _failed(self, lease: Lease, err: MeshError) -> str | None:
        """A renewal failed: the reason the lease is lost, or None to try again (the daemon
        or the voters did not answer, and the deadline is not reached yet)."""
        if isinstance(err, LeaseLost):
            return str(err)
        log.warning("renewing %s failed (retried until its deadline): %s", lease.resource, err)
        if time.monotonic() >= lease.deadline:
            return f"not renewed before its deadline: {err}"
        return None

    def _retry_wait(self, lease: Lease) -> float:
        return min(1.0, max(0.0, lease.deadline - time.monotonic()))

    def _tell(self, lease: Lease, reason: str) -> bool:
        """Record the loss and call the callback; False when there is none (the owner
        must then be interrupted)."""
        self.reason = reason
        if self._on_lost is None:
            return False
        try:
            self._on_lost(lease, reason)
        except Exception:
            log.exception("on_lost callback failed")
        return True

    def _lost_error(self) -> LeaseLost:
        return LeaseLost(f"lease on {self._want[0]!r} lost: {self.reason}")


class Held(_Holding):
    """A lease held by a `with` block (see `Claims.hold`)."""

    def __init__(self, claims: Claims, resource: str, session_id: str, ttl: float,
                 wait: float, on_lost: OnLost | None) -> None:
        super().__init__(resource, session_id, ttl, wait, on_lost)
        self._claims = claims
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner = 0                  # the block's thread id

    def _is_lost(self) -> bool:
        return self.lost.is_set()

    def __enter__(self) -> "Held":
        resource, session_id, ttl, wait = self._want
        self.lease = self._claims.acquire(resource, session_id, ttl, wait)
        self._owner = threading.get_ident()
        self._thread = threading.Thread(target=self._renew, name=f"lease {resource}",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(ROUND_TRIP + 5)
        lease = self.lease
        if not self.lost.is_set() and lease is not None:
            try:
                self._claims.release(lease)
            except MeshError as err:          # it lapses at its TTL anyway
                log.warning("releasing %s failed (it lapses at its TTL): %s", lease.resource, err)
        if self.lost.is_set() and exc_type is None and self._on_lost is None:
            raise self._lost_error()

    def _renew(self) -> None:
        while not self._stop.wait(self._next_wait()):
            lease = self.lease
            assert lease is not None
            if time.monotonic() >= lease.deadline:
                return self._lose(lease, "not renewed before its deadline")
            try:
                self.lease = self._claims.renew(lease)
            except MeshError as err:
                reason = self._failed(lease, err)
                if reason is not None:
                    return self._lose(lease, reason)
                self._stop.wait(self._retry_wait(lease))

    def _lose(self, lease: Lease, reason: str) -> None:
        self.lost.set()
        if not self._tell(lease, reason):
            # No callback: the block must stop at once, in its own thread.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._owner),
                                                       ctypes.py_object(LeaseLost))


# --- asyncio ------------------------------------------------------------------------------

class AsyncClaims:
    """`Claims` for asyncio: the same calls, as coroutines."""

    def __init__(self, *, socket: str | None = None, timeout: float | None = None,
                 client: AsyncClient | None = None) -> None:
        self._client = client or AsyncClient(socket, timeout)

    async def _call(self, command: str, args: dict[str, Any], extra: float = 0.0) -> Any:
        return await self._client.call(command, args, timeout=self._client.timeout + extra)

    async def acquire(self, resource: str, session_id: str, ttl: float = 30,
                      wait: float = 0) -> Lease:
        args = _args("claim.acquire", resource=resource, session_id=session_id, ttl=ttl,
                     wait=wait)
        sent = time.monotonic()
        return _usable(Lease.from_view(await self._call("claim.acquire", args,
                                                        args["wait"] + ROUND_TRIP), sent))

    async def renew(self, lease: Lease) -> Lease:
        args = _args("claim.renew", resource=lease.resource, session_id=lease.holder,
                     token=lease.token)
        sent = time.monotonic()
        return Lease.from_view(await self._call("claim.renew", args), sent)

    async def release(self, lease: Lease) -> bool:
        return bool(await self._call("claim.release", _args(
            "claim.release", resource=lease.resource, session_id=lease.holder,
            token=lease.token)))

    async def holder(self, resource: str) -> Lease | None:
        sent = time.monotonic()
        view = await self._call("claim.holder", _args("claim.holder", resource=resource))
        return None if view is None else Lease.from_view(view, sent)

    async def list(self, prefix: str | None = None) -> list[Lease]:
        sent = time.monotonic()
        return [Lease.from_view(v, sent) for v in await self._call(
            "claim.list", _args("claim.list", prefix=prefix))]

    def hold(self, resource: str, session_id: str, ttl: float = 30, wait: float = 0,
             on_lost: OnLost | None = None) -> "AsyncHeld":
        """`async with claims.hold(...)`: as `Claims.hold`; without a callback, a loss
        cancels the block's task and LeaseLost is raised from it."""
        return AsyncHeld(self, resource, session_id, ttl, wait, on_lost)

    async def close(self) -> None:
        await self._client.close()


class AsyncHeld(_Holding):
    """A lease held by an `async with` block (see `AsyncClaims.hold`)."""

    def __init__(self, claims: AsyncClaims, resource: str, session_id: str, ttl: float,
                 wait: float, on_lost: OnLost | None) -> None:
        super().__init__(resource, session_id, ttl, wait, on_lost)
        self._claims = claims
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._owner: asyncio.Task[Any] | None = None

    def _is_lost(self) -> bool:
        return self.lost.is_set()

    async def __aenter__(self) -> "AsyncHeld":
        self.lease = await self._claims.acquire(*self._want)
        self._owner = asyncio.current_task()
        self._task = asyncio.get_running_loop().create_task(self._renew())
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        lease = self.lease
        if not self.lost.is_set() and lease is not None:
            try:
                await self._claims.release(lease)
            except MeshError as err:
                log.warning("releasing %s failed (it lapses at its TTL): %s", lease.resource, err)
        if self.lost.is_set() and self._on_lost is None and (
                exc_type is None or issubclass(exc_type, asyncio.CancelledError)):
            if self._owner is not None:
                self._owner.uncancel()
            raise self._lost_error() from exc

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._next_wait())
            lease = self.lease
            assert lease is not None
            if time.monotonic() >= lease.deadline:
                return self._lose(lease, "not renewed before its deadline")
            try:
                self.lease = await self._claims.renew(lease)
            except MeshError as err:
                reason = self._failed(lease, err)
                if reason is not None:
                    return self._lose(lease, reason)
                await asyncio.sleep(self._retry_wait(lease))

    def _lose(self, lease: Lease, reason: str) -> None:
        self.lost.set()
        if not self._tell(lease, reason) and self._owner is not None:
            self._owner.cancel()
