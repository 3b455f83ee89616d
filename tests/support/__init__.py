"""What the tests share; test files import these and never each other.

- `support.daemons`: real `meshd` processes (`Daemon`), the child environment, the CLI as a
  user runs it, `eventually`, and what a cluster of daemons sees of itself;
- `support.mesh`: the replicated state as a user sees it, and waiting for nodes to agree;
- `support.routing`: sessions spread over hosts and a sender of many messages;
- `support.leaks`: daemons and network namespaces a test left behind (conftest checks);
- `support.netlab`: hosts made of network namespaces on a bridge (the lab tests);
- `support.lease_checker`: the claims history checker (exclusion, tokens, loss reports,
  liveness), also a command line over JSONL histories;
- scripts run by path: `mdns_announcer.py` (a foreign mDNS announcer), `seed_runner.py`
  (runs the seed document's blocks in order), `claims_client.py` (a lab host's claims
  client, recording its history); `script(name)` gives their path.

The fixtures (`short_tmp`, `make_daemon`, `daemon`, `make_cluster`) are in tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SEED_README = ROOT.parent / "shared" / "seed-README.md"


def script(name: str) -> Path:
    """The path of a helper script of this package, for running it as a program."""
    return Path(__file__).resolve().parent / name
