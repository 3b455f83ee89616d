"""Messages across the mesh: direct and broadcast between sessions on different daemons,
delivered exactly once and in order, kept while the recipient's host is away, with
delivery receipts the sender can see. Real daemons on loopback, `eventually` waits."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import msgpack
import pytest
import zmq

from support.daemons import Daemon, eventually, peer_states, run_cli, wait_converged
from support.routing import acked, assert_inbox_exactly_once_in_order, register_and_spread, \
    start_sender, subjects


def routing_counters(d: Daemon) -> dict[str, int]:
    mesh = d.registry(timeout=5).node_info()["mesh"]
    return {**mesh["transport"]["counters"], **mesh["routing"]["counters"]}


def test_direct_broadcast_threads_and_receipts_across_hosts(make_cluster):
    nodes = make_cluster(3)
    wait_converged(nodes)
    register_and_spread(nodes, {"a": 0, "b": 1, "c1": 2, "c2": 2})
    hub_a, hub_b, hub_c = (d.hub() for d in nodes)
    m = hub_a.send("a", "b", "request", "question", "how?")
    eventually(lambda: subjects(nodes[1], "b") == ["question"], timeout=10,
               message="the direct message on b's host")
    assert subjects(nodes[0], "b") == []                    # stored where b lives
    eventually(lambda: hub_a.get_message_status(m.message_id)["state"] == "stored",
               timeout=10, message="receipt: stored")
    # Read state travels back as a receipt.
    assert [x.subject for x in hub_b.get_messages("b", unread_only=True)] == ["question"]
    assert hub_b.mark_read("b") == 1
    assert hub_b.get_messages("b", unread_only=True) == []
    eventually(lambda: hub_a.get_message_status(m.message_id)["state"] == "read",
               timeout=10, message="receipt: read")
    # A thread spanning hosts is complete on both sides.
    r = hub_b.reply("b", hub_b.get_messages("b")[0], "like this")
    eventually(lambda: subjects(nodes[0], "a") == ["Re: question"], timeout=10,
               message="the reply on a's host")
    for hub in (hub_a, hub_b):
        assert [x.message_id for x in hub.get_conversation(r.message_id)] == [m.message_id,
                                                                              r.message_id]
    # A broadcast reaches every session on every node but the sender, one frame per node.
    before = routing_counters(nodes[2]).get("routed_in", 0)
    hub_a.broadcast("a", "all hands", "meeting")
    for d, sid in ((nodes[1], "b"), (nodes[2], "c1"), (nodes[2], "c2")):
        eventually(lambda d=d, sid=sid: "all hands" in subjects(d, sid), timeout=10,
                   message=f"the broadcast for {sid}")
    assert "all hands" not in subjects(nodes[0], "a")
    assert routing_counters(nodes[2])["routed_in"] - before == 1    # once for c1 and c2
    # ping_session and unknown recipients.
    hub_c.ping_session("c1", "a")
    eventually(lambda: "ping" in [x.type.value for x in hub_a.get_messages("a")],
               timeout=10, message="the ping")
    w = hub_a.send("a", "nobody", "request", "x", "y")       # waits for "nobody"
    assert hub_a.get_message_status(w.message_id)["state"] == "waiting"
    sent = hub_a.get_sent("a")
    assert [s["message"].subject for s in sent] == ["question", "all hands", "x"]
    assert sent[0]["state"] == "read"
    r = run_cli(["--socket", nodes[0].socket, "messages", "a", "--sent"], env=nodes[0].env())
    assert r.returncode == 0 and "read" in r.stdout and "question" in r.stdout, r.stdout


def test_live_handlers_and_watch_get_messages_from_other_hosts(make_cluster):
    nodes = make_cluster(2)
    wait_converged(nodes)
    register_and_spread(nodes, {"sender": 0, "listener": 1})
    got: list[str] = []
    hub_b = nodes[1].hub()
    hub_b.register_handler("notification", lambda msg: got.append(msg.subject),
                           session_id="listener")
    watch = subprocess.Popen([sys.executable, "-m", "sessions", "--socket", nodes[1].socket,
                              "watch", "listener", "--json"], env=nodes[1].env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        eventually(lambda: nodes[1].registry().node_info()["subscriptions"] >= 2, timeout=10,
                   message="both subscribed")
        for i in range(5):
            nodes[0].hub().send("sender", "listener", "notification", f"live-{i}", "x")
        eventually(lambda: got == [f"live-{i}" for i in range(5)], timeout=10,
                   message="the handler called for each, in order")
    finally:
        hub_b.close()
        watch.terminate()
        out, _ = watch.communicate(timeout=10)
    assert all(f"live-{i}" in out for i in range(5)), out


@pytest.mark.parametrize("victim", ["receiver", "sender"])
def test_kill9_with_1000_messages_in_flight(make_cluster, short_tmp, victim):
    nodes = make_cluster(2)
    wait_converged(nodes)
    register_and_spread(nodes, {"tx": 0, "rx": 1})
    tx, rx = nodes
    proc, log = start_sender(short_tmp, tx, 1000)
    try:
        if victim == "receiver":
            eventually(lambda: len(subjects(rx, "rx")) >= 200, timeout=30,
                       message="deliveries under way")
            rx.kill9()
            eventually(lambda: proc.poll() is not None, timeout=60, message="sender done")
            assert proc.returncode == 0
            assert len(acked(log)) == 1000
            rx.start()
        else:
            eventually(lambda: log.exists() and len(acked(log)) >= 300, timeout=30,
                       message="sends under way")
            tx.kill9()
            eventually(lambda: proc.poll() is not None, timeout=30, message="sender stopped")
            tx.start()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    expected = [f"m{i:05d}" for i, _ in acked(log)]
    eventually(lambda: set(expected) <= set(subjects(rx, "rx")), timeout=60,
               message=f"all {len(expected)} acknowledged messages delivered")
    assert_inbox_exactly_once_in_order(rx, expected)
    for _, mid in acked(log)[:50]:
        eventually(lambda mid=mid: tx.hub().get_message_status(mid)["state"] == "stored",
                   timeout=20, message="stored receipts")


def test_a_stopped_host_gets_its_queued_messages_priority_first(make_cluster):
    nodes = make_cluster(3)
    wait_converged(nodes)
    register_and_spread(nodes, {"a": 0, "b": 1, "c": 2})
    hub_a = nodes[0].hub()
    assert nodes[1].stop() == 0
    eventually(lambda: peer_states(nodes[0]).get(nodes[1].node_id) == "left", timeout=10,
               message="b's host gone")
    assert nodes[0].registry().get("b").status.value == "offline"
    sent = [hub_a.send("a", "b", "notification", f"normal-{i}", "x") for i in range(5)]
    urgent = hub_a.send("a", "b", "request", "urgent", "now", priority="high")
    hub_a.broadcast("a", "while-away", "everyone")
    for m in (*sent, urgent):
        assert hub_a.get_message_status(m.message_id)["state"] == "queued"
    eventually(lambda: "while-away" in subjects(nodes[2], "c"), timeout=10,
               message="the broadcast on the host that is up")
    nodes[1].start()
    eventually(lambda: len(subjects(nodes[1], "b")) == 7, timeout=20,
               message="the queued messages delivered on return")
    got = subjects(nodes[1], "b")
    assert got[0] == "urgent"                               # high priority first
    assert [s for s in got if s.startswith("normal")] == [f"normal-{i}" for i in range(5)]
    assert "while-away" in got
    eventually(lambda: all(hub_a.get_message_status(m.message_id)["state"] == "stored"
                           for m in (*sent, urgent)), timeout=10, message="receipts")


def test_messages_that_wait_too_long_expire_and_are_reported(make_cluster):
    nodes = make_cluster(2, args=["--outbox-max-age", "1"])
    wait_converged(nodes)
    register_and_spread(nodes, {"a": 0, "b": 1})
    nodes[1].kill9()
    eventually(lambda: peer_states(nodes[0]).get(nodes[1].node_id) == "dead", timeout=15,
               message="b's host dead")
    hub = nodes[0].hub()
    lost = hub.send("a", "b", "notification", "too-late", "x")
    eventually(lambda: hub.get_message_status(lost.message_id)["state"] == "expired",
               timeout=15, message="the message expired")
    assert routing_counters(nodes[0]).get("expired", 0) >= 1
    assert "expired in the outbox" in nodes[0].log()
    nodes[1].start()
    wait_converged(nodes)
    later = hub.send("a", "b", "notification", "after-return", "x")
    eventually(lambda: subjects(nodes[1], "b") == ["after-return"], timeout=15,
               message="later messages flow; the expired one does not")
    assert hub.get_message_status(later.message_id)["state"] == "stored"


def test_bad_route_frames_are_dropped_and_never_duplicate(make_cluster):
    nodes = make_cluster(2)
    wait_converged(nodes)
    register_and_spread(nodes, {"a": 0, "b": 1})
    target = nodes[1]
    real = nodes[0].hub().send("a", "b", "request", "real", "x")
    eventually(lambda: subjects(target, "b") == ["real"], timeout=10, message="delivered")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(f"tcp://{target.peer_address}")
    fake = "e" * 32

    def msg(mid: str, origin: str = fake, **over: Any) -> dict[str, Any]:
        m = {"message_id": mid, "type": "request", "from_session": "a", "to_session": "b",
             "subject": f"evil-{mid}", "body": "x", "data": {}, "timestamp": "t",
             "in_reply_to": None, "priority": "normal", "origin": origin, "hlc": 1 << 40}
        m.update(over)
        return m

    def route(items: list[Any], sender: str = fake, first: int = 1) -> bytes:
        return msgpack.packb([1, 8, sender, "127.0.0.99:9", {"lane": 1, "first": first,
                                                              "items": items}])
    try:
        sock.send(route([[1, "msg", msg("forged", origin=nodes[0].node_id)]]))  # lies
        sock.send(route([[1, "msg", msg("bad", type="nope")]]))                # bad type
        sock.send(route([[1, "teleport", "x"]]))                               # bad kind
        sock.send(route([[1, "msg", msg(real.message_id)],                     # dup id
                         [2, "msg", msg("fine-1")], [2, "msg", msg("fine-1")],
                         [3, "msg", msg("fine-2", to_session="ghost")]]))
        sock.send(route([[2, "msg", msg("fine-1")]]))                          # resend
    finally:
        sock.close()
        ctx.term()
    c = eventually(lambda: (lambda c: c if c.get("routed_in", 0) >= 5 else None)(
        routing_counters(target)), timeout=10, message="frames handled")
    assert c.get("dropped.forged_origin", 0) >= 1
    assert c.get("dropped.invalid_argument", 0) >= 2
    assert c.get("dropped.unknown_session", 0) >= 1
    got = subjects(target, "b")
    assert got.count("real") == 1 and got.count("evil-fine-1") == 1
    assert "evil-forged" not in got and "evil-bad" not in got
    assert target.alive()
