"""Unit tests of the pure layers: codec limits, validators, HLC, and the store itself."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.state.commands import Commands
from meshd.state.outbox import Outbox
from meshd.errors import InvalidArgument, ProtocolError, TooLarge, UnknownCommand, UnsupportedVersion
from meshd.state import Store
from meshd.state.hlc import HLC, physical_ms
from meshd.wire import codec
from meshd.wire.ipc import decode_request, encode_request, validate_args


def execute(store, command, args):
    """A validated command in its own transaction, as the SDK's directory mode runs it."""
    return Commands(store).execute(command, args)


def test_unpack_rejects_oversize_before_decoding():
    with pytest.raises(TooLarge):
        codec.unpack(b"\x90" * 101, 100)


@pytest.mark.parametrize("frame", [b"\xc1", b"\x92\x01", msgpack.packb({1: 2}),
                                   msgpack.packb(msgpack.ExtType(5, b"x"))])
def test_unpack_rejects_garbage(frame):
    with pytest.raises(ProtocolError):
        codec.unpack(frame, 1000)


def test_decode_request_errors_carry_the_req_id():
    with pytest.raises(UnsupportedVersion) as e:
        decode_request(msgpack.packb([99, 7, "node.info", {}]), 1000)
    assert e.value.req_id == 7
    with pytest.raises(ProtocolError):
        decode_request(msgpack.packb([1, "x", "node.info", {}]), 1000)
    with pytest.raises(UnknownCommand):
        validate_args("no.such", {})
    assert decode_request(encode_request(3, "node.info", {}), 1000) == (3, "node.info", {})


def _deep(n):
    v = 1
    for _ in range(n):
        v = [v]
    return v


@pytest.mark.parametrize("value", [object(), {1, 2}, {1: "x"}, 2**64, -(2**63) - 1,
                                   _deep(40)])
def test_check_value_rejects_what_msgpack_or_json_users_cannot_carry(value):
    with pytest.raises(InvalidArgument):
        codec.check_value(value)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text() | st.binary(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(json_like)
def test_every_checked_value_round_trips(value):
    checked = codec.check_value(value)
    assert codec.unpack(codec.pack(checked), 1 << 20) == checked


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 2**40)), max_size=50))
def test_hlc_only_grows_whatever_the_wall_clock_and_peers_do(steps):
    wall = [1_700_000_000.0]
    clock = HLC(0, lambda: wall[0])
    last = 0
    for jump, remote in steps:
        wall[0] += jump - 5          # the wall clock also steps back
        clock.witness(remote << 16)
        stamp = clock.now()
        assert stamp > last
        last = stamp


def test_hlc_ignores_stamps_far_in_the_future():
    clock = HLC(0, lambda: 1_700_000_000.0)
    far = (1_700_000_000_000 + 3_600_000) << 16
    assert clock.witness(far) is False and physical_ms(clock.now()) < 1_700_000_000_000 + 1000


def _args(cmd, **a):
    return validate_args(cmd, a)


def test_store_keeps_identity_and_counters_across_reopen(tmp_path):
    s = Store(tmp_path)
    node, v0 = s.node_id, s.version
    with s.write():
        execute(s, "session.register", _args("session.register", session_id="a",
                                             agent_name="A", agent_type="T"))
    v1 = s.version
    assert v1 == v0 + 1
    s.close()
    s2 = Store(tmp_path)
    with s2.write():
        pass
    assert s2.node_id == node and s2.version == v1
    assert execute(s2, "session.get", _args("session.get", session_id="a"))["host"] == node


def test_failed_request_in_savepoint_leaves_nothing(tmp_path):
    s = Store(tmp_path)
    msg = {"message_id": "m1", "type": "request", "from_session": "a", "to_session": "nobody",
           "subject": "s", "body": "b", "data": {}, "timestamp": "t", "in_reply_to": None}
    with s.write():
        with pytest.raises(RuntimeError):
            with s.savepoint():       # (to an unknown id: stored, waiting for it)
                execute(s, "message.send", _args("message.send", message=msg))
                raise RuntimeError("a later step of the same request failed")
    assert execute(s, "message.stats", {})["total_messages"] == 0
    assert execute(s, "message.list", _args("message.list", session_id="nobody")) == []
    assert s.take_events() == []


def test_reads_use_indexes(tmp_path):
    s = Store(tmp_path)
    plans = {
        "key": "SELECT * FROM memory m WHERE m.key = 'k' ORDER BY m.hlc DESC",
        "glob": "SELECT * FROM memory m WHERE m.key GLOB 'task_*'",
        "session": "SELECT * FROM memory m WHERE m.session_id = 's' ORDER BY m.hlc DESC",
        "tags": "SELECT entry_id FROM memory_tags WHERE tag IN ('a', 'b')",
        "inbox": "SELECT * FROM inbox i WHERE i.session_id = 's' ORDER BY i.seq",
        "origin": "SELECT * FROM memory WHERE origin = 'o' AND version > 5 ORDER BY version",
    }
    for name, sql in plans.items():
        plan = " ".join(r[-1] for r in s.conn.execute("EXPLAIN QUERY PLAN " + sql))
        assert "SCAN" not in plan.replace("SCAN CONSTANT", ""), f"{name}: {plan}"


def test_router_cache_counts_data_and_non_ascii_text():
    """The send cache's byte bound must see what a message really holds: its data, and
    text that is not ASCII at up to 4 bytes a character."""
    from meshd.mesh.routequeue import item_bytes as _item_bytes
    plain = [1, "msg", {"body": "x" * 1000, "subject": "s", "data": {}}]
    wide = [1, "msg", {"body": "é" * 1000, "subject": "s", "data": {}}]
    heavy = [1, "msg", {"body": "", "subject": "s", "data": {"blob": "y" * 1_000_000}}]
    assert 1000 < _item_bytes(plain) < 2000
    assert _item_bytes(wide) >= 2000
    assert _item_bytes(heavy) >= 1_000_000
    assert _item_bytes([1, "read", "message-id"]) < 1000
