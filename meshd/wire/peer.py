"""The protocol between daemons (ZeroMQ TCP, one-way frames).

Every frame is one msgpack array::

    [version: int, type: int, sender: str (node id), reply_to: str ("host:port"), body: map]

Frames are one-way, like memberlist's UDP packets: a node sends to a peer's ROUTER through
its own DEALER for that peer, and any answer travels the same way back to `reply_to`, so
neither side ever waits on a socket. Types form an append-only list; a frame of a type
this node does not know, of another protocol version, over the size limit, or with a
body that fails validation is dropped and counted by the receiver.

Membership updates (piggybacked on PING/ACK/GOSSIP, and the whole table in SYNC) are
``[node_id, address, state, incarnation]`` with state ALIVE, SUSPECT, DEAD or LEFT.
Replicated records are validated by `meshd.wire.records`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Callable

from meshd.config import DEFAULT_PEER_PORT
from meshd.errors import InvalidArgument, ProtocolError, UnsupportedVersion
from meshd.wire import schema as s
from meshd.wire.codec import pack, unpack

PEER_PROTOCOL_VERSION = 1
SUPPORTED = frozenset({1})
DEFAULT_PORT = DEFAULT_PEER_PORT
#: Updates piggybacked on one probe frame at most.
MAX_UPDATES = 64
MAX_MEMBERS = 10_000
MAX_ORIGINS = 10_000
#: The largest incarnation a frame may carry. Membership never believes one anywhere near
#: it (see `meshd.mesh.membership`), so raising an incarnation can never leave this range.
MAX_INCARNATION = 2**62


class FrameType(IntEnum):
    """Append-only: never renumber or reuse a value."""

    PING = 1         # {seq, updates}: are you alive? (probe)
    ACK = 2          # {seq, updates}: yes (to a PING, or forwarded for a PING_REQ)
    PING_REQ = 3     # {seq, target, target_addr}: probe `target` for me (indirect probe)
    GOSSIP = 4       # {updates}: membership news only (a leave, a refutation)
    SYNC = 5         # {digest, members, reply}: anti-entropy push-pull of state summaries
    RECORDS = 6      # {origin, after, through, records, more}: replicated records, a chunk
    PULL = 7         # {origin, after}: send me `origin`'s records above `after`
    ROUTE = 8        # {lane, first, items}: messages / read receipts for this node, in order
    ROUTE_ACK = 9    # {lane, through}: applied every routed item up to `through`
    # Claims (PaxosLease, `meshd.mesh.paxoslease`; docs/claims.md): proposer -> voter ...
    LEASE_PREPARE = 10   # {resource, ballot}: promise me `ballot` (phase 1)
    LEASE_ACCEPT = 11    # {resource, ballot, owner, token, ttl}: accept this lease (phase 2)
    LEASE_RELEASE = 12   # {resource, owner, token, ballots}: drop it if it is exactly this
    LEASE_QUERY = 13     # {req, prefix, exact}: your unexpired leases under `prefix`
    # ... and voter -> proposer (`acceptor` is the voter's address as listed in --voters)
    LEASE_PROMISE = 14   # {resource, ballot, acceptor, lease}: lease = [] or
                         # [owner, ballot, token, remaining, ttl], its unexpired lease
    LEASE_ACCEPTED = 15  # {resource, ballot, acceptor}
    LEASE_REJECT = 16    # {resource, ballot, acceptor, promised, reason}
    LEASE_RELEASED = 17  # {resource, token, acceptor, released}
    LEASE_STATE = 18     # {req, acceptor, ok, leases, more}: leases = [[resource, owner,
                         # token, ballot, remaining, ttl], ...]


class MemberState(IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


def _digits(v: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' or '١', which int() refuses or
    reads as another number."""
    return v.isascii() and v.isdigit()


def address(v: Any, field: str = "address") -> str:
    """"host:port" with a port in 1..65535 and a host without blanks or control characters
    (a frame must not make us hand ZeroMQ an endpoint it cannot even parse)."""
    if not isinstance(v, str) or ":" not in v or len(v) > 300:
        raise InvalidArgument(f"{field} must be 'host:port'")
    host, _, port = v.rpartition(":")
    if not host or not _digits(port) or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{field} must be 'host:port' with a port in 1..65535")
    if not host.isprintable() or any(c.isspace() or c in "/*;" for c in host):
        raise InvalidArgument(f"{field} has a malformed host")
    return v


def parse_address(v: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'host', 'host:port' or '[v6]:port' -> (host, port). Port 0 is allowed (bind)."""
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif v.count(":") == 1:
        host, _, port = v.partition(":")
    else:
        host, port = v, ""
    if not host:
        raise InvalidArgument(f"no host in address {v!r}")
    if port and (not _digits(port) or int(port) > 65535):
        raise InvalidArgument(f"bad port in address {v!r}")
    return host, int(port) if port else default_port


def _update(v: Any) -> tuple[str, str, int, int]:
    if not isinstance(v, list) or len(v) != 4:
        raise InvalidArgument("a member update is [node_id, address, state, incarnation]")
    node, addr, state, inc = v
    if not _is_int(state) or state not in MemberState._value2member_map_:
        raise InvalidArgument("unknown member state")
    return (s.ident(node, "node_id"), address(addr), int(state),
            s.count(inc, "incarnation", 0, MAX_INCARNATION))


def _is_int(v: Any) -> bool:
    """A plain msgpack integer: not a bool, a float that equals one, or an array or map
    (which would not even be hashable for a lookup)."""
    return type(v) is int


def _updates(v: Any, limit: int = MAX_UPDATES) -> list[tuple[str, str, int, int]]:
    if not isinstance(v, list) or len(v) > limit:
        raise InvalidArgument(f"updates must be a list of at most {limit}")
    return [_update(u) for u in v]


def _digest(v: Any) -> dict[str, int]:
    if not isinstance(v, dict) or len(v) > MAX_ORIGINS:
        raise InvalidArgument("digest must be a map of origin -> version")
    return {s.ident(k, "origin"): s.count(x, "version", 0, 2**62) for k, x in v.items()}


def _seq(v: Any) -> int:
    return s.count(v, "seq", 0, 2**62)


def _records(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise InvalidArgument("records must be a list")
    return v                     # each record is validated by wire.records before use


_BODIES: dict[int, dict[str, Callable[[Any], Any]]] = {
    FrameType.PING: {"seq": _seq, "updates": _updates},
    FrameType.ACK: {"seq": _seq, "updates": _updates},
    FrameType.PING_REQ: {"seq": _seq, "target": lambda v: s.ident(v, "target"),
                         "target_addr": lambda v: address(v, "target_addr")},
    FrameType.GOSSIP: {"updates": _updates},
    FrameType.SYNC: {"digest": _digest,
                     "members": lambda v: _updates(v, MAX_MEMBERS),
                     "reply": lambda v: s.boolean(v, "reply")},
    FrameType.RECORDS: {"origin": lambda v: s.ident(v, "origin"),
                        "after": lambda v: s.count(v, "after", 0, 2**62),
                        "through": lambda v: s.count(v, "through", 0, 2**62),
                        "records": _records, "more": lambda v: s.boolean(v, "more")},
    FrameType.PULL: {"origin": lambda v: s.ident(v, "origin"),
                     "after": lambda v: s.count(v, "after", 0, 2**62)},
    FrameType.ROUTE: {"lane": lambda v: s.count(v, "lane", 0, 1),
                      "first": lambda v: s.count(v, "first", 1, 2**62),
                      "items": lambda v: _route_items(v)},
    FrameType.ROUTE_ACK: {"lane": lambda v: s.count(v, "lane", 0, 1),
                          "through": lambda v: s.count(v, "through", 0, 2**62)},
}

# --- claims (PaxosLease) bodies ------------------------------------------------------------

#: Ballots and tokens stay below this (msgpack and JSON carry them as plain integers).
MAX_BALLOT = 2**62
#: Lease seconds a frame may name at most (a day: far above any configured TTL).
MAX_LEASE_SECONDS = 86400.0
#: Ballots of one lease a release may name (the acquisition's renewals still unexpired).
MAX_RELEASE_BALLOTS = 16
#: Leases one LEASE_STATE frame carries at most (`more` says there were others).
MAX_STATE_LEASES = 1000
#: Why a voter refused: a higher promise, its restart quarantine, a full table, a TTL
#: beyond its bound.
REJECT_REASONS = frozenset({"ballot", "quarantine", "full", "ttl"})


def _ballot(v: Any, field: str = "ballot") -> int:
    return s.count(v, field, 0, MAX_BALLOT)


def _seconds(v: Any, field: str) -> float:
    """A finite number of seconds in [0, MAX_LEASE_SECONDS] (a bool is not one)."""
    if type(v) not in (int, float) or not 0 <= v <= MAX_LEASE_SECONDS:   # (NaN fails too)
        raise InvalidArgument(f"{field} must be seconds in [0, {MAX_LEASE_SECONDS:g}]")
    return float(v)


def _resource(v: Any, field: str = "resource") -> str:
    return s.ident(v, field)


def _lease(v: Any) -> list[Any]:
    """[] or [owner, ballot, token, remaining, ttl]."""
    if not isinstance(v, list) or len(v) not in (0, 5):
        raise InvalidArgument("lease must be [] or [owner, ballot, token, remaining, ttl]")
    if not v:
        return []
    owner, ballot, token, remaining, ttl = v
    return [s.ident(owner, "owner"), _ballot(ballot), _ballot(token, "token"),
            _seconds(remaining, "remaining"), _seconds(ttl, "ttl")]


def _release_ballots(v: Any) -> list[int]:
    if not isinstance(v, list) or not 0 < len(v) <= MAX_RELEASE_BALLOTS:
        raise InvalidArgument(f"ballots must be a list of 1 to {MAX_RELEASE_BALLOTS}")
    return [_ballot(b) for b in v]


def _state_leases(v: Any) -> list[list[Any]]:
    if not isinstance(v, list) or len(v) > MAX_STATE_LEASES:
        raise InvalidArgument(f"leases must be a list of at most {MAX_STATE_LEASES}")
    out = []
    for item in v:
        if not isinstance(item, list) or len(item) != 6:
            raise InvalidArgument("a lease is [resource, owner, token, ballot, remaining, ttl]")
        res, owner, token, ballot, remaining, ttl = item
        out.append([_resource(res), s.ident(owner, "owner"), _ballot(token, "token"),
                    _ballot(ballot), _seconds(remaining, "remaining"), _seconds(ttl, "ttl")])
    return out


def _reason(v: Any) -> str:
    if v not in REJECT_REASONS:
        raise InvalidArgument("unknown reject reason")
    return str(v)


_LEASE_BODIES: dict[int, dict[str, Callable[[Any], Any]]] = {
    FrameType.LEASE_PREPARE: {"resource": _resource, "ballot": _ballot},
    FrameType.LEASE_ACCEPT: {"resource": _resource, "ballot": _ballot,
                             "owner": lambda v: s.ident(v, "owner"),
                             "token": lambda v: _ballot(v, "token"),
                             "ttl": lambda v: _seconds(v, "ttl")},
    FrameType.LEASE_RELEASE: {"resource": _resource, "owner": lambda v: s.ident(v, "owner"),
                              "token": lambda v: _ballot(v, "token"),
                              "ballots": _release_ballots},
    FrameType.LEASE_QUERY: {"req": _seq, "prefix": lambda v: s.text(v, "prefix", s.MAX_ID_LEN),
                            "exact": lambda v: s.boolean(v, "exact")},
    FrameType.LEASE_PROMISE: {"resource": _resource, "ballot": _ballot,
                              "acceptor": lambda v: address(v, "acceptor"), "lease": _lease},
    FrameType.LEASE_ACCEPTED: {"resource": _resource, "ballot": _ballot,
                               "acceptor": lambda v: address(v, "acceptor")},
    FrameType.LEASE_REJECT: {"resource": _resource, "ballot": _ballot,
                             "acceptor": lambda v: address(v, "acceptor"),
                             "promised": lambda v: _ballot(v, "promised"), "reason": _reason},
    FrameType.LEASE_RELEASED: {"resource": _resource, "token": lambda v: _ballot(v, "token"),
                               "acceptor": lambda v: address(v, "acceptor"),
                               "released": lambda v: s.boolean(v, "released")},
    FrameType.LEASE_STATE: {"req": _seq, "acceptor": lambda v: address(v, "acceptor"),
                            "ok": lambda v: s.boolean(v, "ok"), "leases": _state_leases,
                            "more": lambda v: s.boolean(v, "more")},
}
_BODIES.update(_LEASE_BODIES)

#: Fields a frame may carry, checked when present (added after version 1 shipped, so a
#: peer that does not send them is still understood).
_OPTIONAL: dict[int, dict[str, Callable[[Any], Any]]] = {
    # PING: the node id the prober means. Another node now at that address (a host
    # reinstalled with a new identity) must not answer for the old one.
    FrameType.PING: {"node": lambda v: s.ident(v, "node")},
}

MAX_ROUTE_ITEMS = 4096


def _route_items(v: Any) -> list[list[Any]]:
    """[[seq, "msg" | "fwd", routed message] | [seq, "read", message_id], ...]; a bad item fails
    the whole frame (the sender resends from the last applied one)."""
    if not isinstance(v, list) or len(v) > MAX_ROUTE_ITEMS:
        raise InvalidArgument(f"items must be a list of at most {MAX_ROUTE_ITEMS}")
    out = []
    for item in v:
        if not isinstance(item, list) or len(item) != 3:
            raise InvalidArgument("a routed item is [seq, kind, payload]")
        seq, kind, payload = item
        seq = s.count(seq, "seq", 1, 2**62)
        if kind == "msg" or kind == "fwd":      # (fwd: for a session that moved)
            out.append([seq, kind, s.routed_message(payload)])
        elif kind == "read":
            out.append([seq, kind, s.ident(payload, "message_id")])
        else:
            raise InvalidArgument(f"unknown routed item kind {kind!r}")
    return out


#: Room a peer frame has beyond `max_frame_bytes`: one record or routed message can be as
#: large as the request that made it, plus its stamps and the frame's own fields, so the
#: largest write a client may make still replicates and routes (rather than blocking its
#: origin's replication or its outbox lane behind a frame nobody accepts).
FRAME_SLACK = 64 * 1024


def frame_limit(max_frame_bytes: int) -> int:
    """The largest peer frame sent or accepted when requests may be `max_frame_bytes`."""
    return max_frame_bytes + FRAME_SLACK


def encode(ftype: FrameType, sender: str, reply_to: str, body: dict[str, Any]) -> bytes:
    return pack([PEER_PROTOCOL_VERSION, int(ftype), sender, reply_to, body])


def decode(frame: bytes, max_bytes: int) -> tuple[FrameType, str, str, dict[str, Any]]:
    """Parse and validate a peer frame; raises a MeshError (ProtocolError, TooLarge,
    UnsupportedVersion, InvalidArgument) for anything to drop."""
    msg = unpack(frame, max_bytes)
    if not isinstance(msg, list) or len(msg) != 5:
        raise ProtocolError("peer frame must be [version, type, sender, reply_to, body]")
    version, ftype, sender, reply_to, body = msg
    if not _is_int(version):
        raise ProtocolError("peer protocol version must be an integer")
    if version not in SUPPORTED:
        raise UnsupportedVersion(f"peer protocol version {version!r} is not supported")
    if not _is_int(ftype) or ftype not in _BODIES:
        raise ProtocolError("unknown peer frame type")
    if not isinstance(body, dict):
        raise ProtocolError("peer frame body must be a map")
    spec = _BODIES[ftype]
    missing = [k for k in spec if k not in body]
    if missing:
        raise InvalidArgument(f"peer frame lacks {', '.join(missing)}")
    clean = {k: check(body[k]) for k, check in spec.items()}
    for k, check in _OPTIONAL.get(ftype, {}).items():
        if k in body:
            clean[k] = check(body[k])
    return FrameType(ftype), s.ident(sender, "sender"), address(reply_to, "reply_to"), clean
