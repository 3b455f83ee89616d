"""A session that moves to another host (its agent registered again elsewhere) keeps its
mail: unread messages on the old host follow it, and messages still on their way to the
old host are forwarded, each landing in the new inbox exactly once; the sender sees
them read. Real daemons on loopback, `eventually` waits."""

from __future__ import annotations

from collections import Counter

from conftest import Daemon, eventually, peer_states, wait_converged


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
