"""The shared-memory tools: set, get, search, delete, touch, history.

Shared memory is the mesh's blackboard: every host sees every key. The tools keep the
SDK's semantics (each set adds an entry; get returns the newest live one) and cut long
values in lists, saying how to read them whole.
(No `from __future__ import annotations`: the SDK reads these signatures at run time.)
"""

import fnmatch
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from sessions import NotFound
from sessions.mcp import format as fmt
from sessions.mcp.agent import Agent
from sessions.mcp.common import READ, WRITE, Limit, guard, tool

Key = Annotated[str, Field(min_length=1, max_length=1024,
                           description="The key, e.g. project/parser/status")]
MemType = Literal["state", "fact", "decision", "task", "context", "note", "config"]
Tags = Annotated[list[str] | None, Field(description="Labels to find entries by")]


def register(mcp: MCPServer, agent: Agent) -> None:
    sid = agent.sid
    g = guard(agent)

    @tool(mcp, WRITE)
    @g
    async def memory_set(key: Key,
                         value: Annotated[Any, Field(description="Any JSON value: string, "
                                                     "number, object, list")],
                         type: MemType = "state", tags: Tags = None,
                         ttl_s: Annotated[float | None, Field(
                             gt=0, description="Expire after this many seconds")] = None) -> str:
        """Store a value in the mesh's shared memory, readable by every session on every
        host with memory_get. type classifies it (state, fact, decision, task, context,
        note, config); tags help memory_search; ttl_s makes it expire. Each set adds an
        entry and memory_get returns the newest. Values up to about 1 MB."""
        e = await agent.memory.set(sid, key, value, type, ttl_s, tags or [])
        return f"stored {key!r} ({e.type.value}" + (f", expires in {ttl_s:g} s)" if ttl_s
                                                    else ")")

    @tool(mcp, READ)
    @g
    async def memory_get(key: Key, all_entries: bool = False,
                         max_chars: Annotated[int, Field(
                             ge=100, le=1_000_000,
                             description="Cut a longer value (as JSON text) here")] = 20_000
                         ) -> str:
        """Read shared memory: the newest live value of key, with its type, tags, who set
        it and when; all_entries=true lists every live entry of the key, newest first.
        Says so when the key has no live value (never set, deleted or expired)."""
        if all_entries:
            entries = await agent.memory.get_all(key)
        else:
            one = await agent.memory.get_entry(key)
            entries = [] if one is None else [one]
        if not entries:
            return f"no value for {key!r} (never set, deleted or expired)"
        return "\n".join(fmt.dumps(fmt.entry(e, max_chars)) for e in entries)

    @tool(mcp, READ)
    @g
    async def memory_search(
            pattern: Annotated[str | None, Field(description="Shell-style key pattern: *, ?, "
                                                 "[abc]; e.g. project/*")] = None,
            tags: Tags = None, match_all_tags: bool = False,
            by_session: Annotated[str | None, Field(description="Only entries this session "
                                                    "wrote")] = None,
            limit: Limit = 20) -> str:
        """Find shared-memory entries by key pattern, by tags (any of them, or all with
        match_all_tags), or by the session that wrote them; the criteria given must all
        match. Newest first, one JSON line each, values cut at 2,000 characters (memory_get
        gives them whole). No criterion lists everything."""
        # The narrowest read the daemon offers, then the other criteria here.
        if tags:
            found = await agent.memory.get_by_tags(tags, match_all_tags)
        elif pattern or not by_session:
            found = await agent.memory.search(pattern or "*")
        else:
            found = await agent.memory.get_by_session(by_session)
        if pattern and tags:
            found = [e for e in found if fnmatch.fnmatchcase(e.key, pattern)]
        if by_session:
            found = [e for e in found if e.session_id == by_session]
        more = (f"{len(found) - limit} more: narrow the search or raise limit"
                if len(found) > limit else None)
        return fmt.lines(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}",
                         [fmt.entry(e) for e in found[:limit]], more)

    @tool(mcp, WRITE.model_copy(update={"destructive_hint": True}))
    @g
    async def memory_delete(key: Key, only_mine: bool = False) -> str:
        """Delete a shared-memory key on every host: all its entries, or with
        only_mine=true only those you wrote. Returns how many entries went."""
        n = await agent.memory.delete(key, sid if only_mine else None)
        if n == 0:
            return f"nothing to delete: no entries for {key!r}" + (
                " written by you" if only_mine else "")
        return f"deleted {n} entr{'y' if n == 1 else 'ies'} of {key!r}"

    @tool(mcp, WRITE)
    @g
    async def memory_touch(key: Key,
                           ttl_s: Annotated[float | None, Field(
                               gt=0, description="New TTL in seconds; none: the entry's own "
                                                 "TTL length, from now")] = None) -> str:
        """Keep a shared-memory entry alive: renews the TTL of the key's newest live entry
        without resending its value (a new version with the same value, replicated like
        a set). Use it while you work on something you announced with a TTL."""
        try:
            e = await agent.memory.touch(key, ttl_s)
        except NotFound:
            return f"no live entry for {key!r} to touch (never set, deleted or expired)"
        return f"touched {key!r}: " + (f"expires in {e.ttl:g} s" if e.ttl else "no expiry")

    @tool(mcp, READ)
    @g
    async def memory_history(key: Key, limit: Limit = 20) -> str:
        """The last versions of a shared-memory key as this host saw them, newest first:
        set, touch, delete or expire, who (origin host) and when, with the value while it
        is still held."""
        versions = await agent.memory.history(key, limit)
        rows = []
        for v in versions:
            row = {"op": v.op, "origin": v.origin[:12]}
            if v.entry is not None:
                row.update(fmt.entry(v.entry, 2000))
            rows.append(row)
        return fmt.lines(f"{len(rows)} version{'' if len(rows) == 1 else 's'} of {key!r}", rows)
