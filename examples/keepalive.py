"""Keep-alive: a session nobody pings for a while (300 s by default, meshd --stale-after)
reads OFFLINE, and an agent busy on a long task pings nobody. `registry.keepalive(id)`
pings for it from a background thread for as long as its `with` block lasts.

    python examples/keepalive.py [DIR] [--interval SECONDS] [--seconds SECONDS]

No DIR: this host's meshd (MESHD_SOCKET=PATH picks one); DIR (first): no daemon, the state
lives in that directory. The "work" below is a loop that never pings; each turn prints how
long ago the session was last pinged: the keep-alive's pings keep that short.

From a shell, the CLI does the same for a session it registers (Ctrl-C stops it):

    sessions register worker-001 Worker Claude --keepalive --interval 60
"""

import argparse
import time
from datetime import datetime, timezone

import _common
from _common import SessionRegistry, where
from sessions import SessionStatus

parser = argparse.ArgumentParser(description="Keep a session ACTIVE while it works.")
parser.add_argument("directory", nargs="?", help="keep the state here, with no daemon")
parser.add_argument("--interval", type=float, default=1.0, help="seconds between pings")
parser.add_argument("--seconds", type=float, default=4.0, help="how long the work lasts")
args = parser.parse_args()
if args.directory != _common.DIRECTORY:
    parser.error("give the directory first, before the options")
if args.interval <= 0 or args.seconds < 0:
    parser.error("--interval must be positive and --seconds not negative")

WORKER = "worker-001"
registry = SessionRegistry()
registry.register(WORKER, "Worker", "Claude", capabilities=["long-tasks"])
print("State kept by:", where())


def seconds_since(iso: str) -> float:
    return (datetime.now(timezone.utc) - datetime.fromisoformat(iso)).total_seconds()


statuses = set()
with registry.keepalive(WORKER, interval=args.interval) as keepalive:
    print(f"keeping {WORKER} alive: a ping every {args.interval:g} s, "
          f"for {args.seconds:g} s of work")
    started = time.monotonic()
    while time.monotonic() - started < args.seconds:        # bounded "work"
        time.sleep(min(args.interval, 0.5))                  # ... thinking, never pinging
        session = registry.get(WORKER)
        statuses.add(session.status)
        print(f"  {time.monotonic() - started:4.1f} s: {WORKER} is {session.status.value}, "
              f"last ping {seconds_since(session.last_ping):.1f} s ago, "
              f"pings so far: {keepalive.pings}")
# Leaving the block stopped the pings: from here on the session ages like any other.

if statuses == {SessionStatus.ACTIVE}:
    print(f"{WORKER} stayed ACTIVE throughout ({keepalive.pings} pings)")
else:
    raise SystemExit(f"❌ {WORKER} was {sorted(s.value for s in statuses)} while kept alive")
