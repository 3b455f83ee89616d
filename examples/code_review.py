"""Use case 2 of the seed document, "Collaborative Code Review": one session asks for a
review, the reviewer replies, and the whole thread is read back.

Needs a running `meshd` on this host: start one with `meshd` (or use the system service,
see docs/systemd.md). To try it by hand without touching the default paths:

    meshd --socket /tmp/m/m.sock --data-dir /tmp/m/data --no-discovery &
    MESHD_SOCKET=/tmp/m/m.sock python examples/code_review.py

With a directory argument it needs no daemon and keeps everything in that directory:

    python examples/code_review.py /tmp/sessions-demo
"""

from _common import CollaborationHub, SessionRegistry, where
from sessions import MessageType

# Both sessions must be registered: a message to an unknown session is an error.
registry = SessionRegistry()
registry.register("cece-001", "Cece", "Claude", human_user="Alexa",
                  capabilities=["python", "review", "planning"])
registry.register("reviewer-002", "Reviewer", "Claude", human_user="Alexa",
                  capabilities=["review"])

print("State kept by:", where())

# ---- seed ---------------------------------------------------------------------------------
hub = CollaborationHub()

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
# ---- end of seed --------------------------------------------------------------------------

print("The thread:")
for m in hub.get_conversation(msg.message_id):
    print("  ", m.format_signal(), "-", m.body, m.data)
