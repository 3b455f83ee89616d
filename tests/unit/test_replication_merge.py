"""The store-level merge: the same records in any order, duplicated or not, in any
grouping, give the same visible state on every node (property tests with hypothesis)."""

from __future__ import annotations

import random
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.state.commands import Commands
from meshd.state.outbox import Outbox
from meshd.state import Store, replication
from meshd.wire import records
from meshd.wire.ipc import validate_args

SIDS = ["s1", "s2", "s3"]
KEYS = ["k1", "k2", "k3"]

op = st.one_of(
    st.tuples(st.just("register"), st.sampled_from(SIDS), st.sampled_from(["Claude", "GPT"])),
    st.tuples(st.just("status"), st.sampled_from(SIDS), st.sampled_from(["idle", "working"])),
    st.tuples(st.just("unregister"), st.sampled_from(SIDS), st.none()),
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.integers(0, 9)),
    st.tuples(st.just("tagged"), st.sampled_from(KEYS), st.sampled_from(["a", "b"])),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.none()),
    st.tuples(st.just("delete_by"), st.sampled_from(KEYS), st.sampled_from(SIDS)),
    st.tuples(st.just("clear"), st.none(), st.none()),
    st.tuples(st.just("clear_offline"), st.none(), st.none()),
)


def execute(store, command, args):
    """A validated command in its own transaction, as the SDK's directory mode runs it."""
    return Commands(store).execute(command, args)


def run(store: Store, command: str, **args) -> None:
    with store.write():
        execute(store, command, validate_args(command, args))


_ids = iter(range(10**9))


def do(store: Store, o: tuple) -> None:
    kind, a, b = o
    if kind == "register":
        run(store, "session.register", session_id=a, agent_name=a.upper(), agent_type=b,
            capabilities=["python"])
    elif kind == "status":
        run(store, "session.update_status", session_id=a, status=b)
    elif kind == "unregister":
        run(store, "session.unregister", session_id=a)
    elif kind in ("set", "tagged"):
        entry = {"entry_id": f"e{next(_ids)}", "type": "state", "key": a, "value": b,
                 "session_id": random.choice(SIDS), "timestamp": "t", "ttl": None,
                 "tags": [b] if kind == "tagged" else [], "metadata": {}}
        run(store, "memory.set", entry=entry)
    elif kind == "delete":
        run(store, "memory.delete", key=a)
    elif kind == "delete_by":
        run(store, "memory.delete", key=a, session_id=b)
    elif kind == "clear":
        run(store, "memory.clear")
    elif kind == "clear_offline":
        run(store, "session.clear_offline")


def visible(store: Store) -> tuple:
    sessions = sorted((s["session_id"], s["agent_type"], s["status"], s["host"],
                       tuple(s["capabilities"]))
                      for s in execute(store, "session.list", {"include_offline": True}))
    entries = []
    for k in KEYS:
        for e in execute(store, "memory.get_all", {"key": k}):
            entries.append((e["entry_id"], e["key"], e["value"], e["session_id"], tuple(e["tags"])))
    tags = {t: sorted(e["entry_id"] for e in execute(store, 
        "memory.by_tags", {"tags": [t], "match_all": False})) for t in ("a", "b")}
    found = sorted(s["session_id"] for s in execute(store, 
        "session.find", {"status": None, "agent_type": None, "human_user": None,
                         "capability": "python"}))
    return sessions, sorted(entries), tags, found


def all_records(src: Store) -> list[tuple[str, list[dict], int]]:
    """Every origin's records at `src`, validated as a receiver would."""
    out = []
    for origin, through in replication.digest(src).items():
        recs, t = replication.export(src, origin, 0, 10**6)
        out.append((origin, [records.record(r) for r in recs], t))
    return out


def ship(src: Store, dst: Store, limit: int) -> None:
    """One anti-entropy exchange src -> dst, chunked by `limit`, using dst's digest."""
    have = replication.digest(dst)
    for origin, _ in replication.digest(src).items():
        after = have.get(origin, 0)
        for _ in range(10_000):
            recs, through = replication.export(src, origin, after, limit)
            with dst.write():
                replication.apply(dst, Outbox(dst), origin, after, through,
                                  [records.record(r) for r in recs])
            if through <= after:
                break
            after = through


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.integers(0, 2), op), min_size=1, max_size=25),
       seed=st.integers(0, 2**32), limit=st.integers(1, 5))
def test_merge_is_order_duplicate_and_grouping_insensitive(ops, seed, limit):
    rng = random.Random(seed)
    dirs = [tempfile.mkdtemp(prefix="mr") for _ in range(4)]
    try:
        nodes = [Store(d) for d in dirs[:3]]
        for who, o in ops:
            do(nodes[who], o)
            if rng.random() < 0.3:                       # some gossip while writing
                a, b = rng.sample(range(3), 2)
                ship(nodes[a], nodes[b], limit)
        # every node receives everything, in random pairings and chunk sizes, some twice
        for _ in range(3):
            for a in rng.sample(range(3), 3):
                for b in rng.sample(range(3), 3):
                    if a != b:
                        ship(nodes[a], nodes[b], rng.randint(1, 5))
        states = [visible(n) for n in nodes]
        assert states[0] == states[1] == states[2]
        # a fourth node gets all records in one shuffled, duplicated pile
        late = Store(dirs[3])
        pile = [(o, r) for n in nodes for o, recs, _ in all_records(n) for r in recs]
        pile += rng.sample(pile, len(pile) // 2)
        rng.shuffle(pile)
        for origin, rec in pile:
            with late.write():
                replication.apply(late, Outbox(late), origin, 10**9, 0, [rec])
        assert visible(late) == states[0]
        # and digests agree once everyone has everything
        digests = [{o: v for o, v in replication.digest(n).items() if v} for n in nodes]
        assert digests[0] == digests[1] == digests[2]
        for n in nodes + [late]:
            n.close()
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_a_deletion_is_not_undone_by_a_late_entry(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    entry = {"entry_id": "e1", "type": "state", "key": "k", "value": 1, "session_id": "s",
             "timestamp": "t", "ttl": None, "tags": [], "metadata": {}}
    run(a, "memory.set", entry=entry)
    ship(a, b, 10)
    run(b, "memory.delete", key="k")
    # b's deletion reaches a third node before a's entry does
    c = Store(tmp_path / "c")
    ship(b, c, 10)
    recs, through = replication.export(a, a.node_id, 0, 10)
    with c.write():
        replication.apply(c, Outbox(c), a.node_id, 0, through, [records.record(r) for r in recs])
    assert execute(c, "memory.get_all", {"key": "k"}) == []


def test_knowledge_never_skips_a_gap(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    for i in range(5):
        run(a, "memory.set", entry={"entry_id": f"e{i}", "type": "state", "key": "k",
                                    "value": i, "session_id": "s", "timestamp": "t",
                                    "ttl": None, "tags": [], "metadata": {}})
    recs, through = replication.export(a, a.node_id, 3, 10)      # versions 4..5 only
    with b.write():
        replication.apply(b, Outbox(b), a.node_id, 3, through, [records.record(r) for r in recs])
    assert replication.digest(b).get(a.node_id, 0) == 0             # 1..3 still missing
    ship(a, b, 2)
    assert replication.digest(b)[a.node_id] == replication.digest(a)[a.node_id]
    assert len(execute(b, "memory.get_all", {"key": "k"})) == 5


def test_bad_records_are_rejected_by_validation():
    import pytest
    from meshd.errors import InvalidArgument
    good = {"kind": "deletion", "key": "k", "session_id": None, "origin": "n1", "version": 1,
            "hlc": 5}
    assert records.record(good)["key"] == "k"
    for bad in [dict(good, kind="bogus"), dict(good, version=0), dict(good, version="1"),
                dict(good, origin=""), dict(good, hlc=-1), dict(good, key=""), "not a map",
                {"kind": "entry", "origin": "n1", "version": 1, "hlc": 1},
                {"kind": "session", "session_id": "s", "origin": "n1", "version": 1, "hlc": 1}]:
        with pytest.raises(InvalidArgument):
            records.record(bad)


def test_an_entry_id_held_with_another_stamp_keeps_its_own_tags(tmp_path):
    """The same client-made entry id set on two hosts: merging the other host's copy in a
    run of entries (one statement per table) must not index its tags for ours."""
    store = Store(tmp_path)
    run(store, "memory.set", entry={"entry_id": "E", "type": "fact", "key": "k", "value": 1,
                                    "session_id": "s", "timestamp": "t", "ttl": None,
                                    "tags": ["x"], "metadata": {}})
    hlc = store.conn.execute("SELECT hlc FROM memory WHERE entry_id = 'E'").fetchone()[0]
    other = "b" * 32

    def entry(eid: str, version: int, tags: list[str]) -> dict:
        return records.record({"kind": "entry", "entry_id": eid, "key": "k2", "type": "fact",
                               "value": eid, "session_id": "s2", "timestamp": "t", "ttl": None,
                               "tags": tags, "metadata": {}, "origin": other,
                               "version": version, "hlc": hlc + 1000 + version})
    with store.write():
        replication.apply(store, Outbox(store), other, 0, 2, [entry("E", 1, ["y"]), entry("F", 2, ["y"])])
    by = {t: sorted(e["entry_id"] for e in execute(store, 
        "memory.by_tags", {"tags": [t], "match_all": True})) for t in ("x", "y")}
    assert by == {"x": ["E"], "y": ["F"]}
    run(store, "memory.delete", key="k")
    assert store.conn.execute("SELECT COUNT(*) FROM memory_tags WHERE entry_id = 'E'"
                              ).fetchone()[0] == 0
    store.close()
