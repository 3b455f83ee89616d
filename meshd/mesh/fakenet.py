"""An in-memory network for the mesh's protocols: many nodes in one process, one loop.

`meshd.mesh.transport.Transport` moves peer frames over ZeroMQ; the protocols above it
(membership, admission) use only a small part of it, written down here as
`PeerTransport`. `FakeTransport` is that part over a `FakeNetwork`: every frame is encoded
and decoded by the real peer codec (`meshd.wire.peer`, so validation runs as it does on
the wire), travels as a loop callback after `latency` (+ up to `jitter`) seconds, and may
be lost (`loss`), cut off (`cut`), held (`pause`) or sent to a node that is gone (`stop`).
Every frame and byte each node sends is counted, by frame type, for the simulations.

On a `meshd.mesh.simclock.VirtualTimeLoop` this turns seconds of SWIM timers into
milliseconds, deterministically for a given `seed` (as memberlist's MockNetwork does for
its tests). What the fake leaves out, on purpose: per-peer queue bounds and the
transient-connection budget (they belong to the real transport and are tested there),
and reordering beyond what jitter gives.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections import Counter
from typing import Any, Callable, Iterable, Protocol

from meshd.config import Config
from meshd.errors import MeshError
from meshd.mesh.transport import hand_frame
from meshd.wire.peer import FrameType, encode, frame_limit

#: (type, sender node id, sender's reply address, validated body), as the real transport.
Handler = Callable[[FrameType, str, str, dict[str, Any]], None]


class PeerTransport(Protocol):
    """What membership and admission need of a transport (the real one and the fake
    both have it; tests/unit/test_swim_unit.py pins their signatures together)."""

    address: str

    def send(self, addr: str, ftype: FrameType, body: dict[str, Any]) -> bool: ...

    def send_frame(self, addr: str, frame: bytes) -> bool: ...

    def pin(self, addresses: Iterable[str]) -> None: ...

    def pinned(self, addr: str) -> bool: ...

    def forget(self, addr: str, linger_ms: int = 0) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class FakeNetwork:
    """The wire between `FakeTransport`s. Faults are per direction: `cut(a, b)` drops
    what a sends to b and, unless `both=False`, what b sends to a."""

    def __init__(self, *, latency: float = 0.0005, jitter: float = 0.0, loss: float = 0.0,
                 seed: int = 0, codec: bool = True,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.latency, self.jitter, self.loss = latency, jitter, loss
        self.codec = codec                    # False: bodies pass as objects, no bytes
        self.rng = random.Random(seed)        # (faster; then bytes are not counted)
        self.nodes: dict[str, FakeTransport] = {}          # by address
        self._cuts: set[tuple[str, str]] = set()           # (from, to) addresses
        self._wire: list[tuple[float, int, str, Any]] = []  # in flight: (due, order, to, frame)
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._last: dict[tuple[str, str], float] = {}      # link -> last due (jitter only)
        self._loop = loop
        self.counters: Counter[str] = Counter()
        self.errors: list[Exception] = []       # raised by handlers (a bug under test)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def transport(self, config: Config, node_id: str, handler: Handler,
                  address: str = "") -> "FakeTransport":
        """A node's transport on this network, reachable at once at `address` (default:
        a made-up 10.x.y.z:7747)."""
        addr = address or _address(len(self.nodes))
        if addr in self.nodes and not self.nodes[addr].stopped:
            raise ValueError(f"{addr} is taken")
        t = FakeTransport(self, config, node_id, handler, addr)
        self.nodes[addr] = t
        return t

    # --- faults ------------------------------------------------------------------------

    def cut(self, a: str, b: str, both: bool = True) -> None:
        self._cuts.add((a, b))
        if both:
            self._cuts.add((b, a))

    def heal(self, a: str | None = None, b: str | None = None) -> None:
        """Mend the cut between a and b (both ways), or every cut when none is named."""
        if a is None or b is None:
            self._cuts.clear()
        else:
            self._cuts.discard((a, b))
            self._cuts.discard((b, a))

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between addresses of different groups."""
        sets = [list(g) for g in groups]
        for i, g in enumerate(sets):
            for h in sets[i + 1:]:
                for a in g:
                    for b in h:
                        self.cut(a, b)

    # --- moving frames ------------------------------------------------------------------

    def _carry(self, src: "FakeTransport", dst_addr: str, payload: Any) -> None:
        if self._cuts and (src.address, dst_addr) in self._cuts:
            self.counters["lost.cut"] += 1
            return
        if self.loss and self.rng.random() < self.loss:
            self.counters["lost.random"] += 1
            return
        when = self.loop.time() + self.latency
        if self.jitter:
            # Jitter, but each link stays in order, as TCP under ZeroMQ keeps it.
            link = (src.address, dst_addr)
            when = max(when + self.rng.random() * self.jitter, self._last.get(link, 0.0))
            self._last[link] = when
        heapq.heappush(self._wire, (when, next(self._order), dst_addr, payload))
        if self._timer is None or when < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._flush)

    def _flush(self) -> None:
        """Deliver what is due, in the order it was sent (asyncio's own timers run
        frames due at the same moment in no particular order)."""
        self._timer = None
        wire, due = self._wire, self.loop.time() + 1e-6
        for _ in range(len(wire)):
            if wire[0][0] > due:
                break
            _, _, dst_addr, payload = heapq.heappop(wire)
            self._arrive(dst_addr, payload)
            if not wire:
                break
        if wire and self._timer is None:
            self._timer = self.loop.call_at(wire[0][0], self._flush)

    def _arrive(self, dst_addr: str, payload: Any) -> None:
        dst = self.nodes.get(dst_addr)
        if dst is None or dst.stopped:
            self.counters["lost.no_route"] += 1        # nobody listens there (any more)
        elif dst.paused:
            dst.held_in.append(payload)
        else:
            dst.receive(payload)


class FakeTransport:
    """One node's `PeerTransport` on a `FakeNetwork` (see the module docstring)."""

    def __init__(self, net: FakeNetwork, config: Config, node_id: str, handler: Handler,
                 address: str) -> None:
        self.net = net
        self.config = config
        self.node_id = node_id
        self.handler = handler
        self.address = address
        self.counters: Counter[str] = Counter()
        self.stopped = False
        self.paused = False
        self.held_in: list[Any] = []
        self.held_out: list[tuple[str, Any]] = []
        self._pinned: frozenset[str] = frozenset()
        self._limit = frame_limit(config.max_frame_bytes)

    # --- what membership uses --------------------------------------------------------------

    def send(self, addr: str, ftype: FrameType, body: dict[str, Any]) -> bool:
        if not self.net.codec:
            return self._send(addr, (ftype, self.node_id, self.address, body), ftype, 0)
        try:
            frame = encode(ftype, self.node_id, self.address, body)
        except MeshError:
            self.counters["dropped.unencodable"] += 1
            return False
        return self.send_frame(addr, frame)

    def send_frame(self, addr: str, frame: bytes) -> bool:
        if len(frame) > self._limit:
            self.counters["dropped.too_large_out"] += 1
            return False
        # The type is the frame's second byte: [fixarray, version, type, ...].
        return self._send(addr, frame, frame[2] if len(frame) > 2 else 0, len(frame))

    def _send(self, addr: str, payload: Any, ftype: int, size: int) -> bool:
        if self.stopped:
            self.counters["dropped.stopped"] += 1
            return False
        self.counters["frames_out"] += 1
        self.counters["bytes_out"] += size
        self.counters[f"out.{_NAMES.get(ftype, ftype)}"] += 1
        if self.paused:
            self.held_out.append((addr, payload))
        else:
            self.net._carry(self, addr, payload)
        return True

    def pin(self, addresses: Iterable[str]) -> None:
        self._pinned = frozenset(addresses)

    def pinned(self, addr: str) -> bool:
        return addr in self._pinned

    def forget(self, addr: str, linger_ms: int = 0) -> None:
        """The real transport closes its queue to `addr`; frames already on this wire
        still arrive, as frames already in TCP would."""
        self.counters["forgotten"] += 1

    def stats(self) -> dict[str, Any]:
        return {"address": self.address, "bound": self.address,
                "counters": dict(self.counters), "connections": len(self._pinned),
                "transient": 0, "security": {"mode": "none"}}

    # --- receiving ---------------------------------------------------------------------------

    def receive(self, payload: Any) -> None:
        """Hand one frame to the node, as the real transport's drain does: undecodable
        frames and frames from itself are dropped and counted; a handler's failure costs
        that frame only."""
        if not isinstance(payload, tuple):
            self.counters["bytes_in"] += len(payload)
        hand_frame(payload, self._limit, self.node_id, self.handler, self.counters,
                   lambda exc, _t, _s: self.net.errors.append(exc))   # (for the test to see)

    # --- lifecycle and faults ----------------------------------------------------------------

    def start(self) -> None:
        """Nothing to bind: the node is reachable from its creation."""

    def stop(self, linger_ms: int = 0) -> None:
        """The node is gone (a crash, or a stop after its leave): nothing more leaves it,
        and what is sent to it is lost."""
        self.stopped = True
        self.held_in.clear()
        self.held_out.clear()

    def pause(self) -> None:
        """Hold everything sent to and by this node (a stalled host whose TCP buffers
        fill); its timers still run. `resume()` lets it all through, late."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        held_out, self.held_out = self.held_out, []
        held_in, self.held_in = self.held_in, []
        for addr, payload in held_out:
            self.net._carry(self, addr, payload)
        for payload in held_in:
            self.receive(payload)


_NAMES = {int(t): t.name for t in FrameType}


def _address(i: int) -> str:
    n = i + 1
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}:7747"
