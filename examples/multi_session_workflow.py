"""The seed document's "Multi-Session Workflow": a planner, a developer and a reviewer.

Needs a running meshd (`meshd`, or for a try by hand `meshd --socket /tmp/m.sock
--data-dir /tmp/md` and `MESHD_SOCKET=/tmp/m.sock python examples/multi_session_workflow.py`),
or a directory argument to run with no daemon.
"""

from _common import objects
from sessions import MemoryType, MessageType

# Initialize
registry, hub, memory = objects()

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
print("Dev read the plan:", plan)

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

for sid in ("planner-001", "dev-001", "reviewer-001"):
    for msg in hub.get_messages(sid):
        print(f"[{sid}] {msg.format_signal()}")
