"""A session that moves to another host (its agent registered again elsewhere) keeps its
mail: unread messages on the old host follow it, and messages still on their way to the
old host are forwarded, each landing in the new inbox exactly once; the sender sees
them read. Real daemons on loopback, `eventually` waits."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

from support.daemons import Daemon, eventually, peer_states, wait_converged
from meshd.state import mail
from meshd.state import replication
from meshd.state import sessions as state_sessions
from meshd.state.outbox import Outbox
from meshd.state.store import Store


def inbox(d: Daemon, sid: str) -> Counter[str]:
    return Counter(m.subject for m in d.hub().get_messages(sid))


def place(nodes: list[Daemon], placement: dict[str, int]) -> None:
    """Converge, register each session on its node, wait until node 0 knows them all."""
    wait_converged(nodes)
    for sid, i in placement.items():
        nodes[i].registry().register(sid, sid.upper(), "claude")
    eventually(lambda: all(nodes[0].registry().get(s) for s in placement), timeout=15,
               message="sessions known on node 0")


def test_unread_and_in_flight_messages_follow_a_moved_session(make_cluster):
    a, b, c = nodes = make_cluster(3)
    place(nodes, {"sender": 0, "mover": 1})
    hub_a = a.hub(timeout=10)
    m1 = hub_a.send("sender", "mover", "request", "m1", "read on b")
    hub_a.send("sender", "mover", "request", "m2", "unread on b")
    eventually(lambda: inbox(b, "mover") == Counter({"m1": 1, "m2": 1}), timeout=15,
               message="m1, m2 on b")
    assert b.hub().mark_read("mover", [m1.message_id]) == 1

    # b goes away; messages for mover wait in a's outbox for b.
    b.stop()
    eventually(lambda: peer_states(a).get(b.node_id) in ("dead", "left"), timeout=15,
               message="b seen gone")
    m3 = hub_a.send("sender", "mover", "request", "m3", "queued for b")
    hub_a.send("sender", "mover", "request", "m4", "queued for b")

    # The agent comes back on c: same session id, new host.
    c.registry().register("mover", "MOVER", "claude")
    eventually(lambda: getattr(a.registry().get("mover"), "host", None) == c.node_id,
               timeout=15, message="a sees mover hosted by c")
    hub_a.send("sender", "mover", "request", "m5", "straight to c")

    # b returns: it learns of the move and passes on what is unread or arrives for mover.
    b.start()
    want = Counter({"m2": 1, "m3": 1, "m4": 1, "m5": 1})
    eventually(lambda: inbox(c, "mover") == want, timeout=30,
               message=f"m2..m5 once each in mover's inbox on c (have {inbox(c, 'mover')})")
    assert inbox(b, "mover")["m1"] == 1                 # read there: stays as history
    # Nothing more arrives (no duplicates from forwarding and resending).
    counters = b.registry().node_info()["mesh"]["routing"]["counters"]
    assert counters.get("dropped.unknown_session", 0) == 0
    assert inbox(c, "mover") == want

    # Read on c: the sender sees it read, though its receipt named b.
    assert c.hub().mark_read("mover") == 4
    eventually(lambda: hub_a.get_message_status(m3.message_id)["state"] == "read",
               timeout=15, message="m3 read, as the sender sees it")


def test_a_forwarded_message_is_not_forwarded_again(make_cluster):
    """Registries that disagree for a moment must not bounce a message between hosts: a
    forwarded message goes into the inbox where it arrives."""
    a, b = nodes = make_cluster(2)
    place(nodes, {"s-a": 0, "s-b": 1})
    hub_a = a.hub(timeout=10)
    for i in range(20):
        hub_a.send("s-a", "s-b", "notification", f"n{i}", "x")
    # s-b moves to a (its agent registered there) while the messages may still be on
    # their way to b: those b stored follow (unread), those arriving later are
    # forwarded, and a, which already holds every one of them as their sender's daemon,
    # puts each in s-b's inbox once.
    a.registry().register("s-b", "S-B", "claude")
    want = Counter({f"n{i}": 1 for i in range(20)})
    eventually(lambda: inbox(a, "s-b") == want, timeout=30,
               message="every message once in s-b's inbox on a")
    assert inbox(a, "s-b") == want


def unread(d: Daemon, sid: str) -> Counter[str]:
    return Counter(m.subject for m in d.hub().get_messages(sid, unread_only=True))


def test_moving_back_never_hands_out_mail_twice(make_cluster):
    a, b, c = nodes = make_cluster(3)
    place(nodes, {"sender": 0, "mover": 1})
    a.hub(timeout=10).send("sender", "mover", "request", "m1", "x")
    eventually(lambda: unread(b, "mover") == Counter({"m1": 1}), timeout=15, message="m1 on b")
    c.registry().register("mover", "MOVER", "claude")
    eventually(lambda: unread(c, "mover") == Counter({"m1": 1}), timeout=15,
               message="m1 followed mover to c")
    assert inbox(b, "mover") == Counter()              # moved, not copied
    assert c.hub().mark_read("mover") == 1             # the agent read it on c
    b.registry().register("mover", "MOVER", "claude")  # and comes back to b
    eventually(lambda: getattr(c.registry().get("mover"), "host", None) == b.node_id,
               timeout=15, message="c sees mover back on b")
    a.hub(timeout=10).send("sender", "mover", "request", "m2", "y")
    eventually(lambda: unread(b, "mover") == Counter({"m2": 1}), timeout=15,
               message="only the new message unread on b")
    assert inbox(c, "mover") == Counter({"m1": 1})     # read there: history stays


# --- the same rules at the state layer: real stores (SQLite files), records and routed
# items carried between them by the test, so that the order of events is exact ----------

def new_store(tmp: Path, name: str) -> Store:
    return Store(tmp / name, exclusive=True)


def register(store: Store, sid: str) -> None:
    with store.write():
        state_sessions.register(store, {"session_id": sid, "agent_name": sid, "agent_type": "t",
                                        "human_user": None, "location": None,
                                        "capabilities": [], "metadata": {}})


def sync(src: Store, dst: Store) -> None:
    """dst takes every record src has that it lacks (what anti-entropy does)."""
    with src.read():
        digest = replication.digest(src)
    for origin in digest:
        if origin == dst.node_id:
            continue
        with dst.read():
            after = replication.known(dst, origin)
        with src.read():
            records, through = replication.export(src, origin, after, 10_000)
        with dst.write():
            replication.apply(dst, Outbox(dst), origin, after, through, records)


def route(src: Store, dst: Store, lane: int = 1) -> None:
    """Deliver what src queued for dst, and acknowledge it (what the routers do)."""
    with src.read():
        items = Outbox(src).items(dst.node_id, lane, 0, 10_000)
    if items:
        with dst.write():
            through, _ = Outbox(dst).deliver(src.node_id, lane, items[0][0],
                                                       items)
        with src.write():
            Outbox(src).acked(dst.node_id, lane, through)


def send(store: Store, frm: str, to: str, subject: str) -> str:
    m = {"message_id": uuid.uuid4().hex, "type": "request", "from_session": frm,
         "to_session": to, "subject": subject, "body": "b", "data": {}, "timestamp": "t",
         "in_reply_to": None, "priority": "normal"}
    with store.write():
        mail.send(store, Outbox(store), {"message": m})
    return m["message_id"]


def subjects(store: Store, sid: str) -> list[str]:
    with store.read():
        return [m["subject"] for m in mail.list_inbox(
            store, {"session_id": sid, "include_broadcasts": True, "message_type": None,
                    "unread_only": False})]


def test_state_forwarded_mail_follows_a_second_move_made_before_it_arrived(tmp_path):
    a, b, c, d = (new_store(tmp_path, n) for n in "abcd")
    register(a, "sender")
    register(b, "mover")
    for x in (a, c, d):
        sync(b, x)
    send(a, "sender", "mover", "m1")
    route(a, b)
    assert subjects(b, "mover") == ["m1"]
    register(c, "mover")             # the agent moves to c ...
    sync(c, b)                       # ... b learns it and queues m1 for c
    sync(c, d)
    register(d, "mover")             # ... and on to d before c got m1
    sync(d, c)                       # c knows of d first
    route(b, c)                      # then b's forward reaches c
    assert subjects(c, "mover") == []
    route(c, d)                      # c passes it on
    assert subjects(d, "mover") == ["m1"]
    assert subjects(b, "mover") == []


def test_state_expired_forwards_are_reported(tmp_path):
    a, b, c = (new_store(tmp_path, n) for n in "abc")
    register(a, "sender")
    register(b, "mover")
    sync(b, a)
    send(a, "sender", "mover", "m1")
    route(a, b)
    sync(b, c)                       # c has b's records (and clock) before the move, as
    register(c, "mover")             # anti-entropy gives it: else both registrations may
    sync(c, b)                       # share a millisecond and the older one win by node id
    with b.write():
        gone = Outbox(b).expire(10**9, 0)     # (over the size bound)
    assert [(dest, kind) for _, dest, kind in gone] == [(c.node_id, "fwd")]


def test_state_a_forged_forward_cannot_put_a_message_in_another_inbox(tmp_path):
    a, b = (new_store(tmp_path, n) for n in "ab")
    register(a, "sender")
    register(b, "victim")
    register(b, "other")
    sync(b, a)
    mid = send(a, "sender", "other", "for other")
    route(a, b)
    forged = {"message_id": mid, "type": "request", "from_session": "sender",
              "to_session": "victim", "subject": "for other", "body": "b", "data": {},
              "timestamp": "t", "in_reply_to": None, "priority": "normal",
              "origin": a.node_id, "hlc": 1}
    with b.write():
        Outbox(b).deliver("c" * 32, 1, 1, [[1, "fwd", forged]])
    assert subjects(b, "victim") == []
    assert subjects(b, "other") == ["for other"]
