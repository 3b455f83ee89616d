"""The SDK's sans-IO core, with bytes and a made-up clock: no socket, no daemon. What the
blocking client, the asyncio client and the streams share is tested once here; the
daemon-level tests (tests/daemon/test_aio.py, test_streams.py, ...) run the shells."""

from __future__ import annotations

import logging

import pytest

from meshd.errors import RemoteError
from meshd.wire.codec import pack
from meshd.wire.ipc import (
    BATCH, ERROR, EVENT, OK, decode_items, decode_request, encode_reply, encode_request,
)
from sessions import (
    InvalidArgument, Message, MessageType, NotFound, ProtocolError, Timeout, TooLarge,
)
from sessions import _core
from sessions._core import BATCH_ITEMS, Exchange, Pages, collect_pages, decode, error_from
from sessions._subscription import ACK_EVERY, ACK_IDLE, RENEW_EVERY, SILENT_LIMIT, Subscription
from sessions.asking import Asking
from sessions.keepalive import KeepAlive

LIMIT = 1 << 20


def ok(rid: int | None, body: object) -> bytes:
    return encode_reply(rid, OK, body)


def err(rid: int | None, code: str, message: str) -> bytes:
    return encode_reply(rid, ERROR, {"code": code, "message": message})


def batch(*replies: list[object]) -> bytes:
    return pack([None, BATCH, list(replies)])


def sent_items(frame: bytes) -> list[tuple[int | None, str, object]]:
    """What the daemon reads from a frame: its requests as (req_id, command, args)."""
    req_id, command, args = decode_request(frame, LIMIT)
    if command == "batch":
        return [tuple(i) for i in decode_items(args)]  # type: ignore[misc]
    return [(req_id, command, args)]


# --- requests out ----------------------------------------------------------------------------

def test_a_lone_request_is_the_plain_request_frame() -> None:
    ex = Exchange(LIMIT)
    call = ex.start("memory.get", {"key": "k"}, now=10.0, limit=5.0)
    frame, taken = ex.next_frame()
    assert frame == encode_request(call.req_id, "memory.get", {"key": "k"})
    assert taken == 1 and call.deadline == 15.0
    ex.sent(taken)
    assert ex.next_frame() is None


def test_ids_are_fresh_for_every_request() -> None:
    ex = Exchange(LIMIT)
    ids = [ex.start("memory.get", {"key": "k"}, 0.0, 1.0).req_id for _ in range(3)]
    ids.append(ex.cast("stream.ack", {"sub": 1, "cursor": 2})[0])
    assert len(set(ids)) == 4


def test_batching_groups_store_commands_and_sends_others_alone() -> None:
    ex = Exchange(LIMIT, batching=True)
    a = ex.start("memory.set", {"x": 1}, 0.0, 1.0)
    b = ex.start("memory.get", {"key": "k"}, 0.0, 1.0)
    c = ex.start("node.info", {}, 0.0, 1.0)             # not batchable: a frame of its own
    d = ex.start("memory.get", {"key": "j"}, 0.0, 1.0)
    frames = []
    while (out := ex.next_frame()) is not None:
        frames.append(sent_items(out[0]))
        ex.sent(out[1])
    assert [[i[0] for i in f] for f in frames] == [[a.req_id, b.req_id], [c.req_id],
                                                   [d.req_id]]


def test_a_batch_holds_at_most_batch_items_and_about_a_frame() -> None:
    ex = Exchange(LIMIT, batching=True)
    for _ in range(BATCH_ITEMS + 3):
        ex.start("memory.get", {"key": "k"}, 0.0, 1.0)
    frame, taken = ex.next_frame()
    assert taken == BATCH_ITEMS and len(sent_items(frame)) == BATCH_ITEMS
    small = Exchange(4096, batching=True)
    for _ in range(10):
        small.start("memory.get", {"key": "x" * 1000}, 0.0, 1.0)
    frame, taken = small.next_frame()
    assert taken == 3 and len(frame) <= 4096


def test_a_call_given_up_before_it_went_out_is_not_sent() -> None:
    ex = Exchange(LIMIT, batching=True)
    a = ex.start("memory.get", {"key": "a"}, 0.0, 1.0)
    b = ex.start("memory.get", {"key": "b"}, 0.0, 1.0)
    ex.forget(a.req_id)
    frame, taken = ex.next_frame()
    assert [i[0] for i in sent_items(frame)] == [b.req_id] and taken == 2
    ex.sent(taken)
    ex.forget(b.req_id)
    assert ex.next_frame() is None


def test_too_large_is_refused_before_anything_is_queued() -> None:
    lone = Exchange(200)
    with pytest.raises(TooLarge, match=r"request of \d+ bytes is over the 200-byte limit"):
        lone.start("memory.set", {"v": "x" * 300}, 0.0, 1.0)
    assert lone.calls == {} and lone.next_frame() is None
    # A lone request is measured as its frame; a batched one keeps room for the envelope.
    args = {"v": "x" * 170}
    size = len(encode_request(1, "memory.set", args))
    exact = Exchange(size)
    exact.start("memory.set", args, 0.0, 1.0)
    with pytest.raises(TooLarge):
        Exchange(size, batching=True).start("memory.set", args, 0.0, 1.0)


# --- replies in ------------------------------------------------------------------------------

def test_a_reply_settles_its_call_once() -> None:
    ex = Exchange(LIMIT)
    call = ex.start("memory.get", {"key": "k"}, 0.0, 1.0)
    assert ex.receive(ok(call.req_id, {"value": 1})) == [(call.req_id, {"value": 1}, None)]
    assert call.req_id not in ex.calls
    assert ex.receive(ok(call.req_id, {"value": 2})) == []        # a duplicate: dropped


def test_a_reply_for_an_unknown_or_abandoned_id_is_ignored() -> None:
    ex = Exchange(LIMIT)
    call = ex.start("memory.get", {"key": "k"}, 0.0, 1.0)
    assert ex.receive(ok(call.req_id + 100, "stray")) == []
    assert ex.receive(ok("not-an-id", "stray")) == []             # type: ignore[arg-type]
    ex.forget(call.req_id)                                         # the caller gave up
    assert ex.receive(ok(call.req_id, "late")) == []


def test_error_replies_become_the_daemons_exception_classes() -> None:
    ex = Exchange(LIMIT)
    a, b, c = (ex.start("session.get", {}, 0.0, 1.0) for _ in range(3))
    [(rid, answer, error)] = ex.receive(err(a.req_id, "not_found", "no session s1"))
    assert rid == a.req_id and answer is None
    assert type(error) is NotFound and str(error) == "no session s1"
    [(_, _, error)] = ex.receive(err(b.req_id, "made_up", "what"))
    assert isinstance(error, RemoteError) and error.code == "made_up"
    [(_, _, error)] = ex.receive(encode_reply(c.req_id, ERROR, "not a dict"))
    assert type(error) is ProtocolError and "malformed error reply" in str(error)
    assert type(error_from({"code": "invalid_argument", "message": "m"})) is InvalidArgument


def test_an_error_tied_to_no_request_is_reported_and_settles_nothing() -> None:
    ex = Exchange(LIMIT)
    call = ex.start("memory.get", {"key": "k"}, 0.0, 1.0)
    [(rid, _, error)] = ex.receive(err(None, "bad_request", "unreadable"))
    assert rid is None and isinstance(error, ProtocolError)
    assert call.req_id in ex.calls            # the shell decides: the blocking client's own


def test_garbage_and_events_settle_nothing() -> None:
    ex = Exchange(LIMIT)
    call = ex.start("memory.get", {"key": "k"}, 0.0, 1.0)
    assert decode(b"\xc1 not msgpack") == []
    assert ex.receive(b"\xc1") == [] and ex.receive(pack([1, 2])) == []
    assert ex.receive(encode_reply(call.req_id, EVENT, {"sub": 1})) == []
    assert call.req_id in ex.calls


def test_a_batch_reply_settles_each_of_its_calls() -> None:
    ex = Exchange(LIMIT, batching=True)
    a, b = (ex.start("memory.get", {"key": "k"}, 0.0, 1.0) for _ in range(2))
    out = ex.receive(batch([a.req_id, OK, 1], "junk", [b.req_id, ERROR,
                                                      {"code": "not_found", "message": "m"}]))
    assert [(o[0], o[1]) for o in out] == [(a.req_id, 1), (b.req_id, None)]
    assert isinstance(out[1][2], NotFound) and ex.calls == {}


# --- deadlines -------------------------------------------------------------------------------

def test_expire_gives_up_exactly_the_calls_past_their_deadline() -> None:
    ex = Exchange(LIMIT)
    short = ex.start("memory.get", {"key": "k"}, now=100.0, limit=0.5)
    long = ex.start("memory.get", {"key": "k"}, now=100.0, limit=5.0)
    assert ex.expire(100.4) == []
    assert ex.expire(100.5) == [short]
    assert list(ex.calls) == [long.req_id] and short.remaining(100.5) == 0.0
    assert ex.receive(ok(short.req_id, "late")) == []            # its late reply: dropped
    t = Exchange.timeout_error(short, "/run/meshd.sock")
    assert isinstance(t, Timeout)
    assert str(t) == "meshd on /run/meshd.sock did not answer memory.get within 0.5s"


def test_clear_forgets_calls_and_unsent_requests() -> None:
    ex = Exchange(LIMIT, batching=True)
    ex.start("memory.get", {"key": "k"}, 0.0, 1.0)
    ex.clear()
    assert ex.calls == {} and ex.next_frame() is None


# --- paging ----------------------------------------------------------------------------------

def test_pages_are_collected_and_an_item_seen_twice_is_kept_once() -> None:
    # A row inserted at the front between two pages shifts the second page by one.
    pages = [{"items": [{"session_id": "a"}, {"session_id": "b"}], "more": True},
             {"items": [{"session_id": "b"}, {"session_id": "c"}], "more": True},
             {"items": [{"entry_id": "e", "session_id": "a"}, 7, 7], "more": False}]
    asked: list[int] = []

    def fetch(at: dict[str, int]) -> dict[str, object]:
        asked.append(at["offset"])
        return pages[len(asked) - 1]

    items = collect_pages(fetch)
    assert asked == [0, 2, 4]
    # by id: b once; an entry is known by entry_id, not by the session it names; rows
    # with no id are all kept
    assert items == [{"session_id": "a"}, {"session_id": "b"}, {"session_id": "c"},
                     {"entry_id": "e", "session_id": "a"}, 7, 7]


def test_message_sent_rows_are_known_by_their_message_id() -> None:
    p = Pages()
    assert p.feed({"items": [{"message": {"message_id": "m"}, "state": "queued"}],
                   "more": True})
    assert not p.feed({"items": [{"message": {"message_id": "m"}, "state": "read"}],
                       "more": False})
    assert p.done and len(p.items) == 1


def test_an_empty_page_ends_the_read_even_if_more_is_claimed() -> None:
    p = Pages()
    assert not p.feed({"items": [], "more": True}) and p.done and p.items == []


def test_a_read_of_too_many_pages_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_core, "MAX_PAGES", 3)
    p = Pages()
    assert p.feed({"items": [1], "more": True}) and p.feed({"items": [2], "more": True})
    with pytest.raises(InvalidArgument, match="more than 3 pages"):
        p.feed({"items": [3], "more": True})


# --- streams ---------------------------------------------------------------------------------

def message(mid: str) -> dict[str, object]:
    return Message.new(MessageType.PING, "a", "b", "s", "b").to_dict() | {"message_id": mid}


def subscribed(cursor: int | None = None) -> tuple[Subscription, int]:
    s = Subscription("s1", cursor, [], 16)
    [(req, command, args)] = sent_items(s.subscribe())
    assert command == "stream.subscribe" and args["cursor"] == cursor
    assert s.feed(ok(req, {"sub": 9, "cursor": 5})) is False
    return s, req


def event(req: int, sub: int, seq: int) -> bytes:
    return encode_reply(req, EVENT, {"sub": sub, "seq": seq, "message": message(f"m{seq}")})


def test_a_subscription_takes_its_cursor_and_events_after_it() -> None:
    s, req = subscribed()
    assert s.sub == 9 and s.cursor == 5
    for seq in (4, 5, 6, 7):                     # at or below the cursor: dropped
        s.feed(event(req, 9, seq))
    s.feed(event(req, 8, 8))                     # another (replaced) subscription: dropped
    s.feed(event(req + 1, 9, 9))                 # on another request: dropped
    assert [s.take().message_id, s.take().message_id, s.take()] == ["m6", "m7", None]
    assert s.cursor == 7 and s.unacked == 2


def test_a_forgotten_subscription_resubscribes_from_the_last_cursor_handed_out() -> None:
    s, req = subscribed()
    s.feed(event(req, 9, 6))
    s.take()
    assert s.feed(err(123, "not_found", "no subscription 9")) is True and s.sub is None
    assert s.ack() is None and s.close() is None
    [(_, _, args)] = sent_items(s.subscribe())
    assert args["cursor"] == 6


def test_a_refused_subscribe_raises_and_other_errors_do_not() -> None:
    s = Subscription(None, None, [], 16)
    [(req, _, _)] = sent_items(s.subscribe())
    assert s.feed(err(req + 50, "invalid_argument", "an ack's problem")) is False
    with pytest.raises(InvalidArgument, match="bad window"):
        s.feed(err(req, "invalid_argument", "bad window"))


def test_when_a_stream_acks_renews_and_gives_up() -> None:
    s, req = subscribed()
    s.acked(now=100.0)
    assert not s.ack_now(100.0) and s.wait(100.0, None) == RENEW_EVERY
    s.feed(event(req, 9, 6))
    s.take()
    assert not s.ack_full()
    assert s.wait(100.0, None) == ACK_IDLE                  # a partial ack waits a little
    assert s.ack_now(100.0 + ACK_IDLE)
    assert s.wait(100.5, deadline=100.7) == pytest.approx(0.0)   # (ack overdue: don't wait)
    [(_, command, args)] = sent_items(s.ack())
    assert command == "stream.ack" and args == {"sub": 9, "cursor": 6}
    s.acked(100.5)
    assert s.wait(100.5, deadline=100.7) == pytest.approx(0.2)   # the caller's deadline
    assert s.ack_now(100.5 + RENEW_EVERY)                    # a renewal is due
    assert not s.silent(100.5 + SILENT_LIMIT) and s.silent(100.6 + SILENT_LIMIT)
    for seq in range(7, 7 + ACK_EVERY):
        s.feed(event(req, 9, seq))
    for _ in range(ACK_EVERY - 1):
        s.take()
        assert not s.ack_full()
    s.take()
    assert s.ack_full()


# --- ask and keep-alive ----------------------------------------------------------------------

def test_an_ask_waits_in_slices_for_the_response_to_its_request() -> None:
    ask = Asking("me", "you", timeout=2.5, step=1.0)
    request = Message.new(MessageType.REQUEST, "me", "you", "q", "?")
    ask.sent(request, now=10.0)
    assert ask.wait(10.0) == 1.0 and ask.wait(11.8) == pytest.approx(0.7)
    assert ask.wait(12.5) is None
    other = Message.new(MessageType.RESPONSE, "you", "me", "Re", "!", in_reply_to="x")
    assert not ask.answered(other) and not ask.answered(None)
    assert not ask.answered(Message.new(MessageType.REQUEST, "you", "me", "Re", "!",
                                        in_reply_to=request.message_id))
    assert ask.answered(Message.new(MessageType.RESPONSE, "you", "me", "Re", "!",
                                    in_reply_to=request.message_id))
    assert str(ask.expired()) == (f"no reply from you to {request.message_id} within 2.5s; "
                                  f"the request was delivered and a late reply will be in "
                                  f"me's inbox")


def test_keepalive_decisions(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError):
        KeepAlive(lambda s: True, "s1", interval=0)
    with pytest.raises(NotFound, match="no session s1 to keep alive"):
        KeepAlive(lambda s: False, "s1").start()
    k = KeepAlive(lambda s: True, "s1")
    with caplog.at_level(logging.WARNING, "sessions.keepalive"):
        k._later(True)
        k._later(False)
        k._later(Timeout("slow"))
    assert k.pings == 1
    assert [r.getMessage() for r in caplog.records] == [
        "keep-alive: session s1 is not registered any more",
        "keep-alive ping for s1 failed, retrying: slow"]


def test_shared_clients_are_bounded_and_the_least_recently_used_closes_its_socket(tmp_path):
    """A process that talks to many daemons in turn (this test suite does) must not pile up
    DEALER sockets until ZeroMQ refuses new ones (1023 per context)."""
    from sessions import _client

    first = _client.shared_client(str(tmp_path / "s0.sock"), 1.0)
    first._sock = _client.new_dealer(str(tmp_path / "s0.sock"))   # as after a call
    for i in range(1, _client.MAX_SHARED_CLIENTS + 5):
        _client.shared_client(str(tmp_path / f"s{i}.sock"), 1.0)
    assert len(_client._clients) <= _client.MAX_SHARED_CLIENTS
    assert first._sock is None                    # evicted: its socket closed
    again = _client.shared_client(str(tmp_path / "s0.sock"), 1.0)
    assert again is not first                     # a new client when asked again
