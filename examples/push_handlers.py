"""Push handlers: a "calculator" session answers requests the moment they arrive, from a
background thread, while the main thread sends requests and waits for the answers.

    python examples/push_handlers.py          this host's meshd (MESHD_SOCKET=PATH picks one)
    python examples/push_handlers.py DIR      no daemon: the state lives in the directory DIR

`hub.register_handler(type, fn, session_id=...)` calls `fn(message)` in a thread of the
hub for each message of that type delivered to that session from now on; nobody polls an
inbox. `hub.subscribe(session_id)` is the same live feed as an iterator you read yourself.
"""

import time

from _common import CollaborationHub, SessionRegistry, where
from sessions import Message, MessageType

ASKER, CALC = "asker-001", "calculator-001"
DEADLINE = 15.0      # seconds the asker waits for all the answers at most

registry = SessionRegistry()
registry.register(ASKER, "Asker", "Claude")
registry.register(CALC, "Calculator", "Claude", capabilities=["arithmetic"])
print("State kept by:", where())

hub = CollaborationHub()


def answer(request: Message) -> None:
    """Runs in the hub's background thread, once for each REQUEST sent to the calculator."""
    a, b = request.data["a"], request.data["b"]
    print(f"  [calculator thread] {request.subject!r}: {a} x {b} -> replying {a * b}")
    hub.reply(CALC, request, body=f"{a} x {b} = {a * b}", data={"product": a * b})


# From now on every REQUEST delivered to the calculator's inbox goes to answer().
hub.register_handler(MessageType.REQUEST, answer, session_id=CALC)

# Open the asker's live feed of responses *before* asking, so no answer can slip past.
with hub.subscribe(ASKER, types=[MessageType.RESPONSE]) as responses:
    asked = {}
    for a, b in [(6, 7), (12, 12), (3, 14)]:
        msg = hub.send(ASKER, CALC, MessageType.REQUEST, f"multiply {a} by {b}", "please",
                       data={"a": a, "b": b})
        asked[msg.message_id] = msg.subject
        print(f"asker sent: {msg.subject}")

    # Wait for one answer per request, but never longer than DEADLINE seconds in all.
    deadline = time.monotonic() + DEADLINE
    while asked and time.monotonic() < deadline:
        reply = responses.next(timeout=deadline - time.monotonic())  # None on timeout
        if reply is not None and reply.in_reply_to in asked:
            print(f"asker got: {asked.pop(reply.in_reply_to)!r} -> {reply.body}")

hub.close()        # stops the handler thread
if asked:
    raise SystemExit(f"❌ no answer within {DEADLINE:g} s to: {', '.join(asked.values())}")
print("All requests answered by the push handler.")
