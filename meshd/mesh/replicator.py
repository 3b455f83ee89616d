"""Replication of the registry and shared memory between daemons.

- **Push**: after local writes commit, this node's new records (its own origin) go to every
  member that is up, at once, as RECORDS{origin: us, after, through}. The receiver merges
  them and advances its knowledge of our origin (as far as the records go, see below)
  only if it already had everything up to `after`; otherwise it PULLs the gap.
- **Anti-entropy**: every `sync_interval` a SYNC with our version vector and membership
  table goes to one random member, which answers with its own. Each side PULLs, origin by
  origin, whatever the other has beyond its own knowledge; a PULL is answered with one
  chunk of records (bounded in count and bytes), and the puller asks for the next chunk
  when the previous one is merged. A node that was down, is new, or was cut off thus
  catches up chunk by chunk, and the loop stays free between chunks.
- Records are validated (`meshd.wire.records`) and checked against the batch they came
  in (same origin, version inside the batch's range, our own origin never beyond our own
  counter, clock stamps not far in the future) before they reach the store; anything
  else is dropped and counted.
- **Knowledge is not taken on anyone's word.** A batch says it is complete through
  `through`, and records superseded or expired are never shipped, so that may be beyond
  its last record. That claim is believed only from the peer we are pulling that origin
  from (a chain we started); any other batch (a push, a stray or forged frame) advances
  our knowledge only as far as the records it carries, and a claim of more than
  `max_version_jump` versions beyond them is dropped. Anti-entropy then pulls the rest
  from a peer that holds it. And since no node can know more of an origin than the
  origin itself, when an up member's own counter (in its SYNC) stays below what we
  believe we hold of it for a sync round, our knowledge of it was forged (or it lost its
  data): it goes back to the last value that origin confirmed, and is pulled again.
- Only members are served PULLs (an answer is up to a chunk of records, which no frame
  from anyone may direct to any address), and only members are pulled from.
- Deletion records and session tombstones (`clear_offline`) are garbage-collected once
  every known member's version vector shows it holds them (and they are older than
  `tombstone_min_age`): by then every member has removed what they cover, so nothing they
  covered can come back. A member that is down (suspect, dead or left, until it is
  reaped after `reap_after`) still counts with the last vector it sent, so what it may
  lack is kept for it; a member that never sent one holds collection back altogether.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from typing import Any, Callable

from meshd.config import Config
from meshd.errors import MeshError
from meshd.mesh.membership import Member, Membership
from meshd.mesh.periodic import Periodic, stop_all
from meshd.mesh.transport import Transport
from meshd.state import replication
from meshd.state.hlc import MAX_DRIFT_MS, physical_ms, stamp_at
from meshd.state.outbox import Outbox
from meshd.state.store import Store
from meshd.wire.peer import FrameType, encode, frame_limit
from meshd.wire.records import record as validate_record

log = logging.getLogger("meshd.mesh")


class Replicator:
    def __init__(self, config: Config, store: Store, membership: Membership,
                 transport: Transport, clock: Callable[[], float] = time.monotonic,
                 outbox: Outbox | None = None,
                 on_merged: Callable[[], None] | None = None) -> None:
        """`on_merged` is told after each merge that committed (the daemon then logs the
        replicated memory changes it made due: `meshd.ipc.memwatch`)."""
        self.config = config
        self.store = store
        self.on_merged = on_merged or (lambda: None)
        # Where merged sessions' waiting or unread mail goes (the daemon's, which routes).
        self.outbox = outbox if outbox is not None else Outbox(store)
        self.membership = membership
        self.transport = transport
        self.clock = clock              # the loop's clock (a virtual one in simulations)
        self.counters: Counter[str] = Counter()
        self.pushed = 0                 # our own version through which we pushed
        self._push_scheduled = False
        # One anti-entropy round every sync_interval ±25 % (nodes started together do
        # not sync in step), and tombstone collection.
        self._syncing = Periodic(self._sync_round, config.sync_interval,
                                 what="anti-entropy round", jitter=0.25)
        self._collecting = Periodic(self.collect_tombstones, config.tombstone_gc_interval,
                                    what="tombstone collection")
        # origin -> (peer being pulled from, deadline): one pull chain per origin at a
        # time, whichever peer it is from, so a node behind several peers that all hold
        # an origin gets each record once, not once per peer.
        self._pulling: dict[str, tuple[str, float]] = {}
        # origin -> our knowledge when that origin's own counter first fell short of it,
        # and when; and the last knowledge of it that its counter covered.
        self._doubts: dict[str, tuple[int, float]] = {}
        self._confirmed: dict[str, int] = {}
        # origin -> a catch-up under way: peer, our knowledge at its start, the peer's
        # (the target), ours now; for progress in `sessions peers` and `sessions monitor`.
        self._catchup: dict[str, dict[str, Any]] = {}

    def start(self) -> None:
        with self.store.read(fold=False):
            self.pushed = replication.known(self.store, self.store.node_id)
        self._syncing.start()
        self._collecting.start()

    async def stop(self) -> None:
        await stop_all(self._syncing, self._collecting)

    # --- push -------------------------------------------------------------------------------

    def committed(self) -> None:
        """Local writes committed (or were journaled): push them soon, coalesced."""
        if not self._push_scheduled:
            self._push_scheduled = True
            asyncio.get_running_loop().call_soon(self._push)

    def _push(self) -> None:
        self._push_scheduled = False
        if self.store.folded_version() <= self.pushed:
            return
        targets = self.membership.alive()
        try:
            for _ in range(100):                     # bounded: one chunk per round
                frame, through, more = self._chunk(self.store.node_id, self.pushed)
                if frame is None:
                    break
                for m in targets:
                    self.transport.send_frame(m.address, frame)
                self.counters["pushed_chunks"] += 1
                self.pushed = through
                if not more:
                    break
        except MeshError as exc:
            log.warning("push failed: %s", exc)

    def _chunk(self, origin: str, after: int) -> tuple[bytes | None, int, bool]:
        """One RECORDS frame of `origin` above `after`, under the size limits."""
        limit = self.config.sync_chunk_records
        budget = min(self.config.sync_chunk_bytes, self.config.max_frame_bytes - 1024)
        while True:
            with self.store.read(fold=False):
                records, through = replication.export(self.store, origin, after, limit)
                complete = replication.known(self.store, origin)
            if through <= after and not records:
                return None, after, False
            more = through < complete
            frame = encode(FrameType.RECORDS, self.store.node_id, self.transport.address,
                           {"origin": origin, "after": after, "through": through,
                            "records": records, "more": more})
            if len(frame) <= budget or limit == 1:
                if len(frame) > frame_limit(self.config.max_frame_bytes):
                    self.counters["dropped.record_too_large"] += 1
                    log.warning("a record of %s at version %d is over the frame limit",
                                origin[:12], through)
                    return None, after, False
                return frame, through, more
            limit = max(1, limit // 2)

    # --- anti-entropy -------------------------------------------------------------------------

    def _sync_round(self) -> None:
        """Pull chains that stopped answering expire; one SYNC to a random member."""
        now = self.clock()
        self._pulling = {o: p for o, p in self._pulling.items() if p[1] > now}
        self._catchup = {o: c for o, c in self._catchup.items() if o in self._pulling}
        self.sync_with_random()

    def sync_with_random(self) -> None:
        up = self.membership.alive()
        if up:
            self.send_sync(random.choice(up).address, reply=True)

    def send_sync(self, address: str, reply: bool) -> None:
        with self.store.read(fold=False):
            digest = replication.digest(self.store)
        self.transport.send(address, FrameType.SYNC,
                            {"digest": digest, "members": self.membership.table(),
                             "reply": reply})

    def on_sync(self, sender: str, reply_to: str, body: dict[str, Any]) -> None:
        self.membership.apply(body["members"], sender)
        theirs = body["digest"]
        m = self.membership.note_digest(sender, theirs)
        with self.store.read(fold=False):
            mine = replication.digest(self.store)
        if m is not None and m.up and sender in mine and sender in theirs:
            self._check_counter(m, theirs[sender], mine[sender])
        behind = {o: v for o, v in theirs.items() if v > mine.get(o, 0)}
        if behind:
            # Under write load the pushes that will close these gaps are usually in
            # flight: look again a moment later and pull only what is still missing.
            asyncio.get_running_loop().call_later(
                self.config.push_grace, self._pull_if_behind, reply_to, behind)
        if body["reply"]:
            self.send_sync(reply_to, reply=False)

    def _check_counter(self, m: Member, counter: int, known: int) -> None:
        """`m` says its own counter is `counter` and we believe we hold it through
        `known`: more than it ever made is forged knowledge, unless a frame from it was
        merely overtaken (so it must still fall short a sync round later)."""
        origin, now = m.node_id, self.clock()
        if counter >= known:
            self._confirmed[origin] = known
            self._doubts.pop(origin, None)
            return
        first = self._doubts.get(origin)
        if first is None or counter >= first[0]:
            self._doubts[origin] = (known, now)
            return
        if now - first[1] < self.config.sync_interval:
            return
        back = min(self._confirmed.get(origin, 0), counter)
        try:
            with self.store.write():
                replication.forget_beyond(self.store, origin, back)
        except MeshError as exc:
            log.warning("cannot reset the knowledge of %s: %s", origin[:12], exc)
            return
        del self._doubts[origin]
        self.counters["knowledge_resets"] += 1
        log.warning("we held %s through version %d, beyond its own counter %d: pulling it "
                    "again from version %d", origin[:12], known, counter, back)
        self._pull(m.address, origin, back, force=True)

    def _pull_if_behind(self, address: str, behind: dict[str, int]) -> None:
        try:
            with self.store.read(fold=False):
                mine = {o: replication.known(self.store, o) for o in behind}
        except MeshError as exc:
            log.warning("anti-entropy check failed: %s", exc)
            return
        for origin, version in behind.items():
            if version > mine[origin]:
                c = self._catchup.setdefault(origin, {"peer": address, "start": mine[origin],
                                                      "known": mine[origin], "at": 0.0})
                c["target"] = max(version, c.get("target", 0))
                self._pull(address, origin, mine[origin])
            else:
                self.counters["pulls_avoided"] += 1

    def _pull(self, address: str, origin: str, after: int, force: bool = False) -> None:
        """Ask `address` for `origin`'s records above `after`. Unless forced (the next
        chunk of a chain, or a gap in it), not while a chain for that origin is under
        way from any peer; a chain that stops answering expires after two sync rounds.
        Only from a member that is up: a frame from anywhere else (which may name any
        address) must not point a chain at a peer that never answers."""
        if not self.transport.pinned(address):
            self.counters["pulls_not_member"] += 1
            return
        now = self.clock()
        busy = self._pulling.get(origin)
        if not force and busy is not None and busy[1] > now:
            self.counters["pulls_deferred"] += 1
            return
        self._pulling[origin] = (address, now + self.config.sync_interval * 2)
        self.transport.send(address, FrameType.PULL, {"origin": origin, "after": after})
        self.counters["pulls"] += 1
        log.debug("pulling %s's records after version %d from %s", origin[:12], after, address,
                  extra={"event": "replication.pull",
                         "fields": {"origin": origin, "peer": address, "after": after}})

    def on_pull(self, reply_to: str, body: dict[str, Any]) -> None:
        if not self.transport.pinned(reply_to):
            self.counters["dropped.pull_not_member"] += 1
            return
        frame, _, _ = self._chunk(body["origin"], body["after"])
        if frame is not None:
            self.transport.send_frame(reply_to, frame)
            self.counters["served_chunks"] += 1

    # --- receiving records -------------------------------------------------------------------

    def on_records(self, sender: str, reply_to: str, body: dict[str, Any]) -> None:
        origin, after, through = body["origin"], body["after"], body["through"]
        me = self.store.node_id
        if through < after:
            self.counters["dropped.bad_range"] += 1
            return
        good = self._valid_records(origin, after, through, body["records"])
        if origin == me:
            return                     # we are the authority on our own records
        held = max((r["version"] for r in good), default=after)
        if through - held > self.config.max_version_jump:
            # Believing it would make us skip everything up to `through`.
            self.counters["dropped.version_jump"] += 1
            return
        with self.store.read(fold=False):
            known_now = replication.known(self.store, origin)
            full = (not known_now and replication.origin_count(self.store)
                    >= self.config.max_origins)
        if full:
            self.counters["dropped.too_many_origins"] += 1
            return
        asked = self._pulling.get(origin, ("",))[0] == reply_to
        dropped = len(good) < len(body["records"])
        if dropped:
            through = after           # do not advance knowledge past dropped records
        elif through > held and not asked:
            self.counters["claims_ignored"] += 1   # see the module docstring
            through = held
        # Catching up: ask for the next chunk now, so the peer reads and ships it while
        # we merge this one (one chunk ahead at most; merging is idempotent, and a chunk
        # that arrives before its predecessor took effect is handled as a gap).
        prefetched = asked and not dropped and body["more"] and known_now == after
        if prefetched:
            self._pull(reply_to, origin, through, force=True)
        self._merge(sender, reply_to, body, good, known_now, through, dropped, prefetched)

    def _valid_records(self, origin: str, after: int, through: int, raws: list[Any]
                       ) -> list[dict[str, Any]]:
        """The records of a batch that pass validation and belong in it (the others are
        counted)."""
        me = self.store.node_id
        good: list[dict[str, Any]] = []
        wall_ms = int(self.store.wall() * 1000)
        for raw in raws:
            try:
                rec = validate_record(raw)
            except MeshError:
                self.counters["dropped.invalid_record"] += 1
                continue
            if rec["origin"] != origin or not after < rec["version"] <= through:
                self.counters["dropped.record_outside_batch"] += 1
                continue
            if origin == me and rec["version"] > self.store.version:
                self.counters["dropped.forged_own_origin"] += 1
                continue
            if physical_ms(rec["hlc"]) > wall_ms + MAX_DRIFT_MS:
                self.counters["dropped.future_clock"] += 1
                continue
            good.append(rec)
        return good

    def _merge(self, sender: str, reply_to: str, body: dict[str, Any],
               good: list[dict[str, Any]], known_now: int, through: int, dropped: bool,
               prefetched: bool) -> None:
        origin, after = body["origin"], body["after"]
        try:
            with self.store.write():
                known_before = replication.known(self.store, origin)
                changed = replication.apply(self.store, self.outbox, origin, after, through, good)
                known_after = replication.known(self.store, origin)
        except MeshError as exc:
            log.warning("merging records from %s failed: %s", sender[:12], exc)
            self.counters["merge_errors"] += 1
            return
        self.on_merged()
        self.counters["records_in"] += len(good)
        if origin in self._catchup:
            self._progress(origin, known_after)
        self.counters["records_changed"] += changed
        if dropped:
            return                    # anti-entropy asks again later, not in a tight loop
        if not prefetched and self._pulling.get(origin, ("",))[0] == reply_to:
            del self._pulling[origin]             # this chain is done
        if known_before < after:
            self._pull(reply_to, origin, known_before, force=True)    # fill the gap
        elif body["more"] and known_after >= through and not prefetched:
            self._pull(reply_to, origin, known_after, force=True)     # next chunk

    # --- deletions GC ------------------------------------------------------------------------

    def collect_tombstones(self) -> int:
        """Drop deletion records and session tombstones every member holds; returns how
        many went."""
        members: list[Member] = list(self.membership.members.values())
        if any(not m.digest for m in members):
            return 0                                 # someone never told us what it holds
        horizon = stamp_at(self.store.wall() - self.config.tombstone_min_age)
        with self.store.write():
            # Ours too: a record we hold beyond a gap in our own knowledge is kept until
            # the gap closes, so our vector always covers what we collected.
            digests = [replication.digest(self.store), *(m.digest for m in members)]
            n = replication.collect_deletions(self.store, horizon, digests)
            s = replication.collect_sessions(self.store, horizon, digests)
        if n:
            self.counters["tombstones_collected"] += n
            log.info("collected %d deletion record(s) every member holds", n)
        if s:
            self.counters["session_tombstones_collected"] += s
            log.info("collected %d session tombstone(s) every member holds", s)
        return n + s

    def _progress(self, origin: str, known: int) -> None:
        """A catch-up chunk merged: say how far along it is (every 2 s, and when done)."""
        c = self._catchup[origin]
        c["known"] = known
        span, done, now = max(1, c["target"] - c["start"]), known >= c["target"], self.clock()
        if done:
            del self._catchup[origin]
        if done or now - c["at"] >= 2.0:
            c["at"] = now
            pct = min(100, 100 * (known - c["start"]) // span)
            log.log(logging.INFO if span >= 100 else logging.DEBUG,
                    "catching up on %s from %s: %d%% (version %d of %d)", origin[:12],
                    c["peer"], pct, known, c["target"], extra={
                        "event": "replication.caught_up" if done else "replication.progress",
                        "fields": {"origin": origin, "peer": c["peer"], "known": known,
                                   "target": c["target"], "progress": pct / 100}})

    def catching_up(self) -> list[dict[str, Any]]:
        return [{"origin": o, "peer": c["peer"], "start": c["start"], "known": c["known"],
                 "target": c["target"]} for o, c in self._catchup.items()]

    def stats(self) -> dict[str, Any]:
        return {"pushed_through": self.pushed, "counters": dict(self.counters),
                "catching_up": self.catching_up()}
