"""`sessions mcp`: run the MCP server that lets an agent client use the mesh.

Every option also reads a `MESHD_*` variable, so one configuration line (e.g. in a
project's `.mcp.json`) serves many agents, each launched with its own MESHD_SESSION.
The `mcp` SDK is imported only when the command runs: it is an optional extra.
"""

from __future__ import annotations

import logging
import sys

import click

from sessions.cli._base import Ctx, cli, fail, pass_ctx, split_list

_LEVELS = ["debug", "info", "warning", "error"]


def parse_http(value: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT, or :PORT (loopback)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8765)")
    return host or "127.0.0.1", int(port)


@cli.command()
@click.option("--session", "session_id", envvar="MESHD_SESSION", required=True,
              help="The session id this agent is on the mesh [env MESHD_SESSION].")
@click.option("--name", envvar="MESHD_SESSION_NAME",
              help="Its display name [env MESHD_SESSION_NAME; default: the id].")
@click.option("--agent-type", envvar="MESHD_AGENT_TYPE", default="agent", show_default=True,
              help="e.g. Claude, GPT-4 [env MESHD_AGENT_TYPE].")
@click.option("--user", envvar="MESHD_USER", help="The human it works for [env MESHD_USER].")
@click.option("--capabilities", envvar="MESHD_CAPABILITIES",
              help="Comma-separated, e.g. python,review [env MESHD_CAPABILITIES].")
@click.option("--on-exit", envvar="MESHD_ON_EXIT", type=click.Choice(["offline", "keep"]),
              default="offline", show_default=True,
              help="On a clean exit: unregister the session (offline) or leave it as it is "
                   "[env MESHD_ON_EXIT].")
@click.option("--http", "http", metavar="HOST:PORT", envvar="MESHD_MCP_HTTP",
              help="Serve streamable HTTP at http://HOST:PORT/mcp instead of stdio "
                   "[env MESHD_MCP_HTTP].")
@click.option("--allow-remote", is_flag=True,
              help="With --http: allow an address other than loopback.")
@click.option("--progress-every", type=click.FloatRange(0.05, 600), default=15.0,
              show_default=True, envvar="MESHD_MCP_PROGRESS_EVERY",
              help="Seconds between progress notifications during a wait.")
@click.option("--log-level", type=click.Choice(_LEVELS), default="warning", show_default=True,
              envvar="MESHD_MCP_LOG_LEVEL", help="Logging on stderr.")
@pass_ctx
def mcp(c: Ctx, session_id: str, name: str | None, agent_type: str, user: str | None,
        capabilities: str | None, on_exit: str, http: str | None, allow_remote: bool,
        progress_every: float, log_level: str) -> None:
    """Serve this host's mesh to an agent over MCP, as the --session given (docs/mcp.md)."""
    if c.directory is not None:
        raise click.UsageError("sessions mcp needs a running meshd; --dir is not supported")
    if not session_id.strip():
        raise click.BadParameter("must not be empty", param_hint="--session")
    address = None
    if http:
        address = parse_http(http)
    try:
        from sessions.mcp.server import is_loopback, serve
        from sessions.mcp.state import Identity
    except ImportError as exc:
        fail(f"sessions mcp needs the MCP SDK: pip install 'meshd[mcp]' ({exc})")
    if address is not None and not is_loopback(address[0]) and not allow_remote:
        raise click.UsageError(
            f"refusing to serve MCP on {address[0]}: the server has no authentication, so "
            f"anyone who can reach that address could read {session_id}'s mail and send as "
            f"it. Use 127.0.0.1, or add --allow-remote on a network you trust.")
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="sessions mcp: %(levelname)s %(name)s: %(message)s")
    identity = Identity(session_id, name or session_id, agent_type, user,
                        split_list(capabilities), on_exit)
    if address is not None:
        click.echo(f"sessions mcp: serving session {session_id} on "
                   f"http://{address[0]}:{address[1]}/mcp", err=True)
    serve(identity, socket=c.socket, timeout=c.timeout, http=address,
          progress_every=progress_every)
