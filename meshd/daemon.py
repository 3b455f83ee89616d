"""The daemon: composes the store and the IPC server on one event loop, and owns their
lifecycle (ordered start, idempotent stop, housekeeping timers)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.asyncio

from meshd import __version__
from meshd.config import Config
from meshd.errors import MeshError
from meshd.ipc.server import IPCServer
from meshd.mesh.claims import Claims, HostClaims
from meshd.mesh.node import Mesh
from meshd.mesh.periodic import Periodic, stop_all
from meshd.sdnotify import notify
from meshd.state import db, memory
from meshd.state.commands import Commands
from meshd.state.outbox import Outbox
from meshd.state.pipeline import WritePipeline
from meshd.state.store import LogLimits, Store
from meshd.wire.ipc import PROTOCOL_VERSION

log = logging.getLogger("meshd")


class DataDirLocked(MeshError):
    """Another daemon already uses this data directory."""

    code = "data_dir_locked"


class Daemon:
    """One meshd: `await start()` returns once the socket serves; `stop()` is idempotent."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.store: Store | None = None
        self.outbox: Outbox | None = None
        self.pipeline: WritePipeline | None = None
        self.claims: Claims | None = None
        self.ipc: IPCServer | None = None
        self.web: Any = None                # meshd.ipc.web.server.WebServer with --http
        self.mesh: Mesh | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._lock_fd: int | None = None
        self._timers: list[Periodic] = []
        self._stopped = asyncio.Event()
        self._started_at = time.time()

    async def start(self) -> None:
        cfg = self.config
        self._lock_data_dir(Path(cfg.data_dir))
        self.store = Store(cfg.data_dir, durability=cfg.durability,
                           stale_after=cfg.session_stale_after, exclusive=True,
                           log_limits=LogLimits(cfg.memory_log_max_rows,
                                                cfg.memory_history_per_key))
        # The daemon routes when it is part of a mesh: outbox seqs are then given as sends
        # are journaled, so they can go out before they reach SQLite.
        self.outbox = Outbox(self.store, routing=cfg.mesh)
        self.pipeline = WritePipeline(self.store, self.outbox, fsync=cfg.durability == "fsync")
        recovered = self.pipeline.replay()
        if recovered:
            log.info("folded %d journaled set(s) left by the last run into the store", recovered)
        self._ctx = zmq.asyncio.Context()
        if cfg.mesh:
            self.mesh = Mesh(cfg, self.store, zmq.Context.shadow(self._ctx.underlying),
                             self.outbox, self.pipeline, on_delivered=self._delivered,
                             on_merged=self._merged)
            await self.mesh.start()
        # Claims: granted by a majority of the voters when there are some (the mesh's),
        # else by this daemon for its own sessions (host scope).
        mesh_claims = self.mesh.claims if self.mesh is not None else None
        self.claims = mesh_claims or HostClaims(cfg, self.store, self._hosted_here)
        if mesh_claims is None:
            self.claims.start()
        # With --http: metrics (/metrics, fed by the local API's timings) and the dashboard.
        metrics = None
        if cfg.http:
            from meshd.ipc.web import load_metrics
            metrics = load_metrics(self.info, self.mesh.peers if self.mesh else None)
        self.ipc = IPCServer(cfg, self.store, self._ctx, self.info,
                             Commands(self.store, self.outbox), self.pipeline,
                             peers=self.mesh.peers if self.mesh else None,
                             on_commit=self.mesh.committed if self.mesh else None,
                             on_journaled=self.mesh.router.send_new if self.mesh else None,
                             control=self.control, claims=self.claims,
                             observe=metrics.observe if metrics is not None else None)
        await self.ipc.start()
        if cfg.http:                        # the dashboard (docs/dashboard.md); needs aiohttp
            from meshd.ipc.web import server_class
            self.web = server_class()(cfg, self.store, self.outbox, self._ctx, self.info,
                                      peers=self.mesh.peers if self.mesh else None,
                                      metrics=metrics)
            await self.web.start()
        self._every(self._housekeeping, cfg.expiry_interval, "housekeeping")
        log.info("meshd %s ready: node %s, data in %s, durability=%s, peers on %s",
                 __version__, self.store.node_id, cfg.data_dir, cfg.durability,
                 self.mesh.address if self.mesh else "(no mesh)")
        if self.mesh is not None and self.mesh.security().get("exposed"):
            log.warning("peers are not authenticated: anyone who can reach %s can join this "
                        "mesh and read and write its sessions, messages and memory. On a "
                        "network you do not fully trust, make a cluster key once "
                        "(meshd --gen-key FILE), copy it to every host and start each "
                        "daemon with --key-file FILE (or bind to 127.0.0.1)",
                        self.mesh.address)

    def _hosted_here(self, session_id: str) -> bool:
        """Whether a session is registered through this daemon (host-scope claims)."""
        assert self.store is not None and self.outbox is not None
        with self.store.read(fold=False):
            return self.outbox.host_of(session_id) == self.store.node_id

    def _delivered(self) -> None:
        """Messages routed here landed in local inboxes: live streams push them."""
        if self.ipc is not None:
            self.ipc.publish_events()

    def _merged(self) -> None:
        """A merge of replicated records committed: memory watchers get what it made due."""
        if self.ipc is not None:
            self.ipc.memwatch.merged()

    def _lock_data_dir(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(data_dir / db.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirLocked(f"another meshd, or a program using it as a sessions "
                                f"directory, is using the data directory {data_dir}") from None
        self._lock_fd = fd

    def _every(self, fn: Callable[[], None], interval: float, what: str,
               first: float | None = None) -> None:
        timer = Periodic(fn, interval, what=what, first=first)
        timer.start()
        self._timers.append(timer)

    def _housekeeping(self) -> None:
        """Purge expired memory entries and idle stream subscriptions."""
        try:
            assert self.store is not None and self.ipc is not None
            with self.store.write():
                purged = memory.purge_expired(self.store)
            if purged:
                log.info("purged %d expired memory entries", purged)
            self.ipc.housekeeping()
        except MeshError as exc:
            log.warning("housekeeping failed: %s", exc)

    def info(self) -> dict[str, Any]:
        assert self.store is not None and self.ipc is not None
        return {"node_id": self.store.node_id, "version": __version__,
                "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                "socket": self.config.socket_path, "data_dir": self.config.data_dir,
                "durability": self.config.durability,
                "uptime": round(time.time() - self._started_at, 3),
                "peer_address": self.mesh.address if self.mesh else None,
                "mesh": self.mesh.stats() if self.mesh else None,
                "http": self.web.stats() if self.web else None, **self.ipc.stats()}

    def control(self, command: str, args: dict[str, Any]) -> Any:
        """Mesh control from the local API (`sessions join`, `leave`, `force-leave`)."""
        if self.mesh is None:
            raise MeshError("this daemon runs without a mesh (--no-mesh)")
        if command == "mesh.join":
            return self.mesh.join(args["address"])
        if command == "mesh.force_leave":
            return self.mesh.force_leave(args["node"])
        if command == "mesh.leave":
            # Answer first, then leave as on SIGTERM: the peers hear LEFT, the daemon stops.
            log.info("leaving the mesh and stopping, as asked over the local API")
            asyncio.get_running_loop().call_later(0.05, self.request_stop)
            return {"node_id": self.store.node_id if self.store else None, "state": "leaving"}
        raise MeshError(f"command {command!r} is not served here")

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Reverse order of start: stop serving, stop timers, close the store."""
        await stop_all(*self._timers)
        self._timers = []
        if self.claims is not None and (self.mesh is None or self.mesh.claims is None):
            await self.claims.stop()          # (the mesh stops its own)
        self.claims = None
        if self.web is not None:
            await self.web.stop()
            self.web = None
        if self.ipc is not None:
            self.ipc.stop()
            self.ipc = None
        if self.mesh is not None:
            try:
                await self.mesh.stop(leave=True)
            except Exception:                   # never let a peer problem block the stop
                log.exception("stopping the mesh failed")
            self.mesh = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


async def serve(config: Config) -> None:
    """Run a daemon until SIGTERM/SIGINT; tell systemd when it is ready and stopping."""
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    try:
        await daemon.start()
        notify("READY=1\nSTATUS=serving")
        watchdog = _watchdog_interval()
        if watchdog:
            # Pinged from the event loop itself: if the loop is stuck, the pings stop.
            daemon._every(lambda: notify("WATCHDOG=1"), watchdog, "systemd watchdog", first=0)
        await daemon.wait_stopped()
        log.info("shutting down")
        notify("STOPPING=1")
    finally:
        await daemon.stop()
        log.info("stopped")


def _watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec (WATCHDOG_USEC), when it is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.1)
    except ValueError:
        return None
