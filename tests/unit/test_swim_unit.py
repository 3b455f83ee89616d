"""SWIM as a unit: the daemon's own `Membership` on a fake network in virtual time.

Every scenario here runs N real `Membership`s (with admission) over
`meshd.mesh.fakenet`, with the LAN timings a deployment uses (0.5 s probes, 2.5 s
suspicion), on `meshd.mesh.simclock.VirtualTimeLoop`: tens of virtual seconds cost a few
milliseconds, and a seed makes each run the same. Only the network and the clock are
fakes; every frame still goes through the peer codec. tests/test_mesh.py checks the same
behaviour end to end with real daemons and real timers.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable

import pytest

from meshd.config import Config
from meshd.mesh import simclock
from meshd.mesh.fakenet import FakeNetwork, FakeTransport
from meshd.mesh.membership import BroadcastQueue
from meshd.mesh.simcluster import SimCluster, SimNode
from meshd.mesh.transport import Transport
from meshd.wire.peer import FrameType, MemberState, encode

ALIVE, SUSPECT, DEAD, LEFT = (MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD,
                              MemberState.LEFT)
LAN = Config.lan()


def simulate(n: int, scenario: Callable[[SimCluster], Awaitable[Any]], *, start: bool = True,
             converged: bool = True, config: Config = LAN, seed: int = 7, **net: Any) -> Any:
    """Run `scenario` on a fresh cluster of `n` in virtual time (at most 10 real s); a
    frame handler that raised anywhere fails the test."""
    async def main() -> Any:
        c = SimCluster(n, config, seed=seed, converged=converged, **net)
        if start:
            c.start()
        result = await scenario(c)
        await c.close()
        assert c.net.errors == []
        return result
    return simclock.run(main, real_budget=10.0)


def detection_bound(n: int, cfg: Config = LAN) -> float:
    """Worst case from a crash to every node holding it dead, with nothing lost: some
    node probes it within one round over its n-1 members, fails it within a probe
    interval, the suspicion times out, and the news takes a few rounds to spread."""
    return (n - 1) * cfg.probe_interval + cfg.probe_interval + cfg.suspicion_timeout \
        + 4 * cfg.probe_interval


def never(c: SimCluster, subject: SimNode, *states: MemberState) -> bool:
    return not any(ch.subject == subject.node_id and ch.new in states for ch in c.changes)


# --- the clock and the wire ----------------------------------------------------------------

def test_virtual_time_jumps_to_the_next_timer_and_refuses_to_idle_for_ever():
    import asyncio

    async def hour() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(3600)
        return loop.time() - t0
    assert simclock.run(hour, real_budget=1.0) == pytest.approx(3600)

    async def stuck() -> None:
        await asyncio.get_running_loop().create_future()    # nothing will ever set it
    with pytest.raises(RuntimeError, match="idle"):
        simclock.run(stuck, real_budget=1.0)


def test_the_fake_transport_has_the_real_transports_interface():
    for name in ("send", "send_frame", "pin", "pinned", "forget", "stats", "start", "stop"):
        real = inspect.signature(getattr(Transport, name))
        fake = inspect.signature(getattr(FakeTransport, name))
        assert list(real.parameters) == list(fake.parameters), name
    t = FakeNetwork(loop=object()).transport(LAN, "a" * 32, lambda *a: None)  # type: ignore[arg-type]
    assert t.address.endswith(":7747") and t.pinned(t.address) is False


def test_frames_go_through_the_codec_and_bad_ones_are_dropped_and_counted():
    async def scenario(c: SimCluster) -> None:
        a, b = c.nodes
        got: list[Any] = []
        a.transport.handler = lambda *frame: got.append(frame)
        b.transport.send_frame(a.address, b"\x95\x01\x63junk")       # unknown type
        b.transport.send_frame(a.address, encode(FrameType.PING, b.node_id, b.address,
                                                 {"seq": -1, "updates": []}))
        b.transport.send(a.address, FrameType.GOSSIP, {"updates": [b.membership.me()]})
        await c.run_for(0.01)
        assert a.transport.counters["frames_dropped"] == 2
        assert [f[0] for f in got] == [FrameType.GOSSIP]
        assert got[0][3]["updates"] == [b.membership.me()]          # tuples again
        assert b.transport.counters["out.GOSSIP"] == 1
        assert b.transport.counters["bytes_out"] > 0
    simulate(2, scenario, start=False)


# --- the loop helpers: periodic rounds and socket drains -----------------------------------

def test_a_periodic_task_keeps_its_schedule_survives_a_failing_round_and_stops():
    import asyncio

    from meshd.mesh.periodic import Periodic

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        seen: dict[str, list[float]] = {"rate": [], "delay": [], "adaptive": []}

        async def slow() -> None:                 # a probe that waits 0.3 s for its ACK
            seen["rate"].append(loop.time())
            await asyncio.sleep(0.3)

        def flaky() -> int:
            seen["delay"].append(loop.time())
            if len(seen["delay"]) == 2:
                raise RuntimeError("one bad round")
            return 42                             # not a wait: adaptive is off

        def backoff() -> float:
            seen["adaptive"].append(loop.time())
            return 0.5 * len(seen["adaptive"])

        tasks = [Periodic(slow, 1.0, what="rate", first=0.0, fixed_rate=True),
                 Periodic(flaky, 1.0, what="delay"),
                 Periodic(backoff, 1.0, what="adaptive", adaptive=True)]
        t0 = loop.time()
        for t in tasks:
            t.start()
        await asyncio.sleep(3.6)
        for t in tasks:
            await t.stop()
        assert not any(t.running for t in tasks)
        await asyncio.sleep(5)                    # stopped means stopped
        return {k: [round(x - t0, 3) for x in v] for k, v in seen.items()} | {
            "failures": [t.failures for t in tasks]}

    out = simclock.run(main, real_budget=2.0)
    assert out["rate"] == [0.0, 1.0, 2.0, 3.0]     # from each start, not each end
    assert out["delay"] == [1.0, 2.0, 3.0]         # sleeps first; the failure cost a round
    assert out["adaptive"] == [1.0, 1.5, 2.5]      # each round names the next wait
    assert out["failures"] == [0, 1, 0]


def test_a_socket_drain_is_bounded_per_turn_and_a_poison_message_stops_nothing():
    import asyncio

    import zmq

    from meshd.mesh.drain import SocketDrain

    async def main() -> None:
        ctx = zmq.Context()
        rx, tx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        rx.bind("inproc://drain-test")
        tx.connect("inproc://drain-test")
        got: list[bytes] = []
        turns: list[int] = []

        def handle(msg: list[bytes]) -> None:
            if msg[0] == b"poison":
                raise ValueError("a frame the handler chokes on")
            got.append(msg[0])

        def batch(msgs: list[list[bytes]]) -> None:
            turns.append(len(msgs))
            for m in msgs:
                handle(m)

        for i in range(25):
            tx.send(b"poison" if i == 3 else b"%d" % i)
        one = SocketDrain(rx, on_message=handle, max_count=10, name="test")
        one.start()
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(got) == 24 and one.counters["failed"] == 1
        assert one.counters["turns"] >= 3                     # 10 at most per loop turn
        one.stop()
        for i in range(25):
            tx.send(b"poison" if i == 12 else b"%d" % i)
        many = SocketDrain(rx, on_batch=batch, max_count=10, name="test")
        many.start()
        for _ in range(20):
            await asyncio.sleep(0)
        many.stop()
        assert turns == [10, 10, 5] and many.counters["failed"] == 1   # its batch only
        assert len(got) == 24 + 25 - 8       # the rest of the poisoned batch went with it
        rx.close(0)
        tx.close(0)
        ctx.term()
    asyncio.run(main())


# --- precedence: what news overrides what (direct apply() calls) ---------------------------

# (what A held of B, relative to B's incarnation i), news, (what A holds after)
PRECEDENCE = [
    ((ALIVE, 0), (ALIVE, 1), (ALIVE, 1)),
    ((ALIVE, 0), (ALIVE, 0), (ALIVE, 0)),
    ((ALIVE, 0), (SUSPECT, 0), (SUSPECT, 0)),
    ((ALIVE, 0), (SUSPECT, -1), (ALIVE, 0)),       # old news
    ((ALIVE, 0), (DEAD, 0), (DEAD, 0)),
    ((ALIVE, 0), (DEAD, -1), (ALIVE, 0)),
    ((ALIVE, 0), (LEFT, 0), (LEFT, 0)),
    ((SUSPECT, 0), (ALIVE, 0), (SUSPECT, 0)),      # refuting takes a higher incarnation
    ((SUSPECT, 0), (ALIVE, 1), (ALIVE, 1)),
    ((SUSPECT, 0), (SUSPECT, 1), (SUSPECT, 1)),
    ((SUSPECT, 0), (DEAD, 0), (DEAD, 0)),
    ((SUSPECT, 0), (LEFT, 0), (LEFT, 0)),
    ((DEAD, 0), (ALIVE, 0), (DEAD, 0)),
    ((DEAD, 0), (SUSPECT, 0), (DEAD, 0)),
    ((DEAD, 0), (ALIVE, 1), (ALIVE, 1)),           # back, at a higher incarnation
    ((DEAD, 0), (SUSPECT, 1), (SUSPECT, 1)),
    ((DEAD, 0), (DEAD, 1), (DEAD, 1)),             # the incarnation is noted
    ((DEAD, 0), (LEFT, 0), (LEFT, 0)),             # it left rather than failed
    ((LEFT, 0), (DEAD, 0), (LEFT, 0)),
    ((LEFT, 0), (SUSPECT, 0), (LEFT, 0)),
    ((LEFT, 0), (ALIVE, 1), (ALIVE, 1)),           # restarted
]


@pytest.mark.parametrize("held,news,after", PRECEDENCE,
                         ids=[f"{h[0].name}{h[1]:+d}<-{n[0].name}{n[1]:+d}"
                              for h, n, _ in PRECEDENCE])
def test_precedence(held, news, after):
    async def scenario(c: SimCluster) -> None:
        a, b = c.nodes
        i = b.membership.incarnation
        if held != (ALIVE, 0):
            a.membership.apply([(b.node_id, b.address, int(held[0]), i + held[1])])
        a.membership.apply([(b.node_id, b.address, int(news[0]), i + news[1])], b.node_id)
        m = a.membership.members[b.node_id]
        assert (m.state, m.incarnation - i) == after
    simulate(2, scenario, start=False)


def test_news_of_this_node_is_refuted_and_absurd_incarnations_are_dropped():
    async def scenario(c: SimCluster) -> None:
        a, b = c.nodes
        i = a.membership.incarnation
        b_address = b.address
        a.membership.apply([(a.node_id, a.address, int(SUSPECT), i - 1)])    # stale: ignored
        assert a.membership.incarnation == i and a.membership.false_refutations == 0
        a.membership.apply([(a.node_id, a.address, int(DEAD), i)])
        assert a.membership.incarnation == i + 1 and a.membership.false_refutations == 1
        assert a.membership.broadcasts.take(64, 1) == [a.membership.me()]
        far = a.membership._ceiling() + 1
        a.membership.apply([(b.node_id, b_address, int(DEAD), far)])
        assert a.membership.members[b.node_id].state == ALIVE
        assert a.membership.counters["dropped.incarnation_ahead"] == 1
    simulate(2, scenario, start=False)


# --- the broadcast queue -------------------------------------------------------------------

def _upd(node: str, inc: int = 1) -> tuple[str, str, int, int]:
    return (node, "10.0.0.1:7747", int(ALIVE), inc)


def test_broadcast_queue_sends_each_update_a_bounded_number_of_times():
    q = BroadcastQueue()
    q.put(_upd("a"))
    assert [q.take(64, 3) for _ in range(4)] == [[_upd("a")]] * 3 + [[]]
    assert len(q) == 0


def test_broadcast_queue_keeps_the_newest_update_of_a_node_and_sends_it_afresh():
    q = BroadcastQueue()
    q.put(_upd("a", 1))
    q.take(64, 3)
    q.take(64, 3)
    q.put(_upd("a", 2))
    assert len(q) == 1
    assert [q.take(64, 3) for _ in range(4)] == [[_upd("a", 2)]] * 3 + [[]]


def test_broadcast_queue_sends_the_least_sent_first_within_the_limit():
    q = BroadcastQueue()
    for n in "abc":
        q.put(_upd(n))
    assert q.take(2, 10) == [_upd("a"), _upd("b")]
    q.put(_upd("d"))
    assert q.take(2, 10) == [_upd("c"), _upd("d")]           # never sent before a, b
    assert q.take(4, 10) == [_upd("a"), _upd("b"), _upd("c"), _upd("d")]


# --- failure detection ------------------------------------------------------------------------

def test_a_killed_node_is_suspected_then_declared_dead_by_all_in_time():
    n = 8

    async def scenario(c: SimCluster) -> None:
        await c.run_for(3.0)
        victim = c.nodes[3]
        killed = c.loop.time()
        await victim.stop()
        took = await c.until(lambda: c.all_see(victim, DEAD), timeout=30)
        assert took is not None and took <= detection_bound(n), took
        suspected = c.first_change(victim, SUSPECT, killed)
        died = c.first_change(victim, DEAD, killed)
        assert suspected is not None and died is not None
        assert died - suspected >= LAN.suspicion_timeout     # it had its chance to refute
        for other in c.live():                                # nobody else was doubted
            assert never(c, other, SUSPECT, DEAD)
    simulate(n, scenario)


def test_a_suspect_whose_acks_were_lost_refutes_and_is_not_declared_dead():
    async def scenario(c: SimCluster) -> None:
        await c.run_for(2.0)
        b = c.nodes[1]
        for o in c.nodes:
            if o is not b:
                c.net.cut(b.address, o.address, both=False)   # b hears, is not heard
        assert await c.until(lambda: c.first_change(b, SUSPECT) is not None, 20) is not None
        c.net.heal()
        await c.run_for(4 * LAN.suspicion_timeout)
        assert b.membership.false_refutations >= 1
        for node in c.nodes:
            assert never(c, node, DEAD), node.node_id
        assert c.all_see(b, ALIVE)
        assert {n.membership.members[b.node_id].incarnation for n in c.nodes if n is not b} \
            == {b.membership.incarnation}
    simulate(5, scenario)


def test_a_paused_node_is_suspected_and_refutes_when_it_resumes():
    async def scenario(c: SimCluster) -> None:
        await c.run_for(2.0)
        b = c.nodes[2]
        b.transport.pause()
        assert await c.until(lambda: c.first_change(b, SUSPECT) is not None, 20) is not None
        await c.run_for(0.5)
        b.transport.resume()
        await c.run_for(3 * LAN.suspicion_timeout)
        assert c.all_see(b, ALIVE) and never(c, b, DEAD)
    simulate(5, scenario)


def test_an_indirect_probe_through_a_third_node_keeps_a_cut_link_from_making_a_suspect():
    async def scenario(c: SimCluster) -> None:
        a, b, _ = c.nodes
        c.net.cut(a.address, b.address)
        await c.run_for(30.0)
        assert a.transport.counters["out.PING_REQ"] >= 10      # ~ every second round
        assert b.transport.counters["out.PING_REQ"] >= 10
        assert c.net.counters["lost.cut"] > 0
        for node in c.nodes:
            assert never(c, node, SUSPECT, DEAD)
    simulate(3, scenario)


def test_five_percent_loss_makes_no_false_death():
    async def scenario(c: SimCluster) -> None:
        await c.run_for(60.0)
        assert c.net.counters["lost.random"] > 100
        for node in c.nodes:
            assert never(c, node, DEAD)
            assert c.all_see(node, ALIVE, SUSPECT)
    simulate(10, scenario, loss=0.05)


def test_a_partition_declares_the_other_side_dead_and_healing_merges_it_again():
    async def scenario(c: SimCluster) -> None:
        left, right = c.nodes[:3], c.nodes[3:]
        c.net.partition([n.address for n in left], [n.address for n in right])
        split = await c.until(lambda: all(c.all_see(n, DEAD, observers=right) for n in left)
                              and all(c.all_see(n, DEAD, observers=left) for n in right), 30)
        assert split is not None
        for side in (left, right):                      # each side stays whole
            assert all(c.all_see(n, ALIVE, observers=side) for n in side)
        c.net.heal()
        merged = await c.until(lambda: all(c.all_see(n, ALIVE) for n in c.nodes),
                               4 * LAN.reconnect_interval)
        assert merged is not None and merged <= 2 * LAN.reconnect_interval, merged
        assert sum(n.membership.false_refutations for n in c.nodes) >= len(c.nodes)
    simulate(6, scenario)


def test_a_graceful_leave_shows_as_left_at_once_and_never_as_dead():
    async def scenario(c: SimCluster) -> None:
        await c.run_for(2.0)
        gone = c.nodes[0]
        await gone.leave()
        assert c.all_see(gone, LEFT)                    # within leave_grace
        await c.run_for(30.0)
        assert c.all_see(gone, LEFT) and never(c, gone, SUSPECT, DEAD)
    simulate(6, scenario)


# --- joining and admission ----------------------------------------------------------------

def test_nodes_join_through_one_seed_and_each_is_admitted_only_once_it_answers():
    async def scenario(c: SimCluster) -> None:
        seed = c.nodes[0]
        for n in c.nodes[1:]:
            c.join(n, seed)
        took = await c.until(lambda: all(len(n.membership.members) == len(c.nodes) - 1
                                         and c.all_see(n, ALIVE) for n in c.nodes), 10)
        assert took is not None and took < 2.0, took
        verified = sum(n.membership.counters["candidates.verified"] for n in c.nodes)
        assert verified == len(c.nodes) * (len(c.nodes) - 1)
    simulate(6, scenario, converged=False)


def test_a_flood_of_invented_members_stays_bounded_and_does_not_slow_detection():
    async def scenario(c: SimCluster) -> None:
        a, _, victim = c.nodes
        rogue = c.net.transport(LAN, "f" * 32, lambda *frame: None)   # answers nothing
        for k in range(50):                             # hearsay: 3,200 invented members
            updates = [(f"{k:04x}{i:028x}", f"10.9.{k}.{i + 1}:7747", int(ALIVE), 1)
                       for i in range(64)]
            rogue.send(a.address, FrameType.GOSSIP, {"updates": updates})
        for i in range(500):                            # first-hand: 500 invented senders
            rogue.send_frame(a.address, encode(FrameType.PING, f"{i:032x}",
                                               f"10.8.{i // 250}.{i % 250 + 1}:7747",
                                               {"seq": i, "updates": []}))
        await c.run_for(0.1)
        admission = a.membership.admission
        assert len(admission) <= LAN.max_candidates
        assert a.membership.counters["candidates.refused_hearsay"] >= 3200 - LAN.max_hearsay
        assert len(a.membership.members) == 2
        killed = c.loop.time()
        await victim.stop()
        took = await c.until(lambda: c.all_see(victim, DEAD), 30)
        assert took is not None and took <= detection_bound(3), took
        assert c.loop.time() - killed > LAN.candidate_timeout
        assert len(admission) == 0                      # none ever answered: all expired
        assert len(a.membership.members) == 2
    simulate(3, scenario)
