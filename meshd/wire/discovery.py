"""What a meshd announces over mDNS (DNS-SD), and how an announcement heard is checked.

Each daemon announces one service of type ``_meshd._tcp.local.``, named after its node id,
whose SRV record carries the peer port and whose TXT record carries::

    node=<node id>  cluster=<cluster name>  proto=<peer protocol version>  port=<peer port>
    version=<meshd version, informational>  [key=<cluster key fingerprint>, when keyed]

Anything else on the LAN may announce the same type (another implementation, an old meshd,
a misconfigured or hostile host), so an announcement is believed only when every field is
present and well formed, the protocol version is one this node speaks, the cluster is ours,
the cluster key is ours (or both have none: a peer with another key could not complete a
handshake anyway) and the TXT port is the SRV port. A rejected announcement raises `Ignored` with a short
reason the caller counts; it never reaches membership.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Mapping

from meshd.errors import InvalidArgument
from meshd.wire.peer import SUPPORTED

SERVICE_TYPE = "_meshd._tcp.local."
DEFAULT_CLUSTER = "default"
#: A cluster name is one DNS label's worth of plain characters, so it fits a TXT value and
#: reads the same everywhere.
_CLUSTER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: Node ids are 32 hex digits (uuid4); also the service instance label.
_NODE_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_ADDRESSES = 4            # announced IPv4 addresses tried per peer at most


class Ignored(InvalidArgument):
    """An announcement not to act on; `reason` is a counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"announcement ignored ({reason}): {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Announcement:
    node_id: str
    cluster: str
    port: int
    addresses: tuple[str, ...]          # IPv4, as announced in A records

    def peer_addresses(self) -> list[str]:
        return [f"{a}:{self.port}" for a in self.addresses]


def check_cluster(name: str) -> str:
    """Validate a cluster name given on the command line or in config."""
    if not isinstance(name, str) or not _CLUSTER_RE.match(name):
        raise InvalidArgument(
            f"cluster name {name!r} must be 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    return name


def instance_name(node_id: str) -> str:
    return f"{node_id}.{SERVICE_TYPE}"


def txt(node_id: str, cluster: str, port: int, version: str, proto: int,
        key: str = "") -> dict[str, str]:
    out = {"node": node_id, "cluster": cluster, "proto": str(proto), "port": str(port),
           "version": version}
    if key:
        out["key"] = key
    return out


def _field(props: Mapping[bytes, bytes | None], key: str) -> str:
    raw = props.get(key.encode())
    if raw is None:
        raise Ignored("malformed", f"no {key}= in TXT")
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Ignored("malformed", f"{key}= is not UTF-8") from None
    if not value or len(value) > 255 or not value.isprintable():
        raise Ignored("malformed", f"{key}= is empty or not printable")
    return value


def parse(props: Mapping[bytes, bytes | None], srv_port: int | None,
          addresses: list[str], cluster: str, key: str = "") -> Announcement:
    """Check one resolved announcement against our cluster; `Ignored` says why not."""
    if not isinstance(props, Mapping):
        raise Ignored("malformed", "no TXT record")
    node = _field(props, "node")
    if not _NODE_RE.match(node):
        raise Ignored("malformed", f"node={node[:40]!r} is not a node id")
    proto = _field(props, "proto")
    if not proto.isdigit() or int(proto) not in SUPPORTED:
        raise Ignored("protocol", f"peer protocol {proto[:20]!r}, this node speaks "
                                  f"{sorted(SUPPORTED)}")
    theirs = _field(props, "cluster")
    if theirs != cluster:
        raise Ignored("cluster", f"cluster {theirs[:63]!r}, not {cluster!r}")
    their_key = _field(props, "key") if props.get(b"key") is not None else ""
    if their_key != key:
        raise Ignored("key", f"cluster key {their_key[:20] or 'none'}, "
                             f"this node has {key or 'none'}")
    port = _field(props, "port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise Ignored("malformed", f"port={port[:20]!r} is not a port")
    if srv_port != int(port):
        raise Ignored("malformed", f"TXT port {port} is not the SRV port {srv_port}")
    good = []
    for a in addresses:
        try:
            ip = ipaddress.IPv4Address(a)
        except ValueError:
            continue
        if not (ip.is_unspecified or ip.is_multicast or ip.is_loopback):
            good.append(str(ip))
    if not good:
        raise Ignored("malformed", "no usable IPv4 address")
    return Announcement(node, cluster, int(port), tuple(good[:MAX_ADDRESSES]))
