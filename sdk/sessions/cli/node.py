"""The daemon and its mesh: stats, info, peers, join, leave, force-leave, import."""

from __future__ import annotations

import json
from typing import Any

import click

from sessions.cli._base import Ctx, cli, emit_json, fail, json_option, pass_ctx
from sessions.cli.monitor import progress_bar


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


def _kv(rows: list[tuple[str, Any]]) -> None:
    for k, v in rows:
        if v is not None and v != "":
            click.echo(f"   {k + ':':<18} {v}")


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def security_line(sec: dict[str, Any] | None) -> str:
    """One line on how peers are admitted, so an open daemon says so."""
    if not sec:
        return "no mesh (--no-mesh): no peers"
    if sec.get("mode") == "cluster-key":
        return f"cluster key {sec.get('fingerprint')}: peers authenticated, traffic encrypted"
    if sec.get("exposed"):
        return ("OPEN: peers are not authenticated and traffic is plaintext "
                "(set a cluster key: meshd --gen-key FILE, then --key-file FILE)")
    return "open (no cluster key), loopback only"


def _counters(d: dict[str, Any] | None) -> str:
    items = sorted((d or {}).items())
    return ", ".join(f"{k} {v}" for k, v in items if v) or "none"


@cli.command()
@json_option
@pass_ctx
def info(c: Ctx, as_json: bool) -> None:
    """The local daemon, in sections: node, mesh, routing, local API, store."""
    d = c.registry().node_info()
    if as_json:
        emit_json(d)
        return
    if d.get("mode") == "directory":
        click.echo(f"📁 Directory mode (no daemon): {d.get('data_dir')}")
        click.echo(f"   node id: {d.get('node_id')}")
        return
    click.echo("🖥️  Node")
    _kv([("node id", d.get("node_id")), ("version", d.get("version")),
         ("pid", d.get("pid")), ("uptime", _ago(d.get("uptime"))),
         ("socket", d.get("socket")), ("data dir", d.get("data_dir")),
         ("durability", d.get("durability"))])
    mesh = d.get("mesh")
    click.echo("🕸️  Mesh")
    if not mesh:
        click.echo("   off (--no-mesh)")
    else:
        pending = mesh.get("pending_joins") or []
        _kv([("peer address", mesh.get("address")),
             ("security", security_line(mesh.get("security"))),
             ("members", f"{mesh.get('alive', 0)} alive of {mesh.get('members', 0)} known"),
             ("pending joins", ", ".join(p["address"] for p in pending) or "none"),
             ("discovery", _discovery_line(mesh.get("discovery"))),
             ("replication", _counters((mesh.get("replication") or {}).get("counters"))),
             ("transport", _counters((mesh.get("transport") or {}).get("counters")))])
        routing = mesh.get("routing") or {}
        click.echo("📮 Routing")
        queues = routing.get("outbox") or []
        _kv([("outbox", ", ".join(f"{q['node'][:12]} {q['items']} ({q['lane']})"
                                  for q in queues) or "empty"),
             ("counters", _counters(routing.get("counters")))])
    click.echo("🔌 Local API")
    _kv([("subscriptions", d.get("subscriptions")), ("pushed", d.get("pushed")),
         ("monitors", _counters(d.get("monitor"))),
         ("counters", _counters(d.get("counters")))])
    click.echo("💾 Store")
    _kv([("folded", d.get("folded")), ("checkpoints", d.get("checkpoints")),
         ("unfolded", d.get("unfolded"))])


@cli.command()
@json_option
@pass_ctx
def peers(c: Ctx, as_json: bool) -> None:
    """The other daemons of the mesh: address, state, incarnation, last contact, lag;
    then joins still pending, and how peers are admitted."""
    registry = c.registry()
    rows = registry.peers()
    mesh = registry.node_info().get("mesh") or {}
    pending = mesh.get("pending_joins") or []
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
        up = p.get("catching_up")
        if up and up.get("total"):
            click.echo(f"   ⇣ catching up from it: {progress_bar(up['done'] / up['total'])} "
                       f"({up['done']} of {up['total']} version(s), {up['origins']} origin(s))")
    for p in pending:
        click.echo(f"⏳ pending join {p['address']} ({p['source']}, {p['attempts']} "
                   f"attempt(s) over {p['since']:g}s): {p['reason']}")
    click.echo(_discovery_line(mesh.get("discovery")))
    click.echo(f"Security: {security_line(mesh.get('security') if mesh else None)}")


@cli.command()
@click.argument("address")
@pass_ctx
def join(c: Ctx, address: str) -> None:
    """Join the mesh at HOST:PORT (another daemon's peer address); retried with backoff
    until it answers, as --join is."""
    r = c.registry().join(address)
    if r.get("state") == "member":
        click.echo(f"✅ {address} is already a member ({r['node_id'][:12]})")
    else:
        click.echo(f"⏳ Joining {address}: knocking now and retrying until it answers "
                   f"(`sessions peers` shows it pending, and why)")


@cli.command()
@pass_ctx
def leave(c: Ctx) -> None:
    """This daemon leaves the mesh gracefully (peers see it as left, not failed) and
    stops."""
    r = c.registry().leave()
    click.echo(f"👋 meshd {str(r.get('node_id'))[:12]} is leaving the mesh and stopping")


@cli.command("force-leave")
@click.argument("node")
@pass_ctx
def force_leave(c: Ctx, node: str) -> None:
    """Mark a member that is down (node id, or 6+ characters of it) as gone for good: it
    reads left everywhere and mail queued for it expires now."""
    r = c.registry().force_leave(node)
    click.echo(f"✅ {r['node_id'][:12]} ({r['address']}) marked left; "
               f"{r['expired']} queued item(s) for it expired")


@cli.command("import")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@json_option
@pass_ctx
def import_cmd(c: Ctx, path: str, as_json: bool) -> None:
    """Bring the seed tool's .sessions/ directory (sessions, messages, memory) in.
    Idempotent: importing twice changes nothing."""
    from sessions.importer import import_seed
    registry = c.registry()
    report = import_seed(path, registry, c.hub(), c.memory())
    if as_json:
        emit_json(report.to_dict())
        return
    d = report.to_dict()
    click.echo(f"📥 Imported from {d['source']}:")
    for kind in ("sessions", "messages", "memory"):
        k = d[kind]
        if k["status"] != "read":
            click.echo(f"   {kind:<9} {k['file']}: {k['status']}")
            continue
        click.echo(f"   {kind:<9} {k['imported']} imported, {k['already']} already here, "
                   f"{k['skipped']} skipped")
        for skip in k["skips"][:20]:
            item = "" if skip.get("item") is None else f" {skip['item']}"
            click.echo(f"      ⚠️  skipped{item}: {skip['reason']}")
        if k["skipped"] > 20:
            click.echo(f"      ... and {k['skipped'] - 20} more (--json lists them all)")


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
