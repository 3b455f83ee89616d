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

import asyncio
import errno
import itertools
import logging
import os
import socket as pysocket
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.asyncio

from meshd.config import Config
from meshd.errors import MeshError, StoreError
from meshd.ipc.streams import Limits, Streams
from meshd.state import commands, sessions
from meshd.state.folder import FoldThread
from meshd.state.store import Store
from meshd.wire.ipc import (
    BATCH_COMMAND, BATCHABLE, JOURNALED, OK, REGISTRY, decode_items, decode_request,
    encode_batch_replies, encode_error, encode_reply, validate_args,
)

log = logging.getLogger("meshd.ipc")

#: ipc:// paths are limited by sockaddr_un.sun_path.
MAX_SOCKET_PATH = 107

NodeInfo = Callable[[], dict[str, Any]]
#: The daemon's answer to a mesh control command (mesh.join, mesh.leave, mesh.force_leave).
Control = Callable[[str, dict[str, Any]], Any]

#: A request to run: (client ident, req_id, command, validated args, batch group or None).
Work = tuple[bytes, int, str, dict[str, Any], "int | None"]

#: Commands whose answer is a session record (or None) and those answering a list of them.
_ONE_SESSION = frozenset(n for n, c in REGISTRY.items() if c.answers == "session")
_SESSIONS = frozenset(n for n, c in REGISTRY.items() if c.answers == "sessions")

#: A batch of more requests than this (that are not all journaled writes) is served a
#: slice at a time, _SLICE requests a transaction, within a time budget per loop turn.
_DEFER_OVER = 16
_SLICE = 4
#: Slices waiting at most; past it no new request is read until they are served.
_MAX_DEFERRED = 256
#: Bytes of answers to one batch frame at most; items past it get a too_large error.
_BATCH_REPLY_BYTES = 16 << 20

# Plain ints: pyzmq's enum-typed getsockopt costs microseconds per call on the hot path.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


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


class _BatchFailed(Exception):
    """A request failed in a batch run without savepoints: run it again with them."""


class HostStates:
    """The membership state of the node hosting a session, as this daemon sees it, so a
    client can tell a session that is idle from one whose host is gone ("local", or a
    member's "alive", "suspect", "dead", "left"; "unknown" for a host that is not, or no
    longer, a member). The member table is asked at most once per batch, and only when a
    session hosted elsewhere is answered: a lone daemon pays nothing."""

    def __init__(self, local: str, peers: Callable[[], list[dict[str, Any]]] | None) -> None:
        self.local = local
        self._peers = peers
        self._states: dict[str, str] | None = None

    def __call__(self, host: str | None) -> str:
        if host == self.local:
            return "local"
        if self._states is None:
            peers = self._peers() if self._peers is not None else []
            self._states = {p["node_id"]: p["state"] for p in peers}
        return self._states.get(host or "", "unknown")

    def mark(self, command: str, result: Any) -> Any:
        """Add `host_state` to the session records in a command's answer (in place: the
        rows are fresh). The status itself the store already reads as OFFLINE when the
        host is not up, without rewriting the replicated row."""
        if isinstance(result, dict) and "items" in result:    # a page of a list
            result_rows = result["items"]
        else:
            result_rows = result
        rows = (result_rows if command in _SESSIONS else [result] if command in _ONE_SESSION
                else ())
        for row in rows:
            if isinstance(row, dict):
                row["host_state"] = self(row.get("host"))
        return result


class IPCServer:
    """Serves one ROUTER socket from the daemon's event loop."""

    def __init__(self, config: Config, store: Store, ctx: zmq.asyncio.Context,
                 node_info: NodeInfo, peers: Callable[[], list[dict[str, Any]]] | None = None,
                 on_commit: Callable[[], None] | None = None,
                 control: Control | None = None) -> None:
        self.config = config
        self.store = store
        self.path = config.socket_path
        self.node_info = node_info
        self.peers = peers
        self.control = control
        # Told after writes reach SQLite (replication pushes them to peers).
        self.on_commit = on_commit or (lambda: None)
        self.counters: Counter[str] = Counter(store.journal_damage)   # (kept at start)
        self._ctx = ctx
        self._sock: zmq.asyncio.Socket | None = None
        self._raw: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._deferred: deque[list[Work]] = deque()    # slices of a big batch still to serve
        self._reply_bytes: dict[tuple[bytes, int], int] = {}   # per deferred batch frame
        self._deferred_scheduled = False
        self._waiting_on: dict[bytes, int] = {}        # deferred items per connection
        self._frames = itertools.count(1)              # batch frame tokens
        self._flush_timer: asyncio.TimerHandle | None = None
        self._folder: FoldThread | None = None
        self.streams = Streams(store, self._send, config.stream_window, config.stream_idle_timeout,
                               Limits(config.stream_sub_bytes, config.stream_total_bytes,
                                      config.stream_max_per_client, config.stream_max_total,
                                      config.stream_client_bytes))

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
        self._raw = zmq.Socket.shadow(sock.underlying)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._raw.getsockopt(zmq.FD), self._drain)
        if self.store.journal is not None:
            loop = self._loop
            self._folder = FoldThread(
                self.store, lambda error: loop.call_soon_threadsafe(self._folded, error),
                self.config.checkpoint_interval)
            self._folder.start()
        self._wake()
        log.info("serving the local API on ipc://%s", self.path)

    def stop(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._folder is not None:
            self._folder.stop()             # the store folds the rest when it closes
            self._folder = None
        if self._raw is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._raw.getsockopt(zmq.FD))
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
        """After sending from outside `_drain`: a send lets ZeroMQ consume the socket's
        readability edge, so look for waiting requests ourselves."""
        if self._raw is not None and self._raw.get(_EVENTS) & _POLLIN:
            self._wake()

    def _wake(self) -> None:
        """Drain again on the next loop turn (other tasks get to run in between)."""
        if self._scheduled or self._raw is None:
            return
        self._scheduled = True
        assert self._loop is not None
        self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Called when the socket's FD is readable. That FD is edge-triggered, so we read
        until ZeroMQ says nothing is left, a batch at a time."""
        self._scheduled = False
        raw = self._raw
        if raw is None or len(self._deferred) >= _MAX_DEFERRED:
            return                                  # (it wakes us when it has room again)
        batch: list[list[bytes]] = []
        budget = 4 * self.config.max_frame_bytes       # a few big batch frames at most
        try:
            while len(batch) < self.config.max_batch and raw.get(_EVENTS) & _POLLIN:
                frames = raw.recv_multipart(zmq.NOBLOCK)
                batch.append(frames)
                budget -= len(frames[-1]) if frames else 0
                if budget <= 0:
                    break
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:                       # never let the loop die on a socket
            log.warning("receive failed: %s", exc)
        if batch:
            try:
                self._process(batch)
            except Exception:                                # pragma: no cover - last resort
                log.exception("unexpected error while serving a batch")
                self.counters["internal_errors"] += 1
        if self._raw is not None and self._raw.get(_EVENTS) & _POLLIN:
            self._wake()                                     # more waiting: yield, then continue

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
            if group is None or command in BATCHABLE:
                if command in commands.HANDLERS:
                    store_work.append((ident, req_id, command, args, group))
                else:
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
            groups_tokens.append(next(self._frames))
            self.counters["requests"] += len(items) - 1
            for item_id, item_command, item_args in items:
                if item_command is None:
                    self.counters["rejected.bad_request"] += 1
                    answer(ident, group, encode_error(item_id, "bad_request", item_args))
                else:
                    take(ident, group, item_id, item_command, item_args)
        # Sets and sends are answered from the journal and folded into SQLite by the fold
        # thread; a batch with anything else is one group commit on the loop.
        if self._waiting_on:
            # A connection with slices still waiting is served in order: its new requests
            # queue behind them (a write must not overtake an earlier delete, say).
            behind = [w for w in store_work if self._waiting_on.get(w[0])]
            if behind:
                store_work = [w for w in store_work if not self._waiting_on.get(w[0])]
                self._defer(behind, groups_tokens)
        journaled = (self._folder is not None and bool(store_work)
                     and all(w[2] in JOURNALED for w in store_work))
        if not journaled and len(store_work) > _DEFER_OVER:
            # Many reads (or mixed writes) at once, e.g. one batch frame of hundreds of
            # searches: served a slice at a time, within a time budget per loop turn, so
            # other clients and the peer port are not held up (see `_serve_deferred`).
            self._defer(store_work, groups_tokens)
            store_work = []
        if journaled:
            results = self._run_journaled(store_work)
        elif store_work:
            results = self._run_store_batch(store_work)
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
            self.store.journaled(True)
            self._schedule_flush(len(store_work))
        elif store_work:
            self.streams.publish(self.store.take_events())
            self.on_commit()            # writes, or journaled ones a read just folded
        for ident, req_id, command, args, _ in local_work:
            try:
                self._run_local(ident, req_id, command, args)
            except Exception:                    # one bad command must not skip the rest
                log.exception("command %s failed", command)
                self.counters["internal_errors"] += 1
        if self._deferred and not self._deferred_scheduled:
            self._serve_deferred()

    def _defer(self, work: list[Work], tokens: list[int]) -> None:
        """Queue `work` in slices. A batch item keeps its frame's unique token in place of
        its group index (the answers of deferred items go out per slice)."""
        work = [(w[0], w[1], w[2], w[3], None if w[4] is None else tokens[w[4]])
                for w in work]
        for w in work:
            self._waiting_on[w[0]] = self._waiting_on.get(w[0], 0) + 1
        self._deferred.extend(work[i:i + _SLICE] for i in range(0, len(work), _SLICE))

    def _serve_deferred(self) -> None:
        """Serve deferred slices until this turn's time budget is spent, then yield to the
        loop and go on at the next turn, so other clients are served in between. Past
        _MAX_DEFERRED slices no new request is read (`_drain` waits): a greedy client
        meets backpressure in its own socket queue."""
        self._deferred_scheduled = False
        deadline = time.monotonic() + self.config.ipc_turn_budget
        while self._deferred:
            work = self._deferred.popleft()
            for w in work:
                n = self._waiting_on.get(w[0], 0) - 1
                if n > 0:
                    self._waiting_on[w[0]] = n
                else:
                    self._waiting_on.pop(w[0], None)
            refused = [w for w in work if self._over_budget(w)]
            run = [w for w in work if not self._over_budget(w)]
            results = self._run_store_batch(run) if run else []
            answers = list(zip(run, results)) + [
                (w, encode_error(w[1], "too_large", f"the answers to this batch passed "
                                 f"{_BATCH_REPLY_BYTES >> 20} MiB; send fewer reads per "
                                 f"batch, or page them (limit/offset)")) for w in refused]
            self.counters["rejected.batch_reply_bytes"] += len(refused)
            grouped: dict[bytes, list[bytes]] = {}
            for w, frame in answers:
                if w[4] is None:
                    self._send(w[0], frame)
                    continue
                key = (w[0], w[4])
                self._reply_bytes[key] = self._reply_bytes.get(key, 0) + len(frame)
                grouped.setdefault(w[0], []).append(frame)
            for ident, frames in grouped.items():      # (a batch's answers may come in
                for out in encode_batch_replies(frames, self.config.max_frame_bytes):
                    self._send(ident, out)             # several frames)
            self.streams.publish(self.store.take_events())
            self.on_commit()
            if time.monotonic() >= deadline:
                break
        if self._deferred:
            self.counters["turns_deferred"] += 1
            assert self._loop is not None
            self._deferred_scheduled = True
            self._loop.call_soon(self._serve_deferred)
        else:
            self._reply_bytes.clear()
        self._recheck()                                 # requests that waited meanwhile

    def _over_budget(self, w: Work) -> bool:
        """A read of a batch frame whose answers already passed _BATCH_REPLY_BYTES is not
        run (answered too_large): a batch of hundreds of big reads must not make the daemon
        hold hundreds of megabytes for one client. Writes always run and get their answer."""
        return (w[4] is not None and w[2] in commands.READ_ONLY
                and self._reply_bytes.get((w[0], w[4]), 0) > _BATCH_REPLY_BYTES)

    def _reject(self, replies: list[tuple[bytes, bytes]], ident: bytes | None, req_id: int | None,
                code: str, message: str) -> None:
        self.counters[f"rejected.{code}"] += 1
        if ident is not None:
            replies.append((ident, encode_error(req_id, code, message)))

    def _run_journaled(self, work: list[Work]) -> list[bytes]:
        """A small batch of memory sets and sends: one journal append, then the answers.
        The writes reach SQLite moments later (`_flush`), and before any read or other
        write; a send whose recipient is unknown is refused before it is logged."""
        assert self.store.journal is not None
        records: list[Any] = []
        out: list[bytes] = []
        for _, req_id, command, args, _ in work:
            try:
                records.append(self.store.log_write(command, args))
            except MeshError as exc:
                self.counters[f"error.{exc.code}"] += 1
                out.append(encode_error(req_id, exc.code, str(exc)))
                continue
            key = "message" if command == "message.send" else "entry"
            answer = {f"{key}_id": args[key][f"{key}_id"]}
            out.append(encode_reply(req_id, OK, answer))
            self.counters[f"ok.{command}"] += 1
        try:
            self.store.journal.append(records)
        except BaseException as exc:
            self.store.journaled(False)      # their routed items must not go out now
            if not isinstance(exc, OSError):
                raise
            if records:
                del self.store.pending[-len(records):]
            log.error("journal append failed, %d write(s) not applied: %s", len(records), exc)
            self.counters["error.store_error"] += len(work)
            return [encode_error(w[1], "store_error", f"journal write failed: {exc}")
                    for w in work]
        return out

    def _schedule_flush(self, new: int) -> None:
        """Hand journaled writes to the fold thread: at once when enough are queued or a
        message must be folded before it can be routed, else after a short delay (so one
        lone write does not wake the thread; sends routed from the journal do not wait
        for their fold); fold in place when the thread falls far behind (backpressure)
        or a local subscriber waits for one of the `new` records just logged."""
        assert self._loop is not None
        pending = self.store.pending
        sends = [r[1] for r in pending[-new:] if r[0] == "message.send"] if new else []
        if len(pending) >= self.config.journal_flush_max:
            self._flush()
        elif sends and self._pushes_locally(sends):
            if self._flush_timer is not None:
                self._flush_timer.cancel()
            self._flush_timer = self._loop.call_soon(self._flush)  # type: ignore[assignment]
        elif len(pending) >= self.config.journal_handoff or (
                self.peers is not None and any("_routes" not in a for a in sends)):
            self._hand_off()        # (routed only once folded: no delay for it)
        elif self._flush_timer is None:
            self._flush_timer = self._loop.call_later(self.config.journal_flush_delay,
                                                      self._timer)

    def _pushes_locally(self, sends: list[dict[str, Any]]) -> bool:
        """Whether a live subscription here may want one of these messages now: a
        node-wide one, or one on its recipient (any, for a broadcast). A direct message
        to another daemon's session goes there from the journal and has nobody to wait
        for its fold here."""
        subs = self.streams.by_key
        if not subs:
            return False
        if None in subs:
            return True
        return any(a["message"]["to_session"] is None or a["message"]["to_session"] in subs
                   for a in sends)

    def _hand_off(self) -> None:
        if self._folder is not None and self.store.hand_off():
            self._folder.kick()

    def _timer(self) -> None:
        self._flush_timer = None
        self._hand_off()

    def _folded(self, error: BaseException | None) -> None:
        """On the loop, after the fold thread committed a batch (or failed to)."""
        if error is not None:
            log.error("folding journaled writes into the store failed (kept, retried): %s",
                      error)
            self.counters["fold_errors"] += 1
            if self._loop is not None and self._folder is not None:
                self._loop.call_later(1.0, self._folder.kick)
            return
        self.store.finish_hand_off()
        self.streams.publish(self.store.take_events())
        self.on_commit()
        if self.store.pending and self._flush_timer is None:
            self._hand_off()
        self._recheck()

    def _flush(self) -> None:
        """Fold everything queued now, on the loop."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self._flush_timer = None
        try:
            if self.store.flush():
                self.on_commit()
            self.streams.publish(self.store.take_events())
            self._recheck()
        except MeshError as exc:            # stays queued (and journaled); retried later
            log.error("folding journaled writes into the store failed: %s", exc)
            if self._loop is not None:
                self._flush_timer = self._loop.call_later(1.0, self._flush)

    def _run_store_batch(self, work: list[Work]) -> list[bytes]:
        """Apply a batch in one transaction; replies are valid only once it has committed.

        Most batches have no failing request, so the batch first runs without per-request
        savepoints; if any request fails, the whole transaction is rolled back and the
        batch runs again with a savepoint around each request, so that only the failing
        ones are undone.
        """
        read_only = all(w[2] in commands.READ_ONLY for w in work)
        if not read_only and len(work) > 1:
            try:
                return self._apply(work, read_only, isolate=False)
            except _BatchFailed:
                self.counters["batch_retries"] += 1
        return self._apply(work, read_only, isolate=True)

    def _apply(self, work: list[Work], read_only: bool, isolate: bool) -> list[bytes]:
        """One frame per request of `work`, in its order."""
        out: list[bytes] = []
        ok: Counter[str] = Counter()
        hosts = HostStates(self.store.node_id, self.peers)
        try:
            # A lone read is one statement: SQLite's implicit transaction is enough
            # (after folding in journaled sets, so it reads them).
            if read_only and len(work) == 1:
                self.store.fold_for_read()
            # (It still holds the store's lock: the fold thread shares the connection.)
            tx = (self.store.lock if read_only and len(work) == 1
                  else self.store.read() if read_only else self.store.write())
            with tx:
                for _, req_id, command, args, _ in work:
                    try:
                        if isolate and not read_only and len(work) > 1:
                            with self.store.savepoint():
                                result = commands.run(self.store, command, args)
                        else:
                            result = commands.run(self.store, command, args)
                        result = hosts.mark(command, result)
                    except MeshError as exc:
                        if not isolate:
                            raise _BatchFailed() from exc
                        self.counters[f"error.{exc.code}"] += 1
                        out.append(encode_error(req_id, exc.code, str(exc)))
                        continue
                    except Exception as exc:   # a bug in one command must not fail the batch
                        if not isolate:
                            raise _BatchFailed() from exc
                        log.exception("command %s failed", command)
                        self.counters["internal_errors"] += 1
                        out.append(encode_error(req_id, "internal",
                                                f"{type(exc).__name__}: {exc}"))
                        continue
                    out.append(encode_reply(req_id, OK, result))
                    ok[command] += 1
        except StoreError as exc:
            log.error("commit failed, %d request(s) not applied: %s", len(work), exc)
            self.counters["error.store_error"] += len(work)
            # (The rollback took back this batch's events; what is left came from the
            # journaled writes folded first, which did commit: their subscribers wait.)
            self.streams.publish(self.store.take_events())
            return [encode_error(w[1], exc.code, str(exc)) for w in work]
        for command, n in ok.items():
            self.counters[f"ok.{command}"] += n
        return out

    def _run_local(self, ident: bytes, req_id: int, command: str, args: dict[str, Any]) -> None:
        """Commands the IPC layer answers itself: streams and node information."""
        try:
            if command == "stream.subscribe":
                result = self.streams.subscribe(ident, req_id, args)
                self._send(ident, encode_reply(req_id, OK, result))
                sub = self.streams.subs.get(result["sub"])
                if sub is not None:             # gone if the client vanished before the reply
                    self.streams.pump(sub)
                return
            if command == "stream.ack":
                result = self.streams.ack(ident, args)
            elif command == "stream.close":
                result = self.streams.close(ident, args)
            elif command == "node.info":
                result = self.node_info()
            elif command == "mesh.peers":
                result = self.peers() if self.peers is not None else []
            elif command.startswith("mesh.") and self.control is not None:
                result = self.control(command, args)
            else:                                   # validate_args knows it, we do not
                raise MeshError(f"command {command!r} is not served here")
            self._send(ident, encode_reply(req_id, OK, result))
        except MeshError as exc:
            self.counters[f"error.{exc.code}"] += 1
            self._send(ident, encode_error(req_id, exc.code, str(exc)))

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
        folder = self._folder
        return {"counters": dict(self.counters), "subscriptions": len(self.streams.subs),
                "folded": folder.folded if folder else 0,
                "checkpoints": folder.checkpoints if folder else 0,
                "unfolded": len(self.store.pending) + len(self.store.folding or ()),
                "pushed": self.streams.pushed,
                "dropped_subscriptions": self.streams.dropped_subscriptions,
                "streams": {"unacked_bytes": self.streams.inflight_bytes,
                            "followed": len(self.streams.by_key),
                            "heads": len(self.streams.heads),
                            "paused": len(self.streams.paused),
                            "refused": self.streams.refused}}
