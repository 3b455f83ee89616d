"""For agents: ask (and wait for the answer), dispatch by capability, and an inbox
reminder for hook runners (`sessions inbox --hook`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from sessions import MessageType, Timeout
from sessions.cli._base import Ctx, cli, emit_json, enum_choice, json_option, pass_ctx
from sessions.cli.messages import data_option, print_message, priority_option


@cli.command()
@click.argument("from_session")
@click.argument("to_session")
@click.argument("subject")
@click.argument("body")
@data_option
@click.option("--timeout", "wait", type=click.FloatRange(0.1, 86400), default=60.0,
              show_default=True, help="Seconds to wait for the reply.")
@json_option
@pass_ctx
def ask(c: Ctx, from_session: str, to_session: str, subject: str, body: str,
        data: dict[str, Any] | None, wait: float, as_json: bool) -> None:
    """Send a REQUEST and wait for the RESPONSE to it (exit 1 if none comes in time; the
    request stays delivered)."""
    try:
        answer = c.hub().ask(from_session, to_session, subject, body, data=data, timeout=wait)
    except Timeout as exc:
        click.echo(f"⏳ {exc}", err=True)
        sys.exit(1)
    if as_json:
        emit_json(answer.to_dict())
        return
    print_message(answer)


@cli.command()
@click.argument("from_session")
@click.argument("capability")
@click.argument("subject")
@click.argument("body")
@data_option
@click.option("--type", "mtype", type=enum_choice(MessageType), default="request",
              show_default=True)
@priority_option
@pass_ctx
def dispatch(c: Ctx, from_session: str, capability: str, subject: str, body: str,
             data: dict[str, Any] | None, mtype: str, priority: str) -> None:
    """Send to ONE idle or active session that has CAPABILITY (idle first, then the one
    dispatched to least recently) and say which one."""
    msg = c.hub().dispatch(from_session, capability, subject, body, data=data,
                           type=mtype.lower(), priority=priority)
    click.echo(f"✅ Dispatched to {msg.to_session}: {msg.format_signal()}")
    click.echo(f"   Message ID: {msg.message_id}")


def _reminded_file(session_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in session_id)
    return Path(base) / "meshd" / "hook" / f"{safe}.json"


@cli.command()
@click.option("--session", "session_id", required=True, envvar="MESHD_SESSION",
              help="The session whose inbox to look at [env MESHD_SESSION].")
@click.option("--hook", is_flag=True,
              help="For hook runners: a one-paragraph reminder of unread mail not reminded "
                   "of before, and nothing otherwise.")
@click.option("--block", is_flag=True,
              help="With --hook: print the reminder on stderr and exit 2 (Claude Code's "
                   "Stop hook: keeps the agent going to read its mail).")
@pass_ctx
def inbox(c: Ctx, session_id: str, hook: bool, block: bool) -> None:
    """Unread mail of a session, or (--hook) a reminder for an agent's hook runner."""
    hub = c.hub()
    unread = hub.get_messages(session_id, unread_only=True)
    if not hook:
        click.echo(f"📬 {len(unread)} unread message(s) for {session_id}")
        for m in unread:
            click.echo("")
            print_message(m)
        return
    state = _reminded_file(session_id)
    try:
        reminded = set(json.loads(state.read_text()))
    except (OSError, ValueError, TypeError):
        reminded = set()
    new = [m for m in unread if m.message_id not in reminded]
    if not new:
        return                                  # nothing new: silent, exit 0
    senders = sorted({m.from_session for m in new})
    latest = new[-1]
    text = (f"{session_id} has {len(new)} new unread message(s) (of {len(unread)} unread) "
            f"from {', '.join(senders)}; the latest: \"{latest.subject}\" from "
            f"{latest.from_session}. Read them with the check_inbox tool (MCP) or "
            f"`sessions messages {session_id} --unread --mark-read`.")
    state.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    keep = [m.message_id for m in unread][-1000:]       # (bounded: unread ones only)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps(keep))
    os.replace(tmp, state)
    if block:
        click.echo(text, err=True)
        sys.exit(2)
    click.echo(text)
