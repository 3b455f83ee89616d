"""The router's send window as a unit: the daemon's own `Router`s on a fake network.

Each node is a `SimCluster(data_dir=...)` node (a real `Store` in tmp_path, the real
`Membership` and `Replicator`) given what `meshd.mesh.node.Mesh` adds for routing: an
`Outbox(store, routing=True)`, a `Router`, ROUTE / ROUTE_ACK frames handed to it and
`member_up` called when membership sees a member new or back. A session registered on B
replicates to A; A sends to it with `mail.send` in a write, then `router.committed()`, as
the daemon does. Everything runs on `meshd.mesh.simclock.VirtualTimeLoop` with the LAN
timings, so tens of virtual seconds of retries cost milliseconds.

The router is given the virtual loop's clock (`clock=`), as `Membership` and `Replicator` are.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from meshd.config import Config
from meshd.mesh import simclock
from meshd.mesh.router import WINDOW_FRAMES, Router
from meshd.mesh.simcluster import SimCluster, SimNode
from meshd.state import mail
from meshd.state.commands import Commands
from meshd.state.outbox import Outbox
from meshd.wire.ipc import validate_args
from meshd.wire.peer import FrameType, MemberState

LAN = Config.lan()
SID = "agent-b"


class Routed:
    """A SimNode with the routing half of a daemon: outbox, router, and a log of the
    ROUTE frames that reached it (virtual time, lane, first, seqs), dropped or not."""

    def __init__(self, c: SimCluster, node: SimNode) -> None:
        assert node.store is not None
        self.c, self.node, self.store = c, node, node.store
        self.outbox = Outbox(node.store, routing=True)
        self.router = Router(c.config, node.store, self.outbox, node.membership,
                             node.transport, clock=c.loop.time)   # type: ignore[arg-type]
        self.route_log: list[tuple[float, int, int, list[int]]] = []
        self.deaf = False                        # drop ROUTE frames (a silent router)
        self.ups: list[float] = []               # when member_up was called
        sim_frame = node.transport.handler
        membership = node.membership

        def on_frame(ftype: FrameType, sender: str, reply_to: str, body: dict[str, Any]) -> None:
            if ftype == FrameType.ROUTE:         # as Mesh._on_frame
                self.route_log.append((c.loop.time(), body["lane"], body["first"],
                                       [it[0] for it in body["items"]]))
                if self.deaf:
                    return
                membership.heard_from(sender)
                self.router.on_route(sender, reply_to, body)
            elif ftype == FrameType.ROUTE_ACK:
                membership.heard_from(sender)
                self.router.on_ack(sender, body)
            else:
                sim_frame(ftype, sender, reply_to, body)
        node.transport.handler = on_frame

        sim_change = membership.on_change

        def on_change(m: Any, old: MemberState | None) -> None:   # as Mesh._on_change
            sim_change(m, old)
            if m.up and (old is None or old in (MemberState.DEAD, MemberState.LEFT)):
                self.ups.append(c.loop.time())
                self.router.member_up(m.node_id)
        membership.on_change = on_change

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def node_id(self) -> str:
        return self.node.node_id

    def send(self, to: str, body: str, priority: str = "normal") -> None:
        """A message stored and queued as the daemon's write path does, then routed."""
        msg = {"message_id": f"m-{body}", "type": "request", "from_session": "agent-a",
               "to_session": to, "subject": "s", "body": body, "data": {},
               "timestamp": "t", "in_reply_to": None, "priority": priority}
        args = validate_args("message.send", {"message": msg})
        with self.store.write():
            out = mail.send(self.store, self.outbox, args)
        assert out["queued"] == 1, out
        self.router.committed()

    def inbox(self, sid: str = SID) -> list[str]:
        """Bodies in `sid`'s inbox here, in the order they were put there."""
        with self.store.read(fold=False):
            return [r[0] for r in self.store.conn.execute(
                "SELECT m.body FROM inbox i JOIN messages m ON m.message_id = i.message_id "
                "WHERE i.session_id = ? ORDER BY i.seq", (sid,))]

    def outbox_count(self) -> int:
        with self.store.read(fold=False):
            return int(self.store.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def frames_out(self) -> int:
        return self.node.transport.counters["out.ROUTE"]


Scenario = Callable[[SimCluster, Routed, Routed], Awaitable[Any]]


def simulate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: Scenario, *,
             config: Config = LAN, seed: int = 5) -> Any:
    """Two routing nodes A and B on a fake network in virtual time (at most 10 real s),
    B hosting session `SID`, which A knows of; a handler that raised fails the test."""
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        c = SimCluster(2, config, seed=seed, data_dir=tmp_path)
        a, b = (Routed(c, n) for n in c.nodes)
        c.start()
        for r in (a, b):
            r.router.start()
        try:
            await c.run_for(1.0)
            assert b.node.store is not None
            with b.store.write():
                Commands(b.store).run("session.register", validate_args(
                    "session.register", {"session_id": SID, "agent_name": "B",
                                         "agent_type": "Claude"}))
            b.node.committed()                    # pushed to A
            assert await c.until(lambda: a.outbox.hosts(SID) == (b.node_id,), 2.0), \
                "the session did not replicate to A"
            result = await scenario(c, a, b)
        finally:
            for r in (a, b):
                await r.router.stop()
            await c.close()
        assert c.net.errors == []
        return result
    return simclock.run(main, real_budget=10.0)


async def settle(c: SimCluster) -> None:
    """Let the callbacks scheduled now run, without letting virtual time pass (much)."""
    for _ in range(5):
        await asyncio.sleep(0)


_n = itertools.count()


# --- the scenarios ----------------------------------------------------------------------------

def test_every_message_arrives_once_in_order_and_high_overtakes_queued_normal(tmp_path,
                                                                               monkeypatch):
    """One item a frame: 40 normal messages fill the window (32 frames), 8 wait for acks;
    a high-priority one sent then goes at once in its own lane, ahead of those 8."""
    async def scenario(c: SimCluster, a: Routed, b: Routed) -> None:
        for i in range(40):
            a.send(SID, f"n{i:02d}")
        await settle(c)
        assert a.frames_out() == WINDOW_FRAMES          # the window, nothing more yet
        a.send(SID, "urgent", priority="high")
        await settle(c)
        assert a.frames_out() == WINDOW_FRAMES + 1
        took = await c.until(lambda: len(b.inbox()) == 41 and a.outbox_count() == 0, 2.0,
                             step=0.001)
        # Acks, not retries, moved it on (though the 8 wait for the next routing round:
        # see the xfail test below).
        assert took is not None and took < LAN.route_tick + 0.05, took
        normal = [f"n{i:02d}" for i in range(40)]
        assert b.inbox() == normal[:32] + ["urgent"] + normal[32:]
        assert a.router.counters["resends"] == 0
        assert a.router.counters["route_frames"] == 41
        assert b.router.counters["routed_in"] == 41
        # Acknowledged items left the outbox and read as stored at B.
        with a.store.read(fold=False):
            states = {r[0] for r in a.store.conn.execute("SELECT state FROM receipts")}
        assert states == {"stored"}
    simulate(tmp_path, monkeypatch, scenario, config=LAN.with_(route_batch=1))


def test_acks_that_reopen_the_window_send_the_rest_at_once(tmp_path, monkeypatch):
    """on_ack says "the window has room again" and asks for a send: the items queued
    behind a full window go when the acks come, not a routing round later."""
    async def scenario(c: SimCluster, a: Routed, b: Routed) -> None:
        for i in range(WINDOW_FRAMES + 8):
            a.send(SID, f"n{i:02d}")
        took = await c.until(lambda: len(b.inbox()) == WINDOW_FRAMES + 8, 2.0, step=0.001)
        assert took is not None and took < 0.05, took     # a few round trips (0.5 ms each)
    simulate(tmp_path, monkeypatch, scenario, config=LAN.with_(route_batch=1))


@pytest.mark.parametrize("lost", ["frames", "acks"])
def test_the_window_bounds_what_is_in_flight_until_acks_come(tmp_path, monkeypatch, lost):
    """With A->B (frames) or B->A (acks) dropped, A sends WINDOW_FRAMES frames and no
    more until the retry; once the link heals, everything arrives once, in order."""
    async def scenario(c: SimCluster, a: Routed, b: Routed) -> None:
        if lost == "frames":
            c.net.cut(a.address, b.address, both=False)
        else:
            c.net.cut(b.address, a.address, both=False)
        for i in range(100):
            a.send(SID, f"m{i:03d}")
        await settle(c)
        assert a.router.counters["route_frames"] == WINDOW_FRAMES
        await c.run_for(0.9 * LAN.route_retry)            # no ack: nothing more goes
        assert a.router.counters["route_frames"] == WINDOW_FRAMES
        assert a.frames_out() == WINDOW_FRAMES
        assert len(b.route_log) == (0 if lost == "frames" else WINDOW_FRAMES)
        assert len(b.inbox()) == (0 if lost == "frames" else WINDOW_FRAMES)
        c.net.heal()
        took = await c.until(lambda: a.outbox_count() == 0, 5.0)
        assert took is not None, "not delivered after the heal"
        assert b.inbox() == [f"m{i:03d}" for i in range(100)]
        assert a.router.counters["resends"] >= 1
    simulate(tmp_path, monkeypatch, scenario, config=LAN.with_(route_batch=1))


def test_a_lost_frame_shows_as_a_gap_and_is_resent_at_once(tmp_path, monkeypatch):
    """The first frame is lost; the next ones are answered with through=0 (a gap), which
    makes A send the run again from its outbox now, not after route_retry."""
    async def scenario(c: SimCluster, a: Routed, b: Routed) -> None:
        c.net.cut(a.address, b.address, both=False)
        a.send(SID, "m0")
        await settle(c)
        assert c.net.counters["lost.cut"] >= 1 and a.frames_out() == 1
        c.net.heal()
        for i in range(1, 6):
            a.send(SID, f"m{i}")
        took = await c.until(lambda: a.outbox_count() == 0, 2.0, step=0.001)
        assert took is not None and took < 0.1 * LAN.route_retry, took
        assert b.inbox() == [f"m{i}" for i in range(6)]
        assert a.router.counters["resends"] == 1        # one gap, one resend
        # The frames B saw: 2..6 (each naming first=1), then the run again from 1.
        seqs = [s for _, _, _, ss in b.route_log for s in ss]
        assert seqs[:5] == [2, 3, 4, 5, 6] and seqs[5] == 1
        assert all(first == 1 for _, _, first, _ in b.route_log[:5])
    simulate(tmp_path, monkeypatch, scenario, config=LAN.with_(route_batch=1))


def test_resends_back_off_doubling_up_to_route_retry_max(tmp_path, monkeypatch):
    """B is up (SWIM answers) but its router is silent: A sends the run again after
    route_retry, then 2x, 4x ... capped at route_retry_max; then progress resets it."""
    cfg = LAN
    async def scenario(c: SimCluster, a: Routed, b: Routed) -> None:
        b.deaf = True
        a.send(SID, "m0")
        await settle(c)
        horizon = sum([1, 2, 4, 8, 16]) * cfg.route_retry + 3 * cfg.route_retry_max + 1
        await c.run_for(horizon)
        assert a.node.membership.members[b.node_id].up       # silent, not down
        times = [t for t, _, _, _ in b.route_log]
        gaps = [round(t1 - t0, 3) for t0, t1 in zip(times, times[1:])]
        expected = [min(cfg.route_retry * 2 ** k, cfg.route_retry_max) for k in range(8)]
        assert len(gaps) == len(expected), (gaps, expected)
        for got, want in zip(gaps, expected):
            # Resends are looked for every route_tick, so each may come a tick late.
            assert want - 0.01 <= got <= want + cfg.route_tick + 0.01, (gaps, expected)
        assert a.router.counters["resends"] == len(expected)
        assert b.inbox() == []
        b.deaf = False                                        # answers again
        took = await c.until(lambda: a.outbox_count() == 0, cfg.route_retry_max + 1)
        assert took is not None
        assert b.inbox() == ["m0"]
        # Progress reset the backoff: the next silence is retried after route_retry.
        b.deaf = True
        a.send(SID, "m1")
        await settle(c)
        t0 = c.loop.time()
        n = len(b.route_log)
        await c.run_for(cfg.route_retry + cfg.route_tick + 0.01)
        assert len(b.route_log) == n + 2                      # the send, one resend
        assert cfg.route_retry - 0.01 <= b.route_log[-1][0] - b.route_log[-2][0] \
            <= cfg.route_retry + cfg.route_tick + 0.01
        b.deaf = False
        assert await c.until(lambda: b.inbox() == ["m0", "m1"], 5.0) is not None
    simulate(tmp_path, monkeypatch, scenario, config=cfg)


def test_a_destination_back_from_down_gets_the_whole_run_from_the_oldest_unacked(
        tmp_path, monkeypatch):
    """B is cut off until A holds it dead: what A sends meanwhile waits in the outbox
    (nothing is tried). When B is back, member_up sends the whole run at once, from the
    oldest item never acknowledged, rather than at the next retry."""
    async def scenario(c: SimCluster, a: Routed, b: Routed) -> None:
        a.send(SID, "m00")                                 # acknowledged before the cut
        assert await c.until(lambda: a.outbox_count() == 0, 1.0) is not None
        c.net.partition([a.address], [b.address])
        for i in range(1, 11):
            a.send(SID, f"m{i:02d}")                       # sent, lost
        dead = await c.until(lambda: not a.node.membership.members[b.node_id].up, 20.0,
                             step=0.05)
        assert dead is not None, "A never held B down"
        frames = a.frames_out()
        for i in range(11, 21):
            a.send(SID, f"m{i:02d}")                       # B is down: queued only
        await c.run_for(3 * LAN.route_retry_max)           # long past every retry
        assert a.frames_out() == frames, "frames were sent to a member held down"
        assert a.outbox_count() == 20
        b.route_log.clear()
        ups_before = len(a.ups)
        c.net.heal()
        back = await c.until(lambda: len(a.ups) > ups_before, 3 * LAN.reconnect_interval,
                             step=0.05)
        assert back is not None, "A never saw B back"
        took = await c.until(lambda: a.outbox_count() == 0, 2.0, step=0.001)
        assert took is not None, "not delivered after B came back"
        # At once (member_up), not at the next route_tick or retry.
        first_at, _, first, seqs = b.route_log[0]
        assert first_at - a.ups[-1] < 0.05, (first_at, a.ups[-1])
        assert first == 2 and seqs[0] == 2                 # from the oldest unacknowledged
        assert b.inbox() == [f"m{i:02d}" for i in range(21)]
    simulate(tmp_path, monkeypatch, scenario)


def test_member_up_resends_at_once_rather_than_after_the_backed_off_retry(tmp_path,
                                                                          monkeypatch):
    """B's router was silent long enough for A's retry to back off to route_retry_max,
    then B went down and came back well before that retry was due: member_up starts the
    run again from the oldest unacknowledged item now, with the backoff reset."""
    cfg = LAN

    async def scenario(c: SimCluster, a: Routed, b: Routed) -> None:
        b.deaf = True
        for i in range(5):
            a.send(SID, f"m{i}")
        # The first send and 5 resends (after 1, 2, 4, 8, 16 s): the next waits 30 s.
        assert await c.until(lambda: len(b.route_log) == 6, 40.0, step=0.05) is not None
        last_try = b.route_log[-1][0]
        c.net.partition([a.address], [b.address])
        assert await c.until(lambda: not a.node.membership.members[b.node_id].up, 10.0,
                             step=0.05) is not None, "A never held B down"
        b.deaf = False
        ups_before = len(a.ups)
        c.net.heal()
        assert await c.until(lambda: len(a.ups) > ups_before, 2 * cfg.reconnect_interval,
                             step=0.05) is not None, "A never saw B back"
        up_at = a.ups[-1]
        assert up_at - last_try < cfg.route_retry_max - 5      # the retry is not due yet
        took = await c.until(lambda: a.outbox_count() == 0, 1.0, step=0.001)
        assert took is not None, "not sent again when B came back"
        after = [e for e in b.route_log if e[0] > up_at]
        assert after and after[0][0] - up_at < 0.05 and after[0][3][0] == 1
        assert b.inbox() == [f"m{i}" for i in range(5)]
    simulate(tmp_path, monkeypatch, scenario, config=cfg)
