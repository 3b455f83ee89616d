"""Claims: claim, release, claims (leases on named resources, with fencing tokens)."""

from __future__ import annotations

import dataclasses

import click

from sessions.claims import Claims, Lease
from sessions.cli._base import Ctx, cli, emit_json, fail, json_option, pass_ctx


def _claims(c: Ctx) -> Claims:
    if c.directory is not None:
        fail("claims need a daemon: a sessions directory grants none")
    return Claims(socket=c.socket, timeout=c.timeout)


def _view(lease: Lease) -> dict[str, object]:
    d = dataclasses.asdict(lease)
    d.pop("deadline")
    d["valid_for"] = round(max(0.0, lease.remaining), 3)
    return d


def _line(lease: Lease) -> str:
    return (f"{lease.resource}  holder {lease.holder}  token {lease.token}  "
            f"{max(0.0, lease.remaining):.1f}s left of {lease.ttl:g}s  ({lease.scope})")


@cli.command()
@click.argument("resource")
@click.option("--session", "session_id", required=True, help="The session that claims it.")
@click.option("--ttl", type=click.FloatRange(0.001, 3600), default=30.0, show_default=True,
              help="Seconds the lease runs unless renewed.")
@click.option("--wait", type=click.FloatRange(0, 3600), default=0.0, show_default=True,
              help="Seconds to wait for a busy resource to be freed.")
@json_option
@pass_ctx
def claim(c: Ctx, resource: str, session_id: str, ttl: float, wait: float,
          as_json: bool) -> None:
    """Claim RESOURCE for a session: prints the fencing token (give it to the resource).

    The lease runs for --ttl seconds; the session's daemon renews it while the session
    is registered. Busy: exit 1, naming the holder."""
    lease = _claims(c).acquire(resource, session_id, ttl=ttl, wait=wait)
    if as_json:
        emit_json(_view(lease))
        return
    click.echo(f"🔒 {_line(lease)}")


@cli.command()
@click.argument("resource")
@click.option("--session", "session_id", required=True, help="The session holding it.")
@click.option("--token", type=click.IntRange(0), default=None,
              help="The lease's token (default: the current holder's, if it is this session).")
@pass_ctx
def release(c: Ctx, resource: str, session_id: str, token: int | None) -> None:
    """Release a claim on RESOURCE held by a session."""
    claims = _claims(c)
    if token is None:
        held = claims.holder(resource)
        if held is None or held.holder != session_id:
            fail(f"{session_id} holds no claim on {resource}")
        token = held.token
    lease = Lease(resource, session_id, token, 0.0, "", 0.0, "")
    if not claims.release(lease):
        fail(f"{session_id} holds no claim on {resource} with token {token}")
    click.echo(f"🔓 released {resource}")


@cli.command()
@click.argument("prefix", required=False)
@json_option
@pass_ctx
def claims(c: Ctx, prefix: str | None, as_json: bool) -> None:
    """The claims held now (those whose resource starts with PREFIX)."""
    leases = _claims(c).list(prefix)
    if as_json:
        emit_json([_view(lease) for lease in leases])
        return
    if not leases:
        click.echo("No claims.")
        return
    for lease in leases:
        click.echo(f"🔒 {_line(lease)}")
