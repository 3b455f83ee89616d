"""`node.monitor`: a live feed of what this daemon sees and does (Serf's `monitor`).

Events come from the daemon's own log records (a handler on the `meshd` logger tree) and
from explicit structured events: code in the mesh logs with
``extra={"event": "member.dead", "fields": {...}}`` and the record becomes that event,
fields included; client errors (error replies of the local API) are taken from the
replies going out. Each event is a map::

    {"id": int, "time": float (epoch s), "level": "debug|info|warning|error",
     "source": logger name, "event": kind ("log" for plain records), "message": str,
     "fields": {str: scalar or list}}

A monitor subscription pushes EVENT frames on its request's req_id, like a stream
(`meshd.ipc.streams`): {"sub", "seq", "message": event}, seq counting from 1 per
subscription, at most `window` beyond the last `stream.ack`. What the client has not
taken waits in a bounded queue; past it the oldest events go, and the client then gets a
``monitor.dropped`` event saying how many. A subscription ends with `stream.close`, or
when its client stops acking for `stream_idle_timeout`. Subscriptions are few (a handful
per connection and in all): a monitor is an operator's tool. A new subscriber may ask
for the last `backlog` events first (the bus keeps a short ring of them, as Serf does).

Debug records are only produced while someone monitors at debug: the `meshd` logger is
lowered for that time, and the daemon's own log handlers keep their previous threshold.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from meshd.errors import InvalidArgument, NotFound, TooLarge
from meshd.ipc.streams import admit
from meshd.wire.codec import unpack
from meshd.wire.ipc import ERROR, EVENT, encode_reply, is_batch_reply

log = logging.getLogger("meshd.ipc.monitor")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
MAX_MESSAGE = 2000          # characters of an event's message
MAX_FIELDS = 32             # fields of an event
MAX_FIELD_TEXT = 500        # characters of a text field
#: Errors that are part of normal use (a lookup of something gone): debug, not info.
QUIET_ERRORS = frozenset({"not_found"})

SendFn = Callable[[bytes, bytes], bool]


@dataclass(frozen=True, slots=True)
class MonitorLimits:
    queue: int = 512         # events waiting per subscriber (then the oldest are dropped)
    window: int = 128        # events pushed beyond the last ack
    per_client: int = 4      # subscriptions per connection
    total: int = 16          # subscriptions in all
    backlog: int = 256       # recent events kept for new subscribers


@dataclass(slots=True, eq=False)
class MonitorSub:
    sub_id: int
    ident: bytes
    req_id: int
    level: int
    queue: deque[dict[str, Any]] = field(default_factory=deque)
    dropped: int = 0         # events lost since the last "dropped" notice
    sent: int = 0
    acked: int = 0
    last_seen: float = field(default_factory=time.monotonic)


def _scalar(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float)):
        return v
    text = v if isinstance(v, str) else str(v)
    return text[:MAX_FIELD_TEXT]


def clean_fields(fields: Any) -> dict[str, Any]:
    """Fields as plain msgpack/JSON values, bounded in number and size."""
    if not isinstance(fields, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in list(fields.items())[:MAX_FIELDS]:
        if isinstance(v, (list, tuple, set, frozenset)):
            out[str(k)] = [_scalar(x) for x in list(v)[:MAX_FIELDS]]
        else:
            out[str(k)] = _scalar(v)
    return out


def level_name(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    return "info" if levelno >= logging.INFO else "debug"


def record_event(record: logging.LogRecord) -> dict[str, Any]:
    try:
        message = record.getMessage()
    except Exception:                       # a bad format string must not lose the event
        message = str(record.msg)
    fields = clean_fields(getattr(record, "fields", None))
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        fields.setdefault("error", _scalar(f"{type(exc).__name__}: {exc}"))
    return {"time": record.created, "level": level_name(record.levelno),
            "source": record.name, "event": str(getattr(record, "event", "log")),
            "message": message[:MAX_MESSAGE], "fields": fields}


class _Quiet(logging.Filter):
    """Keeps a log handler at the threshold it had before a debug monitor lowered `meshd`."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.threshold or not record.name.startswith("meshd")


class _Handler(logging.Handler):
    def __init__(self, bus: "Monitor") -> None:
        super().__init__(logging.DEBUG)
        self.bus = bus

    def emit(self, record: logging.LogRecord) -> None:
        self.bus.take_record(record)


class Monitor:
    """The event bus and its subscriptions, for one IPC server."""

    def __init__(self, send: SendFn, idle_timeout: float,
                 limits: MonitorLimits | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.send = send
        self.idle_timeout = idle_timeout
        self.limits = limits or MonitorLimits()
        self.subs: dict[int, MonitorSub] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=self.limits.backlog)
        self.counters = {"events": 0, "pushed": 0, "dropped": 0, "refused": 0, "expired": 0}
        self._ids = itertools.count(1 << 48)     # apart from the streams' ids
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._incoming: deque[dict[str, Any]] = deque(maxlen=4 * self.limits.queue)
        self._scheduled = False
        self._flushing: int | None = None        # the thread flushing (its records: skipped)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._floor = logging.INFO               # records below it are not kept
        self._quiet: list[tuple[logging.Handler, _Quiet]] = []
        self._saved_level: int | None = None
        self.logger = logger or logging.getLogger("meshd")
        self.handler = _Handler(self)
        self.logger.addHandler(self.handler)

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        for sub in list(self.subs.values()):
            self._drop(sub)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- wiring into the IPC server --------------------------------------------------------------

    def install(self, local: dict[str, Callable[[bytes, int, dict[str, Any]], Any]],
                send: SendFn) -> SendFn:
        """Serve `node.monitor`, and the acks and closes of its subscriptions (the streams'
        commands: a monitor's sub id is never a stream's). Answers `send` tapped (`tap`)."""
        ack, close = local["stream.ack"], local["stream.close"]
        local["node.monitor"] = self.subscribe
        local["stream.ack"] = lambda i, r, a: (self.ack(i, a) if a["sub"] in self.subs
                                               else ack(i, r, a))
        local["stream.close"] = lambda i, r, a: (self.close_sub(i, a) if a["sub"] in self.subs
                                                 else close(i, r, a))
        return self.tap(send)

    def tap(self, send: SendFn) -> SendFn:
        """`send`, noting the error replies that go out (client errors) as events, also
        those among the replies of a batch frame's items (decoded only while someone
        monitors)."""
        def tapped(ident: bytes, frame: bytes) -> bool:
            if self.subs:
                if _is_error(frame):
                    self._client_error(frame)
                elif is_batch_reply(frame):
                    self._batch_errors(frame)
            return send(ident, frame)
        return tapped

    def _client_error(self, frame: bytes) -> None:
        try:
            self._error_event(unpack(frame, len(frame) + 1))
        except Exception:
            return

    def _batch_errors(self, frame: bytes) -> None:
        try:
            replies = unpack(frame, len(frame) + 1)[2]
            for reply in replies:
                if isinstance(reply, list) and len(reply) == 3 and reply[1] == ERROR:
                    self._error_event(reply)
        except Exception:
            return

    def _error_event(self, reply: list[Any]) -> None:
        req_id, _, body = reply
        code, message = str(body["code"]), str(body["message"])
        self.publish(logging.DEBUG if code in QUIET_ERRORS else logging.INFO, "client.error",
                     f"error reply {code}: {message}", {"code": code, "req_id": req_id})

    # --- events in -----------------------------------------------------------------------------

    def take_record(self, record: logging.LogRecord) -> None:
        if record.levelno < self._floor or self._flushing == threading.get_ident():
            return
        self._take(record_event(record), record.levelno)

    def publish(self, levelno: int, kind: str, message: str,
                fields: dict[str, Any] | None = None, source: str = "meshd.ipc") -> None:
        """An event of the IPC layer itself (not logged)."""
        if levelno < self._floor:
            return
        self._take({"time": time.time(), "level": level_name(levelno), "source": source,
                    "event": kind, "message": message[:MAX_MESSAGE],
                    "fields": clean_fields(fields)}, levelno)

    def _take(self, ev: dict[str, Any], levelno: int) -> None:
        ev["levelno"] = levelno
        with self._lock:
            ev["id"] = next(self._seq)
            self.counters["events"] += 1
            if levelno >= logging.INFO:
                self.recent.append(ev)
            if not self.subs or self._loop is None:
                return
            self._incoming.append(ev)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:                     # the loop is closed: nobody to tell
            self._scheduled = False

    def _flush(self) -> None:
        with self._lock:
            self._scheduled = False
            events = list(self._incoming)
            self._incoming.clear()
        self._flushing = threading.get_ident()
        try:
            for ev in events:
                for sub in self.subs.values():
                    if ev["levelno"] >= sub.level:
                        self._queue(sub, ev)
            for sub in list(self.subs.values()):
                self._pump(sub)
        finally:
            self._flushing = None

    def _queue(self, sub: MonitorSub, ev: dict[str, Any]) -> None:
        if len(sub.queue) >= self.limits.queue:
            sub.queue.popleft()
            sub.dropped += 1
            self.counters["dropped"] += 1
        sub.queue.append(ev)

    # --- subscriptions ---------------------------------------------------------------------------

    def subscribe(self, ident: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        level = LEVELS.get(args["level"])
        if level is None:
            raise InvalidArgument(f"level must be one of {', '.join(LEVELS)}")
        lim = self.limits
        try:
            admit("monitors", len(self.subs), lim.total,
                  sum(1 for s in self.subs.values() if s.ident == ident), lim.per_client)
        except TooLarge:
            self.counters["refused"] += 1
            raise
        self._loop = asyncio.get_running_loop()
        sub = MonitorSub(next(self._ids), ident, req_id, level)
        with self._lock:
            recent = [ev for ev in self.recent if ev["levelno"] >= level]
        for ev in recent[len(recent) - min(args["backlog"], len(recent)):]:
            self._queue(sub, ev)
        self.subs[sub.sub_id] = sub
        self._levels_changed()
        if self._timer is None:
            self._timer = self._loop.call_later(self.idle_timeout / 4, self._tick)
        self._loop.call_soon(self._pump, sub)    # after the answer goes out
        return {"sub": sub.sub_id, "cursor": 0, "level": args["level"],
                "backlog": len(sub.queue)}

    def _get(self, ident: bytes, sub_id: int) -> MonitorSub:
        sub = self.subs.get(sub_id)
        if sub is None or sub.ident != ident:
            raise NotFound(f"no monitor {sub_id} (expired or closed); subscribe again")
        return sub

    def ack(self, ident: bytes, args: dict[str, Any]) -> dict[str, Any]:
        sub = self._get(ident, args["sub"])
        sub.acked = max(sub.acked, min(args["cursor"], sub.sent))
        sub.last_seen = time.monotonic()
        self._pump(sub)
        return {"sub": sub.sub_id, "acked": sub.acked}

    def close_sub(self, ident: bytes, args: dict[str, Any]) -> bool:
        self._drop(self._get(ident, args["sub"]))
        return True

    def _drop(self, sub: MonitorSub) -> None:
        if self.subs.pop(sub.sub_id, None) is not None:
            sub.queue.clear()
            self._levels_changed()

    def _pump(self, sub: MonitorSub) -> None:
        """Push what the subscriber lacks, up to its window beyond its last ack."""
        if sub.sub_id not in self.subs:
            return
        while sub.sent - sub.acked < self.limits.window and (sub.queue or sub.dropped):
            if sub.dropped:
                ev = {"id": 0, "time": time.time(), "level": "warning",
                      "source": "meshd.ipc.monitor", "event": "monitor.dropped",
                      "message": f"dropped {sub.dropped} event(s): this monitor reads "
                                 f"too slowly", "fields": {"dropped": sub.dropped}}
            else:
                ev = sub.queue[0]
            body = {k: v for k, v in ev.items() if k != "levelno"}
            frame = encode_reply(sub.req_id, EVENT,
                                 {"sub": sub.sub_id, "seq": sub.sent + 1, "message": body})
            if not self.send(sub.ident, frame):
                return                           # its queue is full or it is gone: later
            sub.sent += 1
            self.counters["pushed"] += 1
            if sub.dropped:
                sub.dropped = 0
            else:
                sub.queue.popleft()

    def _tick(self) -> None:
        """Drop subscriptions whose client went quiet; retry pushes that did not go out."""
        self._timer = None
        cutoff = time.monotonic() - self.idle_timeout
        for sub in [s for s in self.subs.values() if s.last_seen < cutoff]:
            self._drop(sub)
            self.counters["expired"] += 1
            log.info("dropped an idle monitor subscription")
        for sub in list(self.subs.values()):
            self._pump(sub)
        if self.subs and self._loop is not None:
            self._timer = self._loop.call_later(self.idle_timeout / 4, self._tick)

    # --- debug records only while someone wants them ---------------------------------------------

    def _levels_changed(self) -> None:
        want = min((s.level for s in self.subs.values()), default=logging.INFO)
        self._floor = min(want, logging.INFO)
        debug = want <= logging.DEBUG
        if debug and self._saved_level is None:
            threshold = self.logger.getEffectiveLevel()
            if threshold <= logging.DEBUG:
                return                           # the daemon logs debug already
            self._saved_level = self.logger.level
            for h in [*logging.getLogger().handlers, *self.logger.handlers]:
                if h is not self.handler:
                    q = _Quiet(threshold)
                    h.addFilter(q)
                    self._quiet.append((h, q))
            self.logger.setLevel(logging.DEBUG)
        elif not debug and self._saved_level is not None:
            self.logger.setLevel(self._saved_level)
            self._saved_level = None
            for h, q in self._quiet:
                h.removeFilter(q)
            self._quiet.clear()

    def stats(self) -> dict[str, Any]:
        return {"subscriptions": len(self.subs), **self.counters,
                "queued": sum(len(s.queue) for s in self.subs.values())}


def _is_error(frame: bytes) -> bool:
    """Whether a reply frame ([req_id, kind, body]) is an error, without decoding it."""
    if len(frame) < 3 or frame[0] != 0x93:
        return False
    b = frame[1]
    width = 1 if b < 0x80 or b == 0xC0 else {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}.get(b)
    return width is not None and len(frame) > 1 + width and frame[1 + width] == ERROR
