"""The messaging tools: who is there, send, reply, broadcast, read, wait, ask, dispatch.

Descriptions are written for the model that calls the tools: what the tool does, when
to use it rather than another, what comes back. Every anticipated failure raises
`ToolError` with the daemon's one-line message, so the model reads why and can correct
itself; an unexpected exception would reach it as a bare "Error executing tool".
(No `from __future__ import annotations`: the SDK reads these signatures at run time.)
"""

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from sessions import Message, NotFound, SessionsError, Timeout
from sessions.mcp import format as fmt
from sessions.mcp.agent import Agent
from sessions.mcp.common import (
    READ, WRITE, Body, Data, Limit, MessageId, MsgType, Priority, SessionId, Subject, guard,
    ticking, tool,
)


def register(mcp: MCPServer, agent: Agent, progress_every: float = 15.0) -> None:
    sid = agent.sid
    g = guard(agent)

    async def known(session_id: str) -> Any:
        s = await agent.registry.get(session_id)
        if s is None:
            raise ToolError(f"no session {session_id!r} on the mesh; list_sessions shows who "
                            f"is there")
        return s

    async def received(message_id: str) -> Message:
        receipt = await agent.hub.get_message_status(message_id)
        if receipt is None:
            raise ToolError(f"unknown message id {message_id!r} (ids come from "
                            f"wait_for_messages, check_inbox or get_thread)")
        return receipt["message"]

    async def mark(msgs: list[Message]) -> str:
        """Mark handed-out messages read. They are already off the stream (the cursor
        moved), so a failure must not lose them: it becomes a note, not an error."""
        try:
            await agent.hub.mark_read(sid, [m.message_id for m in msgs])
        except SessionsError as exc:
            return f" (not marked read: {' '.join(str(exc).split())})"
        return ""

    @tool(mcp, READ)
    @g
    async def whoami() -> str:
        """Who you are on the meshd mesh: your session id (what others send to), name,
        type, capabilities, status, task, host, and how many unread messages wait for you.
        Call it first when unsure of your id or state."""
        s = await known(sid)
        unread = await agent.hub.get_messages(sid, unread_only=True)
        d = fmt.session(s)
        d.update(unread=len(unread), cursor=agent.delivered, daemon=agent.socket_path)
        return fmt.dumps(d)

    @tool(mcp, READ)
    @g
    async def list_sessions(
            status: Annotated[Literal["active", "idle", "working", "waiting", "offline"] | None,
                              Field(description="Only sessions with this status")] = None,
            capability: Annotated[str | None, Field(description="Only sessions with it")] = None,
            agent_type: Annotated[str | None, Field(description="e.g. Claude, GPT-4")] = None,
            include_offline: bool = False, limit: Limit = 50) -> str:
        """The agent sessions on the mesh (every host of the LAN), one JSON line each: id,
        name, type, status (active, idle, working, waiting, offline), capabilities, task,
        host and host_state (local, alive, suspect, dead, left). Filter by status,
        capability or agent_type. OFFLINE sessions are left out unless status='offline' or
        include_offline=true. Use it to find whom to message; dispatch picks one for you."""
        if status is None and capability is None and agent_type is None:
            found = await agent.registry.list_sessions(include_offline=include_offline)
        else:
            found = await agent.registry.find_sessions(status, agent_type, None, capability)
            if include_offline and status is None:
                found += [s for s in await agent.registry.find_sessions(
                    "offline", agent_type, None, capability)]
        rows = [fmt.session(s) for s in found[:limit]]
        more = (f"{len(found) - limit} more: narrow the filters or raise limit"
                if len(found) > limit else None)
        return fmt.lines(f"{len(found)} session(s); you are {sid}", rows, more)

    @tool(mcp, WRITE)
    @g
    async def send_message(to: SessionId, subject: Subject, body: Body,
                           type: MsgType = "request", data: Data = None,
                           priority: Priority = "normal",
                           in_reply_to: Annotated[str | None, Field(
                               description="The message id this one follows up")] = None,
                           queue_if_unknown: bool = False) -> str:
        """Send a direct message from you to one session (on any host). type: request
        (expects an answer), notification, handoff, task_offer, ...; priority high
        overtakes queued normal mail. Returns the message id. To send and wait for the
        answer in one call use ask; to answer a message use reply. An id nobody has
        registered is an error unless queue_if_unknown=true (it then waits for that id)."""
        note = ""
        if not queue_if_unknown:
            s = await known(to)
            if s.status.value == "offline":
                note = f"; {to} is OFFLINE and sees it when it comes back"
        msg = await agent.hub.send(sid, to, type, subject, body, data, in_reply_to, priority)
        return f"sent {msg.message_id} to {to}{note}"

    @tool(mcp, WRITE)
    @g
    async def reply(message_id: MessageId, body: Body, data: Data = None) -> str:
        """Answer a message you received: a RESPONSE to its sender, subject "Re: ...",
        threaded under it (a sender waiting in ask gets it at once). Returns the id of
        your reply."""
        original = await received(message_id)
        msg = await agent.hub.reply(sid, original, body, data)
        return f"replied {msg.message_id} to {original.from_session}"

    @tool(mcp, WRITE)
    @g
    async def broadcast(subject: Subject, body: Body, data: Data = None,
                        priority: Priority = "normal") -> str:
        """Send one message to every other session on the mesh, on every host. For news
        everyone needs ("I am taking over module X"); for one recipient use send_message
        or dispatch. Returns the message id."""
        msg = await agent.hub.broadcast(sid, subject, body, data, priority)
        return f"broadcast {msg.message_id}"

    @tool(mcp, WRITE)
    @g
    async def check_inbox(unread_only: bool = True, mark_read: bool = False,
                          limit: Limit = 20) -> str:
        """Read your inbox now, without waiting: your unread messages (oldest first, high
        priority first), or with unread_only=false your latest messages, read or not.
        mark_read=true marks the listed ones read. One JSON line per message: id, from,
        type, subject, body, data, in_reply_to, at. To wait for new mail use
        wait_for_messages."""
        msgs = await agent.hub.get_messages(sid, unread_only=unread_only)
        total = len(msgs)
        shown = msgs[:limit] if unread_only else msgs[-limit:]
        if mark_read and shown:
            await agent.hub.mark_read(sid, [m.message_id for m in shown])
            agent.seen([m.message_id for m in shown])
        what = "unread" if unread_only else "in your inbox"
        more = None
        if total > len(shown):
            more = (f"{total - len(shown)} more: call again with mark_read=true or a larger "
                    f"limit" if unread_only else f"{total - len(shown)} older not shown")
        return fmt.lines(f"{total} message(s) {what}" + (", marked read" if mark_read else ""),
                         [fmt.message(m) for m in shown], more)

    @tool(mcp, WRITE)
    @g
    async def wait_for_messages(
            ctx: Context,
            timeout_s: Annotated[float, Field(ge=0, le=600, description="Seconds to wait at "
                                              "most (0: just look)")] = 30,
            limit: Limit = 20, mark_read: bool = True) -> str:
        """Wait for new messages to you; returns as soon as any arrive, or after timeout_s
        with "no new messages". Each message is returned once: the server remembers what
        it handed out, across calls and restarts (older unread mail: check_inbox). Use it
        when idle or waiting on others, and call it again to keep listening. Returned
        messages are marked read unless mark_read=false. Answer requests with reply."""
        async def tick(elapsed: float) -> None:
            await ctx.report_progress(elapsed, timeout_s,
                                      f"waiting for messages ({elapsed:.0f} of {timeout_s:g} s)")
        msgs = await agent.wait(timeout_s, limit, tick, progress_every)
        if not msgs:
            return f"no new messages in {timeout_s:g} s; call again to keep waiting"
        note = await mark(msgs) if mark_read else ""
        more = " (more are waiting: call again)" if agent.inbox else ""
        return fmt.lines(f"{len(msgs)} new message(s){more}{note}",
                         [fmt.message(m) for m in msgs])

    @tool(mcp, READ)
    @g
    async def get_thread(message_id: MessageId, limit: Limit = 50) -> str:
        """The whole conversation a message belongs to, root first then replies in order,
        one JSON line per message. Use it to catch up before answering."""
        msgs = await agent.hub.get_conversation(message_id)
        if not msgs:
            raise ToolError(f"unknown message id {message_id!r}")
        more = f"{len(msgs) - limit} later message(s) not shown" if len(msgs) > limit else None
        return fmt.lines(f"{len(msgs)} message(s) in the thread",
                         [fmt.message(m) for m in msgs[:limit]], more)

    @tool(mcp, READ)
    @g
    async def message_status(message_id: MessageId) -> str:
        """Where a message stands, and the whole message: state waiting (no session has
        that id yet), queued (the recipient's host is unreachable; delivered when it is
        back), stored (in the inbox), read, or expired. Use it to check that your message
        got through or was read."""
        receipt = await agent.hub.get_message_status(message_id)
        if receipt is None:
            raise ToolError(f"unknown message id {message_id!r}")
        return fmt.dumps({"state": receipt["state"],
                          "message": fmt.message(receipt["message"], None)})

    @tool(mcp, WRITE)
    @g
    async def set_status(status: Literal["active", "idle", "working", "waiting"],
                         task: Annotated[str | None, Field(
                             max_length=1000, description="What you are doing, one line")]
                         = None) -> str:
        """Tell the mesh what you are doing. active: available; idle: free for work
        (dispatch prefers idle sessions); working: busy (dispatch skips you); waiting:
        blocked on someone. task: a short line others see in list_sessions."""
        await agent.registry.update_status(sid, status, task)
        return f"{sid} is {status}" + (f": {task}" if task else "")

    @tool(mcp, WRITE)
    @g
    async def ask(ctx: Context, to: SessionId, subject: Subject, body: Body, data: Data = None,
                  timeout_s: Annotated[float, Field(gt=0, le=600, description="Seconds to "
                                                    "wait for the answer")] = 60) -> str:
        """Ask another session and wait for its answer: sends a REQUEST and returns the
        RESPONSE that replies to it (the other side answers with reply). If none comes in
        timeout_s you get a note saying so; the request stays delivered and a late answer
        shows up in wait_for_messages. Use it when you need the answer to go on."""
        await known(to)
        try:
            answer = await ticking(ctx, agent.hub.ask(sid, to, subject, body, data, timeout_s),
                                   timeout_s, f"waiting for {to}", progress_every)
        except Timeout as exc:
            return f"no answer yet: {' '.join(str(exc).split())}"
        agent.seen([answer.message_id])
        note = await mark([answer])
        return fmt.lines(f"answer from {to}:{note}", [fmt.message(answer)])

    @tool(mcp, WRITE)
    @g
    async def dispatch(capability: Annotated[str, Field(min_length=1, description=
                                                        "e.g. review, python")],
                       subject: Subject, body: Body, data: Data = None,
                       type: MsgType = "request", priority: Priority = "normal") -> str:
        """Hand work to ONE session that has a capability, chosen by the mesh: an idle
        session before an active one (working, waiting and offline ones never), then the
        one given work least recently, then the nearest host. Returns who got it and the
        message id; an error if nobody qualifies. Their answer arrives in
        wait_for_messages."""
        try:
            msg = await agent.hub.dispatch(sid, capability, subject, body, data, type, priority)
        except NotFound as exc:
            raise ToolError(" ".join(str(exc).split())) from exc
        return f"dispatched {msg.message_id} to {msg.to_session}"
