"""The claim tools: claim, release, list_claims.

A claim is a lease on a named resource (a task, a file, a branch) for this agent's
session, with a fencing token that rises with every grant: the agent passes the token to
whatever it changes, so a late write from an earlier holder can be refused. The lease is
held in this server for as long as the agent works on it: renewed in the background until
released, and the agent is told when it is lost.
(No `from __future__ import annotations`: the SDK reads these signatures at run time.)
"""

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from sessions.claims import AsyncClaims, AsyncHeld, Lease
from sessions.mcp.agent import Agent
from sessions.mcp.common import READ, WRITE, guard, tool

Resource = Annotated[str, Field(min_length=1, max_length=1024,
                                description="What to claim, e.g. task/42 or repo/main")]


def _line(lease: Lease) -> str:
    return (f"{lease.resource}: held by {lease.holder}, token {lease.token}, "
            f"{max(0.0, lease.remaining):.0f} s left of {lease.ttl:g} s ({lease.scope})")


def register(mcp: MCPServer, agent: Agent) -> None:
    sid = agent.sid
    g = guard(agent)
    claims = AsyncClaims(client=agent.registry._client)
    held: dict[str, AsyncHeld] = {}
    lost: dict[str, str] = {}

    def on_lost(lease: Lease, reason: str) -> None:
        held.pop(lease.resource, None)
        lost[lease.resource] = reason

    @tool(mcp, WRITE)
    @g
    async def claim(resource: Resource,
                    ttl_s: Annotated[float, Field(gt=0, le=3600, description=(
                        "Seconds the lease runs if this server stops renewing it"))] = 30,
                    wait_s: Annotated[float, Field(ge=0, le=300, description=(
                        "Seconds to wait if someone else holds it"))] = 0) -> str:
        """Claim a resource so no other agent works on it too. Gives a fencing token:
        pass it along with every change you make to the resource. The claim is kept
        (renewed) until you call release or your session ends; if it is ever lost,
        list_claims and the next claim/release say so. Busy: says who holds it and for
        how long."""
        if resource in held:
            return "you already hold " + _line(held[resource].lease)  # type: ignore[arg-type]
        h = AsyncHeld(claims, resource, sid, ttl_s, wait_s, on_lost)
        await h.__aenter__()
        held[resource] = h
        lost.pop(resource, None)
        return "claimed " + _line(h.lease)  # type: ignore[arg-type]

    @tool(mcp, WRITE)
    @g
    async def release(resource: Resource) -> str:
        """Release a claim you hold, so others may take the resource."""
        h = held.pop(resource, None)
        if h is None:
            why = lost.pop(resource, None)
            return (f"your claim on {resource} was lost earlier: {why}" if why
                    else f"you hold no claim on {resource}")
        await h.__aexit__(None, None, None)
        return f"released {resource}"

    @tool(mcp, READ)
    @g
    async def list_claims(prefix: Annotated[str | None, Field(
            max_length=1024, description="Only resources starting with this")] = None) -> str:
        """The claims held now across the mesh (or this host, without voters): resource,
        holder session, token, time left. Also says which of yours were lost."""
        leases = await claims.list(prefix)
        lines = [_line(lease) for lease in leases] or ["no claims"]
        lines += [f"lost: your claim on {r} ({why})" for r, why in lost.items()]
        return "\n".join(lines)
