"""Use case 3 of the seed document, "Task Handoff": a session that has to leave hands its
deployment to another, which finds the HANDOFF message in its inbox and picks up the
deployment state from shared memory.

Needs a running `meshd` on this host: start one with `meshd` (or use the system service,
see docs/systemd.md). To try it by hand without touching the default paths:

    meshd --socket /tmp/m/m.sock --data-dir /tmp/m/data --no-discovery &
    MESHD_SOCKET=/tmp/m/m.sock python examples/task_handoff.py

With a directory argument it needs no daemon and keeps everything in that directory:

    python examples/task_handoff.py /tmp/sessions-demo
"""

from _common import CollaborationHub, SessionRegistry, SharedMemory, where
from sessions import MemoryType, MessageType, SessionStatus

# The two sessions, and the deployment state session-1 has been keeping in shared memory.
registry = SessionRegistry()
registry.register("session-1", "Deployer", "Claude", human_user="Alexa")
registry.register("session-2", "Successor", "GPT-4", human_user="Alexa")
SharedMemory().set("session-1", "deploy_state",
                   {"task": "deploy-prod", "stage": "testing", "done": ["build", "migrate"]},
                   type=MemoryType.TASK, tags=["deploy", "active"])
hub = CollaborationHub()

print("State kept by:", where())

# ---- seed ---------------------------------------------------------------------------------
# Session 1: Can't complete task
hub.send(
    from_session="session-1",
    to_session="session-2",
    type=MessageType.HANDOFF,
    subject="Handing off deployment",
    body="I need to disconnect. Can you take over?",
    data={"task": "deploy-prod", "stage": "testing"}
)

# Session 2: Picks up where session-1 left off
memory = SharedMemory()
deploy_state = memory.get("deploy_state")
# Continue deployment...
# ---- end of seed --------------------------------------------------------------------------

for m in hub.get_messages("session-2", message_type=MessageType.HANDOFF, unread_only=True):
    print("session-2 got:", m.format_signal(), "-", m.body, m.data)
hub.mark_read("session-2")
print("deploy_state:", deploy_state)
registry.unregister("session-1")           # session-1 disconnects (kept, shown OFFLINE)
registry.update_status("session-2", SessionStatus.WORKING, current_task="deploy-prod")
print("Sessions:", [(s.session_id, s.status.value, s.current_task)
                    for s in registry.list_sessions(include_offline=True)
                    if s.session_id in ("session-1", "session-2")])
