"""A live stream's protocol with the daemon, without I/O: the state of one subscription and
the decisions of the loop that feeds it (when to ack, when to renew, when to give up on a
silent daemon), for `MessageStream` to carry out on its socket.

The daemon pushes EVENT frames on the subscribe request's id, at most `window` beyond
the last acked cursor; an ack also renews the subscription. When the daemon forgets us
(a restart, or no ack for too long) it answers an ack with not_found, and we subscribe
again from the last cursor handed out: events at or below it are dropped, so nothing is
delivered twice.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from meshd.config import Config
from meshd.wire.ipc import ERROR, EVENT, OK
from sessions._core import Exchange, decode, error_from
from sessions.models import Message

ACK_EVERY = 32            # events between acks
ACK_IDLE = 0.01           # s a partial ack waits for more events (saves acks under load)
RENEW_EVERY = 1.0         # s of silence between renewals (acks double as keep-alives)
RETRY_EVERY = 0.5         # s between attempts to (re)subscribe while the daemon is away
SUBSCRIBE_WAIT = 2.0      # s a subscribe waits for its answer
SILENT_LIMIT = 3 * RENEW_EVERY   # s without an answer to our acks before we reconnect


class Subscription:
    """One stream's subscription: its cursor, the events not yet handed out, and whether
    the daemon currently knows it (`sub`). Feed it the frames read; ask it for frames.
    A subclass follows another kind of stream (`command`, `args`, `convert`: see
    `sessions._memwatch`)."""

    #: The command that (re)subscribes; acks and closes are the same for every stream.
    command = "stream.subscribe"

    def __init__(self, session_id: str | None, cursor: int | None, types: list[str],
                 window: int, max_frame_bytes: int = Config().max_frame_bytes) -> None:
        self.session_id = session_id
        self.cursor = cursor
        self.types = types
        self.window = window
        self.sub: int | None = None          # the daemon's id for it; None: not subscribed
        self.unacked = 0                     # events handed out since the last ack
        self.last_renew = 0.0
        self.pending: deque[tuple[int, Message]] = deque()
        self._req: int | None = None         # the subscribe request events come back on
        self._exchange = Exchange(max_frame_bytes)

    def args(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "cursor": self.cursor, "types": self.types,
                "window": self.window}

    # --- frames to send ------------------------------------------------------------------------

    def subscribe(self) -> bytes:
        """The frame that (re)subscribes from our cursor; events of an older subscription
        are ignored from now on."""
        self.sub = None
        self._req, frame = self._exchange.cast(self.command, self.args())
        return frame

    def ack(self) -> bytes | None:
        """The frame acking (and renewing) up to our cursor, or None while unsubscribed.
        Call `acked` once it went out."""
        if self.sub is None or self.cursor is None:
            return None
        return self._exchange.cast("stream.ack", {"sub": self.sub, "cursor": self.cursor})[1]

    def acked(self, now: float) -> None:
        self.unacked = 0
        self.last_renew = now

    def close(self) -> bytes | None:
        """The frame that closes the subscription, or None when there is none."""
        if self.sub is None:
            return None
        return self._exchange.cast("stream.close", {"sub": self.sub})[1]

    # --- frames received -----------------------------------------------------------------------

    def feed(self, frame: bytes) -> bool:
        """Take a frame read from the socket. True when the daemon says it forgot us (then
        `sub` is None and the shell subscribes again); a refused subscribe raises."""
        forgotten = False
        for rid, kind, body in decode(frame):
            if kind == EVENT and rid == self._req and isinstance(body, dict):
                if body.get("sub") != self.sub or self.sub is None:
                    continue                          # from a subscription we replaced
                seq = body.get("seq")
                if isinstance(seq, int) and (self.cursor is None or seq > self.cursor):
                    self.pending.append((seq, self.convert(seq, body["message"])))
            elif rid == self._req and kind == OK:
                self.sub = body["sub"]
                if self.cursor is None:
                    self.cursor = body["cursor"]
            elif kind == ERROR and isinstance(body, dict):
                if body.get("code") == "not_found":   # a restart, or we were idle too long
                    self.sub = None
                    forgotten = True
                elif rid == self._req:
                    raise error_from(body)
        return forgotten

    def convert(self, seq: int, message: Any) -> Any:
        """An event's message as the stream hands it out."""
        return Message.from_dict(message)

    # --- the loop's decisions ------------------------------------------------------------------

    def take(self) -> Message | None:
        """The next message to hand out (advancing the cursor past it), or None."""
        if not self.pending:
            return None
        seq, msg = self.pending.popleft()
        self.cursor = seq
        self.unacked += 1
        return msg

    def ack_full(self) -> bool:
        """Whether a whole batch of events was handed out since the last ack (ack at once:
        the daemon pushes at most `window` beyond it)."""
        return self.unacked >= ACK_EVERY

    def ack_now(self, now: float) -> bool:
        """Whether to ack before waiting again: a partial batch waited long enough for
        more (one ack for many events under load), or a renewal is due."""
        since = now - self.last_renew
        return (self.unacked > 0 and since >= ACK_IDLE) or since >= RENEW_EVERY

    def wait(self, now: float, deadline: float | None, after_ack: bool = False) -> float:
        """How long to wait for frames now: until the next renewal, the caller's deadline,
        or a partial ack's turn, whichever comes first (`after_ack`: an ack was just
        tried, so the partial ack's clock starts again)."""
        since = 0.0 if after_ack else now - self.last_renew
        wait = RENEW_EVERY if deadline is None else min(RENEW_EVERY, deadline - now)
        if self.unacked:
            wait = min(wait, max(ACK_IDLE - since, 0.0))
        return max(wait, 0.0)

    def silent(self, now: float) -> bool:
        """Whether the daemon has answered none of our renewals for too long (then the
        shell drops the socket and reconnects)."""
        return now - self.last_renew > SILENT_LIMIT
