"""The seed document, verbatim and in its own order, against one fresh daemon, with nothing
registered beforehand: what a user of the seed does after reading it top to bottom.

(tests/daemon/test_seed.py runs each block on its own, also in directory mode, and checks each
one's effects in detail; this one checks that the document as a whole works as written.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from support import SEED_README, script
from support.daemons import python_on_path, subprocess_env

RUNNER = script("seed_runner.py")


@pytest.mark.skipif(not SEED_README.exists(), reason=f"{SEED_README} is not beside the project")
def test_the_seed_document_runs_verbatim_in_order(daemon, short_tmp: Path) -> None:
    import subprocess
    env = daemon.env()
    env["PATH"] = python_on_path(short_tmp) + ":" + env.get("PATH", "/usr/bin:/bin")
    work = short_tmp / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, str(RUNNER), str(SEED_README)], env=env, cwd=str(work),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [x["kind"] for x in recs]
    assert kinds.count("python") >= 8 and kinds.count("cli") >= 6, kinds
    for rec in recs:
        assert rec["ok"], f"seed block at line {rec['line']} ({rec['heading']}) failed:\n" \
                          f"{rec['error']}\n{rec['stdout']}"
        for shown in rec["shown"] if rec["kind"] != "output" else ():
            assert shown in rec["stdout"], (rec["heading"], shown, rec["stdout"])
    # The "Output:" block of `list`: the header and the row of the session the document
    # registered just before (agent-002 is registered by no block before it).
    i = next(i for i, x in enumerate(recs) if x["kind"] == "output")
    shown, printed = recs[i]["shown"], recs[i - 1]["stdout"].splitlines()
    # (this meshd adds a HOST column after the seed's columns)
    assert printed[0].startswith(shown[0].rstrip())
    cece = next(line for line in shown if line.startswith("cece-001"))
    assert any(p.startswith(cece.rstrip()) for p in printed), (cece, printed)

    # What the document did is in the daemon.
    reg, hub, mem = daemon.registry(), daemon.hub(), daemon.memory()
    assert reg.get("cece-001").status.value == "working"          # the Python API block
    assert mem.get("api_endpoints") == ["GET /users", "POST /users", "DELETE /users/:id"]
    assert mem.get("current_task") == {"name": "Build collaboration", "status": "in_progress"}
    # Messages to ids the document never registers wait for them, and read as in the seed.
    waiting = [m for m in hub.get_messages("agent-002") if m.to_session == "agent-002"]
    assert {"Ping", "Need code review", "Need help"} <= {m.subject for m in waiting}
    assert all(hub.get_message_status(m.message_id)["state"] == "waiting" for m in waiting)
    review = [m for m in hub.get_messages("reviewer-002") if m.subject == "Code review needed"]
    assert len(review) == 1
    thread = hub.get_conversation(review[0].message_id)
    assert [m.subject for m in thread] == ["Code review needed", "Re: Code review needed"]
    assert [m.subject for m in hub.get_messages("session-2")] == ["Handing off deployment"]
    # When agent-002 registers, what waited for it is its mail, once.
    reg.register("agent-002", "Agent-2", "GPT-4", human_user="Alexa")
    after = [m for m in hub.get_messages("agent-002") if m.to_session == "agent-002"]
    assert sorted(m.message_id for m in after) == sorted(m.message_id for m in waiting)
    assert all(hub.get_message_status(m.message_id)["state"] == "stored" for m in after)
