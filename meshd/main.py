"""The `meshd` command: builds a Config from flags and MESHD_* variables, sets up
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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
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
         voters: str | None, no_mesh: bool, preset: str, log_level: str) -> None:
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
    config = base.with_(**overrides)
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
