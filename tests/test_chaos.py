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

from conftest import Daemon, eventually, wait_converged

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
    for t in threads:
        t.start()
    total = SENDS_PER_SESSION * len(SESSIONS)
    try:
        for n in range(KILLS):
            # Kill after a random share of the sends, restart a little later.
            at = total * (n + rnd.uniform(0.3, 0.9)) / (KILLS + 1)
            eventually(lambda: progress["sent"] >= at or not any(t.is_alive() for t in threads),
                       timeout=60, interval=0.005, message=f"sends going on (seed {seed})")
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
    assert not any(t.is_alive() for t in threads), f"senders stuck (seed {seed})"
    assert len(history.acked) == total, (seed, len(history.acked), history.errors)

    def inboxes() -> dict[str, list[str]]:
        return {sid: [m.message_id for m in nodes[i].hub(timeout=5).get_messages(sid)]
                for i, sid in enumerate(SESSIONS)}

    def all_arrived() -> bool:
        have = {mid for ids in inboxes().values() for mid in ids}
        return set(history.acked) <= have

    eventually(all_arrived, timeout=60, interval=0.2,
               message=f"every acknowledged send in its recipient's inbox (seed {seed})")
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
