"""The `sessions` command line: a thin client of the SDK (it imports nothing from meshd).

Exit status: 0 success, 1 not found or failed, 2 usage error. Errors are one line on
stderr, never a traceback. Read commands take --json for machine-readable output.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import click

from sessions import (
    CollaborationHub,
    MemoryEntry,
    MemoryType,
    Message,
    MessageType,
    Session,
    SessionRegistry,
    SessionsError,
    SessionStatus,
    SharedMemory,
)


@dataclass
class Ctx:
    socket: str | None
    directory: str | None
    timeout: float | None

    def registry(self) -> SessionRegistry:
        return SessionRegistry(self.directory, socket=self.socket, timeout=self.timeout)

    def hub(self) -> CollaborationHub:
        return CollaborationHub(messages_path=self.directory, socket=self.socket,
                                timeout=self.timeout)

    def memory(self) -> SharedMemory:
        return SharedMemory(self.directory, socket=self.socket, timeout=self.timeout)


pass_ctx = click.make_pass_decorator(Ctx)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def fail(message: str) -> None:
    click.echo(f"❌ {message}", err=True)
    sys.exit(1)


def emit_json(obj: Any) -> None:
    def default(o: Any) -> Any:
        if hasattr(o, "to_dict"):
            return o.to_dict()
        if isinstance(o, bytes):
            return o.decode("utf-8", "replace")
        return str(o)
    click.echo(json.dumps(obj, default=default, ensure_ascii=False, indent=2))


def show_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)


def parse_json_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object")
    return data


def split_list(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def enum_choice(enum: type) -> click.Choice:
    return click.Choice([m.value for m in enum], case_sensitive=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", envvar="MESHD_SOCKET", default=None,
              help="The daemon's socket [env MESHD_SOCKET; default: this host's meshd].")
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False),
              help="Work in this directory with no daemon.")
@click.option("--timeout", type=click.FloatRange(0.01, 3600), default=None,
              help="Seconds to wait for each answer [env MESHD_TIMEOUT; default 10].")
@click.version_option(package_name="meshd", prog_name="sessions")
@click.pass_context
def cli(ctx: click.Context, socket: str | None, directory: str | None,
        timeout: float | None) -> None:
    """Sessions on the meshd mesh: registry, messages and shared memory."""
    ctx.obj = Ctx(socket, directory, timeout)


# --- session management ----------------------------------------------------------------------

@cli.command()
@click.argument("session_id")
@click.argument("agent_name")
@click.argument("agent_type")
@click.option("--user", help="The human the session works for.")
@click.option("--capabilities", help="Comma-separated, e.g. python,review")
@pass_ctx
def register(c: Ctx, session_id: str, agent_name: str, agent_type: str, user: str | None,
             capabilities: str | None) -> None:
    """Register a session."""
    s = c.registry().register(session_id, agent_name, agent_type, human_user=user,
                              capabilities=split_list(capabilities))
    click.echo(f"✅ Registered session: {s.session_id} ({s.agent_name}, {s.agent_type})")


@cli.command()
@click.argument("session_id")
@pass_ctx
def unregister(c: Ctx, session_id: str) -> None:
    """Mark a session OFFLINE."""
    if not c.registry().unregister(session_id):
        fail(f"Session not found: {session_id}")
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
    """List sessions."""
    registry = c.registry()
    sessions = registry.list_sessions(include_offline=include_offline)
    if as_json:
        emit_json([s.to_dict() for s in sessions])
        return
    stats = registry.get_stats()
    click.echo(f"{'SESSION ID':<20} {'AGENT':<15} {'TYPE':<10} {'STATUS':<10} {'USER':<15}")
    click.echo("=" * 82)
    for s in sessions:
        click.echo(f"{s.session_id:<20} {s.agent_name:<15} {s.agent_type:<10} "
                   f"{s.status.value:<10} {s.human_user or '':<15}{host_note(s)}")
    click.echo("")
    click.echo("📊 Stats:")
    click.echo(f"   Total: {stats['total_sessions']}")
    click.echo(f"   Active: {stats['active_sessions']}")
    click.echo(f"   By status: {stats['by_status']}")


@cli.command()
@click.argument("session_id")
@pass_ctx
def ping(c: Ctx, session_id: str) -> None:
    """Keep a session alive."""
    if not c.registry().ping(session_id):
        fail(f"Session not found: {session_id}")
    click.echo(f"✅ Pinged {session_id}")


@cli.command()
@click.argument("session_id")
@click.argument("status", type=enum_choice(SessionStatus))
@click.option("--task", help="What the session is working on.")
@pass_ctx
def status(c: Ctx, session_id: str, status: str, task: str | None) -> None:
    """Set a session's status."""
    if not c.registry().update_status(session_id, status.lower(), current_task=task):
        fail(f"Session not found: {session_id}")
    click.echo(f"✅ {session_id} is now {status.lower()}" + (f" ({task})" if task else ""))


# --- collaboration ---------------------------------------------------------------------------

@cli.command()
@click.argument("from_session")
@click.argument("to_session")
@click.argument("subject")
@click.argument("body")
@click.option("--type", "mtype", type=enum_choice(MessageType), default="request",
              show_default=True)
@click.option("--data", callback=parse_json_option, help="A JSON object to attach.")
@pass_ctx
def send(c: Ctx, from_session: str, to_session: str, subject: str, body: str, mtype: str,
         data: dict[str, Any] | None) -> None:
    """Send a direct message."""
    hub = c.hub()
    msg = hub.send(from_session, to_session, mtype.lower(), subject, body, data=data)
    click.echo(f"✅ Sent: {msg.format_signal()}")
    click.echo(f"   Message ID: {msg.message_id}")
    receipt = hub.get_message_status(msg.message_id)
    if receipt is not None and receipt["state"] == "waiting":
        click.echo(f"   💤 No session {to_session} is registered yet: the message waits, and "
                   f"is delivered when one registers on any host (or expires)")


@cli.command()
@click.argument("from_session")
@click.argument("subject")
@click.argument("body")
@click.option("--data", callback=parse_json_option, help="A JSON object to attach.")
@pass_ctx
def broadcast(c: Ctx, from_session: str, subject: str, body: str,
              data: dict[str, Any] | None) -> None:
    """Send a message to every session."""
    msg = c.hub().broadcast(from_session, subject, body, data=data)
    click.echo(f"✅ Broadcast: {msg.format_signal()}")
    click.echo(f"   Message ID: {msg.message_id}")


def print_message(m: Message) -> None:
    click.echo(m.format_signal())
    click.echo(f"   {m.body}")
    if m.data:
        click.echo(f"   data: {json.dumps(m.data, ensure_ascii=False, default=str)}")
    click.echo(f"   {m.timestamp}  id={m.message_id}"
               + (f"  reply-to={m.in_reply_to}" if m.in_reply_to else ""))


@cli.command()
@click.argument("session_id")
@click.option("--type", "mtype", type=enum_choice(MessageType), default=None)
@click.option("--unread", is_flag=True, help="Only unread messages.")
@click.option("--mark-read", is_flag=True, help="Mark the listed messages read.")
@click.option("--sent", is_flag=True,
              help="The messages the session sent, with their delivery state instead.")
@json_option
@pass_ctx
def messages(c: Ctx, session_id: str, mtype: str | None, unread: bool, mark_read: bool,
             sent: bool, as_json: bool) -> None:
    """Show a session's messages, oldest first."""
    hub = c.hub()
    if sent:
        show_sent(hub, session_id, as_json)
        return
    msgs = hub.get_messages(session_id, message_type=mtype.lower() if mtype else None,
                            unread_only=unread)
    if not msgs and c.registry().get(session_id) is None:
        fail(f"Session not found: {session_id}")
    if mark_read and msgs:
        hub.mark_read(session_id, [m.message_id for m in msgs])
    if as_json:
        emit_json([m.to_dict() for m in msgs])
        return
    if not msgs:
        click.echo(f"📭 No messages for {session_id}")
        return
    click.echo(f"📬 {len(msgs)} message(s) for {session_id}:")
    for m in msgs:
        click.echo("")
        print_message(m)


STATE_EMOJI = {"waiting": "💤", "queued": "⏳", "stored": "📥", "read": "👀", "expired": "⌛"}


def show_sent(hub: CollaborationHub, session_id: str, as_json: bool) -> None:
    rows = hub.get_sent(session_id)
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
    until Ctrl-C."""
    stream = c.hub().subscribe(session_id, cursor=from_cursor,
                               types=[t.lower() for t in mtype] or None)
    target = session_id or "this node"
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


# --- shared memory ---------------------------------------------------------------------------

def parse_value(raw: str) -> Any:
    """JSON when it parses, else the string as typed."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


@cli.command("memory-set")
@click.argument("session_id")
@click.argument("key")
@click.argument("value")
@click.option("--type", "mtype", type=enum_choice(MemoryType), default="state", show_default=True)
@click.option("--tags", help="Comma-separated tags.")
@click.option("--ttl", type=click.FloatRange(0, min_open=True), default=None,
              help="Seconds until the entry expires.")
@pass_ctx
def memory_set(c: Ctx, session_id: str, key: str, value: str, mtype: str, tags: str | None,
               ttl: float | None) -> None:
    """Store a value in shared memory."""
    entry = c.memory().set(session_id, key, parse_value(value), type=mtype.lower(), ttl=ttl,
                           tags=split_list(tags))
    click.echo(f"✅ Stored: {entry.key} = {show_value(entry.value)}")


def print_entry(e: MemoryEntry) -> None:
    tags = f" [{', '.join(e.tags)}]" if e.tags else ""
    ttl = f" ttl={e.ttl:g}s" if e.ttl else ""
    click.echo(f"   {e.key} = {show_value(e.value)}")
    click.echo(f"      {e.type.value} by {e.session_id} at {e.timestamp}{tags}{ttl}")


@cli.command("memory-get")
@click.argument("key")
@click.option("--all", "all_entries", is_flag=True, help="Every entry of the key, newest first.")
@json_option
@pass_ctx
def memory_get(c: Ctx, key: str, all_entries: bool, as_json: bool) -> None:
    """Read a value from shared memory."""
    memory = c.memory()
    if all_entries:
        entries = memory.get_all(key)
        if as_json:
            emit_json([e.to_dict() for e in entries])
            if not entries:
                sys.exit(1)                     # like the other forms of a missing key
            return
        if not entries:
            fail(f"Key not found: {key}")
        click.echo(f"✅ {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} for {key}:")
        for e in entries:
            print_entry(e)
        return
    entry = memory.get_entry(key)
    if as_json:
        if entry is None:
            emit_json(None)
            sys.exit(1)
        emit_json(entry.to_dict())
        return
    if entry is None:
        fail(f"Key not found: {key}")
    click.echo(f"✅ Value: {show_value(entry.value)}")


@cli.command("memory-search")
@click.option("--pattern", help="Shell-style key pattern, e.g. 'task_*'.")
@click.option("--tags", help="Comma-separated tags (any of them).")
@click.option("--session", help="Entries written by this session.")
@json_option
@pass_ctx
def memory_search(c: Ctx, pattern: str | None, tags: str | None, session: str | None,
                  as_json: bool) -> None:
    """Find entries by key pattern, tags or session (all given criteria must match;
    with none, every entry)."""
    memory = c.memory()
    results: list[MemoryEntry] | None = None

    def narrow(found: list[MemoryEntry]) -> None:
        nonlocal results
        if results is None:
            results = found
        else:
            ids = {e.entry_id for e in found}
            results = [e for e in results if e.entry_id in ids]

    if pattern:
        narrow(memory.search(pattern))
    if tags:
        narrow(memory.get_by_tags(split_list(tags)))
    if session:
        narrow(memory.get_by_session(session))
    if results is None:                         # no criteria: every live entry
        narrow(memory.search("*"))
    assert results is not None
    if as_json:
        emit_json([e.to_dict() for e in results])
        return
    click.echo(f"🔍 {len(results)} entr{'y' if len(results) == 1 else 'ies'} found")
    for e in results:
        print_entry(e)


@cli.command("memory-delete")
@click.argument("key")
@click.option("--session", help="Only this session's entries.")
@pass_ctx
def memory_delete(c: Ctx, key: str, session: str | None) -> None:
    """Delete a key's entries."""
    n = c.memory().delete(key, session_id=session)
    if n == 0:
        fail(f"Key not found: {key}")
    click.echo(f"✅ Deleted {n} entr{'y' if n == 1 else 'ies'} of {key}")


# --- statistics ------------------------------------------------------------------------------

@cli.command()
@json_option
@pass_ctx
def stats(c: Ctx, as_json: bool) -> None:
    """Registry, message and memory statistics."""
    data = {"registry": c.registry().get_stats(), "messages": c.hub().get_stats(),
            "memory": c.memory().get_stats()}
    if as_json:
        emit_json(data)
        return
    r, h, m = data["registry"], data["messages"], data["memory"]
    click.echo("📊 Sessions:")
    click.echo(f"   Total: {r['total_sessions']}")
    click.echo(f"   Active: {r['active_sessions']}")
    click.echo(f"   By status: {r['by_status']}")
    click.echo(f"   By type: {r['by_agent_type']}")
    click.echo(f"   By user: {r['by_user']}")
    click.echo("💬 Messages:")
    click.echo(f"   Total: {h['total_messages']}")
    click.echo(f"   By type: { {k: v for k, v in h['by_type'].items() if v} }")
    click.echo("🧠 Memory:")
    click.echo(f"   Entries: {m['total_entries']}")
    click.echo(f"   Keys: {m['unique_keys']}  Sessions: {m['unique_sessions']}  "
               f"Tags: {m['unique_tags']}")
    click.echo(f"   By type: { {k: v for k, v in m['by_type'].items() if v} }")


@cli.command()
@json_option
@pass_ctx
def info(c: Ctx, as_json: bool) -> None:
    """The local daemon: node id, socket, counters."""
    data = c.registry().node_info()
    if as_json:
        emit_json(data)
        return
    for k, v in data.items():
        click.echo(f"{k}: {v}")


@cli.command()
@json_option
@pass_ctx
def peers(c: Ctx, as_json: bool) -> None:
    """The other daemons of the mesh: address, state, incarnation, last contact, lag."""
    rows = c.registry().peers()
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("No peers (this daemon is alone, or runs with --no-mesh).")
    else:
        click.echo(f"{'NODE':<14}{'ADDRESS':<24}{'STATE':<9}{'INCARNATION':>15}"
                   f"{'CONTACT':>10}{'BEHIND':>8}")
    for p in rows:
        contact = "-" if p["last_contact"] is None else f"{p['last_contact']:.1f}s"
        behind = "?" if p["behind"] is None else str(p["behind"])
        click.echo(f"{p['node_id'][:12]:<14}{p['address']:<24}{p['state']:<9}"
                   f"{p['incarnation']:>15}{contact:>10}{behind:>8}")
    click.echo(_discovery_line((c.registry().node_info().get("mesh") or {}).get("discovery")))


def _discovery_line(d: dict[str, Any] | None) -> str:
    """One line on how this daemon finds peers, so a lonely node says why."""
    if not d or d.get("state") == "off":
        return "mDNS discovery: off (peers come from --join and the peers known before)"
    if d.get("state") != "on":
        return f"mDNS discovery: {d.get('state')}"
    counters = d.get("counters", {})
    ignored = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("ignored.")}
    extra = (", ignored: " + ", ".join(f"{k} {v}" for k, v in sorted(ignored.items()))
             if ignored else "")
    return (f"mDNS discovery: on {', '.join(d.get('interfaces', []))}, cluster "
            f"{d.get('cluster')!r}, {d.get('peers_heard', 0)} peer(s) heard{extra}")


def main() -> None:
    """Entry point: SDK errors become one ❌ line and exit 1; usage errors exit 2."""
    try:
        cli.main(standalone_mode=False, prog_name="sessions")
    except click.exceptions.Abort:
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SessionsError as exc:
        click.echo(f"❌ {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:                    # never a traceback for the user
        click.echo(f"❌ unexpected error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
