"""Shared memory: memory-set, memory-get, memory-search, memory-delete, memory-touch,
memory-history, memory-watch."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from sessions import MemoryEntry, MemoryEvent, MemoryType, NotFound
from sessions.cli._base import (
    Ctx, cli, emit_json, enum_choice, json_option, not_found, pass_ctx, show_value, split_list,
)


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
            not_found("Key", key)
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
        not_found("Key", key)
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
        not_found("Key", key)
    click.echo(f"✅ Deleted {n} entr{'y' if n == 1 else 'ies'} of {key}")


@cli.command("memory-touch")
@click.argument("key")
@click.option("--ttl", type=click.FloatRange(0, min_open=True), default=None,
              help="New TTL in seconds (default: the entry's own TTL length, from now).")
@json_option
@pass_ctx
def memory_touch(c: Ctx, key: str, ttl: float | None, as_json: bool) -> None:
    """Renew the TTL of KEY's newest entry without resending its value."""

    try:
        entry = c.memory().touch(key, ttl=ttl)
    except NotFound:
        not_found("Key", key)
    if as_json:
        emit_json(entry.to_dict())
        return
    left = f"expires in {entry.ttl:g}s" if entry.ttl else "no expiry"
    click.echo(f"✅ Touched: {key} ({left})")


@cli.command("memory-history")
@click.argument("key")
@click.option("--limit", type=click.IntRange(1, 1000), default=None,
              help="Versions to show at most (default: all kept, 50 per key by default).")
@json_option
@pass_ctx
def memory_history(c: Ctx, key: str, limit: int | None, as_json: bool) -> None:
    """The last versions of KEY as this host saw them, newest first."""
    versions = c.memory().history(key, limit=limit)
    if as_json:
        emit_json([v.to_dict() for v in versions])
        return
    if not versions:
        not_found("History of key", key)
    click.echo(f"📜 {len(versions)} version{'' if len(versions) == 1 else 's'} of {key}:")
    for v in versions:
        value = "" if v.entry is None else f" = {show_value(v.entry.value)}"
        ttl = f" ttl={v.entry.ttl:g}s" if v.entry is not None and v.entry.ttl else ""
        click.echo(f"   #{v.cursor} {v.op}{value}{ttl}  (origin {v.origin[:12]}, hlc {v.hlc})")


def print_event(ev: MemoryEvent) -> None:
    if ev.kind == "gap":
        click.echo(f"⚠️  gap: events up to cursor {ev.cursor} were trimmed; re-read what "
                   f"you need")
        return
    what = ev.op if ev.kind == "put" else ev.kind
    value = "" if ev.entry is None else f" = {show_value(ev.entry.value)}"
    click.echo(f"#{ev.cursor} {what} {ev.key}{value}  (origin {ev.origin[:12]})")


@cli.command("memory-watch")
@click.argument("prefix", required=False)
@click.option("--tags", help="Comma-separated tags (entries with any of them).")
@click.option("--from-cursor", type=click.IntRange(0), default=None,
              help="Resume after this cursor instead of starting now.")
@json_option
@pass_ctx
def memory_watch(c: Ctx, prefix: str | None, tags: str | None, from_cursor: int | None,
                 as_json: bool) -> None:
    """Print changes of shared memory (keys starting with PREFIX) as this host sees
    them, local and replicated, until Ctrl-C. --json prints one JSON object a line."""
    watch = c.memory().watch(prefix, tags=split_list(tags) or None, cursor=from_cursor)

    def on_state(state: str) -> None:
        if state == "lost":
            click.echo(f"⚠️  meshd went away; waiting for it (cursor {watch.cursor})", err=True)
        else:
            click.echo(f"✅ meshd is back; resuming after cursor {watch.cursor}", err=True)

    if hasattr(watch, "on_state"):
        watch.on_state = on_state
    if not as_json:
        click.echo(f"👀 Watching {prefix or 'all keys'} from cursor {watch.cursor} "
                   f"(Ctrl-C to stop)")
    try:
        for ev in watch:
            if as_json:
                click.echo(json.dumps(ev.to_dict(), ensure_ascii=False, default=str))
            else:
                print_event(ev)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        watch.close()
