"""Use case 3, "Task Handoff": one session hands a deployment to another.

Needs a running meshd (see multi_session_workflow.py), or a directory argument.
"""

from _common import objects
from sessions import MemoryType, MessageType

registry, hub, memory = objects()
registry.register("session-1", "Deployer", "Claude")
registry.register("session-2", "Successor", "GPT-4")
memory.set("session-1", "deploy_state", {"stage": "testing", "target": "prod"},
           type=MemoryType.TASK, tags=["deploy"])

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
deploy_state = memory.get("deploy_state")
# Continue deployment...
print("session-2 inbox:", [m.format_signal() for m in hub.get_messages("session-2")])
print("deploy_state:", deploy_state)
