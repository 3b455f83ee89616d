"""Use case 2, "Collaborative Code Review": a request, its reply, and the thread.

Needs a running meshd (see multi_session_workflow.py), or a directory argument.
"""

from _common import objects
from sessions import MessageType

registry, hub, memory = objects()
registry.register("cece-001", "Cece", "Claude")
registry.register("reviewer-002", "Reviewer", "Claude")

# Session 1: Request review
msg = hub.send(
    from_session="cece-001",
    to_session="reviewer-002",
    type=MessageType.REQUEST,
    subject="Code review needed",
    body="Please review PR #123",
    data={"pr": 123, "files": ["main.py", "test.py"]}
)

# Session 2: Accept and respond
hub.reply(
    from_session="reviewer-002",
    to_message=msg,
    body="Reviewed. LGTM with minor comments.",
    data={"approved": True, "comments": 2}
)

for m in hub.get_conversation(msg.message_id):
    print(m.format_signal(), "-", m.body, m.data)
