"""Routing from the journal: a send to another daemon goes out as soon as it is journaled,
with its outbox seq given then, before the fold puts it in SQLite. These tests kill and
restart daemons while such sends are in flight and then send more, so that a seq given
twice (the later message skipped as a resend), a run started past an item not yet folded,
or an acknowledgement lost on the way to the outbox would show as a missing, duplicated or
reordered message, or a receipt stuck in "queued". Real daemons on loopback."""

from __future__ import annotations

from support.daemons import eventually, wait_converged
from support.routing import acked, assert_inbox_exactly_once_in_order, register_and_spread, \
    start_sender, subjects


def finish(proc, timeout: float) -> int:
    eventually(lambda: proc.poll() is not None, timeout=timeout, message="sender done")
    return proc.returncode


def reap(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def tx_and_rx(make_cluster):
    nodes = make_cluster(2)
    wait_converged(nodes)
    register_and_spread(nodes, {"tx": 0, "rx": 1})
    return nodes


def test_sender_kill9_mid_stream_then_more_messages_flow_exactly_once(make_cluster, short_tmp):
    nodes = tx_and_rx(make_cluster)
    tx, rx = nodes
    proc, log1 = start_sender(short_tmp, tx, 3000)
    try:
        eventually(lambda: log1.exists() and len(acked(log1)) >= 500, timeout=30,
                   message="sends under way")
        tx.kill9()                       # sends journaled and routed, not all folded
        finish(proc, 30)
    finally:
        reap(proc)
    tx.start()
    wait_converged(nodes)
    # After the restart the outbox counters come back from the journal and SQLite: a seq
    # handed out again would make rx drop the new message as one it already has.
    proc, log2 = start_sender(short_tmp, tx, 500)
    assert finish(proc, 60) == 0
    first = [f"m{i:05d}" for i, _ in acked(log1)]
    second = [f"m{i:05d}" for i, _ in acked(log2)]
    assert len(second) == 500

    ids1, ids2 = {mid for _, mid in acked(log1)}, {mid for _, mid in acked(log2)}

    def inbox() -> list[tuple[str, str]]:
        return [(m.message_id, m.subject) for m in rx.hub().get_messages("rx")]
    eventually(lambda: (ids1 | ids2) <= {mid for mid, _ in inbox()}, timeout=60,
               message="every acknowledged message delivered")
    got = inbox()
    assert len(got) == len({mid for mid, _ in got}), "a message is in the inbox twice"
    # The second run reuses the subjects m00000...: check each run's order by its ids.
    run1 = [s for mid, s in got if mid in ids1]
    run2 = [s for mid, s in got if mid in ids2]
    assert run1 == sorted(run1) and run2 == sorted(run2), "out of send order"
    assert len(run1) == len(first) and len(run2) == len(second) == 500
    for _, mid in acked(log2)[-20:] + acked(log1)[-20:]:
        eventually(lambda mid=mid: tx.hub().get_message_status(mid)["state"] == "stored",
                   timeout=20, message="stored receipts")
    assert tx.hub().get_message_status(acked(log2)[0][1])["state"] == "stored"


def test_receiver_restarts_while_sends_keep_coming(make_cluster, short_tmp):
    nodes = tx_and_rx(make_cluster)
    tx, rx = nodes
    proc, log = start_sender(short_tmp, tx, 3000)
    try:
        eventually(lambda: len(subjects(rx, "rx")) >= 300, timeout=30,
                   message="deliveries under way")
        rx.kill9()                       # frames in flight are lost: a gap, then a resend
        eventually(lambda: log.exists() and len(acked(log)) >= 1500, timeout=30,
                   message="sends continue while rx is away")
        rx.start()                       # back: the run starts again from the oldest
        assert finish(proc, 60) == 0     # item not acknowledged, folded or not
    finally:
        reap(proc)
    expected = [f"m{i:05d}" for i, _ in acked(log)]
    assert len(expected) == 3000
    eventually(lambda: set(expected) <= set(subjects(rx, "rx")), timeout=60,
               message="all acknowledged messages delivered")
    assert_inbox_exactly_once_in_order(rx, expected)
    eventually(lambda: tx.registry().node_info()["mesh"]["routing"]["outbox"] == [],
               timeout=20, message="every item acknowledged and out of the outbox")


def test_broadcasts_and_directs_interleaved_keep_order_per_destination(make_cluster):
    nodes = make_cluster(3)
    wait_converged(nodes)
    register_and_spread(nodes, {"a": 0, "b": 1, "c": 2})
    hub = nodes[0].hub()
    for i in range(60):
        if i % 3 == 0:
            hub.broadcast("a", f"x{i:03d}", "all")
        else:
            hub.send("a", "b" if i % 3 == 1 else "c", "notification", f"x{i:03d}", "one",
                     priority="high" if i % 10 == 5 else "normal")
    want_b = [f"x{i:03d}" for i in range(60) if i % 3 in (0, 1)]
    want_c = [f"x{i:03d}" for i in range(60) if i % 3 in (0, 2)]
    eventually(lambda: sorted(subjects(nodes[1], "b")) == want_b, timeout=15,
               message="b has its messages")
    eventually(lambda: sorted(subjects(nodes[2], "c")) == want_c, timeout=15,
               message="c has its messages")
    for d, sid in ((nodes[1], "b"), (nodes[2], "c")):
        got = [m.subject for m in d.hub().get_messages(sid)]
        normal = [s for s in got if int(s[1:]) % 10 != 5]
        assert normal == sorted(normal), f"{sid}: normal lane out of order"
    eventually(lambda: nodes[0].registry().node_info()["mesh"]["routing"]["outbox"] == [],
               timeout=15, message="all acknowledged")
