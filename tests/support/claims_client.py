"""A claims client for the lab (tests/lab/test_claims_lab.py), run as a program on one lab
host: it registers a session with the host's daemon and loops until SIGTERM: `hold()` one of
a few resources for a short random time, "using" it (a `use` event with the fencing token,
the stand-in for a write to a fenced resource) every few tens of ms while `check()` passes,
release, pause. Every event goes to a JSONL file, one line each, flushed at once, stamped
with time.monotonic_ns() (CLOCK_MONOTONIC, which every namespace of the host shares). The
event vocabulary is support/lease_checker.py's.

Stamps are placed so that recorded intervals only err long: acq.invoke before the request,
acq.ok before the first use, a use stamped before the check that allowed it, lost and
release.invoke before the holder stops acting, renew.ok with the time its request was sent.

    python claims_client.py --socket S --host 3 --out h3.jsonl --resources r0,r1 --ttl 3 --seed 7
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from typing import Any

from sessions import Claims, ClaimBusy, Lease, LeaseLost, SessionRegistry
from sessions.errors import MeshError, NoQuorum


class Recorder:
    def __init__(self, path: str, client: str, host: int, session: str) -> None:
        self._f = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self.common = {"client": client, "host": host, "session": session}

    def __call__(self, ev: str, t: int | None = None, **kw: Any) -> int:
        with self._lock:
            t = time.monotonic_ns() if t is None else t
            self._f.write(json.dumps({"t": t, "ev": ev, **self.common, **kw}) + "\n")
            self._f.flush()
            return t

    def close(self) -> None:
        with self._lock:
            self._f.close()


def ns(monotonic_s: float) -> int:
    return int(monotonic_s * 1_000_000_000)


class Grant:
    """What the client knows of the lease it holds now: 'held', 'releasing', 'done'."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.state = "held"
        self.lock = threading.Lock()


class RecordingClaims(Claims):
    """Claims whose requests record their outcome the moment they return, so that a
    renewal is on record before `hold()` lets the block act on it."""

    def __init__(self, rec: Recorder, **kw: Any) -> None:
        super().__init__(**kw)
        self.rec = rec
        self.current: Grant | None = None

    def acquire(self, resource: str, session_id: str, ttl: float = 30,
                wait: float = 0) -> Lease:
        self.rec("acq.invoke", resource=resource, ttl=ttl, wait=wait)
        try:
            lease = super().acquire(resource, session_id, ttl, wait)
        except (ClaimBusy, NoQuorum) as err:      # nothing was granted
            self.rec("acq.fail", resource=resource, reason=type(err).__name__,
                     detail=str(err)[:200])
            raise
        except MeshError as err:                   # it may or may not have been granted
            self.rec("acq.info", resource=resource, reason=type(err).__name__,
                     detail=str(err)[:200])
            raise
        self.current = Grant(lease)
        self.rec("acq.ok", resource=resource, token=lease.token, ttl=lease.ttl,
                 valid_for=lease.valid_for, deadline=ns(lease.deadline), scope=lease.scope)
        return lease

    def renew(self, lease: Lease) -> Lease:
        sent = time.monotonic_ns()
        try:
            new = super().renew(lease)
        except MeshError as err:
            self.rec("renew.fail", resource=lease.resource, token=lease.token,
                     reason=type(err).__name__, detail=str(err)[:200])
            raise
        self.rec("renew.ok", resource=lease.resource, token=lease.token, sent=sent,
                 valid_for=new.valid_for, deadline=ns(new.deadline))
        return new

    def release(self, lease: Lease) -> bool:
        g = self.current
        try:
            ok = super().release(lease)
        except MeshError as err:
            self.finish(g, lease, "release.fail", reason=type(err).__name__,
                        detail=str(err)[:200])
            raise
        self.finish(g, lease, "release.ok", released=ok)
        return ok

    def finish(self, g: Grant | None, lease: Lease, ev: str, **kw: Any) -> None:
        """The one terminal event of a grant: a release's outcome once it is releasing."""
        if g is None or g.lease.token != lease.token:
            return
        with g.lock:
            if g.state != "releasing":
                return
            g.state = "done"
            self.rec(ev, resource=lease.resource, token=lease.token, **kw)

    def lose(self, g: Grant | None, reason: str, t: int | None = None) -> None:
        """Record the loss, once, unless the holder already stopped by releasing."""
        if g is None:
            return
        with g.lock:
            if g.state != "held":
                return
            g.state = "done"
            self.rec("lost", t=t, resource=g.lease.resource, token=g.lease.token,
                     reason=reason[:200])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--host", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resources", required=True)
    p.add_argument("--ttl", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hold-max", type=float, default=2.5, help="longest hold, s")
    p.add_argument("--pause-max", type=float, default=0.5, help="longest pause, s")
    p.add_argument("--wait-max", type=float, default=1.0, help="longest acquire wait, s")
    p.add_argument("--timeout", type=float, default=3.0, help="SDK call timeout, s")
    a = p.parse_args(argv)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    rng = random.Random(a.seed * 1000 + a.host)
    client, session = f"c{a.host}", f"lab-h{a.host}"
    rec = Recorder(a.out, client, a.host, session)
    resources = a.resources.split(",")
    rec("client.start", pid=os.getpid(), resources=resources, ttl=a.ttl)

    registry = SessionRegistry(socket=a.socket, timeout=a.timeout)
    while not stopping.is_set():                   # the daemon may be restarting
        try:
            registry.register(session, f"lab client {a.host}", "claude")
            break
        except MeshError as err:
            rec("register.fail", reason=type(err).__name__)
            stopping.wait(0.3)
    claims = RecordingClaims(rec, socket=a.socket, timeout=a.timeout)

    def on_lost(lease: Lease, reason: str) -> None:
        g = claims.current
        if g is not None and g.lease.token == lease.token:
            claims.lose(g, f"on_lost: {reason}")

    while not stopping.is_set():
        resource = rng.choice(resources)
        wait = rng.choice([0.0, 0.0, rng.uniform(0, a.wait_max)])
        held = claims.hold(resource, session, ttl=a.ttl, wait=wait, on_lost=on_lost)
        claims.current = None
        try:
            held.__enter__()
        except MeshError:
            stopping.wait(rng.uniform(0.05, a.pause_max))
            continue
        g = claims.current
        assert g is not None
        until = time.monotonic() + rng.uniform(0.2, a.hold_max)
        while time.monotonic() < until and not stopping.is_set():
            t = time.monotonic_ns()
            try:
                held.check()
            except LeaseLost as err:
                claims.lose(g, f"check: {err}")
                break
            with g.lock:
                if g.state != "held":
                    break
                rec("use", t=t, resource=resource, token=held.token)
            time.sleep(rng.uniform(0.02, 0.1))
        with g.lock:
            releasing = g.state == "held"
            if releasing:
                g.state = "releasing"
                rec("release.invoke", resource=resource, token=g.lease.token)
        try:
            held.__exit__(None, None, None)
        except MeshError as err:
            claims.finish(g, g.lease, "release.fail", reason=type(err).__name__)
        # Released without a request (the SDK saw the loss first, or swallowed an error).
        claims.finish(g, g.lease, "release.fail", reason="no release request answered")
        stopping.wait(rng.uniform(0.0, a.pause_max))
    rec("client.stop")
    rec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
