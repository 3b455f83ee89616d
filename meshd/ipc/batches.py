"""Store commands served in batches: one transaction per batch (group commit), a savepoint
per request only when one fails, and big batches in slices within a time budget per loop
turn, so one greedy client cannot hold up the others or the peer port.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from typing import Any, Callable

from meshd.config import Config
from meshd.errors import MeshError, StoreError
from meshd.ipc.timing import Observe, observe_each
from meshd.state.commands import Commands
from meshd.state.store import Store
from meshd.wire.ipc import OK, READ_ONLY, REGISTRY, encode_batch_replies, encode_error, encode_reply

log = logging.getLogger("meshd.ipc")

#: A request to run: (client ident, req_id, command, validated args, batch group or None).
Work = tuple[bytes, int, str, dict[str, Any], "int | None"]
#: Sends one frame to a client; False when it could not.
Send = Callable[[bytes, bytes], bool]

#: Commands whose answer is a session record (or None) and those answering a list of them.
_ONE_SESSION = frozenset(n for n, c in REGISTRY.items() if c.answers == "session")
_SESSIONS = frozenset(n for n, c in REGISTRY.items() if c.answers == "sessions")

#: A batch of more requests than this (that are not all journaled writes) is served a
#: slice at a time, _SLICE requests a transaction, within a time budget per loop turn.
DEFER_OVER = 16
_SLICE = 4
#: Slices waiting at most; past it no new request is read until they are served.
MAX_DEFERRED = 256
#: Bytes of answers to one batch frame at most; items past it get a too_large error.
BATCH_REPLY_BYTES = 16 << 20


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


class StoreBatches:
    """Runs store commands for the IPC server. `served()` is told after answers went out
    for writes (or for reads that folded journaled writes in first), `turn_done()` when a
    turn of deferred slices ends (requests may have waited meanwhile)."""

    def __init__(self, config: Config, store: Store, commands: Commands, counters: Counter[str],
                 send: Send, served: Callable[[], None], turn_done: Callable[[], None],
                 peers: Callable[[], list[dict[str, Any]]] | None,
                 after: dict[str, Callable[[dict[str, Any]], None]] | None = None,
                 observe: Observe | None = None) -> None:
        self.config = config
        self.store = store
        self.commands = commands
        self.counters = counters
        self._send = send
        self._served = served
        self._turn_done = turn_done
        self._peers = peers
        # Told the args of these commands once a batch with them ran (e.g. an unregister
        # frees the session's claims).
        self._after = after or {}
        self.observe = observe          # told each request's time (`meshd.ipc.timing`)
        self.deferred: deque[list[Work]] = deque()     # slices of a big batch still to serve
        self._reply_bytes: dict[tuple[bytes, int], int] = {}   # per deferred batch frame
        self._scheduled = False
        self._waiting_on: dict[bytes, int] = {}         # deferred items per connection
        self._frames = itertools.count(1)               # batch frame tokens

    @property
    def full(self) -> bool:
        """No new request should be read until deferred slices are served."""
        return len(self.deferred) >= MAX_DEFERRED

    def token(self) -> int:
        """A batch frame's unique token (deferred items of it are grouped by it)."""
        return next(self._frames)

    def after_waiting(self, work: list[Work], tokens: list[int]) -> list[Work]:
        """What of `work` may run now. A connection with slices still waiting is served in
        order: its new requests queue behind them (a write must not overtake an earlier
        delete, say)."""
        if self._waiting_on:
            behind = [w for w in work if self._waiting_on.get(w[0])]
            if behind:
                work = [w for w in work if not self._waiting_on.get(w[0])]
                self.defer(behind, tokens)
        return work

    def defer(self, work: list[Work], tokens: list[int]) -> None:
        """Queue `work` in slices. A batch item keeps its frame's unique token in place of
        its group index (the answers of deferred items go out per slice)."""
        work = [(w[0], w[1], w[2], w[3], None if w[4] is None else tokens[w[4]])
                for w in work]
        for w in work:
            self._waiting_on[w[0]] = self._waiting_on.get(w[0], 0) + 1
        self.deferred.extend(work[i:i + _SLICE] for i in range(0, len(work), _SLICE))

    def serve_deferred(self) -> None:
        """Serve deferred slices until this turn's time budget is spent, then yield to the
        loop and go on at the next turn, so other clients are served in between. Past
        MAX_DEFERRED slices no new request is read: a greedy client meets backpressure
        in its own socket queue."""
        self._scheduled = False
        deadline = time.monotonic() + self.config.ipc_turn_budget
        while self.deferred:
            work = self.deferred.popleft()
            for w in work:
                n = self._waiting_on.get(w[0], 0) - 1
                if n > 0:
                    self._waiting_on[w[0]] = n
                else:
                    self._waiting_on.pop(w[0], None)
            refused = [w for w in work if self._over_budget(w)]
            run = [w for w in work if not self._over_budget(w)]
            results = self.run(run) if run else []
            answers = list(zip(run, results)) + [
                (w, encode_error(w[1], "too_large", f"the answers to this batch passed "
                                 f"{BATCH_REPLY_BYTES >> 20} MiB; send fewer reads per "
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
            self._served()
            if time.monotonic() >= deadline:
                break
        if self.deferred:
            self.counters["turns_deferred"] += 1
            self.schedule()
        else:
            self._reply_bytes.clear()
        self._turn_done()

    def schedule(self) -> None:
        if not self._scheduled and self.deferred:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.serve_deferred)

    @property
    def scheduled(self) -> bool:
        return self._scheduled

    def _over_budget(self, w: Work) -> bool:
        """A read of a batch frame whose answers already passed BATCH_REPLY_BYTES is not
        run (answered too_large): a batch of hundreds of big reads must not make the daemon
        hold hundreds of megabytes for one client. Writes always run and get their answer."""
        return (w[4] is not None and w[2] in READ_ONLY
                and self._reply_bytes.get((w[0], w[4]), 0) > BATCH_REPLY_BYTES)

    def run(self, work: list[Work]) -> list[bytes]:
        """Apply a batch in one transaction; replies are valid only once it has committed.

        Most batches have no failing request, so the batch first runs without per-request
        savepoints; if any request fails, the whole transaction is rolled back and the
        batch runs again with a savepoint around each request, so that only the failing
        ones are undone.
        """
        started = time.perf_counter()
        read_only = all(w[2] in READ_ONLY for w in work)
        out: list[bytes] | None = None
        if not read_only and len(work) > 1:
            try:
                out = self._apply(work, read_only, isolate=False)
            except _BatchFailed:
                self.counters["batch_retries"] += 1
        if out is None:
            out = self._apply(work, read_only, isolate=True)
        if self._after:
            for w in work:
                hook = self._after.get(w[2])
                if hook is not None:
                    hook(w[3])
        observe_each(self.observe, (w[2] for w in work), started)
        return out

    def _apply(self, work: list[Work], read_only: bool, isolate: bool) -> list[bytes]:
        """One frame per request of `work`, in its order."""
        out: list[bytes] = []
        ok: Counter[str] = Counter()
        hosts = HostStates(self.store.node_id, self._peers)
        run = self.commands.run
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
                                result = run(command, args)
                        else:
                            result = run(command, args)
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
            self._served()
            return [encode_error(w[1], exc.code, str(exc)) for w in work]
        for command, n in ok.items():
            self.counters[f"ok.{command}"] += n
        return out
