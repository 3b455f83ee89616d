"""The local API server: a ZeroMQ ROUTER on an ipc:// socket, answering the protocol of
`meshd.wire.ipc`.

Requests are drained from the socket in batches and applied in one store transaction
(group commit): each request runs in its own savepoint, replies go out only after the
commit, so an acknowledged write is on disk and a failing request undoes only itself.
Readiness comes from the event loop watching the socket's file descriptor, and all socket
calls are non-blocking: one slow or vanished client can never stall the loop or other
clients (its replies are dropped and counted).
"""

from __future__ import annotations

import errno
import logging
import os
import socket as pysocket
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import zmq
import zmq.asyncio

from meshd.config import Config
from meshd.errors import MeshError
from meshd.ipc.batches import DEFER_OVER, StoreBatches, Work
from meshd.ipc.later import LaterReplies, claim_handlers
from meshd.ipc.memwatch import MemoryWatch
from meshd.ipc.monitor import Monitor
from meshd.ipc.streams import Limits, Streams
from meshd.ipc.timing import Observe, now, observe_each, timed
from meshd.ipc.writes import JournaledWrites
from meshd.mesh.drain import SocketDrain
from meshd.state import memlog, sessions
from meshd.state.commands import Commands
from meshd.state.pipeline import WritePipeline
from meshd.state.store import Store
from meshd.wire.ipc import (
    BATCH_COMMAND, JOURNALED, OK, REGISTRY, decode_items, decode_request, encode_batch_replies,
    encode_error, encode_reply, validate_args,
)

log = logging.getLogger("meshd.ipc")

#: ipc:// paths are limited by sockaddr_un.sun_path.
MAX_SOCKET_PATH = 107

if TYPE_CHECKING:
    from meshd.mesh.claims import Claims

NodeInfo = Callable[[], dict[str, Any]]
#: The daemon's answer to a mesh control command (mesh.join, mesh.leave, mesh.force_leave).
Control = Callable[[str, dict[str, Any]], Any]

class SocketInUse(MeshError):
    """Another live daemon already serves this socket."""

    code = "socket_in_use"


def prepare_socket_path(path: str, mode: int) -> None:
    """Create the socket's directory (owner-only) and remove a stale socket file; refuse if
    a live daemon answers on it."""
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise MeshError(f"socket path is longer than {MAX_SOCKET_PATH} bytes: {path}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o750 if mode & 0o070 else 0o700)
    if p.exists() or p.is_symlink():
        probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            probe.connect(str(p))
        except OSError:
            p.unlink()                      # nobody listens: a leftover of a killed daemon
        else:
            raise SocketInUse(f"another meshd is already serving on {path}")
        finally:
            probe.close()


class IPCServer:
    """Serves one ROUTER socket from the daemon's event loop. Each request goes where its
    command is declared to be served (`meshd.wire.ipc.REGISTRY`): the store (batched,
    `meshd.ipc.batches`; memory sets and sends through the journal, `meshd.ipc.writes`),
    the live streams, or the daemon (node information, mesh control)."""

    def __init__(self, config: Config, store: Store, ctx: zmq.asyncio.Context,
                 node_info: NodeInfo, commands: Commands,
                 pipeline: WritePipeline | None = None,
                 peers: Callable[[], list[dict[str, Any]]] | None = None,
                 on_commit: Callable[[], None] | None = None,
                 on_journaled: Callable[[], None] | None = None,
                 control: Control | None = None, claims: "Claims | None" = None,
                 observe: Observe | None = None) -> None:
        self.config = config
        self.store = store
        self.path = config.socket_path
        self.node_info = node_info
        self.peers = peers
        self.control = control
        self.observe = observe          # told each request's time (`meshd.ipc.timing`)
        # Told after writes reach SQLite (replication pushes them to peers), and after
        # sends were journaled (the router sends them to other daemons at once).
        self.on_commit = on_commit or (lambda: None)
        self.on_journaled = on_journaled or (lambda: None)
        self.counters: Counter[str] = Counter(pipeline.damage if pipeline else ())
        self._ctx = ctx
        self._sock: zmq.asyncio.Socket | None = None
        self._raw: zmq.Socket | None = None
        self._drain: SocketDrain | None = None
        self.streams = Streams(store, self._send, config.stream_window, config.stream_idle_timeout,
                               Limits(config.stream_sub_bytes, config.stream_total_bytes,
                                      config.stream_max_per_client, config.stream_max_total,
                                      config.stream_client_bytes))
        self.memwatch = MemoryWatch(store, self.streams, self._recheck)
        self.batches = StoreBatches(
            config, store, commands, self.counters, self._send, self._served, self._recheck,
            peers, observe=observe, after=None if claims is None else {
                "session.unregister": lambda a: claims.session_gone(a["session_id"])})
        self.writes = (None if pipeline is None else JournaledWrites(
            config, pipeline, self.counters, self._folded, self._pushes_locally))
        # The commands answered here rather than by the store, by how they are served.
        self._local: dict[str, Callable[[bytes, int, dict[str, Any]], Any]] = {
            "stream.subscribe": self._subscribe,
            "memory.watch": lambda ident, req_id, a: self._subscribe(ident, req_id, a, True),
            "stream.ack": lambda ident, _, a: self.streams.ack(ident, a),
            "stream.close": lambda ident, _, a: self.streams.close(ident, a),
            "node.info": lambda *_: self.node_info(),
            "mesh.peers": lambda *_: self.peers() if self.peers is not None else [],
        }
        for name, c in REGISTRY.items():
            if c.served_by == "mesh" and name not in self._local and self.control is not None:
                self._local[name] = lambda _i, _r, a, name=name: self.control(name, a)  # type: ignore[misc]
        self.later = LaterReplies(self._send, self.counters, self._recheck)
        if claims is not None:
            self._local.update(claim_handlers(claims))
        self.monitor = Monitor(self._send, config.stream_idle_timeout)   # node.monitor
        self._send = self.monitor.install(self._local, self._send)  # type: ignore[method-assign]

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        prepare_socket_path(self.path, self.config.socket_mode)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)        # unroutable reply -> error, not silence
        sock.setsockopt(zmq.SNDHWM, 10_000)            # frames queued per client at most
        sock.setsockopt(zmq.RCVHWM, 10_000)
        # Hard cap far above the protocol limit: frames between the two get a clear
        # too_large error reply; beyond it ZeroMQ drops the connection before buffering.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.max_frame_bytes + 65536)
        old = os.umask(0o777 & ~self.config.socket_mode)
        try:
            sock.bind(f"ipc://{self.path}")
        finally:
            os.umask(old)
        os.chmod(self.path, self.config.socket_mode)
        self._sock = sock
        # A synchronous view of the same socket: the loop tells us when it is readable and
        # we drain it with non-blocking calls, which costs far less than a future per frame.
        # A turn reads a batch (group commit) of at most max_batch requests and a few big
        # frames; none while deferred slices are full (backpressure on the client).
        self._raw = zmq.Socket.shadow(sock.underlying)
        self._drain = SocketDrain(self._raw, on_batch=self._process,
                                  max_count=self.config.max_batch,
                                  max_bytes=4 * self.config.max_frame_bytes,
                                  ready=lambda: not self.batches.full,
                                  on_error=self._process_failed, name="local API", logger=log)
        if self.writes is not None:
            self.writes.start()
        self._drain.start()
        log.info("serving the local API on ipc://%s", self.path)

    def stop(self) -> None:
        if self.writes is not None:
            self.writes.stop()              # the pipeline folds the rest when it closes
        self.later.cancel()                 # claim requests in flight: their clients time out
        self.monitor.close()
        if self._raw is None:
            return
        if self._drain is not None:
            self._drain.stop()
            self._drain = None
        assert self._sock is not None
        self._sock.close(linger=0)
        self._sock = self._raw = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def publish_events(self) -> None:
        """Push what writes made elsewhere (e.g. routed messages) put in inboxes."""
        self.streams.publish(self.store.take_events())
        self._recheck()

    def housekeeping(self) -> None:
        self.memwatch.tick()                             # replicated changes left parked
        self.streams.publish(self.store.take_events())   # from writes folded by timers
        self._keep_watched_alive()
        self._recheck()
        dropped = self.streams.expire()
        if dropped:
            log.info("dropped %d idle stream subscription(s)", dropped)

    def _keep_watched_alive(self) -> None:
        """A session someone follows (an open stream: a handler, `subscribe`, `sessions
        watch`) is in use: ping it before it would go stale, so an agent that listens is
        not shown OFFLINE just because nothing else pinged for it."""
        watched = [k for k in self.streams.by_key if k is not None]
        if not watched:
            return
        cutoff = self.store.now() - self.config.session_stale_after / 4
        try:
            with self.store.read(fold=False):          # (most turns: nothing is due)
                due = sessions.due_for_keepalive(self.store, watched, cutoff)
            if not due:
                return
            # (An unregistered session stays OFFLINE: a ping touches only last_ping.)
            with self.store.write():
                pinged = sum(sessions.ping(self.store, {"session_id": sid}) for sid in due)
        except MeshError as exc:
            log.warning("keeping watched sessions alive failed: %s", exc)
            return
        if pinged:
            self.counters["keepalive.pings"] += pinged
            self.on_commit()

    # --- receiving -------------------------------------------------------------------------

    def _recheck(self) -> None:
        """After sending from outside the drain: a send lets ZeroMQ consume the socket's
        readability edge, so look for waiting requests ourselves."""
        if self._drain is not None:
            self._drain.recheck()

    def _process_failed(self, exc: Exception) -> None:      # pragma: no cover - last resort
        log.error("unexpected error while serving a batch", exc_info=exc)
        self.counters["internal_errors"] += 1

    def _process(self, batch: list[list[bytes]]) -> None:
        # Replies to single requests go out as they are; replies to the items of a batch
        # frame are collected in that frame's group and sent together (see wire.ipc).
        replies: list[tuple[bytes, bytes]] = []
        groups: list[tuple[bytes, list[bytes]]] = []
        groups_tokens: list[int] = []       # a batch frame's unique token, per group index
        store_work: list[Work] = []
        local_work: list[Work] = []

        def answer(ident: bytes, group: int | None, frame: bytes) -> None:
            if group is None:
                replies.append((ident, frame))
            else:
                groups[group][1].append(frame)

        def take(ident: bytes, group: int | None, req_id: int, command: str, raw: Any) -> None:
            try:
                args = validate_args(command, raw)
            except MeshError as exc:
                self.counters[f"rejected.{exc.code}"] += 1
                answer(ident, group, encode_error(req_id, exc.code, str(exc)))
                return
            except Exception as exc:            # a validator bug must not cost the others
                log.exception("validating %s failed", command)
                self.counters["rejected.invalid_argument"] += 1
                answer(ident, group, encode_error(req_id, "invalid_argument",
                                                  f"{type(exc).__name__}: {exc}"))
                return
            served_by = REGISTRY[command].served_by
            if served_by == "store":
                store_work.append((ident, req_id, command, args, group))
            elif group is None:
                local_work.append((ident, req_id, command, args, group))
            else:
                self.counters["rejected.bad_request"] += 1
                answer(ident, group, encode_error(req_id, "bad_request",
                                                  f"{command} cannot be sent in a batch"))

        for frames in batch:
            self.counters["requests"] += 1
            if len(frames) != 2:
                self._reject(replies, frames[0] if frames else None, None, "bad_request",
                             "a request is exactly one frame")
                continue
            ident, frame = frames
            try:
                req_id, command, raw_args = decode_request(frame, self.config.max_frame_bytes)
                items = decode_items(raw_args) if command == BATCH_COMMAND else None
            except MeshError as exc:
                self._reject(replies, ident, getattr(exc, "req_id", None), exc.code, str(exc))
                continue
            if items is None:
                take(ident, None, req_id, command, raw_args)
                continue
            groups.append((ident, []))
            group = len(groups) - 1
            groups_tokens.append(self.batches.token())
            self.counters["requests"] += len(items) - 1
            for item_id, item_command, item_args in items:
                if item_command is None:
                    self.counters["rejected.bad_request"] += 1
                    answer(ident, group, encode_error(item_id, "bad_request", item_args))
                else:
                    take(ident, group, item_id, item_command, item_args)
        # Sets and sends are answered from the journal and folded into SQLite by the fold
        # thread; a batch with anything else is one group commit on the loop.
        store_work = self.batches.after_waiting(store_work, groups_tokens)
        journaled = (self.writes is not None and self.writes.running and bool(store_work)
                     and all(w[2] in JOURNALED for w in store_work))
        if not journaled and len(store_work) > DEFER_OVER:
            # Many reads (or mixed writes) at once, e.g. one batch frame of hundreds of
            # searches: served a slice at a time, within a time budget per loop turn, so
            # other clients and the peer port are not held up.
            self.batches.defer(store_work, groups_tokens)
            store_work = []
        if journaled:
            assert self.writes is not None
            started = now()
            results = self.writes.run(store_work)
            observe_each(self.observe, (w[2] for w in store_work), started)
        elif store_work:
            results = self.batches.run(store_work)
        else:
            results = []
        for w, frame in zip(store_work, results):
            answer(w[0], w[4], frame)
        for ident, frame in replies:
            self._send(ident, frame)
        for ident, frames in groups:
            for out in encode_batch_replies(frames, self.config.max_frame_bytes):
                self._send(ident, out)
        if journaled:
            # Once answered, and before the fold thread competes for the interpreter:
            # sends to other daemons go out now, from the journaled records.
            assert self.writes is not None
            self.on_journaled()
            self.writes.schedule(len(store_work))
        elif store_work:
            self._served()              # writes, or journaled ones a read just folded
        for ident, req_id, command, args, _ in local_work:
            started = now()
            try:
                self._run_local(ident, req_id, command, args)
            except Exception:                    # one bad command must not skip the rest
                log.exception("command %s failed", command)
                self.counters["internal_errors"] += 1
            observe_each(self.observe, () if command.startswith("claim.") else (command,), started)
        if self.batches.deferred and not self.batches.scheduled:
            self.batches.serve_deferred()

    def _served(self) -> None:
        """Store commands were answered: push their events, tell replication."""
        self.streams.publish(self.store.take_events())
        self.on_commit()

    def _folded(self, changed: bool) -> None:
        """Journaled writes reached SQLite (`meshd.ipc.writes`)."""
        self.streams.publish(self.store.take_events())
        if changed:
            self.on_commit()
        self._recheck()

    def _reject(self, replies: list[tuple[bytes, bytes]], ident: bytes | None, req_id: int | None,
                code: str, message: str) -> None:
        self.counters[f"rejected.{code}"] += 1
        if ident is not None:
            replies.append((ident, encode_error(req_id, code, message)))

    def _pushes_locally(self, records: list[list[Any]]) -> bool:
        """Whether a live subscription here may want one of these journaled records now: a
        node-wide message stream, one on a message's recipient (any, for a broadcast), or
        a memory watch for a set. A direct message to another daemon's session goes there
        from the journal and has nobody to wait for its fold here."""
        subs = self.streams.by_key
        if not subs:
            return False
        for command, args, *_ in records:
            if command == "message.send":
                to = args["message"]["to_session"]
                if None in subs or to is None or to in subs:
                    return True
            elif memlog.STREAM_KEY in subs:
                return True
        return False

    def _run_local(self, ident: bytes, req_id: int, command: str, args: dict[str, Any]) -> None:
        """Commands the IPC layer answers itself: streams, node information, mesh control,
        and claims (answered when their round trips are done)."""
        try:
            handler = self._local.get(command)
            if handler is None:                     # validate_args knows it, we do not
                if command.startswith("claim."):
                    raise MeshError("claims are not served by this daemon")
                raise MeshError(f"command {command!r} is not served here")
            if command.startswith("claim."):
                self.later.answer(ident, req_id,
                                  timed(self.observe, command, handler(ident, req_id, args)),
                                  command)
                return
            result = handler(ident, req_id, args)
            if command not in ("stream.subscribe", "memory.watch"):   # (answer, then push)
                self._send(ident, encode_reply(req_id, OK, result))
            self.counters[f"ok.{command}"] += 1
        except MeshError as exc:
            self.counters[f"error.{exc.code}"] += 1
            self._send(ident, encode_error(req_id, exc.code, str(exc)))

    def _subscribe(self, ident: bytes, req_id: int, args: dict[str, Any],
                   memory: bool = False) -> Any:
        result = (self.streams.watch_memory if memory else self.streams.subscribe)(
            ident, req_id, args)
        self._send(ident, encode_reply(req_id, OK, result))
        sub = self.streams.subs.get(result["sub"])
        if sub is not None:             # gone if the client vanished before the reply
            self.streams.pump(sub)
        return result

    # --- sending ---------------------------------------------------------------------------

    def _send(self, ident: bytes, frame: bytes) -> bool:
        raw = self._raw
        if raw is None:
            return False
        try:
            raw.send_multipart([ident, frame], zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.counters["dropped.client_queue_full"] += 1
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                self.counters["dropped.client_gone"] += 1
                self.streams.forget_client(ident)
            else:
                self.counters["dropped.send_error"] += 1
                log.warning("send to a client failed: %s", exc)
        return False

    def stats(self) -> dict[str, Any]:
        writes = self.writes.stats() if self.writes is not None else {
            "folded": 0, "checkpoints": 0, "unfolded": 0}
        return {"counters": dict(self.counters), "subscriptions": len(self.streams.subs),
                **writes,
                "pushed": self.streams.pushed,
                "dropped_subscriptions": self.streams.dropped_subscriptions,
                "streams": {"unacked_bytes": self.streams.inflight_bytes,
                            "followed": len(self.streams.by_key),
                            "heads": len(self.streams.heads),
                            "paused": len(self.streams.paused),
                            "refused": self.streams.refused},
                "monitor": self.monitor.stats()}
