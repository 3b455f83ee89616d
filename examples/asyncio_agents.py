"""Two agents as asyncio coroutines: `sessions.aio` has the blocking API's calls as
coroutines, so one event loop can run several agents side by side.

    python examples/asyncio_agents.py          this host's meshd (MESHD_SOCKET=PATH picks one)
    python examples/asyncio_agents.py DIR      no daemon: the state lives in the directory DIR

Ada stores her notes in shared memory and asks Bob two questions at once; Bob, reading
his live inbox with `async for`, looks the notes up and answers each. Against a daemon,
calls started together with `asyncio.gather` travel together (pipelined).
"""

import asyncio

from _common import DIRECTORY, where
from sessions import MessageType, Timeout
from sessions.aio import AsyncCollaborationHub, AsyncSessionRegistry, AsyncSharedMemory

ADA, BOB = "ada-001", "bob-001"
QUESTIONS = ["Which database?", "Which port?"]
TIMEOUT = 15.0       # seconds each agent waits for its messages at most


async def ada(hub: AsyncCollaborationHub, memory: AsyncSharedMemory, answers) -> None:
    await memory.set(ADA, "design_notes", {"database": "sqlite", "port": 7070},
                     tags=["design"])
    # Two requests in flight at once.
    await asyncio.gather(*(hub.send(ADA, BOB, MessageType.REQUEST, q, "see design_notes")
                           for q in QUESTIONS))
    print(f"ada asked bob {len(QUESTIONS)} questions")
    for _ in QUESTIONS:
        reply = await answers.next(timeout=TIMEOUT)      # None if nothing came in time
        if reply is None:
            raise Timeout(f"ada got no answer within {TIMEOUT:g} s")  # an SDK error: 1 line
        print(f"ada got: {reply.subject} -> {reply.body}")


async def bob(hub: AsyncCollaborationHub, memory: AsyncSharedMemory, requests) -> None:
    async def answer_all() -> None:
        answered = 0
        async for request in requests:                  # waits for each message as it comes
            notes = await memory.get("design_notes", {})
            word = "database" if "database" in request.subject else "port"
            await hub.reply(BOB, request, f"{notes.get(word)} (from ada's notes)")
            print(f"bob answered: {request.subject}")
            answered += 1
            if answered == len(QUESTIONS):
                return
    # `async for` alone would wait forever: bound it.
    try:
        await asyncio.wait_for(answer_all(), TIMEOUT)
    except TimeoutError:
        raise Timeout(f"bob did not get {len(QUESTIONS)} requests within {TIMEOUT:g} s") from None


async def main() -> None:
    # No argument: this host's meshd; a directory: that directory, no daemon.
    registry = AsyncSessionRegistry(DIRECTORY)
    hub = AsyncCollaborationHub(registry=registry)       # shares the registry's connection
    memory = AsyncSharedMemory(DIRECTORY)
    try:
        await asyncio.gather(registry.register(ADA, "Ada", "Claude"),
                             registry.register(BOB, "Bob", "GPT-4"))
        # Live feeds, opened before anyone talks: only messages from now on.
        answers = await hub.subscribe(ADA, types=[MessageType.RESPONSE])
        requests = await hub.subscribe(BOB, types=[MessageType.REQUEST])
        await asyncio.gather(ada(hub, memory, answers), bob(hub, memory, requests))
        answers.close()
        requests.close()
        stats = await hub.get_stats()
        print(f"done: {stats['total_messages']} messages stored in all")
    finally:
        await hub.close()
        await memory.close()
        await registry.close()


print("State kept by:", where())
asyncio.run(main())
