"""`sessions import`: the seed tool's `.sessions/` JSON files brought into meshd.

People move from the JSON-file tool with their data, so every record keeps its own
identity (session id, message id, entry id) and times: that is what makes a second
import a no-op, and what keeps threads, inbox order and "newest entry" meaning what they
meant. One bad record, or one bad file, never stops the rest.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

from meshd.wire.ipc import validate_args
from sessions import _ops as ops
from sessions.collaboration import CollaborationHub
from sessions.errors import DaemonUnavailable, InvalidArgument, SessionsError, Timeout
from sessions.memory import SharedMemory
from sessions.models import MemoryEntry, Message
from sessions.registry import SessionRegistry

__all__ = ["ImportReport", "KindReport", "Skip", "import_seed", "seed_directory",
           "SESSIONS_FILE", "MESSAGES_FILE", "MEMORY_FILE"]

SESSIONS_FILE = "active_sessions.json"
MESSAGES_FILE = "messages/recent_messages.json"
MEMORY_FILE = "shared_memory/memory.json"

_MESSAGE_FIELDS = ("message_id", "type", "from_session", "to_session", "subject", "body",
                   "data", "timestamp", "in_reply_to")
_ENTRY_FIELDS = ("entry_id", "type", "key", "value", "session_id", "timestamp", "ttl", "tags",
                 "metadata")
_TIMES = ("started_at", "last_ping")

Item = str | int
Records = list[tuple[Item, Any]]


@dataclass
class Skip:
    """A record left out, so the user can fix it and import again (only the fixed
    records are then new). `item` is the record's id, else its place in the file (list
    index, or `key[i]` in a memory map); None means the whole file."""

    file: str
    item: Item | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "item": self.item, "reason": self.reason}


@dataclass
class KindReport:
    """What became of one file's records. `already` counts those an earlier import brought
    in (left untouched), so a second run reads imported 0 and changes nothing. `status`
    is "read", "not found" (no file is no error: the seed wrote them lazily) or
    "unreadable" (with a Skip of item None saying why)."""

    file: str
    status: str = "not found"
    imported: int = 0
    already: int = 0
    skipped: list[Skip] = field(default_factory=list)

    def skip(self, item: Item | None, reason: str) -> None:
        self.skipped.append(Skip(self.file, item, reason))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "status": self.status, "imported": self.imported,
                "already": self.already, "skipped": len(self.skipped),
                "skips": [s.to_dict() for s in self.skipped]}


@dataclass
class ImportReport:
    """The outcome of one import, per kind of record; `source` is the `.sessions`
    directory that was read."""

    source: str
    sessions: KindReport = field(default_factory=lambda: KindReport(SESSIONS_FILE))
    messages: KindReport = field(default_factory=lambda: KindReport(MESSAGES_FILE))
    memory: KindReport = field(default_factory=lambda: KindReport(MEMORY_FILE))

    @property
    def kinds(self) -> dict[str, KindReport]:
        return {"sessions": self.sessions, "messages": self.messages, "memory": self.memory}

    @property
    def skipped(self) -> list[Skip]:
        return [s for k in self.kinds.values() for s in k.skipped]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, **{n: k.to_dict() for n, k in self.kinds.items()}}


def seed_directory(path: str | os.PathLike[str]) -> Path:
    """The `.sessions` directory: PATH itself, or PATH/.sessions when there is one (users
    give either the project they ran the seed tool in or its data directory)."""
    p = Path(path).expanduser()
    if (p / ".sessions").is_dir():
        return p / ".sessions"
    if p.is_dir():
        return p
    raise InvalidArgument(f"{p} is not a directory: give the seed's .sessions directory "
                          "or the directory that holds it")


def import_seed(path: str | os.PathLike[str], registry: SessionRegistry,
                hub: CollaborationHub, memory: SharedMemory) -> ImportReport:
    """Import the seed's sessions, then messages (so that they reach the imported
    sessions' inboxes), then memory. Raises only when PATH is not a directory, or when
    the daemon is gone (DaemonUnavailable, Timeout): importing again is safe, so the
    user simply reruns it."""
    root = seed_directory(path)
    report = ImportReport(str(root))
    if (data := _load(root, report.sessions)) is not None:
        _import_sessions(_listed(data, "sessions", "session_id", report.sessions),
                         registry, hub, report.sessions)
    if (data := _load(root, report.messages)) is not None:
        _import_messages(_listed(data, "messages", "message_id", report.messages),
                         hub, report.messages)
    if (data := _load(root, report.memory)) is not None:
        _import_memory(_memory_records(data, report.memory), memory, report.memory)
    return report


# --- reading the files -----------------------------------------------------------------------

def _load(root: Path, kind: KindReport) -> Any:
    """The file's JSON, or None when it is missing or cannot be read (noted in `kind`)."""
    try:
        data = json.loads((root / kind.file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        reason = f"not valid JSON: {exc}"
    except (OSError, UnicodeDecodeError) as exc:
        reason = f"unreadable: {exc}"
    else:
        kind.status = "read"
        return data
    kind.status = "unreadable"
    kind.skip(None, reason)
    return None


def _unwrap(data: Any, wrapper: str, id_field: str) -> Any:
    """`{wrapper: records}` -> records, unless the map is itself keyed by id and one id
    happens to be `wrapper` (then its value is a record, with `id_field`)."""
    if isinstance(data, dict) and wrapper in data:
        inner = data[wrapper]
        if isinstance(inner, list) or (isinstance(inner, dict) and id_field not in inner):
            return inner
    return data


def _label(rec: Any, id_field: str, fallback: Item) -> Item:
    v = rec.get(id_field) if isinstance(rec, dict) else None
    return v if isinstance(v, str) and v else fallback


def _listed(data: Any, wrapper: str, id_field: str, kind: KindReport) -> Records:
    """(label, record) from a list of records or a map {id: record}, either of them
    possibly under `wrapper`; a map's key stands in for a record's missing id."""
    data = _unwrap(data, wrapper, id_field)
    if isinstance(data, list):
        pairs: Iterable[tuple[Item, Any]] = enumerate(data)
    elif isinstance(data, dict):
        pairs = ((k, {id_field: k, **v} if isinstance(v, dict) else v) for k, v in data.items())
    else:
        kind.skip(None, f"expected a list or a map of {wrapper}, not {type(data).__name__}")
        return []
    return [(_label(rec, id_field, at), rec) for at, rec in pairs]


def _memory_records(data: Any, kind: KindReport) -> Records:
    """Entries from {key: [entries]}, {key: entry}, a list of entries, or any of these
    under "entries"; a map's key stands in for an entry's missing key."""
    data = _unwrap(data, "entries", "entry_id")
    if not isinstance(data, dict):
        return _listed(data, "entries", "entry_id", kind)
    out: Records = []
    for key, v in data.items():
        many = isinstance(v, list)
        for i, rec in enumerate(v if many else [v]):
            rec = {"key": key, **rec} if isinstance(rec, dict) else rec
            out.append((_label(rec, "entry_id", f"{key}[{i}]" if many else key), rec))
    return out


def _epoch(v: Any) -> float:
    """Seconds since the epoch of a record's time; the seed wrote `datetime.now()`, so a
    time without a zone is local time."""
    if not isinstance(v, str):
        raise InvalidArgument(f"timestamp must be an ISO 8601 string, not {type(v).__name__}")
    try:
        return datetime.fromisoformat(v).timestamp()
    except ValueError:
        raise InvalidArgument(f"timestamp must be an ISO 8601 time; got {v!r}") from None


def _zoned(v: Any) -> Any:
    """A zoneless seed time made explicit in this process's zone, the user's, as the seed's
    was: the daemon would read it in its own zone, which may differ (a system service)."""
    try:
        t = datetime.fromisoformat(v)
    except (TypeError, ValueError):
        return v                           # the validator says what is wrong with it
    return t.astimezone().isoformat() if t.tzinfo is None else v


def _record(rec: Any, what: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise InvalidArgument(f"not a {what} record (a map) but {type(rec).__name__}")
    return rec


def _skip(kind: KindReport, item: Item, exc: SessionsError) -> None:
    """Note a record the SDK or daemon refused; a daemon that is gone refuses everything
    after it too, so that ends the import instead."""
    if isinstance(exc, (DaemonUnavailable, Timeout)):
        raise exc
    kind.skip(item, str(exc))


# --- importing ---------------------------------------------------------------------------------

def _store_new(ready: list[tuple[float, Item, dict[str, Any]]], kind: KindReport,
               present: Callable[[dict[str, Any]], bool],
               store: Callable[[dict[str, Any]], Any]) -> None:
    """Store the validated records the store lacks, in seed time order (ties in file
    order): the daemon orders inboxes, threads and a key's entries by arrival, so arriving
    in the seed's order keeps the seed's order."""
    for _, item, args in sorted(ready, key=lambda r: r[0]):
        try:
            if present(args):
                kind.already += 1
                continue
            store(args)
        except SessionsError as exc:
            _skip(kind, item, exc)
            continue
        kind.imported += 1


def _import_sessions(records: Records, registry: SessionRegistry, hub: CollaborationHub,
                     kind: KindReport) -> None:
    # A hub whose messages live apart from the registry must know the sessions too, or
    # the messages imported next would wait for them instead of reaching them.
    apart = hub._backend is not registry._backend
    for item, rec in records:
        try:
            rec = _record(rec, "session")
            op = ops.import_session({**rec, **{k: _zoned(rec[k]) for k in _TIMES if k in rec}})
            changed = registry._backend.run(op)
            if apart:
                hub._backend.run(op)
        except SessionsError as exc:
            _skip(kind, item, exc)
            continue
        kind.imported += bool(changed)
        kind.already += not changed


def _import_messages(records: Records, hub: CollaborationHub, kind: KindReport) -> None:
    ready = []
    for item, rec in records:
        try:
            rec = _record(rec, "message")
            if "to_session" not in rec:        # (None would make it a broadcast)
                raise InvalidArgument("to_session is missing (null for a broadcast)")
            msg = {f: rec.get(f) for f in _MESSAGE_FIELDS}
            msg["priority"] = rec.get("priority", "normal")
            args = validate_args("message.send", {"message": msg})
            ready.append((_epoch(rec.get("timestamp")), item, args))
        except SessionsError as exc:
            _skip(kind, item, exc)
    _store_new(ready, kind,
               lambda a: hub.get_message_status(a["message"]["message_id"]) is not None,
               lambda a: hub._backend.run(ops.Op("message.send", a, Message.from_dict,
                                                 echo="message")))


def _remaining_ttl(entry: dict[str, Any], born: float, now: float) -> Any:
    """meshd counts a ttl from when it stores the entry; the seed counted from the entry's
    timestamp. What is left of it, whole seconds rounded up; <= 0 means expired."""
    ttl = entry.get("ttl")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        return ttl                         # None (forever), or wrong: the validator says so
    return math.ceil(ttl - (now - born))


def _import_memory(records: Records, memory: SharedMemory, kind: KindReport) -> None:
    ready = []
    now = time.time()
    for item, rec in records:
        try:
            rec = _record(rec, "memory entry")
            born = _epoch(rec.get("timestamp"))
            entry = {f: rec.get(f) for f in _ENTRY_FIELDS}
            ttl = entry["ttl"] = _remaining_ttl(entry, born, now)
            if isinstance(ttl, int) and ttl <= 0:
                kind.skip(item, f"expired: its ttl of {rec['ttl']} s ran out "
                                f"{now - born - rec['ttl']:.0f} s ago")
                continue
            ready.append((born, item, validate_args("memory.set", {"entry": entry})))
        except SessionsError as exc:
            _skip(kind, item, exc)
    known: dict[str, set[str]] = {}        # key -> entry ids the store has, read once per key

    def ids(args: dict[str, Any]) -> set[str]:
        key = args["entry"]["key"]
        if key not in known:
            known[key] = {e.entry_id for e in memory.get_all(key)}
        return known[key]

    def store(args: dict[str, Any]) -> None:
        memory._backend.run(ops.Op("memory.set", args, MemoryEntry.from_dict, echo="entry"))
        ids(args).add(args["entry"]["entry_id"])

    _store_new(ready, kind, lambda a: a["entry"]["entry_id"] in ids(a), store)
