"""The local API protocol between the SDK/CLI and the daemon (ZeroMQ DEALER -> ROUTER).

Every frame is one msgpack array.

Request (client -> daemon)::

    [version: int, req_id: int, command: str, args: map]

Reply (daemon -> client), echoing req_id::

    [req_id, OK,    result]                     # result: any value, per command
    [req_id, ERROR, {"code": str, "message": str}]
    [req_id, EVENT, {"sub": int, "seq": int, "message": map}]   # live stream push

Batch (several requests in one frame; the asyncio SDK sends one when calls are in flight
together, which saves a ZeroMQ message and a wake-up per call on both sides)::

    [version, 0, "batch", [[req_id, command, args], ...]]     # 1..MAX_BATCH_ITEMS items
    [nil, BATCH, [[req_id, kind, body], ...]]                 # the answers, in one or more
                                                              # frames, each under the limit

Only store commands (registry, messages, memory) may be batched; each item is validated
and answered on its own, exactly as if it had come alone.

A frame that cannot be parsed far enough to read its req_id is answered with req_id nil.
Error codes are the `code` attributes of `meshd.errors` (invalid_argument, not_found,
too_large, bad_request, unsupported_version, unknown_command, ...).

Live streams (`stream.subscribe`): the daemon pushes EVENT frames on the subscribe
request's req_id, each carrying the per-session inbox sequence number `seq` (or the
node-wide message sequence when no session is given). At most `window` events are pushed
beyond the last `stream.ack`ed cursor, so a slow client is never flooded and never loses
frames to a full queue; a subscription with no ack for `stream_idle_timeout` is closed.
A client that reconnects (or whose daemon restarted) subscribes again with its last
cursor and receives exactly the events after it: nothing missed, nothing twice.

Commands and their arguments are listed in COMMANDS below; the validators run in the SDK
before sending and again in the daemon on receipt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from meshd.errors import InvalidArgument, ProtocolError, UnknownCommand, UnsupportedVersion
from meshd.wire import schema as s
from meshd.wire.codec import pack, unpack

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

OK, ERROR, EVENT, BATCH = 0, 1, 2, 3
BATCH_COMMAND = "batch"
MAX_BATCH_ITEMS = 1024

_REQUIRED = object()
_ABSENT = object()     # optional argument that is left out of the result when not given

Validator = Callable[[Any], dict[str, Any]]


def _spec(**fields: tuple[Callable[..., Any], Any]) -> Validator:
    """Build an argument validator: each field is (check(value, name), default)."""

    def validate(args: Any) -> dict[str, Any]:
        if not isinstance(args, dict):
            raise InvalidArgument("args must be a map")
        unknown = [k for k in args if k not in fields]
        if unknown:
            raise InvalidArgument(f"unknown argument(s): {', '.join(map(str, unknown))}")
        out: dict[str, Any] = {}
        for name, (check, default) in fields.items():
            if name in args:
                out[name] = check(args[name], name)
            elif default is _REQUIRED:
                raise InvalidArgument(f"missing argument: {name}")
            elif default is not _ABSENT:
                out[name] = check(default, name)
        return out

    return validate


def _status(v: Any, f: str) -> str:
    return s.enum_value(v, s.SessionStatus, f)


def _opt_status(v: Any, f: str) -> str | None:
    return s.opt_enum(v, s.SessionStatus, f)


def _opt_msgtype(v: Any, f: str) -> str | None:
    return s.opt_enum(v, s.MessageType, f)


def _msgtypes(v: Any, f: str) -> list[str]:
    return [s.enum_value(x, s.MessageType, f) for x in s.str_list(v, f)]


#: The levels `node.monitor` filters on; how many past events it may ask for first.
MONITOR_LEVELS = ("debug", "info", "warning", "error")
MAX_MONITOR_BACKLOG = 256


def _monitor_level(v: Any, f: str) -> str:
    if v not in MONITOR_LEVELS:
        raise InvalidArgument(f"{f} must be one of {', '.join(MONITOR_LEVELS)}")
    return str(v)


def _backlog(v: Any, f: str) -> int:
    return s.count(v, f, 0, MAX_MONITOR_BACKLOG)


def _opt_count(v: Any, f: str) -> int | None:
    return None if v is None else s.count(v, f)


def _record(fn: Callable[[Any], dict[str, Any]]) -> Callable[[Any, str], dict[str, Any]]:
    return lambda v, f: fn(v)


R = _REQUIRED
SID = (s.ident, R)
#: A claim's TTL and how long an acquire may wait, in seconds, at most.
MAX_CLAIM_TTL = 3600.0
MAX_CLAIM_WAIT = 3600.0


def _claim_ttl(v: Any, f: str) -> float:
    ttl = s.ttl(v, f)
    if ttl is None or ttl > MAX_CLAIM_TTL:
        raise InvalidArgument(f"{f} must be a positive number of seconds up to {MAX_CLAIM_TTL:g}")
    return ttl


def _claim_wait(v: Any, f: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_CLAIM_WAIT:
        raise InvalidArgument(f"{f} must be a number of seconds in [0, {MAX_CLAIM_WAIT:g}]")
    return float(v)


def _opt_key(v: Any, f: str) -> str | None:
    return None if v is None else s.key(v, f)
#: Result pages of list commands (see PAGED): at most MAX_PAGE rows an answer.
MAX_PAGE = 1000
#: Versions `memory.history` answers at most; tags a memory watch may filter on.
MAX_HISTORY = 1000
MAX_WATCH_TAGS = 64


def _history_limit(v: Any, f: str) -> int | None:
    return None if v is None else s.count(v, f, 1, MAX_HISTORY)


def _watch_tags(v: Any, f: str) -> list[str]:
    tags = s.str_list(v, f)
    if len(tags) > MAX_WATCH_TAGS:
        raise InvalidArgument(f"{f} has more than {MAX_WATCH_TAGS} tags")
    return tags


def _limit(v: Any, f: str) -> int:
    return s.count(v, f, 1, MAX_PAGE)


PAGE = {"limit": (_limit, _ABSENT), "offset": (s.count, _ABSENT)}

@dataclass(frozen=True, slots=True)
class Command:
    """One command of the local API, declared once: how its arguments are checked and
    what kind of command it is. The SDK, the IPC server and the store read these flags
    instead of keeping lists of their own."""

    name: str
    validate: Validator
    served_by: str = "store"     # store (state layer, batchable), streams, node, mesh, claims
    read_only: bool = False      # reads only: no transaction to commit, no events
    journaled: bool = False      # acknowledged from the journal, folded into SQLite later
    paged: bool = False          # a list read: limit/offset, answered in pages (PAGED)
    answers: str | None = None   # "session" / "sessions": rows get the host's state

    @property
    def batchable(self) -> bool:
        """Only the store's commands may be items of a batch: streams are followed by
        pushes, and node and mesh commands are not the store's to group-commit."""
        return self.served_by == "store"


def _read(name: str, validate: Validator, **flags: Any) -> Command:
    return Command(name, validate, read_only=True, **flags)


_LIST = {"read_only": True, "paged": True}

REGISTRY: dict[str, Command] = {c.name: c for c in [
    # registry
    Command("session.register", _spec(
        session_id=SID, agent_name=(s.text, R), agent_type=(s.text, R),
        human_user=(s.opt_text, None), capabilities=(s.str_list, None),
        metadata=(s.mapping, None), location=(s.opt_text, None)), answers="session"),
    Command("session.unregister", _spec(session_id=SID)),
    Command("session.ping", _spec(session_id=SID)),
    _read("session.get", _spec(session_id=SID), answers="session"),
    Command("session.update_status", _spec(session_id=SID, status=(_status, R),
                                           current_task=(s.opt_text, _ABSENT))),
    Command("session.list", _spec(include_offline=(s.boolean, False), **PAGE),
            answers="sessions", **_LIST),
    Command("session.find", _spec(status=(_opt_status, None), agent_type=(s.opt_text, None),
                                  human_user=(s.opt_text, None),
                                  capability=(s.opt_text, None), **PAGE),
            answers="sessions", **_LIST),
    _read("session.stats", _spec()),
    Command("session.clear_offline", _spec()),
    Command("session.import", _spec(session=(_record(s.session_record), R))),
    # messages
    Command("message.send", _spec(message=(_record(s.message_record), R)), journaled=True),
    Command("message.list", _spec(session_id=SID, include_broadcasts=(s.boolean, True),
                                  message_type=(_opt_msgtype, None),
                                  unread_only=(s.boolean, False), **PAGE), **_LIST),
    _read("message.conversation", _spec(message_id=(s.ident, R))),
    Command("message.mark_read", _spec(session_id=SID, message_ids=(s.str_list, None))),
    _read("message.stats", _spec()),
    _read("message.status", _spec(message_id=(s.ident, R))),
    Command("message.sent", _spec(session_id=SID, **PAGE), **_LIST),
    # shared memory
    Command("memory.set", _spec(entry=(_record(s.entry_record), R)), journaled=True),
    _read("memory.get", _spec(key=(s.key, R))),
    Command("memory.get_all", _spec(key=(s.key, R), **PAGE), **_LIST),
    Command("memory.search", _spec(pattern=(s.key, R), **PAGE), **_LIST),
    Command("memory.by_tags", _spec(tags=(s.str_list, R), match_all=(s.boolean, False),
                                    **PAGE), **_LIST),
    Command("memory.by_session", _spec(session_id=SID, **PAGE), **_LIST),
    Command("memory.delete", _spec(key=(s.key, R), session_id=(s.opt_ident, None))),
    Command("memory.clear", _spec(session_id=(s.opt_ident, None))),
    _read("memory.stats", _spec()),
    Command("memory.touch", _spec(key=(s.key, R), ttl=(s.ttl, None),
                                  entry_id=(s.opt_ident, None))),
    _read("memory.history", _spec(key=(s.key, R), limit=(_history_limit, None))),
    # memory change events: a stream (acked and closed with stream.ack / stream.close)
    Command("memory.watch", _spec(prefix=(_opt_key, None), tags=(_watch_tags, None),
                                  cursor=(_opt_count, None), window=(_opt_count, None)),
            served_by="streams"),
    # the daemon itself and its mesh
    Command("node.info", _spec(), served_by="node", read_only=True),
    Command("mesh.peers", _spec(), served_by="mesh", read_only=True),
    Command("mesh.join", _spec(address=(s.address, R)), served_by="mesh"),
    Command("mesh.leave", _spec(), served_by="mesh"),
    Command("mesh.force_leave", _spec(node=(s.ident, R)), served_by="mesh"),
    # claims (leases with fencing tokens; served by the daemon's claims service, which may
    # ask the voters: answered when the round trips are done)
    Command("claim.acquire", _spec(resource=(s.key, R), session_id=SID,
                                   ttl=(_claim_ttl, 30.0), wait=(_claim_wait, 0.0)),
            served_by="claims"),
    Command("claim.renew", _spec(resource=(s.key, R), session_id=SID, token=(s.count, R)),
            served_by="claims"),
    Command("claim.release", _spec(resource=(s.key, R), session_id=SID, token=(s.count, R)),
            served_by="claims"),
    Command("claim.holder", _spec(resource=(s.key, R)), served_by="claims", read_only=True),
    Command("claim.list", _spec(prefix=(_opt_key, None)), served_by="claims", read_only=True),
    # live streams (served by the IPC layer, not the store)
    Command("stream.subscribe", _spec(session_id=(s.opt_ident, None),
                                      cursor=(_opt_count, None), types=(_msgtypes, None),
                                      window=(_opt_count, None)), served_by="streams"),
    Command("stream.ack", _spec(sub=(s.count, R), cursor=(s.count, R)), served_by="streams"),
    Command("stream.close", _spec(sub=(s.count, R)), served_by="streams"),
    # the daemon's own events, pushed like a stream (meshd.ipc.monitor): acked and closed
    # with stream.ack / stream.close
    Command("node.monitor", _spec(level=(_monitor_level, "info"), backlog=(_backlog, 0)),
            served_by="streams"),
]}

#: The argument validators by command name.
COMMANDS: dict[str, Validator] = {name: c.validate for name, c in REGISTRY.items()}
#: List commands that answer in pages: given `limit` (and `offset`), the answer is
#: {"items": [...], "more": bool}, the items also cut to about a frame's size; without
#: `limit`, a plain list, refused as too large past a bound (the SDK always pages).
PAGED = frozenset(name for name, c in REGISTRY.items() if c.paged)
#: Commands the store answers (the state layer's handlers, one per name).
STORE_COMMANDS = frozenset(name for name, c in REGISTRY.items() if c.served_by == "store")
READ_ONLY = frozenset(name for name in STORE_COMMANDS if REGISTRY[name].read_only)
#: Writes acknowledged from the journal (memory sets and sends).
JOURNALED = frozenset(name for name, c in REGISTRY.items() if c.journaled)


def validate_args(command: str, args: Any) -> dict[str, Any]:
    """Check a command's arguments; raises UnknownCommand or InvalidArgument."""
    validator = COMMANDS.get(command)
    if validator is None:
        raise UnknownCommand(f"unknown command {command!r}")
    return validator(args)


def encode_request(req_id: int, command: str, args: dict[str, Any],
                   version: int = PROTOCOL_VERSION) -> bytes:
    return pack([version, req_id, command, args])


def decode_request(frame: bytes, max_bytes: int) -> tuple[int, str, Any]:
    """Parse a request frame down to (req_id, command, raw args).

    Raises ProtocolError (with `.req_id` set when it could be read) for anything else.
    """
    msg = unpack(frame, max_bytes)
    if not isinstance(msg, list) or len(msg) != 4:
        raise ProtocolError("request must be [version, req_id, command, args]")
    version, req_id, command, args = msg
    if isinstance(req_id, bool) or not isinstance(req_id, int) or not 0 <= req_id < 2**63:
        raise ProtocolError("req_id must be a non-negative 64-bit integer")
    err: ProtocolError | None = None
    if isinstance(version, bool) or not isinstance(version, int):
        err = ProtocolError("version must be an integer")
    elif version not in SUPPORTED_VERSIONS:
        err = UnsupportedVersion(f"protocol version {version} is not supported "
                                 f"(this daemon speaks {sorted(SUPPORTED_VERSIONS)})")
    elif not isinstance(command, str):
        err = ProtocolError("command must be a string")
    if err is not None:
        err.req_id = req_id  # type: ignore[attr-defined]
        raise err
    return req_id, command, args


def encode_item(req_id: int, command: str, args: dict[str, Any]) -> bytes:
    """One request of a batch, packed on its own so its size can be checked."""
    return pack([req_id, command, args])


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_REQUEST_HEAD = pack(PROTOCOL_VERSION)
_BATCH_HEAD = b"\x94" + _REQUEST_HEAD + pack(0) + pack(BATCH_COMMAND)
_BATCH_REPLY_HEAD = b"\x93" + pack(None) + pack(BATCH)


def encode_items(items: list[bytes]) -> bytes:
    """The frame for packed items (`encode_item`): a plain request for one, else a batch.
    Built by concatenation: msgpack arrays are their header followed by their elements."""
    if len(items) == 1:
        return b"\x94" + _REQUEST_HEAD + items[0][1:]       # [v] + the item's 3 elements
    return _BATCH_HEAD + _array_header(len(items)) + b"".join(items)


def decode_items(args: Any) -> list[tuple[int | None, Any, Any]]:
    """The items of a batch request as (req_id, command, args); an item that is not
    [req_id, command, args] comes back as (req_id or None, None, reason)."""
    if not isinstance(args, list) or not 0 < len(args) <= MAX_BATCH_ITEMS:
        raise ProtocolError(f"a batch is a list of 1 to {MAX_BATCH_ITEMS} requests")
    out: list[tuple[int | None, Any, Any]] = []
    for item in args:
        if not isinstance(item, list) or len(item) != 3:
            out.append((None, None, "a batch item must be [req_id, command, args]"))
            continue
        req_id, command, raw = item
        if isinstance(req_id, bool) or not isinstance(req_id, int) or not 0 <= req_id < 2**63:
            out.append((None, None, "req_id must be a non-negative 64-bit integer"))
        elif not isinstance(command, str):
            out.append((req_id, None, "command must be a string"))
        else:
            out.append((req_id, command, raw))
    return out


def encode_batch_replies(replies: list[bytes], max_bytes: int) -> list[bytes]:
    """Frames carrying packed replies (`encode_reply`), each at most about `max_bytes`
    (one reply larger than that goes alone)."""
    frames: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for r in replies:
        if group and size + len(r) > max_bytes:
            frames.append(_BATCH_REPLY_HEAD + _array_header(len(group)) + b"".join(group))
            group, size = [], 0
        group.append(r)
        size += len(r)
    if group:
        frames.append(_BATCH_REPLY_HEAD + _array_header(len(group)) + b"".join(group))
    return frames


def encode_reply(req_id: int | None, kind: int, body: Any) -> bytes:
    return pack([req_id, kind, body])


def encode_error(req_id: int | None, code: str, message: str) -> bytes:
    return pack([req_id, ERROR, {"code": code, "message": message}])


def is_batch_reply(frame: bytes) -> bool:
    """Whether a reply frame carries the replies of a batch's items (without decoding it)."""
    return frame.startswith(_BATCH_REPLY_HEAD)


def decode_reply(frame: bytes, max_bytes: int) -> tuple[int | None, int, Any]:
    msg = unpack(frame, max_bytes)
    if not isinstance(msg, list) or len(msg) != 3 or msg[1] not in (OK, ERROR, EVENT, BATCH):
        raise ProtocolError("reply must be [req_id, kind, body]")
    if msg[1] == BATCH and not isinstance(msg[2], list):
        raise ProtocolError("a batch reply's body must be a list of replies")
    return msg[0], msg[1], msg[2]

#: Commands that may be items of a batch (see Command.batchable).
BATCHABLE = frozenset(name for name, c in REGISTRY.items() if c.batchable)
