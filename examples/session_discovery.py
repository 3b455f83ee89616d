"""Use case 1, "Session Discovery": list the sessions on the mesh.

Needs a running meshd (see multi_session_workflow.py), or a directory argument.
"""

from _common import objects

registry, hub, memory = objects()
registry.register("cece-001", "Cece", "Claude", human_user="Alexa",
                  capabilities=["python", "review", "planning"])
registry.register("agent-002", "Agent-2", "GPT-4", human_user="Alexa")

# Find all active sessions
sessions = registry.list_sessions()

for session in sessions:
    print(f"{session.agent_name} ({session.agent_type}) - {session.status.value}")

print("Python experts:", [s.session_id for s in registry.find_sessions(capability="python")])
