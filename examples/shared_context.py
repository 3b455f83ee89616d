"""Use case 4 of the seed document, "Shared Context": one session stores what it found
in shared memory, another reads it back.

Needs a running `meshd` on this host: start one with `meshd` (or use the system service,
see docs/systemd.md). To try it by hand without touching the default paths:

    meshd --socket /tmp/m/m.sock --data-dir /tmp/m/data --no-discovery &
    MESHD_SOCKET=/tmp/m/m.sock python examples/shared_context.py

With a directory argument it needs no daemon and keeps everything in that directory:

    python examples/shared_context.py /tmp/sessions-demo
"""

from _common import SharedMemory, where
from sessions import MemoryType

print("State kept by:", where())

# ---- seed ---------------------------------------------------------------------------------
memory = SharedMemory()

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
# ---- end of seed --------------------------------------------------------------------------

# Session 2 is another object (in a real setup, another process or agent) on the same state.
session_2_memory = SharedMemory()
entry = session_2_memory.get_entry("api_endpoints")
print("endpoints:", endpoints)
print(f"stored by {entry.session_id} at {entry.timestamp} as {entry.type.value}, tags {entry.tags}")
for endpoint in session_2_memory.get("api_endpoints"):
    print("  ", endpoint)
print("documentation keys:", sorted({e.key for e in session_2_memory.get_by_tags(["documentation"])}))
