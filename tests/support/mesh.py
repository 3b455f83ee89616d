"""The replicated state as a user sees it on each daemon, and waiting until nodes agree."""

from __future__ import annotations

import json
from typing import Any

from support.daemons import Daemon, eventually


def snapshot(d: Daemon) -> dict[str, Any]:
    """Everything a user can see of the replicated state, in a comparable form."""
    mem = d.memory(timeout=10)
    reg = d.registry(timeout=10)
    entries = sorted((e.entry_id, e.key, json.dumps(e.value, sort_keys=True), e.session_id,
                      tuple(e.tags)) for e in mem.search("*"))
    sessions = sorted((s.session_id, s.agent_name, s.status.value, s.host, s.current_task)
                      for s in reg.list_sessions(include_offline=True))
    return {"entries": entries, "sessions": sessions}


def wait_same_state(nodes: list[Daemon], timeout: float = 30.0) -> dict[str, Any]:
    def same() -> dict[str, Any] | None:
        snaps = [snapshot(d) for d in nodes]
        return snaps[0] if all(s == snaps[0] for s in snaps[1:]) else None
    return eventually(same, timeout=timeout, interval=0.1,
                      message=f"identical state on {len(nodes)} nodes")
