"""Use case 1 of the seed document, "Session Discovery": list the sessions this host's
meshd knows, then look some up by capability and by status.

Needs a running `meshd` on this host: start one with `meshd` (or use the system service,
see docs/systemd.md). To try it by hand without touching the default paths:

    meshd --socket /tmp/m/m.sock --data-dir /tmp/m/data --no-discovery &
    MESHD_SOCKET=/tmp/m/m.sock python examples/session_discovery.py

With a directory argument it needs no daemon and keeps everything in that directory:

    python examples/session_discovery.py /tmp/sessions-demo

It first registers two sessions so there is something to discover; sessions registered
by other programs (and other runs of the examples) show up too.
"""

from _common import SessionRegistry, where
from sessions import SessionStatus

# Two sessions to discover (the seed's Quick Start registers these).
setup = SessionRegistry()
setup.register("cece-001", "Cece", "Claude", human_user="Alexa",
               capabilities=["python", "review", "planning"])
setup.register("agent-002", "Agent-2", "GPT-4", human_user="Alexa")
setup.update_status("agent-002", SessionStatus.WORKING, current_task="Code review")

print("State kept by:", where())

# ---- seed ---------------------------------------------------------------------------------
# Find all active sessions
registry = SessionRegistry()
sessions = registry.list_sessions()

for session in sessions:
    print(f"{session.agent_name} ({session.agent_type}) - {session.status.value}")
# ---- end of seed --------------------------------------------------------------------------

print()
print("Python experts:", [s.session_id for s in registry.find_sessions(capability="python")])
print("Working:", [f"{s.session_id} on {s.current_task!r}"
                   for s in registry.find_sessions(status=SessionStatus.WORKING)])
print("Stats:", registry.get_stats())
