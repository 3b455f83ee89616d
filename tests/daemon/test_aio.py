"""The asyncio SDK: the same calls as the blocking one, against a daemon and a directory,
plus live streams and handlers on the event loop."""

from __future__ import annotations

import asyncio

import pytest

from sessions import InvalidArgument, MemoryType, MessageType
from sessions.aio import AsyncCollaborationHub, AsyncSessionRegistry, AsyncSharedMemory


@pytest.fixture(params=["daemon", "directory"])
def where(request, make_daemon, short_tmp):
    if request.param == "daemon":
        return {"socket": make_daemon().socket}
    return {"path": str(short_tmp / "dir")}


def build(where):
    if "path" in where:
        reg = AsyncSessionRegistry(where["path"])
        return reg, AsyncCollaborationHub(reg), AsyncSharedMemory(where["path"])
    s = where["socket"]
    return (AsyncSessionRegistry(socket=s), AsyncCollaborationHub(socket=s),
            AsyncSharedMemory(socket=s))


def test_async_calls_mirror_the_blocking_api(where):
    async def main():
        reg, hub, mem = build(where)
        try:
            s = await reg.register("a", "A", "Claude", capabilities=["py"])
            await reg.register("b", "B", "GPT-4")
            assert s.session_id == "a" and (await reg.get("a")).agent_type == "Claude"
            assert await reg.update_status("a", "working", current_task="t")
            assert [x.session_id for x in await reg.find_sessions(capability="py")] == ["a"]
            assert (await reg.get_stats())["total_sessions"] == 2
            m = await hub.send("a", "b", MessageType.REQUEST, "subj", "body", data={"x": 1})
            r = await hub.reply("b", m, "ok")
            assert [x.message_id for x in await hub.get_conversation(m.message_id)] == [
                m.message_id, r.message_id]
            assert len(await hub.get_messages("b")) == 1
            w = await hub.send("a", "nobody", "request", "s", "b")   # waits for "nobody"
            assert (await hub.get_message_status(w.message_id))["state"] == "waiting"
            e = await mem.set("a", "k", {"v": 1}, type=MemoryType.FACT, tags=["t"])
            assert e.type is MemoryType.FACT and await mem.get("k") == {"v": 1}
            assert [x.key for x in await mem.get_by_tags(["t"])] == ["k"]
            with pytest.raises(InvalidArgument):
                await mem.set("a", "k", object())
            results = await asyncio.gather(*(mem.set("a", f"p{i}", i) for i in range(200)))
            assert len({x.entry_id for x in results}) == 200
            assert (await mem.get_stats())["total_entries"] == 201
            assert await mem.delete("k") == 1
        finally:
            for x in (reg, hub, mem):
                await x.close()
    asyncio.run(main())


def test_async_stream_and_handler(where):
    async def main():
        reg, hub, mem = build(where)
        try:
            await reg.register("a", "A", "T")
            await reg.register("b", "B", "T")
            got: list = []

            async def on_request(msg):
                got.append(msg.message_id)

            await hub.register_handler(MessageType.REQUEST, on_request)
            stream = await hub.subscribe("b")
            sent = [(await hub.send("a", "b", "request", f"s{i}", "x")).message_id
                    for i in range(5)]
            await hub.send("a", "b", "notification", "n", "not a request")
            received = []
            async with asyncio.timeout(15):
                async for msg in stream:
                    received.append(msg.message_id)
                    if len(received) == 6:
                        break
                while len(got) < 5:
                    await asyncio.sleep(0.02)
            assert received[:5] == sent and got == sent
            assert stream.cursor == 6
            stream.close()
        finally:
            for x in (reg, hub, mem):
                await x.close()
    asyncio.run(main())


def test_async_calls_time_out_when_the_daemon_hangs(daemon):
    import os
    import signal
    import time

    from sessions import Timeout

    async def main():
        mem = AsyncSharedMemory(socket=daemon.socket, timeout=0.5)
        await mem.set("s", "k", 1)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            results = await asyncio.gather(*(mem.get("k") for _ in range(20)),
                                           return_exceptions=True)
            assert all(isinstance(r, Timeout) for r in results), results
            assert time.monotonic() - t0 < 3
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        assert await mem.get("k") == 1
        await mem.close()
    asyncio.run(main())
