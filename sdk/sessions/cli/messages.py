"""Collaboration: send, broadcast, reply, messages, thread, watch."""

from __future__ import annotations

import json
from typing import Any

import click

from sessions import CollaborationHub, Message, MessageType
from sessions.cli._base import (
    Ctx, cli, emit_json, enum_choice, json_option, not_found, parse_json_option, pass_ctx,
)

priority_option = click.option(
    "--priority", type=click.Choice(["normal", "high"]), default="normal", show_default=True,
    help="high overtakes queued normal messages (outboxes and inboxes).")
data_option = click.option("--data", callback=parse_json_option,
                           help="A JSON object to attach.")


def say_if_waiting(hub: CollaborationHub, msg: Message) -> None:
    receipt = hub.get_message_status(msg.message_id)
    if receipt is not None and receipt["state"] == "waiting":
        click.echo(f"   💤 No session {msg.to_session} is registered yet: the message waits, "
                   f"and is delivered when one registers on any host (or expires)")


@cli.command()
@click.argument("from_session")
@click.argument("to_session")
@click.argument("subject")
@click.argument("body")
@click.option("--type", "mtype", type=enum_choice(MessageType), default="request",
              show_default=True)
@data_option
@priority_option
@pass_ctx
def send(c: Ctx, from_session: str, to_session: str, subject: str, body: str, mtype: str,
         data: dict[str, Any] | None, priority: str) -> None:
    """Send a direct message."""
    hub = c.hub()
    msg = hub.send(from_session, to_session, mtype.lower(), subject, body, data=data,
                   priority=priority)
    click.echo(f"✅ Sent: {msg.format_signal()}")
    click.echo(f"   Message ID: {msg.message_id}")
    say_if_waiting(hub, msg)


@cli.command()
@click.argument("from_session")
@click.argument("subject")
@click.argument("body")
@data_option
@priority_option
@pass_ctx
def broadcast(c: Ctx, from_session: str, subject: str, body: str,
              data: dict[str, Any] | None, priority: str) -> None:
    """Send a message to every session."""
    msg = c.hub().broadcast(from_session, subject, body, data=data, priority=priority)
    click.echo(f"✅ Broadcast: {msg.format_signal()}")
    click.echo(f"   Message ID: {msg.message_id}")


@cli.command()
@click.argument("from_session")
@click.argument("message_id")
@click.argument("body")
@data_option
@pass_ctx
def reply(c: Ctx, from_session: str, message_id: str, body: str,
          data: dict[str, Any] | None) -> None:
    """Answer a message: a RESPONSE to its sender, threaded under it."""
    hub = c.hub()
    receipt = hub.get_message_status(message_id)
    if receipt is None:
        not_found("Message", message_id)
    msg = hub.reply(from_session, receipt["message"], body, data=data)
    click.echo(f"✅ Replied: {msg.format_signal()}")
    click.echo(f"   Message ID: {msg.message_id}")
    say_if_waiting(hub, msg)


def print_message(m: Message, indent: str = "") -> None:
    click.echo(f"{indent}{m.format_signal()}")
    click.echo(f"{indent}   {m.body}")
    if m.data:
        click.echo(f"{indent}   data: {json.dumps(m.data, ensure_ascii=False, default=str)}")
    click.echo(f"{indent}   {m.timestamp}  id={m.message_id}"
               + (f"  reply-to={m.in_reply_to}" if m.in_reply_to else ""))


@cli.command()
@click.argument("session_id")
@click.option("--type", "mtype", type=enum_choice(MessageType), default=None)
@click.option("--unread", is_flag=True, help="Only unread messages.")
@click.option("--mark-read", is_flag=True, help="Mark the listed messages read.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Only the last N of the list (high priority first, then oldest first).")
@click.option("--sent", is_flag=True,
              help="The messages the session sent, with their delivery state instead.")
@json_option
@pass_ctx
def messages(c: Ctx, session_id: str, mtype: str | None, unread: bool, mark_read: bool,
             limit: int | None, sent: bool, as_json: bool) -> None:
    """Show a session's messages, oldest first."""
    hub = c.hub()
    if sent:
        show_sent(hub, session_id, limit, as_json)
        return
    msgs = hub.get_messages(session_id, message_type=mtype.lower() if mtype else None,
                            unread_only=unread)
    if not msgs and c.registry().get(session_id) is None:
        not_found("Session", session_id)
    more = 0
    if limit is not None and len(msgs) > limit:
        more, msgs = len(msgs) - limit, msgs[-limit:]
    if mark_read and msgs:
        hub.mark_read(session_id, [m.message_id for m in msgs])
    if as_json:
        emit_json([m.to_dict() for m in msgs])
        return
    if not msgs:
        click.echo(f"📭 No messages for {session_id}")
        return
    click.echo(f"📬 {len(msgs)} message(s) for {session_id}:"
               + (f" (the last {limit}; {more} earlier not shown)" if more else ""))
    for m in msgs:
        click.echo("")
        print_message(m)


STATE_EMOJI = {"waiting": "💤", "queued": "⏳", "stored": "📥", "read": "👀", "expired": "⌛"}


def show_sent(hub: CollaborationHub, session_id: str, limit: int | None, as_json: bool) -> None:
    rows = hub.get_sent(session_id)
    if limit is not None:
        rows = rows[-limit:]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"📭 {session_id} has sent no messages through this daemon")
        return
    click.echo(f"📤 {len(rows)} message(s) sent by {session_id}:")
    for r in rows:
        m = r["message"]
        click.echo(f"{STATE_EMOJI.get(r['state'], '?')} {r['state']:<8} {m.message_id}  "
                   f"→ {m.to_session or 'ALL'}  {m.subject}")


@cli.command()
@click.argument("message_id")
@json_option
@pass_ctx
def thread(c: Ctx, message_id: str, as_json: bool) -> None:
    """Show the whole thread a message belongs to, root first, replies indented."""
    msgs = c.hub().get_conversation(message_id)
    if not msgs:
        not_found("Message", message_id)
    if as_json:
        emit_json([m.to_dict() for m in msgs])
        return
    depth: dict[str, int] = {}
    click.echo(f"🧵 {len(msgs)} message(s) in the thread of {message_id}:")
    for m in msgs:
        d = depth[m.message_id] = depth.get(m.in_reply_to or "", -1) + 1
        click.echo("")
        print_message(m, indent="    " * d)


@cli.command()
@click.argument("session_id", required=False)
@click.option("--type", "mtype", type=enum_choice(MessageType), multiple=True,
              help="Only these types (repeatable).")
@click.option("--from-cursor", type=click.IntRange(0), default=None,
              help="Resume after this sequence number instead of starting now.")
@json_option
@pass_ctx
def watch(c: Ctx, session_id: str | None, mtype: tuple[str, ...], from_cursor: int | None,
          as_json: bool) -> None:
    """Print messages to SESSION (every message on this node if omitted) as they arrive,
    until Ctrl-C. While it watches a session, the daemon keeps that session alive."""
    stream = c.hub().subscribe(session_id, cursor=from_cursor,
                               types=[t.lower() for t in mtype] or None)
    target = session_id or "this node"

    def on_state(state: str) -> None:
        if state == "lost":
            click.echo(f"⚠️  meshd went away; waiting for it (cursor {stream.cursor})",
                       err=True)
        else:
            click.echo(f"✅ meshd is back; resuming after cursor {stream.cursor}", err=True)

    if hasattr(stream, "on_state"):
        stream.on_state = on_state
    if not as_json:
        click.echo(f"👀 Watching {target} from cursor {stream.cursor} (Ctrl-C to stop)")
    try:
        for m in stream:
            if as_json:
                click.echo(json.dumps({"seq": stream.cursor, "message": m.to_dict()},
                                      ensure_ascii=False, default=str))
            else:
                click.echo("")
                print_message(m)
                click.echo(f"   seq={stream.cursor}")
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
