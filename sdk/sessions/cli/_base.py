"""What every `sessions` command shares: the group with its global options, the objects
it builds, and one way to print errors, JSON and values."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from sessions import CollaborationHub, SessionRegistry, SharedMemory


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


def fail(message: str) -> NoReturn:
    """One ❌ line on stderr and exit 1."""
    click.echo(f"❌ {message}", err=True)
    sys.exit(1)


def not_found(what: str, name: str) -> NoReturn:
    """The one wording for a missing thing, whatever the command: "<What> not found: X"."""
    fail(f"{what} not found: {name}")


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
              help="Work in this directory with no daemon (it must exist, see --create).")
@click.option("--create", is_flag=True,
              help="With --dir: create the directory if it does not exist.")
@click.option("--timeout", type=click.FloatRange(0.01, 3600), default=None,
              help="Seconds to wait for each answer [env MESHD_TIMEOUT; default 10].")
@click.version_option(package_name="meshd", prog_name="sessions")
@click.pass_context
def cli(ctx: click.Context, socket: str | None, directory: str | None, create: bool,
        timeout: float | None) -> None:
    """Sessions on the meshd mesh: registry, messages and shared memory."""
    if directory is not None and not os.path.isdir(directory):
        if not create:
            # A typo must not silently start an empty registry somewhere else.
            raise click.UsageError(f"directory {directory!r} does not exist "
                                   f"(add --create to make it)")
        os.makedirs(directory, mode=0o700, exist_ok=True)
    elif create and directory is None:
        raise click.UsageError("--create goes with --dir DIR")
    ctx.obj = Ctx(socket, directory, timeout)
