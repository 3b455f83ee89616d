"""Session management: register, unregister, list, ping, status."""

from __future__ import annotations

import time

import click

from sessions import Session, SessionStatus
from sessions.cli._base import (
    Ctx, cli, emit_json, enum_choice, json_option, not_found, pass_ctx, split_list,
)
from sessions.keepalive import DEFAULT_INTERVAL


@cli.command()
@click.argument("session_id")
@click.argument("agent_name")
@click.argument("agent_type")
@click.option("--user", help="The human the session works for.")
@click.option("--capabilities", help="Comma-separated, e.g. python,review")
@click.option("--keepalive", is_flag=True,
              help="Stay running and keep the session alive (pinging it) until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=DEFAULT_INTERVAL,
              show_default=True, help="Seconds between keep-alive pings.")
@pass_ctx
def register(c: Ctx, session_id: str, agent_name: str, agent_type: str, user: str | None,
             capabilities: str | None, keepalive: bool, interval: float) -> None:
    """Register a session."""
    registry = c.registry()
    s = registry.register(session_id, agent_name, agent_type, human_user=user,
                          capabilities=split_list(capabilities))
    click.echo(f"✅ Registered session: {s.session_id} ({s.agent_name}, {s.agent_type})")
    if not keepalive:
        return
    click.echo(f"💓 Keeping {session_id} alive (a ping every {interval:g} s); Ctrl-C to stop",
               err=True)
    with registry.keepalive(session_id, interval):
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    click.echo(f"👋 Stopped keeping {session_id} alive (it shows OFFLINE once stale)",
               err=True)


@cli.command()
@click.argument("session_id")
@pass_ctx
def unregister(c: Ctx, session_id: str) -> None:
    """Mark a session OFFLINE."""
    if not c.registry().unregister(session_id):
        not_found("Session", session_id)
    click.echo(f"✅ Unregistered session: {session_id}")


def host_note(s: Session) -> str:
    """A note after a row whose host is not known up and running here ("alive" or
    "local"), so a session gone with its host is not taken for an idle one."""
    if s.host_state in (None, "alive", "local"):
        return ""
    return f" (host {s.host_state})"


@cli.command(name="list")
@click.option("--all", "include_offline", is_flag=True, help="Include OFFLINE sessions.")
@json_option
@pass_ctx
def list_cmd(c: Ctx, include_offline: bool, as_json: bool) -> None:
    """List sessions, with the host each runs on."""
    registry = c.registry()
    sessions = registry.list_sessions(include_offline=include_offline)
    if as_json:
        emit_json([s.to_dict() for s in sessions])
        return
    stats = registry.get_stats()
    # The seed's columns first, so its output reads the same; HOST is where it runs.
    click.echo(f"{'SESSION ID':<20} {'AGENT':<15} {'TYPE':<10} {'STATUS':<10} {'USER':<15}"
               f"HOST")
    click.echo("=" * 82)
    for s in sessions:
        click.echo(f"{s.session_id:<20} {s.agent_name:<15} {s.agent_type:<10} "
                   f"{s.status.value:<10} {s.human_user or '':<15}{s.location}{host_note(s)}")
    click.echo("")
    click.echo("📊 Stats:")
    click.echo(f"   Total: {stats['total_sessions']}")
    click.echo(f"   Active: {stats['active_sessions']}")
    click.echo(f"   By status: {stats['by_status']}")
    hidden = stats["total_sessions"] - stats["active_sessions"]
    if not include_offline and hidden > 0:
        click.echo(f"   ({hidden} offline session{'s' if hidden != 1 else ''} not shown; "
                   f"--all lists them)")


@cli.command()
@click.argument("session_id")
@pass_ctx
def ping(c: Ctx, session_id: str) -> None:
    """Keep a session alive."""
    if not c.registry().ping(session_id):
        not_found("Session", session_id)
    click.echo(f"✅ Pinged {session_id}")


@cli.command()
@click.argument("session_id")
@click.argument("status", type=enum_choice(SessionStatus))
@click.option("--task", help="What the session is working on.")
@pass_ctx
def status(c: Ctx, session_id: str, status: str, task: str | None) -> None:
    """Set a session's status."""
    if not c.registry().update_status(session_id, status.lower(), current_task=task):
        not_found("Session", session_id)
    click.echo(f"✅ {session_id} is now {status.lower()}" + (f" ({task})" if task else ""))
