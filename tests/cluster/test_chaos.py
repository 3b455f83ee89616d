"""Randomized faults with a history check: three daemons, one session on each, every
session sending to the others from its own thread while daemons are killed with SIGKILL
and restarted at random moments. Afterwards every send the SDK acknowledged is in its
recipient's inbox exactly once, in send order per sender and recipient; a send that
failed (timeout, daemon gone) is there at most once. The seed is in every failure
message, and `MESHD_CHAOS_SEED` replays a run."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from support.daemons import Daemon, eventually, wait_converged

SESSIONS = ["c0", "c1", "c2"]          # c<i> lives on node i
SENDS_PER_SESSION = 200
KILLS = 4


@dataclass
class History:
    acked: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # id -> (from, to, k)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def sender(node: Daemon, frm: str, seed: int, history: History, progress: Counter[str],
           stop: threading.Event) -> None:
    """Send SENDS_PER_SESSION messages from `frm`, noting each one acknowledged; a failed
    attempt (daemon down or killed mid-call) is counted and the next one is a new message."""
    from sessions import CollaborationHub
    rnd = random.Random(seed)
    hub = CollaborationHub(socket=node.socket, timeout=2.0)
    counters = Counter[str]()
    deadline = time.monotonic() + 120
    i = 0
    while i < SENDS_PER_SESSION and not stop.is_set() and time.monotonic() < deadline:
        to = rnd.choice([s for s in SESSIONS if s != frm])
        k = counters[to]
        try:
            m = hub.send(frm, to, "notification", f"{frm}>{to}#{k}", "chaos")
        except Exception as exc:               # the daemon is down or died mid-call
            with history.lock:
                history.errors[type(exc).__name__] += 1
            time.sleep(0.02)                    # (a dead daemon answers at once: pace retries)
            continue
        with history.lock:
            history.acked[m.message_id] = (frm, to, k)
            progress["sent"] += 1
        counters[to] += 1
        i += 1
    hub.close()


def diagnostics(nodes: list[Daemon]) -> str:
    """What each daemon says of its peers, replication and routing, for a failure."""
    out = []
    for d in nodes:
        try:
            mesh = d.registry(timeout=5).node_info()["mesh"]
            peers = [(p["node_id"][:8], p["state"]) for p in d.registry(timeout=5).peers()]
            out.append(f"node {d.node_id[:8]}: peers {peers}"
                       f" replication {mesh['replication']} routing {mesh['routing']}"
                       f" transport {mesh['transport']['counters']}")
        except Exception as exc:                # (a diagnostic must not hide the failure)
            out.append(f"node {d.node_id[:8]}: {exc!r}")
    return "; ".join(out)


def run_with_kills(nodes: list[Daemon], rnd: random.Random, seed: int,
                   threads: list[threading.Thread], progress: Counter[str],
                   stop: threading.Event, total: int) -> None:
    """Start the client threads; kill -9 a random daemon KILLS times, each after a random
    share of the `total` operations, and start it again a little later; wait for the
    threads (bounded) and leave every daemon running."""
    for t in threads:
        t.start()
    try:
        for n in range(KILLS):
            at = total * (n + rnd.uniform(0.3, 0.9)) / (KILLS + 1)
            eventually(lambda: progress["sent"] >= at or not any(t.is_alive() for t in threads),
                       timeout=60, interval=0.005, message=f"clients going on (seed {seed})")
            victim = rnd.choice(nodes)
            victim.kill9()
            down_for = progress["sent"] + rnd.randint(10, 60)
            try:
                eventually(lambda: progress["sent"] >= down_for, timeout=rnd.uniform(0.2, 1.0),
                           interval=0.005)
            except AssertionError:
                pass                              # (the others may be slow: restart anyway)
            victim.start()
        for t in threads:
            t.join(120)
    finally:
        stop.set()
        for d in nodes:
            if not d.alive():
                d.start()
    assert not any(t.is_alive() for t in threads), f"clients stuck (seed {seed})"


def test_kill9_at_random_moments_loses_nothing_acknowledged(make_cluster):
    seed = int(os.environ.get("MESHD_CHAOS_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    nodes = make_cluster(3)
    wait_converged(nodes)
    for i, sid in enumerate(SESSIONS):
        nodes[i].registry().register(sid, sid.upper(), "claude")
    for d in nodes:
        eventually(lambda d=d: all(d.registry().get(s) for s in SESSIONS), timeout=15,
                   message=f"sessions known everywhere (seed {seed})")

    history, progress, stop = History(), Counter[str](), threading.Event()
    threads = [threading.Thread(target=sender, args=(nodes[i], sid, seed + i, history,
                                                     progress, stop), daemon=True)
               for i, sid in enumerate(SESSIONS)]
    total = SENDS_PER_SESSION * len(SESSIONS)
    run_with_kills(nodes, rnd, seed, threads, progress, stop, total)
    assert len(history.acked) == total, (seed, len(history.acked), history.errors)

    def inboxes() -> dict[str, list[str]]:
        return {sid: [m.message_id for m in nodes[i].hub(timeout=5).get_messages(sid)]
                for i, sid in enumerate(SESSIONS)}

    def all_arrived() -> bool:
        have = {mid for ids in inboxes().values() for mid in ids}
        return set(history.acked) <= have

    try:
        eventually(all_arrived, timeout=60, interval=0.2)
    except AssertionError:
        have = {mid for ids in inboxes().values() for mid in ids}
        missing = sorted(history.acked[mid] for mid in set(history.acked) - have)
        raise AssertionError(f"acknowledged sends missing after 60 s (seed {seed}): "
                             f"{missing[:20]} ({len(missing)} in all); "
                             f"{diagnostics(nodes)}") from None
    boxes = inboxes()
    print(f"chaos seed {seed}: {len(history.acked)} acknowledged, failed attempts "
          f"{dict(history.errors)}, inboxes {[len(v) for v in boxes.values()]}")
    for sid, ids in boxes.items():
        counts = Counter(ids)
        dups = [mid for mid, n in counts.items() if n > 1]
        assert not dups, f"{sid} has {len(dups)} messages twice (seed {seed})"
        unknown = [mid for mid in ids if mid not in history.acked]
        # A failed send may have landed (its reply was lost); nothing else may appear.
        assert len(unknown) <= sum(history.errors.values()), (seed, sid, len(unknown))
        # In send order per sender.
        seen: dict[str, int] = {}
        for mid in ids:
            if mid in history.acked:
                frm, to, k = history.acked[mid]
                assert to == sid, (seed, mid, to, sid)
                assert k > seen.get(frm, -1), f"{frm}>{sid}#{k} out of order (seed {seed})"
                seen[frm] = k


def writer(node: Daemon, sid: str, history: History, progress: Counter[str],
           stop: threading.Event) -> None:
    """Set SENDS_PER_SESSION memory keys from `sid`, noting each acknowledged entry."""
    from sessions import SharedMemory
    memory = SharedMemory(socket=node.socket, timeout=2.0)
    deadline = time.monotonic() + 120
    k = 0
    while k < SENDS_PER_SESSION and not stop.is_set() and time.monotonic() < deadline:
        try:
            entry = memory.set(sid, f"chaos/{sid}/{k}", {"k": k}, tags=["chaos"])
        except Exception as exc:               # the daemon is down or died mid-call
            with history.lock:
                history.errors[type(exc).__name__] += 1
            time.sleep(0.02)
            continue
        with history.lock:
            history.acked[entry.entry_id] = (sid, entry.key, k)
            progress["sent"] += 1
        k += 1


def test_kill9_at_random_moments_every_acknowledged_set_reaches_every_node(make_cluster):
    seed = int(os.environ.get("MESHD_CHAOS_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    nodes = make_cluster(3)
    wait_converged(nodes)
    history, progress, stop = History(), Counter[str](), threading.Event()
    threads = [threading.Thread(target=writer, args=(nodes[i], sid, history, progress, stop),
                                daemon=True) for i, sid in enumerate(SESSIONS)]
    total = SENDS_PER_SESSION * len(SESSIONS)
    run_with_kills(nodes, rnd, seed, threads, progress, stop, total)
    assert len(history.acked) == total, (seed, len(history.acked), history.errors)

    def entries(d: Daemon) -> list[str]:
        return [e.entry_id for e in d.memory(timeout=5).get_by_tags(["chaos"])]

    for d in nodes:
        try:
            eventually(lambda d=d: set(history.acked) <= set(entries(d)), timeout=60,
                       interval=0.2)
        except AssertionError:
            missing = sorted(history.acked[e] for e in set(history.acked) - set(entries(d)))
            raise AssertionError(f"acknowledged sets missing on node {d.node_id[:8]} after "
                                 f"60 s (seed {seed}): {missing[:20]} ({len(missing)} in all);"
                                 f" {diagnostics(nodes)}") from None
        ids = entries(d)
        assert len(ids) == len(set(ids)), f"an entry twice (seed {seed})"
        # A failed set may have landed (its reply was lost); nothing else may appear.
        assert len(set(ids) - set(history.acked)) <= sum(history.errors.values()), seed
        for entry_id in history.acked:
            sid, key, k = history.acked[entry_id]
            assert d.memory(timeout=5).get(key) == {"k": k}, (seed, key)
