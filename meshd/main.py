"""The `meshd` command: builds a Config from flags, MESHD_* variables and a TOML config
file (flag > environment > file > default), sets up
journald-friendly logging, and runs the daemon."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import sys

import click

from meshd import __version__
from meshd.config import (
    DURABILITY_MODES, Config, default_data_dir, default_socket_path, prepare_socket_dir,
)
from meshd.errors import MeshError
from meshd.wire.discovery import check_cluster
from meshd.wire.peer import parse_address


#: How long a thread may hold the GIL while another waits for it. The daemon's fold thread
#: gives the GIL up at every SQLite step; with the default 5 ms it then waits that long to
#: get it back from the busy loop (a convoy), so folding crawls under load.
GIL_SWITCH_INTERVAL = 0.0005


def _setup_logging(level: str) -> None:
    # Under journald (JOURNAL_STREAM set) the journal stamps each line itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=fmt)


# --- the config file (docs/configuration.md, "Config file") ---------------------------------
# Built from click's own parameter list, so any option added to `main` can come from the file
# with no more code: its TOML key is its long flag name (`-` or `_`), the file's values go in
# click's default_map, and click's precedence is ours: flag > environment > file > default.

#: Options that act rather than configure; never read from a file.
NOT_IN_FILE = {"gen_key"}
_FILE = "meshd.config_file"         # ctx.meta: {"path", "looked", "tuning"}


class _MeshdCommand(click.Command):
    """Keeps the raw arguments: which default config file applies depends on --system,
    which is known only after the file's values were put in place."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["meshd.argv"] = list(args)
        return super().parse_args(ctx, args)


def _file_options(command: click.Command) -> dict[str, click.Option]:
    """TOML key (long flag name, `-` form) -> the option it sets."""
    keys: dict[str, click.Option] = {}
    for p in command.params:
        if (not isinstance(p, click.Option) or p.is_eager or not p.expose_value
                or p.name in NOT_IN_FILE):
            continue
        for opt in p.opts:
            if opt.startswith("--"):
                keys.setdefault(opt[2:], p)
    return keys


def _file_value(ctx: click.Context, p: click.Option, key: str, value: object,
                path: str) -> object:
    """A value from the file, checked against the option's type (TOML types, not strings
    to parse) and converted by click as a flag's would be."""
    where = f"config file {path}: {key}"
    many = p.multiple or p.nargs != 1
    if many and not isinstance(value, list):
        raise click.UsageError(f"{where} must be a list, e.g. {key} = [\"...\"], "
                               f"not {value!r}", ctx)
    items = value if many else [value]
    ptype = p.type
    for item in items:  # type: ignore[union-attr]
        if isinstance(ptype, click.types.BoolParamType):
            ok, what = isinstance(item, bool), "true or false"
        elif isinstance(ptype, click.types.IntParamType):
            ok, what = isinstance(item, int) and not isinstance(item, bool), "an integer"
        elif isinstance(ptype, click.types.FloatParamType):
            ok, what = (isinstance(item, (int, float)) and not isinstance(item, bool),
                        "a number")
        else:
            ok, what = isinstance(item, str), "a string"
        if not ok:
            raise click.UsageError(f"{where} must be {what}"
                                   + (" in a list" if many else "") + f", not {item!r}", ctx)
    try:
        out = [ptype.convert(item, p, ctx) for item in items]  # type: ignore[union-attr]
    except click.BadParameter as exc:
        raise click.UsageError(f"{where}: {exc.message}", ctx) from None
    return tuple(out) if many else out[0]


def _read_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """--config's callback (eager: before every other option): read the file, check every
    key, and hand the values to click as the defaults of the options they name."""
    if ctx.resilient_parsing:
        return
    import tomllib
    from meshd.config import default_config_file, tuning_overrides

    explicit = value is not None
    path = os.path.abspath(value) if explicit else default_config_file(
        system="--system" in ctx.meta.get("meshd.argv", ()))
    ctx.meta[_FILE] = {"path": None, "looked": path, "tuning": {}}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise click.BadParameter(f"{path}: no such file", ctx, param) from None
        return                                   # no default file: nothing to read
    except OSError as exc:
        raise click.UsageError(f"cannot read the config file {path}: {exc.strerror}",
                               ctx) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise click.UsageError(f"config file {path} is not valid TOML: {exc}", ctx) from None
    options = _file_options(ctx.command)
    names = {p.name for p in ctx.command.params}
    defaults: dict[str, object] = {}
    tuning: dict[str, object] = {}
    for key, v in data.items():
        if key == "tuning":
            if not isinstance(v, dict):
                raise click.UsageError(f"config file {path}: tuning must be a table, "
                                       "[tuning]", ctx)
            try:
                tuning = tuning_overrides(v)
            except ValueError as exc:
                raise click.UsageError(f"config file {path}: {exc}", ctx) from None
            for k in tuning:
                if k in names:
                    raise click.UsageError(
                        f"config file {path}: [tuning] {k} is an option: set it at the top "
                        f"level, {k.replace('_', '-')} = ...", ctx)
            continue
        p = options.get(key.replace("_", "-"))
        if p is None:
            import difflib
            near = difflib.get_close_matches(key.replace("_", "-"), list(options), n=1)
            raise click.UsageError(
                f"config file {path}: unknown key {key!r}"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + "; keys are the long flag names of `meshd --help`, timing knobs go in "
                  "[tuning]", ctx)
        if p.name in defaults:
            raise click.UsageError(f"config file {path}: {key!r} is given twice", ctx)
        defaults[p.name] = _file_value(ctx, p, key, v, path)  # type: ignore[arg-type]
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_FILE] = {"path": path, "looked": path, "tuning": tuning}


def _file_tuning() -> dict[str, object]:
    """The config file's [tuning] values (Config field -> value), for the preset."""
    return dict(click.get_current_context().meta.get(_FILE, {}).get("tuning", {}))


def _toml(name: str, value: object) -> str:
    import json
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(name, v) for v in value) + "]"
    if isinstance(value, int) and name == "socket_mode":
        return f"0o{value:o}"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _source(ctx: click.Context, p: click.Parameter, path: str | None) -> str:
    from click.core import ParameterSource
    src = ctx.get_parameter_source(p.name or "")
    if src == ParameterSource.COMMANDLINE:
        return "flag"
    if src == ParameterSource.ENVIRONMENT:
        env = p.envvar if isinstance(p.envvar, str) else " ".join(p.envvar or ())
        return f"env {env}"
    if src == ParameterSource.DEFAULT_MAP:
        return f"file {path}"
    return "default"


def _line(text: str, comment: str) -> str:
    return f"{text:<44} # {comment}"


def _print_or_log_config(config: Config, overrides: dict[str, object], preset: str) -> bool:
    """With --print-config: print the effective configuration, each value with where it
    came from, as a TOML file meshd can read back; True then (the daemon does not start)."""
    ctx = click.get_current_context()
    info = ctx.meta.get(_FILE, {})
    path = info.get("path")
    if not ctx.meta.get("meshd.print_config"):
        if path:
            logging.getLogger("meshd").info("read the config file %s", path)
        return False
    out = ["# meshd --print-config: the effective configuration and where each value came "
           "from.",
           "# Precedence: flag > environment (MESHD_*) > config file > preset/default.",
           f"# Config file: {path}" if path else
           f"# Config file: none ({info.get('looked')} does not exist)", ""]
    for key, p in _file_options(ctx.command).items():
        value = ctx.params.get(p.name or "")
        text = (f"# {key} = (not set)" if value is None
                else f"{key} = {_toml(p.name or '', value)}")
        out.append(_line(text, _source(ctx, p, path)))
    out += ["", "# Every field of Config (meshd/config.py) as the daemon runs with it; those "
            "set", "# by the options above are commented out here.", "[tuning]"]
    names = {p.name for p in ctx.command.params}
    plain = Config()
    tuning = info.get("tuning", {})
    for name in Config.__dataclass_fields__:
        value = getattr(config, name)
        if name in overrides:
            src = "from the options above"
        elif name in tuning:
            src = f"file {path} [tuning]"
        elif value != getattr(plain, name):
            src = f"preset {preset}"
        else:
            src = "default"
        text = (f"{name} = (not set)" if value is None else f"{name} = {_toml(name, value)}")
        out.append(_line(("# " + text) if name in names or value is None else text, src))
    click.echo("\n".join(out))
    return True


@click.command(cls=_MeshdCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", envvar="MESHD_CONFIG", default=None, metavar="FILE",
              is_eager=True, expose_value=False, callback=_read_config_file,
              help="TOML file of options: keys are the long flag names, timing knobs go "
                   "in [tuning] (docs/configuration.md). Default: /etc/meshd/meshd.toml "
                   "with --system, else $XDG_CONFIG_HOME/meshd/meshd.toml (~/.config/...; "
                   "/etc/... for root), read if it exists [env MESHD_CONFIG].")
@click.option("--print-config", is_flag=True, expose_value=False,
              callback=lambda ctx, _p, v: ctx.meta.__setitem__("meshd.print_config", v),
              help="Print the effective configuration, and where each value came from "
                   "(flag, env, file, default), as TOML; then exit.")
@click.option("--socket", "socket_path", envvar="MESHD_SOCKET", default=None,
              help="Local API socket path [env MESHD_SOCKET].")
@click.option("--data-dir", envvar="MESHD_DATA_DIR", default=None,
              help="Directory for the database and node id [env MESHD_DATA_DIR].")
@click.option("--system", is_flag=True,
              help="Use the system service's paths (/run/meshd, /var/lib/meshd) and a "
                   "group-accessible socket (0660).")
@click.option("--durability", type=click.Choice(DURABILITY_MODES), default="process",
              envvar="MESHD_DURABILITY", show_default=True,
              help="process: acknowledged writes survive kill -9; fsync: also power loss.")
@click.option("--max-frame", "max_frame", type=click.IntRange(1024, 64 * 1024 * 1024),
              default=None, help="Largest request in bytes (default 1 MiB).")
@click.option("--bind", envvar="MESHD_BIND", default=None,
              help="Peer address HOST:PORT (TCP; default 0.0.0.0:7747; port 0 picks a free "
                   "one) [env MESHD_BIND].")
@click.option("--advertise", envvar="MESHD_ADVERTISE", default=None,
              help="Address peers should use to reach this node, if not the bind address.")
@click.option("--join", "join", multiple=True, metavar="HOST:PORT", envvar="MESHD_JOIN",
              help="A peer to join (repeatable); retried with backoff until it answers "
                   "[env MESHD_JOIN, space-separated].")
@click.option("--cluster", envvar="MESHD_CLUSTER", default=None, metavar="NAME",
              help="Cluster name: mDNS discovery joins only peers announcing the same one "
                   "(default 'default') [env MESHD_CLUSTER].")
@click.option("--interface", "interfaces", multiple=True, metavar="ADDR",
              envvar="MESHD_INTERFACE",
              help="IPv4 address of an interface to run mDNS discovery on (repeatable; "
                   "default: the bind address, or every non-loopback one) "
                   "[env MESHD_INTERFACE, space-separated].")
@click.option("--discovery/--no-discovery", default=True, envvar="MESHD_DISCOVERY",
              show_default=True,
              help="Announce and browse for peers over mDNS on the LAN; with --no-discovery "
                   "only --join peers are joined [env MESHD_DISCOVERY=0/1].")
@click.option("--discovery-max-peers", type=click.IntRange(1), default=None, metavar="N",
              envvar="MESHD_DISCOVERY_MAX_PEERS",
              help="Announcements of our cluster remembered at most (default 1024); more "
                   "are dropped, a bound against floods [env MESHD_DISCOVERY_MAX_PEERS].")
@click.option("--discovery-max-resolves", type=click.IntRange(1), default=None, metavar="N",
              envvar="MESHD_DISCOVERY_MAX_RESOLVES",
              help="mDNS names resolved at once at most (default 64); more are dropped "
                   "[env MESHD_DISCOVERY_MAX_RESOLVES].")
@click.option("--key-file", envvar="MESHD_KEY_FILE", default=None, metavar="FILE",
              help="Cluster key: only peers holding the same key are let in, and all peer "
                   "traffic is encrypted (CurveZMQ). Default: none, plaintext "
                   "[env MESHD_KEY_FILE].")
@click.option("--gen-key", "gen_key", default=None, metavar="FILE",
              help="Write a new random cluster key to FILE (mode 0600) and exit; copy it "
                   "to every host of the cluster.")
@click.option("--outbox-max-age", type=click.FloatRange(0.1), default=None, metavar="SECONDS",
              help="How long a message may wait for its recipient's host (default 7 days); "
                   "older ones expire and are reported.")
@click.option("--stale-after", type=click.FloatRange(1), default=None, metavar="SECONDS",
              envvar="MESHD_STALE_AFTER",
              help="Seconds without a ping before a session reads OFFLINE (default 300) "
                   "[env MESHD_STALE_AFTER].")
@click.option("--memory-log-max", type=click.IntRange(1), default=None, metavar="N",
              envvar="MESHD_MEMORY_LOG_MAX",
              help="Memory change events kept for watchers (default 100000); the oldest "
                   "are trimmed [env MESHD_MEMORY_LOG_MAX].")
@click.option("--memory-history", type=click.IntRange(0), default=None, metavar="N",
              envvar="MESHD_MEMORY_HISTORY",
              help="Versions memory-history keeps per key (default 50) "
                   "[env MESHD_MEMORY_HISTORY].")
@click.option("--voters", envvar="MESHD_VOTERS", default=None, metavar="HOST:PORT,...",
              help="Peer addresses of the 3 (or 5) daemons that vote on claims, the same "
                   "list on every daemon; without it claims are per host "
                   "(docs/claims.md) [env MESHD_VOTERS].")
@click.option("--http", "http", envvar="MESHD_HTTP", default=None, metavar="HOST:PORT",
              help="Serve the dashboard, its JSON API and /metrics there, e.g. "
                   "127.0.0.1:8947 (docs/dashboard.md); off by default [env MESHD_HTTP].")
@click.option("--http-token-file", envvar="MESHD_HTTP_TOKEN_FILE", default=None,
              metavar="FILE", help="The dashboard's token (mode 0600); else a random one is "
                   "logged at start. Required for a non-loopback --http "
                   "[env MESHD_HTTP_TOKEN_FILE].")
@click.option("--no-mesh", is_flag=True,
              help="Serve this host only: no peer port, no replication.")
@click.option("--preset", type=click.Choice(["lan", "test"]), default="lan", show_default=True,
              help="Timing preset; 'test' shortens timers for test clusters.")
@click.option("--log-level", envvar="MESHD_LOG_LEVEL", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.version_option(__version__, prog_name="meshd")
def main(socket_path: str | None, data_dir: str | None, system: bool, durability: str,
         max_frame: int | None, bind: str | None, advertise: str | None, join: tuple[str, ...],
         cluster: str | None, interfaces: tuple[str, ...], discovery: bool,
         discovery_max_peers: int | None, discovery_max_resolves: int | None,
         key_file: str | None, gen_key: str | None, outbox_max_age: float | None,
         stale_after: float | None, memory_log_max: int | None, memory_history: int | None,
         voters: str | None, http: str | None, http_token_file: str | None, no_mesh: bool,
         preset: str, log_level: str) -> None:
    """Run the meshd daemon in the foreground."""
    from meshd.daemon import serve
    from meshd.mesh.security import generate_key_file, load_key

    if gen_key:
        try:
            key = generate_key_file(gen_key)
        except MeshError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"wrote a new cluster key to {gen_key} (fingerprint {key.fingerprint}); "
                   "give every daemon of the cluster the same file with --key-file")
        return
    _setup_logging(log_level)
    base = Config.test() if preset == "test" else Config.lan()
    base = base.with_(**_file_tuning())          # the config file's [tuning] table
    overrides: dict[str, object] = {
        "socket_path": socket_path or default_socket_path(system=system),
        "data_dir": data_dir or default_data_dir(system=system),
        "durability": durability,
    }
    if system:
        overrides["socket_mode"] = 0o660
    if max_frame is not None:
        overrides["max_frame_bytes"] = max_frame
    if bind:
        overrides["bind"] = bind
    if advertise:
        overrides["advertise"] = advertise
    if join:
        overrides["join"] = tuple(join)
    if no_mesh:
        overrides["mesh"] = False
    if not discovery:
        overrides["discovery"] = False
    if cluster is not None:
        try:
            overrides["cluster"] = check_cluster(cluster)
        except MeshError as exc:
            raise click.BadParameter(str(exc), param_hint="--cluster") from None
    if interfaces:
        for a in interfaces:
            try:
                ipaddress.IPv4Address(a)
            except ValueError:
                raise click.BadParameter(f"{a!r} is not an IPv4 address",
                                         param_hint="--interface") from None
        overrides["interfaces"] = tuple(interfaces)
    if discovery_max_peers is not None:
        overrides["discovery_max_peers"] = discovery_max_peers
    if discovery_max_resolves is not None:
        overrides["discovery_max_resolves"] = discovery_max_resolves
    if outbox_max_age is not None:
        overrides["outbox_max_age"] = outbox_max_age
    if stale_after is not None:
        overrides["session_stale_after"] = stale_after
    if memory_log_max is not None:
        overrides["memory_log_max_rows"] = memory_log_max
    if memory_history is not None:
        overrides["memory_history_per_key"] = memory_history
    if key_file is None and "MESHD_KEY_FILE" in os.environ:
        key_file = os.environ["MESHD_KEY_FILE"]  # (click drops an empty one: refused below)
    if key_file is not None:                     # an empty value is refused, not "no key"
        try:
            load_key(key_file)
        except MeshError as exc:
            raise click.BadParameter(str(exc), param_hint="--key-file") from None
        overrides["key_file"] = os.path.abspath(key_file)
    for hint, addr in [("--bind", bind), ("--advertise", advertise), *[("--join", j) for j in join]]:
        if addr:
            try:
                parse_address(addr)
            except MeshError as exc:
                raise click.BadParameter(str(exc), param_hint=hint) from None
    if voters:
        from meshd.mesh.claims import check_voters
        try:
            overrides["voters"] = check_voters(
                [v.strip() for v in voters.split(",") if v.strip()])
        except MeshError as exc:
            raise click.BadParameter(str(exc), param_hint="--voters") from None
        if no_mesh:
            raise click.BadParameter("claims voters need the mesh (drop --no-mesh)",
                                     param_hint="--voters")
    if http:
        from meshd.ipc.web import http_problem
        problem = http_problem(http, http_token_file)
        if problem:
            raise click.BadParameter(problem, param_hint="--http")
        overrides["http"] = http
    if http_token_file:
        overrides["http_token_file"] = os.path.abspath(http_token_file)
    config = base.with_(**overrides)
    if _print_or_log_config(config, overrides, preset):
        return
    try:
        # Before the store opens and the mesh starts: a socket directory another user
        # controls, or a file in the socket's place, is refused, never used or deleted.
        problem = prepare_socket_dir(config.socket_path, config.socket_mode)
        if problem:
            raise MeshError(problem)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        asyncio.run(serve(config))
    except MeshError as exc:
        logging.getLogger("meshd").error("%s", exc)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
