"""Ask-and-wait and dispatch by capability: the rules, apart from the transports.

`ask` is the mesh's version of Serf's query: a REQUEST goes out and the caller waits for
the RESPONSE that replies to it (`in_reply_to`). The caller's inbox stream is opened
before the request is sent, so an answer that comes back at once is not missed. The wait's
decisions are `Asking`, without I/O; the blocking and asyncio hubs only carry them out.

`dispatch` sends work to one session that can do it. Which one, in this order:

1. only sessions that have the capability, are IDLE or ACTIVE (not WORKING, WAITING or
   OFFLINE: a session whose host is down reads OFFLINE), and are not the sender;
2. IDLE before ACTIVE;
3. the one dispatched to least recently (never before first), as recorded in shared
   memory under `meshd:dispatch:<capability>`, so every host and process follows the
   same rotation (two dispatches at the same instant may pick the same session: the
   record is last-writer-wins, not a lock);
4. a session on this host, then on a host that is alive, then one that is suspect;
5. the session id, so the choice is deterministic.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from meshd.errors import Timeout
from sessions.models import Message, MessageType, Session, SessionStatus

DISPATCH_PREFIX = "meshd:dispatch:"
#: How long a dispatch record is kept (a session not dispatched to for this long counts as
#: never dispatched to).
DISPATCH_TTL = 7 * 86400.0
_HOST_RANK = {"local": 0, None: 0, "alive": 1, "suspect": 2}


def dispatch_key(capability: str) -> str:
    return DISPATCH_PREFIX + capability


def choose(candidates: Iterable[Session], from_session: str,
           last: dict[str, float] | None) -> Session | None:
    """The session `dispatch` sends to (the rule of the module docstring), or None."""
    last = last if isinstance(last, dict) else {}
    ok = [s for s in candidates if s.session_id != from_session
          and s.status in (SessionStatus.IDLE, SessionStatus.ACTIVE)]
    if not ok:
        return None

    def rank(s: Session) -> tuple[Any, ...]:
        when = last.get(s.session_id)
        return (s.status != SessionStatus.IDLE,
                when if isinstance(when, (int, float)) else float("-inf"),
                _HOST_RANK.get(s.host_state, 3), s.session_id)

    return min(ok, key=rank)


def record(last: dict[str, float] | None, chosen: str, now: float | None = None
           ) -> dict[str, float]:
    """The dispatch record after choosing `chosen` (entries older than the TTL dropped)."""
    now = time.time() if now is None else now
    kept = {k: v for k, v in (last or {}).items()
            if isinstance(v, (int, float)) and now - v < DISPATCH_TTL}
    kept[chosen] = now
    return kept


def nobody(capability: str, found: list[Session], from_session: str) -> str:
    """Why no session qualified, for the NotFound error."""
    others = [s for s in found if s.session_id != from_session]
    if not others:
        return (f"no session has capability {capability!r} (list_sessions / "
                f"`sessions list` shows who is there)")
    busy = ", ".join(f"{s.session_id} ({s.status.value})" for s in others[:10])
    return (f"no IDLE or ACTIVE session has capability {capability!r}; those that have it "
            f"are busy or offline: {busy}")


def pick(found: list[Session], capability: str, from_session: str,
         last: dict[str, float] | None) -> Session:
    """The session to dispatch to, or NotFound saying why there is none."""
    from meshd.errors import NotFound
    chosen = choose(found, from_session, last)
    if chosen is None:
        raise NotFound(nobody(capability, found, from_session))
    return chosen


def record_ops(from_session: str, capability: str, last: dict[str, float] | None,
               chosen: str) -> list[Any]:
    """The memory writes that record a dispatch: the old entries of the key go, the new
    record stays (one current record per capability)."""
    from sessions import _ops as ops
    key = dispatch_key(capability)
    return [ops.memory_delete(key),
            ops.memory_set(from_session, key, record(last, chosen), ttl=DISPATCH_TTL,
                           tags=["meshd"])]


def answers(msg: Message | None, request_id: str) -> bool:
    return (msg is not None and msg.in_reply_to == request_id
            and msg.type == MessageType.RESPONSE)


class Asking:
    """One ask's wait for its answer, without I/O: started when the request is sent, it
    says how long to wait for the next message, which message is the answer, and the
    Timeout to raise when the time is up. `step` caps each wait (the asyncio hub waits
    in a worker thread, and a short step keeps it cancellable)."""

    __slots__ = ("from_session", "to_session", "timeout", "step", "request_id", "deadline")

    def __init__(self, from_session: str, to_session: str, timeout: float,
                 step: float | None = None) -> None:
        self.from_session = from_session
        self.to_session = to_session
        self.timeout = timeout
        self.step = step
        self.request_id: str | None = None
        self.deadline = 0.0

    def sent(self, request: Message, now: float) -> None:
        """The request went out at `now`: the time allowed runs from here."""
        self.request_id = request.message_id
        self.deadline = now + self.timeout

    def wait(self, now: float) -> float | None:
        """Seconds to wait for the next message, or None when the time is up."""
        remaining = self.deadline - now
        if remaining <= 0:
            return None
        return remaining if self.step is None else min(remaining, self.step)

    def answered(self, msg: Message | None) -> bool:
        return self.request_id is not None and answers(msg, self.request_id)

    def expired(self) -> Timeout:
        return Timeout(f"no reply from {self.to_session} to {self.request_id} within "
                       f"{self.timeout:g}s; the request was delivered and a late reply will "
                       f"be in {self.from_session}'s inbox")
