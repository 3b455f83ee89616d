"""Every knob of meshd in one frozen object, with LAN defaults and a fast preset for tests.

Library code receives a `Config` and never reads the environment or files itself; the
daemon's entry point (`meshd.main`) builds one from flags and `MESHD_*` variables. The path
helpers at the bottom are pure functions of an environment mapping so the SDK can find the
daemon's socket the same way the daemon chose it; the daemon and the SDK check the socket's
directory the same way too (`socket_dir_problem`). Leaf module: stdlib only.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

MiB = 1024 * 1024
DEFAULT_PEER_PORT = 7747

#: Durability modes. "process": every acknowledged write is in SQLite's WAL in the OS
#: before the reply, so it survives kill -9 and daemon crashes (not a power cut).
#: "fsync": the WAL is fsynced before the reply (group commit), which also survives power
#: loss at a cost of roughly one disk flush per batch of writes.
DURABILITY_MODES = ("process", "fsync")


@dataclass(frozen=True, slots=True)
class Config:
    """All timing, size and path knobs. Units are in the field names or comments."""

    # --- where things live -------------------------------------------------------------
    socket_path: str = ""                 # local API socket; "" = default_socket_path()
    data_dir: str = ""                    # SQLite + node id; "" = default_data_dir()
    socket_mode: int = 0o600              # owner-only; the system service uses 0o660
    # --- sizes -------------------------------------------------------------------------
    max_frame_bytes: int = 1 * MiB        # largest request/record accepted; larger = error
    max_batch: int = 64                 # requests applied per transaction (group commit)
    ipc_turn_budget: float = 0.01         # s of a loop turn spent on one big batch of local
                                          # requests before yielding (the rest next turn)
    # --- durability --------------------------------------------------------------------
    durability: str = "process"           # see DURABILITY_MODES
    # --- sessions ----------------------------------------------------------------------
    session_stale_after: float = 300.0    # s without ping before a session shows OFFLINE
    # --- live streams ------------------------------------------------------------------
    stream_window: int = 256              # events pushed before the subscriber must ack
    stream_idle_timeout: float = 30.0     # s without ack/renew before a stream is dropped
    stream_sub_bytes: int = 1 * MiB       # bytes pushed and not yet acked, per stream, before
                                          # it pauses (it resumes from its cursor on ack)
    stream_total_bytes: int = 64 * MiB    # the same over all streams of the daemon
    stream_client_bytes: int = 8 * MiB    # ... and over the streams of one connection
    stream_max_per_client: int = 64       # open streams per client connection
    stream_max_total: int = 4096          # open streams in all
    # --- memory change events (memory.watch, memory.history) ------------------------------
    memory_log_max_rows: int = 100_000    # events kept for watchers; the oldest are trimmed
                                          # (a watcher resuming below them gets a gap event)
    memory_history_per_key: int = 50      # versions memory.history keeps per key
    # --- housekeeping ------------------------------------------------------------------
    expiry_interval: float = 5.0          # s between purges of TTL-expired memory entries
    checkpoint_interval: float = 1.0      # s between WAL checkpoints, made by the fold
                                          # thread (shorter = smaller WAL)
    journal_flush_delay: float = 0.005    # s a journaled write may wait before it goes to
                                          # the fold thread (reads and other writes fold at once)
    journal_handoff: int = 32             # queued writes that go to the fold thread at once
    journal_flush_max: int = 4096         # queued writes that make the loop fold them itself
                                          # (the fold thread is behind: backpressure)
    # --- clients -----------------------------------------------------------------------
    client_timeout: float = 10.0          # s, default deadline of one SDK call
    # --- the mesh: peers, membership (SWIM), replication -------------------------------
    mesh: bool = True                     # False: a single-host daemon, no peer port
    bind: str = f"0.0.0.0:{DEFAULT_PEER_PORT}"  # peer transport (TCP); port 0 = any free one
    advertise: str = ""                   # address peers should use; "" = derived from bind
    join: tuple[str, ...] = ()            # seed peers ("host:port"), retried until they answer
    key_file: str = ""                    # cluster key (CurveZMQ secret, `meshd --gen-key`):
                                          # peers must hold it; all peer traffic encrypted.
                                          # "" = no authentication, plaintext (trusted LAN)
    peer_queue: int = 256                 # frames queued per peer before new ones are dropped
    probe_interval: float = 0.5           # s between probes of one member by this node
    probe_timeout: float = 0.2            # s to wait for a direct ack before indirect probes
    indirect_checks: int = 3              # members asked to probe a silent one for us
    suspicion_timeout: float = 2.5        # s a suspect has to refute before it is dead
    retransmit_mult: int = 4              # an update rides on mult x log10(N+1) messages
    sync_interval: float = 2.0            # s between anti-entropy rounds (one random member)
    push_grace: float = 0.5               # s an anti-entropy gap may be closed by a push in
                                          # flight before it is pulled
    sync_chunk_records: int = 500         # records per replication chunk at most
    sync_chunk_bytes: int = 256 * 1024    # bytes per replication chunk at most
    join_retry: float = 1.0               # s before retrying a silent seed; doubles ...
    join_retry_max: float = 30.0          # ... up to this
    reconnect_interval: float = 5.0       # s between attempts to reach members declared
                                          # dead (a healed partition, a host back up) ...
    reconnect_max: int = 8                # ... this many of them per attempt, at random
    leave_grace: float = 0.2              # s to let the leave announcement go out on stop
    reap_after: float = 72 * 3600.0       # s a dead or departed member is remembered
    tombstone_min_age: float = 3600.0     # s before a deletion record may be collected ...
    tombstone_gc_interval: float = 60.0   # ... checked this often (once all members hold it)
    max_version_jump: int = 1_000_000_000  # a batch claiming this many versions beyond the
                                           # records it carries is dropped
    # --- bounds on what frames from the peer port can make this node hold --------------
    max_members: int = 512                # members remembered (each one up holds a connection)
    max_candidates: int = 64              # unknown nodes being pinged before they are members
    max_hearsay: int = 16                 # ... of them known only from another node's word
    candidate_timeout: float = 3.0        # s an unknown node has to answer before it is dropped
    max_incarnation_ahead: float = 365 * 86400.0  # s an incarnation may be ahead of our clock
    max_relays: int = 256                 # indirect probes relayed for others at once
    max_origins: int = 4096               # origins known; records of a new one refused beyond
    transient_max: int = 64               # connections to addresses that are not members ...
    transient_queue: int = 4              # ... frames queued on each of them ...
    transient_idle: float = 30.0          # ... s after which an idle one is closed ...
    transient_rate: float = 20.0          # ... new ones per s (bursts up to transient_max)
    # --- discovery on the LAN (mDNS / DNS-SD) -----------------------------------------
    discovery: bool = True                # announce and browse _meshd._tcp.local.
    cluster: str = "default"              # only peers announcing the same name are joined
    interfaces: tuple[str, ...] = ()      # IPv4 addresses to run mDNS on; () = the bind
                                          # address, or every non-loopback one for 0.0.0.0
    discovery_resolve_timeout: float = 3.0  # s to wait for a service's records per try
    discovery_max_resolves: int = 64      # names resolved at once; more are dropped (a flood)
    discovery_max_peers: int = 1024       # announcements of our cluster remembered (each is
                                          # knocked at with backoff); more are dropped
    discovery_evict_after: float = 30.0   # s after which a remembered announcement whose node
                                          # is not an up member may make room for a new one
    # --- routing messages between daemons ----------------------------------------------
    route_tick: float = 0.5               # s between looks at the outboxes (new ones go at once)
    route_retry: float = 1.0              # s without an ack before a run is sent again ...
    route_retry_max: float = 30.0         # ... doubling up to this
    route_batch: int = 256                # routed items per frame at most
    outbox_max_age: float = 7 * 86400.0   # s a message may wait for its host, then expires
    outbox_max: int = 100_000             # items queued per destination, then the oldest expire
    outbox_check_interval: float = 60.0   # s between expiry checks
    # --- claims (leases with fencing tokens; see docs/claims.md) ----------------------
    voters: tuple[str, ...] = ()          # peer addresses ("host:port") of the claim voters,
                                          # the same list on every daemon (3 or 5); () =
                                          # claims for this host's sessions only
    claim_max_ttl: float = 300.0          # s, longest lease TTL (D_P bound): a restarted
                                          # voter sits out this long (its quarantine)
    claim_drift: float = 0.01             # rho: bound on any clock's rate error (1 %)
    claim_timeout: float = 1.0            # s a claim round waits for a majority
    claim_renew_fraction: float = 1 / 3   # renew a held lease after this part of its TTL
    claim_max_resources: int = 100_000    # resources one voter tracks; more are refused
    # --- the dashboard (docs/dashboard.md) ---------------------------------------------
    http: str | None = None               # HOST:PORT of the web page, JSON API and /metrics;
                                          # None = off (e.g. "127.0.0.1:8947")
    http_token_file: str | None = None    # its token (else a random one, logged at start);
                                          # required for a non-loopback HOST

    @classmethod
    def lan(cls, **overrides: object) -> "Config":
        """Defaults for hosts on one LAN."""
        return replace(cls(), **overrides)  # type: ignore[arg-type]

    @classmethod
    def test(cls, **overrides: object) -> "Config":
        """Short timers so tests converge quickly on loopback."""
        base = replace(cls(), stream_idle_timeout=5.0, expiry_interval=0.5, client_timeout=5.0,
                       checkpoint_interval=0.2, probe_interval=0.2, probe_timeout=0.1,
                       suspicion_timeout=1.0, sync_interval=0.3, push_grace=0.1,
                       join_retry=0.1, reconnect_interval=0.5,
                       join_retry_max=1.0, leave_grace=0.1, reap_after=60.0,
                       tombstone_min_age=2.0, tombstone_gc_interval=1.0, route_tick=0.1,
                       route_retry=0.3, route_retry_max=2.0, outbox_check_interval=0.5,
                       discovery_evict_after=2.0, candidate_timeout=1.0, transient_idle=2.0,
                       claim_max_ttl=5.0, claim_timeout=0.5)
        return replace(base, **overrides)  # type: ignore[arg-type]

    def with_(self, **overrides: object) -> "Config":
        """A copy with some fields changed (the object itself is immutable)."""
        return replace(self, **overrides)  # type: ignore[arg-type]


def default_socket_path(environ: Mapping[str, str] | None = None, system: bool = False) -> str:
    """Where the local API socket lives.

    `MESHD_SOCKET` wins; the system service (or root with no user runtime dir) uses
    /run/meshd (systemd's RuntimeDirectory); a user gets $XDG_RUNTIME_DIR/meshd, or a
    per-uid directory under /tmp when that variable is unset.
    """
    env = os.environ if environ is None else environ
    if env.get("MESHD_SOCKET"):
        return env["MESHD_SOCKET"]
    if env.get("RUNTIME_DIRECTORY"):          # set by systemd for RuntimeDirectory=
        return str(Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "meshd.sock")
    if system:
        return "/run/meshd/meshd.sock"
    if env.get("XDG_RUNTIME_DIR"):
        return str(Path(env["XDG_RUNTIME_DIR"]) / "meshd" / "meshd.sock")
    if os.geteuid() == 0:
        return "/run/meshd/meshd.sock"
    return f"/tmp/meshd-{os.geteuid()}/meshd.sock"


def candidate_socket_paths(environ: Mapping[str, str] | None = None) -> list[str]:
    """Sockets a client tries, in order: the user's daemon first, then the system one."""
    env = os.environ if environ is None else environ
    if env.get("MESHD_SOCKET"):
        return [env["MESHD_SOCKET"]]
    paths = [default_socket_path(env), "/run/meshd/meshd.sock"]
    return list(dict.fromkeys(paths))


#: The system service's socket directory (systemd's RuntimeDirectory=meshd).
SYSTEM_SOCKET_DIR = "/run/meshd"
_AVOID = ("choose a directory only you can write to (MESHD_SOCKET or --socket; the default "
          "is under $XDG_RUNTIME_DIR, else /tmp/meshd-UID)")


def socket_dir_problem(directory: str) -> str | None:
    """Why a socket in `directory` could be taken over by another local user, else None
    (also when it does not exist yet: the daemon creates it, then asks again).

    Whoever may write to the directory can put their own socket in the daemon's place and
    read what clients send (a `memory-set` value, say), and a directory made first by
    someone else in /tmp is theirs. So, as ssh-agent and tmux do, it must be owned by this
    user (or root) and writable by nobody else. The service's /run/meshd belongs to the
    service's user: only root can make it in /run, so it passes while /run is root's.
    """
    trusted = {os.geteuid(), 0}
    try:
        st = os.lstat(directory)
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in trusted:
                return (f"the socket directory {directory} is a symbolic link owned by uid "
                        f"{st.st_uid}, who could point it elsewhere at any time; {_AVOID}")
            st = os.stat(directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot check the socket directory {directory}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"the socket directory {directory} is not a directory"
    if st.st_uid not in trusted and not _service_dir(directory):
        return (f"the socket directory {directory} belongs to uid {st.st_uid}, not to you "
                f"(uid {os.geteuid()}): its owner could replace the socket and read what is "
                f"sent to meshd. Remove it if you did not make it, or {_AVOID}")
    if st.st_mode & 0o022:
        return (f"the socket directory {directory} is writable by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): any of them could replace the socket and "
                f"read what is sent to meshd; {_AVOID}")
    return None


def _service_dir(directory: str) -> bool:
    if os.path.realpath(directory) != SYSTEM_SOCKET_DIR:
        return False
    try:
        parent = os.stat(os.path.dirname(SYSTEM_SOCKET_DIR))
    except OSError:
        return False
    return parent.st_uid == 0 and not parent.st_mode & 0o022


def prepare_socket_dir(socket_path: str, mode: int) -> str | None:
    """For the daemon, before it serves: make the socket's directory (owner-only; 0750
    when the socket is for a group) and check it, and check that only a socket is in the
    way. Returns why it must not serve there, else None. (A socket is replaced only when
    nobody answers on it: the IPC server probes it.)"""
    directory = os.path.dirname(os.path.abspath(socket_path))
    try:
        os.makedirs(directory, mode=0o750 if mode & 0o070 else 0o700, exist_ok=True)
    except OSError as exc:
        return f"cannot create the socket directory {directory}: {exc.strerror}"
    problem = socket_dir_problem(directory)
    if problem:
        return problem
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot check the socket path {socket_path}: {exc.strerror}"
    if stat.S_ISSOCK(st.st_mode):
        return None
    kind = ("a regular file" if stat.S_ISREG(st.st_mode) else "a directory"
            if stat.S_ISDIR(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode)
            else "a special file")
    return (f"{socket_path} exists and is {kind}, not a socket: meshd replaces only the "
            "socket of a daemon that died. Move it away or choose another socket path "
            "(--socket, MESHD_SOCKET)")


def default_data_dir(environ: Mapping[str, str] | None = None, system: bool = False) -> str:
    """Where the database and node id live: MESHD_DATA_DIR, systemd's StateDirectory,
    /var/lib/meshd for the service, else $XDG_STATE_HOME/meshd (~/.local/state/meshd)."""
    env = os.environ if environ is None else environ
    if env.get("MESHD_DATA_DIR"):
        return env["MESHD_DATA_DIR"]
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    if system:
        return "/var/lib/meshd"
    state_home = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "/tmp")) / ".local" / "state")
    return str(Path(state_home) / "meshd")


# --- the config file (meshd.toml) ----------------------------------------------------------
# The `meshd` command reads its options from a TOML file (docs/configuration.md, "Config
# file"); the click side is in meshd.main. Here: where the file is, and the `[tuning]` table,
# whose keys are the names of Config's fields.

#: The system service's config file (`meshd --system`, or root).
SYSTEM_CONFIG_FILE = "/etc/meshd/meshd.toml"


def default_config_file(environ: Mapping[str, str] | None = None, system: bool = False) -> str:
    """The config file read when `--config` is not given, chosen as default_socket_path
    chooses: /etc/meshd/meshd.toml for the service (`--system`), else
    $XDG_CONFIG_HOME/meshd/meshd.toml, else /etc/meshd/meshd.toml for root and
    ~/.config/meshd/meshd.toml for a user. A missing default file is no error."""
    env = os.environ if environ is None else environ
    if system:
        return SYSTEM_CONFIG_FILE
    if not env.get("XDG_CONFIG_HOME") and os.geteuid() == 0:
        return SYSTEM_CONFIG_FILE
    config_home = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "/tmp")) / ".config")
    return str(Path(config_home) / "meshd" / "meshd.toml")


def _field_kinds() -> dict[str, str]:
    # Annotations are strings here (`from __future__ import annotations`).
    return {name: str(f.type) for name, f in Config.__dataclass_fields__.items()}


def tuning_overrides(table: Mapping[str, object]) -> dict[str, object]:
    """Check a `[tuning]` table (Config field name -> value, as tomllib read it) against
    Config's fields and their types; returns the values to give `Config.with_`. Raises
    ValueError naming the key for an unknown field or a value of the wrong type."""
    import math

    kinds = _field_kinds()
    out: dict[str, object] = {}
    for key, value in table.items():
        kind = kinds.get(key)
        if kind is not None and kind.endswith(" | None"):
            kind = kind[: -len(" | None")]        # None is "not set": leave the key out
        if kind is None:
            import difflib
            near = difflib.get_close_matches(key, list(kinds), n=1)
            raise ValueError(f"unknown key {key!r} in [tuning]"
                             + (f" (did you mean {near[0]!r}?)" if near else "")
                             + "; its keys are the fields of Config in meshd/config.py")
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"[tuning] {key} must be true or false, not {value!r}")
        elif kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    kind == "int" and not isinstance(value, int)):
                what = "an integer" if kind == "int" else "a number"
                raise ValueError(f"[tuning] {key} must be {what}, not {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"[tuning] {key} must be a finite number >= 0, not {value!r}")
            value = float(value) if kind == "float" else value
        elif kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"[tuning] {key} must be a string, not {value!r}")
        elif kind == "tuple[str, ...]":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"[tuning] {key} must be a list of strings, not {value!r}")
            value = tuple(value)
        else:
            raise ValueError(f"[tuning] {key} cannot be set from a file (type {kind})")
        out[key] = value
    return out
