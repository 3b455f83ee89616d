"""The SDK's side of the local protocol, without I/O: what the clients say to the daemon and
how they read its answers, written once.

Three clients talk to the daemon: the blocking `Client`, the asyncio `AsyncClient` and the
blocking `MessageStream`. They differ only in how they wait (a poll loop, the event loop's
reader on ZeroMQ's descriptor, a worker thread), so, in the manner of h11 and of
python-zeroconf's core, everything else lives here and is fed bytes and the clock:

- `Exchange`: request ids, the frames to send (several calls to a batch frame where the
  client batches), which reply answers which call (a reply for an id we no longer wait for
  is dropped), the error a reply stands for, and each call's deadline;
- `decode` and `error_from`: a reply frame as (req_id, kind, body) items, and the SDK
  exception an error reply names;
- `Pages` and `collect_pages`: a paged list read, page after page, each row kept once;
- `Subscription` (in `_subscription`): a live stream's subscribe/ack/renew protocol.

The other decisions the blocking and asyncio APIs share are kept without I/O in the same
spirit: `asking.Asking` (an ask's wait) and `keepalive._Pinging` (a keep-alive's rules).

The shells own the sockets, the timers and the waiting; nothing here blocks or touches
a socket, so `tests/unit/test_sdk_core.py` runs it with bytes and a made-up clock.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from meshd.errors import InvalidArgument, MeshError, ProtocolError, Timeout, TooLarge, from_code
from meshd.wire.ipc import BATCH, BATCHABLE, ERROR, OK, decode_reply, encode_item, encode_items

#: Largest reply frame we unpack (the daemon bounds its own; this bounds a stranger's).
MAX_REPLY_BYTES = 1 << 30
#: Calls per batch frame at most (the daemon accepts up to MAX_BATCH_ITEMS).
BATCH_ITEMS = 256
#: Bytes a batch frame keeps free for its envelope, and a batched item for its share of it.
BATCH_ROOM, ITEM_ROOM = 64, 16

#: Rows asked for per page of a list read. The daemon bounds each answer (rows, and about
#: a frame's bytes), so a big registry or memory comes in several round trips instead of
#: one answer that would hold the daemon (and this process) for long.
PAGE_ROWS = 1000
#: Pages per call at most (a bound on the loop: 5 million rows).
MAX_PAGES = 10_000

#: One settled call: (req_id, answer, error). req_id is None for an error the daemon could
#: not tie to a request (it could not read that far); error is None for a success. Plain
#: tuples: the asyncio client settles tens of thousands of these a second.
Outcome = tuple["int | None", Any, "MeshError | None"]


def error_from(body: Any) -> MeshError:
    """The exception an error reply names, of the same class the daemon raised, so callers
    catch `NotFound` and not a generic remote error."""
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        return from_code(body["code"], str(body.get("message", "")))
    return ProtocolError(f"malformed error reply: {body!r}")


def decode(frame: bytes) -> list[tuple[Any, Any, Any]]:
    """The replies a frame carries as (req_id, kind, body), a batch reply flattened. A frame
    we cannot read gives none: it is not an answer to anything of ours, and a client must
    outlive garbage on its socket rather than fail a call over it."""
    try:
        rid, kind, body = decode_reply(frame, MAX_REPLY_BYTES)
    except MeshError:
        return []
    if kind != BATCH:
        return [(rid, kind, body)]
    return [(i[0], i[1], i[2]) for i in body if isinstance(i, list) and len(i) == 3]


class Call:
    """One request in flight: what it asked, and until when its caller waits."""

    __slots__ = ("req_id", "command", "limit", "deadline")

    def __init__(self, req_id: int, command: str, limit: float, deadline: float) -> None:
        self.req_id = req_id
        self.command = command
        self.limit = limit
        self.deadline = deadline

    def remaining(self, now: float) -> float:
        return self.deadline - now


class Exchange:
    """Requests and their replies on one connection, without the connection.

    `start` registers a call and queues its request; `next_frame`/`sent` hand the shell
    the frames to write; `receive` turns a frame read into outcomes for the calls it
    answers; `expire` gives up the calls whose deadline passed. A call forgotten
    (`forget`: its caller gave up, or it expired) before its request went out is not sent,
    and a reply that comes for it later is dropped.

    With `batching`, store commands queued together share a frame (the asyncio client
    pipelines); without, each request is a frame of its own (the blocking client has one
    call in flight). The two measure a request against the frame limit as they did
    before they shared this code: a lone request as its frame, a batchable item with room
    left for the batch envelope.
    """

    def __init__(self, max_frame_bytes: int, *, batching: bool = False) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.batching = batching
        self.calls: dict[int, Call] = {}
        self._ids = itertools.count(1)
        self._queue: list[tuple[int, bytes, bool]] = []    # (req_id, packed item, batchable)

    def _encode(self, command: str, args: dict[str, Any]) -> tuple[int, bytes]:
        req_id = next(self._ids)
        item = encode_item(req_id, command, args)
        if self.batching:
            size, over = len(item), len(item) > self.max_frame_bytes - ITEM_ROOM
        else:
            size = len(item) + 1                           # the frame: [version] + the item
            over = size > self.max_frame_bytes
        if over:
            raise TooLarge(f"request of {size} bytes is over the "
                           f"{self.max_frame_bytes}-byte limit")
        return req_id, item

    def start(self, command: str, args: dict[str, Any], now: float, limit: float) -> Call:
        """A call of `command`, waited for until `now + limit`; TooLarge (before anything
        is queued) when its request could never be sent."""
        req_id, item = self._encode(command, args)
        call = self.calls[req_id] = Call(req_id, command, limit, now + limit)
        self._queue.append((req_id, item, self.batching and command in BATCHABLE))
        return call

    def cast(self, command: str, args: dict[str, Any]) -> tuple[int, bytes]:
        """A request no call waits on (a stream's subscribe, ack, close: their answers
        are read by the stream's own rules), as (req_id, frame)."""
        req_id, item = self._encode(command, args)
        return req_id, encode_items([item])

    def next_frame(self) -> tuple[bytes, int] | None:
        """The next frame to write and how many queued requests it takes (pass that to
        `sent` once the frame went out), or None when nothing is waiting to go."""
        queue, calls = self._queue, self.calls
        items: list[bytes] = []
        size = taken = 0
        for req_id, item, batchable in queue:
            if req_id not in calls:                        # given up before it went out
                taken += 1
                continue
            if items and (not batchable or len(items) >= BATCH_ITEMS
                          or size + len(item) > self.max_frame_bytes - BATCH_ROOM):
                break
            items.append(item)
            size += len(item)
            taken += 1
            if not batchable:
                break
        if not items:
            del queue[:taken]
            return None
        return encode_items(items), taken

    def sent(self, taken: int) -> None:
        del self._queue[:taken]

    def receive(self, frame: bytes) -> list[Outcome]:
        """The calls this frame settles. A reply for an id not waited for (late, after its
        call timed out, or never ours) and anything that is not a reply are dropped."""
        out: list[Outcome] = []
        calls = self.calls
        for rid, kind, body in decode(frame):
            if kind != OK and kind != ERROR:
                continue
            if isinstance(rid, int) and calls.pop(rid, None) is not None:
                out.append((rid, body, None) if kind == OK else (rid, None, error_from(body)))
            elif rid is None and kind == ERROR:
                out.append((None, None, error_from(body)))
        return out

    def expire(self, now: float) -> list[Call]:
        """Give up (and return) the calls whose deadline is past."""
        gone = [c for c in self.calls.values() if c.deadline <= now]
        for c in gone:
            del self.calls[c.req_id]
        return gone

    def forget(self, req_id: int) -> None:
        self.calls.pop(req_id, None)

    def clear(self) -> None:
        """Forget every call and everything not yet sent (the connection is gone)."""
        self.calls.clear()
        self._queue.clear()

    @staticmethod
    def timeout_error(call: Call, path: str) -> Timeout:
        return Timeout(f"meshd on {path} did not answer {call.command} within {call.limit:g}s")


# --- paging ----------------------------------------------------------------------------------

def _identity(item: Any) -> Any:
    """What makes a row of a paged list the same row again: its id."""
    if not isinstance(item, dict):
        return None
    for k in ("entry_id", "message_id", "session_id"):      # (entries also name a session)
        if k in item:
            return item[k]
    inner = item.get("message")                              # message.sent rows
    return inner.get("message_id") if isinstance(inner, dict) else None


class Pages:
    """A paged list read being collected: ask at `offset`, `feed` each answer, until `done`.

    Pages are read one request each, so a list longer than a page is not a snapshot:
    rows written between two pages can shift the offsets. An item seen twice is kept
    once (by its id); a row removed meanwhile may make one of the rest be missed."""

    __slots__ = ("items", "offset", "done", "_seen", "_pages")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.offset = 0
        self.done = False
        self._seen: set[Any] = set()
        self._pages = 0

    def feed(self, answer: dict[str, Any]) -> bool:
        """Take one page's answer, {"items", "more"}; True when another page is wanted."""
        page = answer["items"]
        self._pages += 1
        self.offset += len(page)
        for item in page:
            key = _identity(item)
            if key is None or key not in self._seen:
                self._seen.add(key)
                self.items.append(item)
        if not answer["more"] or not page:
            self.done = True
            return False
        if self._pages >= MAX_PAGES:
            raise InvalidArgument(f"more than {MAX_PAGES} pages: narrow the query")
        return True


def collect_pages(fetch: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """All items of a paged read, page after page until the daemon says no more follow.
    `fetch({"offset": n})` returns one page's answer, {"items", "more"}."""
    pages = Pages()
    while pages.feed(fetch({"offset": pages.offset})):
        pass
    return pages.items


__all__ = ["Exchange", "Call", "Outcome", "Pages", "collect_pages", "decode", "error_from",
           "MAX_REPLY_BYTES", "PAGE_ROWS", "MAX_PAGES", "BATCH_ITEMS"]


class OverExchange:
    """What every client over an `Exchange` shares (blocking and asyncio alike)."""

    _exchange: Exchange

    @property
    def max_frame_bytes(self) -> int:
        """The largest request frame sent (the daemon's bound by default)."""
        return self._exchange.max_frame_bytes

    @max_frame_bytes.setter
    def max_frame_bytes(self, value: int) -> None:
        self._exchange.max_frame_bytes = value
