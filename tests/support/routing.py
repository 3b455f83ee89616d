"""Sessions spread over the hosts of a cluster, and a sender of many messages whose
acknowledgements are logged, for checking that each arrives exactly once and in order."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from support.daemons import Daemon, eventually


def register_and_spread(nodes: list[Daemon], placement: dict[str, int]) -> None:
    """Register each session on its node, then wait until every node knows every one."""
    for sid, i in placement.items():
        nodes[i].registry().register(sid, sid.upper(), "claude")
    for d in nodes:
        eventually(lambda d=d: all(d.registry().get(s) is not None for s in placement),
                   timeout=15, message="sessions replicated")


def subjects(d: Daemon, sid: str, **kw: Any) -> list[str]:
    return [m.subject for m in d.hub().get_messages(sid, **kw)]


SENDER = textwrap.dedent('''
    import asyncio, sys
    from sessions.aio import AsyncCollaborationHub
    log_path, n = sys.argv[1], int(sys.argv[2])

    async def main():
        hub = AsyncCollaborationHub(timeout=3.0)
        todo, failed = iter(range(n)), []
        with open(log_path, "a", buffering=1) as log:
            async def worker():
                for i in todo:
                    if failed:
                        return
                    try:
                        m = await hub.send("tx", "rx", "notification", f"m{i:05d}", "body")
                    except Exception as exc:
                        failed.append(repr(exc))
                        return
                    log.write(f"{i} {m.message_id}\\n")
            await asyncio.gather(*(worker() for _ in range(20)))
        sys.exit(3 if failed else 0)

    asyncio.run(main())
''')


def acked(log: Path) -> list[tuple[int, str]]:
    lines = [ln for ln in log.read_text().splitlines(keepends=True) if ln.endswith("\n")]
    return [(int(a), b) for a, b in (ln.split() for ln in lines)]


def start_sender(tmp: Path, d: Daemon, n: int) -> tuple[subprocess.Popen[bytes], Path]:
    script, log = tmp / "sender.py", tmp / f"sent-{os.urandom(3).hex()}.log"
    script.write_text(SENDER)
    proc = subprocess.Popen([sys.executable, str(script), str(log), str(n)], env=d.env(),
                            stderr=subprocess.DEVNULL)
    return proc, log


def assert_inbox_exactly_once_in_order(d: Daemon, expected: list[str]) -> None:
    got = subjects(d, "rx")
    assert len(got) == len(set(got)), "a message is in the inbox twice"
    assert got == sorted(got), "out of send order"
    missing = sorted(set(expected) - set(got))
    assert not missing, f"{len(missing)} acknowledged messages never arrived: {missing[:5]}"
