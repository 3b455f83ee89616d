"""Memory change events, TTL renew and per-key history at the store level (no daemon):
what is logged for local sets, retries, replays, deletions, expiry and replicated entries
(in each origin's order, also when a later batch arrives before a gap is filled), the
bound with its gap, and the TTL rules of set and touch."""

from __future__ import annotations

import pytest

from meshd.errors import InvalidArgument, NotFound
from meshd.state import Store, memlog, memory, replication
from meshd.state.commands import Commands
from meshd.state.hlc import physical_ms
from meshd.state.outbox import Outbox
from meshd.wire import records
from meshd.wire.ipc import validate_args

_n = iter(range(10**9))


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def run(store: Store, command: str, **args):
    with store.write():
        return Commands(store).run(command, validate_args(command, args))


def put(store: Store, key: str, value=1, ttl=None, tags=None, eid=None):
    entry = {"entry_id": eid or f"e{next(_n)}", "type": "state", "key": key, "value": value,
             "session_id": "s1", "timestamp": "t", "ttl": ttl, "tags": tags or [],
             "metadata": {"m": 1}}
    run(store, "memory.set", entry=entry)
    return entry


def log(store: Store, cursor: int = 0, prefix=None, tags=None):
    with store.read():
        rows, _ = memlog.after(store, cursor, 10_000, prefix, frozenset(tags) if tags else None)
    return rows


def kinds(store: Store, **kw):
    return [(m["kind"], m["op"], m["key"]) for _, m in log(store, **kw)]


def test_local_sets_deletes_and_retries_are_logged_once(tmp_path):
    s = Store(tmp_path)
    e = put(s, "a/x", tags=["t1"])
    run(s, "memory.set", entry=e)                 # a client's retry: not stored, not logged
    put(s, "b/y")
    assert run(s, "memory.delete", key="a/x") == 1
    assert run(s, "memory.delete", key="nothing") == 0
    assert kinds(s) == [("put", "set", "a/x"), ("put", "set", "b/y"), ("delete", "delete", "a/x")]
    first = log(s)[0][1]
    assert first["entry"] is None             # deleted since: a re-read carries no entry
    assert log(s)[1][1]["entry"]["key"] == "b/y"
    assert first["origin"] == s.node_id and first["tags"] == ["t1"]
    # cursors are the log's seq, strictly increasing; after(cursor) resumes exactly
    seqs = [q for q, _ in log(s)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    assert [q for q, _ in log(s, cursor=seqs[0])] == seqs[1:]
    assert kinds(s, prefix="a/") == [("put", "set", "a/x"), ("delete", "delete", "a/x")]
    assert kinds(s, tags=["t1"]) == [("put", "set", "a/x"), ("delete", "delete", "a/x")]


def test_events_go_out_with_the_commit_and_not_with_a_rollback(tmp_path):
    s = Store(tmp_path)
    put(s, "k")
    events = [e for e in s.take_events() if e[0] == memlog.STREAM_KEY]
    assert len(events) == 1 and events[0][2]["entry"]["key"] == "k"
    with pytest.raises(RuntimeError):
        with s.write():
            memory.insert_entries(s, [({"entry_id": "x", "type": "state", "key": "k2",
                                        "value": 1, "session_id": "s", "timestamp": "t",
                                        "ttl": None, "tags": [], "metadata": {}},
                                       s.node_id, *s.stamp())])
            raise RuntimeError("rolled back")
    assert not [e for e in s.take_events() if e[0] == memlog.STREAM_KEY]
    with s.read():
        assert memlog.head(s) == 1


def test_expire_logs_the_newest_version_only(tmp_path):
    clock = Clock()
    s = Store(tmp_path, wall=clock)
    put(s, "old", ttl=5)
    put(s, "k", ttl=5)
    put(s, "k", ttl=100)                          # newer version: the old one expires unseen
    clock.t += 10
    with s.write():
        assert memory.purge_expired(s) == 2
    assert [k for k in kinds(s) if k[0] == "expire"] == [("expire", "expire", "old")]


def test_touch_renews_without_resending_and_the_ttl_rules(tmp_path):
    clock = Clock()
    s = Store(tmp_path, wall=clock)
    e = put(s, "k", value={"big": "v"}, ttl=10, tags=["t"])
    clock.t += 8
    t = run(s, "memory.touch", key="k")          # ttl None: the same length, from now
    assert t["value"] == {"big": "v"} and t["ttl"] == 10 and t["tags"] == ["t"]
    assert t["metadata"] == {"m": 1} and t["entry_id"].startswith(memlog.TOUCH_PREFIX)
    assert t["entry_id"] != e["entry_id"]
    clock.t += 5                                  # past the first TTL, within the renewed one
    assert run(s, "memory.get", key="k")["value"] == {"big": "v"}
    t2 = run(s, "memory.touch", key="k", ttl=1, entry_id="touch:fixed")
    assert t2["ttl"] == 1
    assert run(s, "memory.touch", key="k", ttl=50, entry_id="touch:fixed") == t2   # a retry
    clock.t += 2
    # touch's own ttl applies to the version it adds; reads show the newest live version,
    # so the earlier touch's (renewed at +8 for 10 s) shows until it runs out too
    assert run(s, "memory.get", key="k")["entry_id"] == t["entry_id"]
    clock.t += 4
    assert run(s, "memory.get", key="k") is None
    with pytest.raises(NotFound):
        run(s, "memory.touch", key="k")
    with pytest.raises(NotFound):
        run(s, "memory.touch", key="never")
    # a set's own ttl applies to its entry (None: it never expires); it leaves the TTLs of
    # earlier versions as they were
    put(s, "k", ttl=3)
    put(s, "k", ttl=None)
    clock.t += 10
    assert run(s, "memory.get", key="k")["ttl"] is None
    put(s, "k2", ttl=None)
    put(s, "k2", value="short", ttl=1)
    assert run(s, "memory.get", key="k2")["value"] == "short"
    clock.t += 2
    assert run(s, "memory.get", key="k2")["value"] == 1     # the earlier version shows again
    nt = run(s, "memory.touch", key="k")          # no TTL: still none
    assert nt["ttl"] is None
    with pytest.raises(InvalidArgument):
        validate_args("memory.touch", {"key": "k", "ttl": -1})


def test_history_is_bounded_per_key_newest_first(tmp_path):
    clock = Clock()
    s = Store(tmp_path, wall=clock, log_limits=memlog.LogLimits(max_rows=1000,
                                                                history_per_key=3))
    for i in range(5):
        put(s, "h", value=i, ttl=5)
    run(s, "memory.touch", key="h")
    run(s, "memory.delete", key="h")
    h = run(s, "memory.history", key="h")
    assert [v["op"] for v in h] == ["delete", "touch", "set"]
    assert h[2]["entry"] is None                  # removed by the delete: no longer held
    assert all(v["origin"] == s.node_id and v["hlc"] > 0 for v in h)
    put(s, "h", value="again")
    h = run(s, "memory.history", key="h", limit=1)
    assert len(h) == 1 and h[0]["op"] == "set" and h[0]["entry"]["value"] == "again"
    with pytest.raises(InvalidArgument):
        validate_args("memory.history", {"key": "h", "limit": 0})


def test_trim_keeps_the_bound_and_a_cursor_below_it_gets_a_gap(tmp_path):
    s = Store(tmp_path, log_limits=memlog.LogLimits(max_rows=5, history_per_key=2))
    for i in range(12):
        put(s, f"k{i}")
    with s.read():
        assert s.conn.execute("SELECT COUNT(*) FROM memlog").fetchone()[0] == 5
        assert memlog.trimmed_through(s) == 7 and memlog.head(s) == 12
    rows = log(s, cursor=2)
    assert rows[0] == (7, rows[0][1]) and rows[0][1]["kind"] == "gap"
    assert [q for q, _ in log(s, cursor=7)] == [8, 9, 10, 11, 12]
    # the seq is never reused, even after a restart
    s.close()
    s = Store(tmp_path)
    put(s, "after")
    with s.read():
        assert memlog.head(s) == 13


def test_migration_from_schema_5_adds_the_tables(tmp_path):
    s = Store(tmp_path)
    with s.write():
        for t in ("memlog", "memlog_parked", "memory_history"):
            s.conn.execute(f"DROP TABLE {t}")
        s.conn.execute("PRAGMA user_version=5")
    s.close()
    s = Store(tmp_path)
    put(s, "k")
    assert kinds(s) == [("put", "set", "k")]


def _ship(src: Store, dst: Store, after: int, through: int, recs: list[dict]) -> None:
    with dst.write():
        replication.apply(dst, Outbox(dst), src.node_id, after, through,
                          [records.record(r) for r in recs])


def test_replicated_changes_are_logged_in_their_origins_order(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    for k in ("k1", "k2", "k3"):
        put(a, k)
    with a.read():
        recs, through = replication.export(a, a.node_id, 0, 100)
    assert [r["version"] for r in recs] == [1, 2, 3]
    _ship(a, b, 2, 3, recs[2:])           # a later batch before the gap is filled: parked
    with b.write():
        assert memlog.flush_parked(b) == 0
    assert kinds(b) == []
    _ship(a, b, 0, 2, recs[:2])           # the gap: due now, in order
    with b.write():
        assert memlog.flush_parked(b) == 2
    assert [k for _, _, k in kinds(b)] == ["k1", "k2"]
    _ship(a, b, 2, 3, recs[2:])           # anti-entropy brings v3 again: knowledge moves
    with b.write():
        assert memlog.flush_parked(b) == 1
    got = log(b)
    assert [m["key"] for _, m in got] == ["k1", "k2", "k3"]
    assert [m["hlc"] for _, m in got] == sorted(m["hlc"] for _, m in got)
    assert all(m["origin"] == a.node_id and m["entry"] is not None for _, m in got)
    _ship(a, b, 0, 3, recs)               # records received twice are logged once
    with b.write():
        assert memlog.flush_parked(b) == 0
    assert len(log(b)) == 3
    run(a, "memory.delete", key="k1")     # a replicated deletion: a delete event at b
    with a.read():
        recs, _ = replication.export(a, a.node_id, 3, 100)
    _ship(a, b, 3, 4, recs)
    with b.write():
        assert memlog.flush_parked(b) == 1
    assert kinds(b)[-1] == ("delete", "delete", "k1")
    assert log(b)[-1][1]["origin"] == a.node_id


def test_watch_validation_is_bounded():
    with pytest.raises(InvalidArgument):
        validate_args("memory.watch", {"tags": [f"t{i}" for i in range(65)]})
    with pytest.raises(InvalidArgument):
        validate_args("memory.watch", {"prefix": "x" * 2000})
    with pytest.raises(InvalidArgument):
        validate_args("memory.watch", {"cursor": -1})
    assert validate_args("memory.watch", {})["prefix"] is None
    assert physical_ms(0) == 0
