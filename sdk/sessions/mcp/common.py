"""What every tool shares: argument types with their descriptions and bounds, the
annotations, registration with a one-line description, the error guard, and progress
while a tool waits.
(No `from __future__ import annotations`: the SDK reads these signatures at run time.)
"""

import asyncio
import functools
from typing import Annotated, Any, Awaitable, Callable, Literal, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from sessions import SessionsError, TooLarge
from sessions.mcp.agent import Agent

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

MsgType = Literal["request", "response", "notification", "handoff", "task_offer",
                  "task_accept", "sync", "ping"]
Priority = Literal["normal", "high"]
SessionId = Annotated[str, Field(min_length=1, max_length=256,
                                 description="A session id, as list_sessions shows it")]
MessageId = Annotated[str, Field(min_length=1, max_length=256,
                                 description="A message id, as wait_for_messages or "
                                             "check_inbox show it")]
Subject = Annotated[str, Field(max_length=1000, description="One line saying what it is about")]
Body = Annotated[str, Field(description="The text of the message")]
Data = Annotated[dict[str, Any] | None,
                 Field(description="Optional JSON object with machine-readable details")]
Limit = Annotated[int, Field(ge=1, le=200, description="At most this many items")]

READ = ToolAnnotations(read_only_hint=True, open_world_hint=False)
WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)


def guard(agent: Agent) -> Callable[[F], F]:
    """Join the mesh first (or say why not), and turn SDK errors into tool errors."""
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                await agent.ready()
                return await fn(*args, **kwargs)
            except ToolError:
                raise
            except SessionsError as exc:
                text = " ".join(str(exc).split()) or type(exc).__name__
                if isinstance(exc, TooLarge):
                    text += ("; the mesh carries values and messages up to its frame size: "
                             "put large content in a file and share its path")
                raise ToolError(text) from exc
        return wrapper  # type: ignore[return-value]
    return deco


def tool(mcp: MCPServer, annotations: ToolAnnotations) -> Callable[[F], F]:
    """Register a tool whose description is its docstring on one line: the indentation
    of a docstring would cost the model tokens on every turn."""
    def deco(fn: F) -> F:
        return mcp.tool(description=" ".join((fn.__doc__ or "").split()),
                        annotations=annotations, structured_output=False)(fn)
    return deco


async def ticking(ctx: Context, work: Awaitable[Any], total: float, what: str,
                  every: float) -> Any:
    """Await `work`, sending a progress notification every `every` seconds meanwhile (a
    no-op unless the caller gave a progress token); clients reset idle timers on them."""
    task = asyncio.ensure_future(work)
    start = asyncio.get_running_loop().time()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            elapsed = asyncio.get_running_loop().time() - start
            await ctx.report_progress(elapsed, total, f"{what} ({elapsed:.0f} of {total:g} s)")
    finally:
        if not task.done():
            task.cancel()
