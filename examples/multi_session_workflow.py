"""The seed document's "Example: Multi-Session Workflow": a planner, a developer and a
reviewer share a plan through shared memory and talk through the collaboration hub.

Needs a running `meshd` on this host: start one with `meshd` (or use the system service,
see docs/systemd.md). To try it by hand without touching the default paths:

    meshd --socket /tmp/m/m.sock --data-dir /tmp/m/data --no-discovery &
    MESHD_SOCKET=/tmp/m/m.sock python examples/multi_session_workflow.py

With a directory argument it needs no daemon and keeps everything in that directory:

    python examples/multi_session_workflow.py /tmp/sessions-demo

The code between the "seed" markers is the seed document's, verbatim. Running it again
against the same daemon or directory re-registers the sessions and adds new messages and
memory entries (the stats grow); the inboxes printed at the end show what is new.
"""

import _common

# ---- seed ---------------------------------------------------------------------------------
from sessions import SessionRegistry, CollaborationHub, SharedMemory, MessageType, MemoryType
# (added: the same three classes from _common, which with a DIR argument are bound to DIR)
from _common import SessionRegistry, CollaborationHub, SharedMemory  # noqa: E402,F811

# Initialize
registry = SessionRegistry()
hub = CollaborationHub()
memory = SharedMemory()

# Session 1: Planning agent
registry.register("planner-001", "Planner", "Claude", human_user="Alexa")
memory.set("planner-001", "project_plan", {
    "phase": "design",
    "tasks": ["architecture", "api-design", "database"]
}, type=MemoryType.STATE, tags=["project", "active"])

hub.broadcast("planner-001", "Project started", "Beginning design phase")

# Session 2: Developer agent
registry.register("dev-001", "Developer", "GPT-4", human_user="Alexa")

# Dev reads plan from memory
plan = memory.get("project_plan")

# Dev requests clarification
hub.send("dev-001", "planner-001", MessageType.REQUEST, 
         "API design question", "Should we use REST or GraphQL?")

# Session 3: Reviewer agent
registry.register("reviewer-001", "Reviewer", "Claude", human_user="Alexa")

# Later: Dev hands off to reviewer
memory.set("dev-001", "api_code", "class API...", 
          type=MemoryType.STATE, tags=["code", "ready-for-review"])

hub.send("dev-001", "reviewer-001", MessageType.TASK_OFFER,
         "Code review", "API implementation ready",
         data={"files": ["api.py"], "tests": "passing"})

# Reviewer accepts
hub.send("reviewer-001", "dev-001", MessageType.TASK_ACCEPT,
         "Starting review", "Will review and provide feedback")

# Show stats
print(registry.get_stats())
print(hub.get_stats())
print(memory.get_stats())
# ---- end of seed --------------------------------------------------------------------------

print()
print("State kept by:", _common.where())
print("The plan the developer read:", plan)
print("Ready for review:", sorted({e.key for e in memory.get_by_tags(["ready-for-review"])}))
for session in registry.list_sessions():
    if session.session_id in ("planner-001", "dev-001", "reviewer-001"):
        print(f"\n{session.session_id} ({session.agent_name}, {session.agent_type}) - "
              f"{session.status.value}; new messages:")
        for msg in hub.get_messages(session.session_id, unread_only=True):
            print("  ", msg.format_signal(), "-", msg.body, msg.data or "")
        hub.mark_read(session.session_id)
