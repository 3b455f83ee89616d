"""`sessions monitor`: the local daemon's events, live (Serf's `monitor`)."""

from __future__ import annotations

import json
import time

import click

from sessions.cli._base import Ctx, cli, fail, json_option, pass_ctx

LEVEL_MARK = {"debug": "DEBUG", "info": "INFO", "warning": "WARN", "error": "ERROR"}


def progress_bar(fraction: float, width: int = 20) -> str:
    """[#########-----------]  45%"""
    f = min(1.0, max(0.0, fraction))
    filled = int(round(f * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {int(f * 100):>3d}%"


def human_line(ev: dict) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(ev["time"]))
    ms = int((ev["time"] % 1) * 1000)
    line = (f"{stamp}.{ms:03d} {LEVEL_MARK.get(ev['level'], ev['level'].upper()):<5} "
            f"{ev['event']:<22} {ev['message']}")
    progress = ev["fields"].get("progress")
    if isinstance(progress, (int, float)) and not isinstance(progress, bool):
        line += f"  {progress_bar(progress)}"
    return line


@cli.command()
@click.option("--level", type=click.Choice(["debug", "info", "warning", "error"],
                                           case_sensitive=False), default="info",
              show_default=True, help="Show events at this level and above.")
@click.option("--backlog", type=click.IntRange(0, 256), default=0,
              help="Start with up to N recent events.")
@json_option
@pass_ctx
def monitor(c: Ctx, level: str, backlog: int, as_json: bool) -> None:
    """Print what the local daemon sees and does as it happens, until Ctrl-C: members
    joining, suspect, dead and left; joins attempted and refused; replication pulls and
    catch-up progress; routed batches, retries and expiries; client errors; and its log.
    With --json, one JSON object per line (time, level, source, event, message, fields)."""
    if c.directory is not None:
        fail("monitor needs a daemon: a sessions directory has no events")
    stream = c.registry().monitor(level.lower(), backlog)

    def on_state(state: str) -> None:
        if state == "lost":
            click.echo("⚠️  meshd went away; waiting for it", err=True)
        else:
            click.echo("✅ meshd is back; monitoring again", err=True)

    stream.on_state = on_state
    click.echo(f"👀 Monitoring meshd at level {level.lower()} (Ctrl-C to stop)", err=True)
    try:
        for ev in stream:
            d = ev.to_dict()
            if as_json:
                click.echo(json.dumps(d, ensure_ascii=False, default=str))
            else:
                click.echo(human_line(d))
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
