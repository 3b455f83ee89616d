"""Use case 4, "Shared Context": one session stores findings, another reads them.

Needs a running meshd (see multi_session_workflow.py), or a directory argument.
"""

from _common import objects
from sessions import MemoryType

registry, hub, memory = objects()

# Session 1: Store findings
memory.set(
    session_id="session-1",
    key="api_endpoints",
    value=["GET /users", "POST /users", "DELETE /users/:id"],
    type=MemoryType.FACT,
    tags=["api", "documentation"]
)

# Session 2: Access findings
endpoints = memory.get("api_endpoints")
# Use the discovered endpoints...
print("endpoints:", endpoints)
print("documented:", [e.key for e in memory.get_by_tags(["documentation"])])
