"""The journal in front of SQLite: a crash after acknowledging journaled sets, before they
reach SQLite, loses none of them; a torn tail is ignored; folding twice changes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.daemons import CHILD_CWD, eventually, subprocess_env
from meshd.state import Store
from meshd.state.commands import Commands
from meshd.state.journal import Journal
from meshd.state.outbox import Outbox
from meshd.state.pipeline import WritePipeline
from meshd.wire.ipc import validate_args


def run(store: Store, command: str, args: dict) -> object:
    return Commands(store).execute(command, args)

CRASHER = r"""
import os, sys
from meshd.state import Store
from meshd.state.outbox import Outbox
from meshd.state.pipeline import WritePipeline
from meshd.wire.ipc import validate_args
store = Store(sys.argv[1], exclusive=True)
pipeline = WritePipeline(store, Outbox(store))
pipeline.replay()
frames = []
for i in range(int(sys.argv[2])):
    args = validate_args("memory.set", {"entry": {
        "entry_id": f"e{i}", "type": "state", "key": f"k{i}", "value": i, "session_id": "s",
        "timestamp": "t", "ttl": None, "tags": ["x"], "metadata": {}}})
    frames.append(pipeline.log("memory.set", args))
    if i == int(sys.argv[3]):    # hand the first ones off (never folded): two segments
        pipeline.append(frames)
        frames = []
        assert pipeline.hand_off()
pipeline.append(frames)     # acknowledged from here on
print(store.version, flush=True)
os._exit(0)                      # dies before anything reaches SQLite
"""


FOLD_THEN_CRASH = r"""
import os, sys
from meshd.state import Store
from meshd.state.outbox import Outbox
from meshd.state.pipeline import WritePipeline
from meshd.wire.ipc import validate_args
store = Store(sys.argv[1], exclusive=True)
pipeline = WritePipeline(store, Outbox(store))
pipeline.replay()

def log(lo, hi):
    pipeline.append([pipeline.log("memory.set", validate_args("memory.set", {"entry": {
        "entry_id": f"e{i}", "type": "state", "key": f"k{i}", "value": i, "session_id": "s",
        "timestamp": "t", "ttl": None, "tags": [], "metadata": {}}})) for i in range(lo, hi)])

log(0, 40)
assert pipeline.hand_off()          # the fold thread's batch
log(40, 60)                      # acknowledged while it folds
assert pipeline.fold_handed_off() == 40
assert pipeline.finish_hand_off()   # empties the batch's segment only
os._exit(0)                      # the last 20 are in the journal alone
"""


def test_finishing_a_fold_keeps_writes_logged_meanwhile(tmp_path):
    r = subprocess.run([sys.executable, "-c", FOLD_THEN_CRASH, str(tmp_path)],
                       env=subprocess_env(), cwd=CHILD_CWD, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    store = Store(tmp_path, exclusive=True)
    assert run(store, "memory.stats", {})["total_entries"] == 40
    assert WritePipeline(store, Outbox(store)).replay() == 20
    assert run(store, "memory.stats", {})["total_entries"] == 60
    store.close()


def crash_with_journaled_sets(data_dir, n: int, hand_off_at: int = -1) -> int:
    r = subprocess.run([sys.executable, "-c", CRASHER, str(data_dir), str(n), str(hand_off_at)],
                       env=subprocess_env(), cwd=CHILD_CWD, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_journaled_sets_survive_a_crash_before_folding(tmp_path):
    version = crash_with_journaled_sets(tmp_path, 200)
    assert (tmp_path / "journal.0").stat().st_size > 0
    store = Store(tmp_path, exclusive=True)
    assert run(store, "memory.stats", {})["total_entries"] == 0   # not folded yet
    assert WritePipeline(store, Outbox(store)).replay() == 200
    assert run(store, "memory.stats", {})["total_entries"] == 200
    assert [e["value"] for e in run(store, "memory.get_all", {"key": "k7"})] == [7]
    assert len(run(store, "memory.by_tags", {"tags": ["x"], "match_all": False})) == 200
    assert (tmp_path / "journal.0").stat().st_size == 0
    assert store.version >= version                 # stamps are never handed out twice
    with store.write():
        run(store, "memory.set", validate_args("memory.set", {"entry": {
            "entry_id": "new", "type": "state", "key": "k-new", "value": 1, "session_id": "s",
            "timestamp": "t", "ttl": None, "tags": [], "metadata": {}}}))
    assert run(store, "memory.get", {"key": "k-new"})["value"] == 1
    store.close()


def test_torn_tail_is_ignored_and_folding_twice_changes_nothing(tmp_path):
    crash_with_journaled_sets(tmp_path, 20)
    journal = tmp_path / "journal.0"
    whole = journal.read_bytes()
    with open(journal, "ab") as f:
        f.write(Journal.frame([["memory.set", {}, 999, 1]])[:-3])     # a torn last write
    assert len(Journal(tmp_path).read_all()) == 20
    store = Store(tmp_path, exclusive=True)
    assert WritePipeline(store, Outbox(store)).replay() == 20
    store.close()
    journal.write_bytes(whole)                   # as if the crash came before the truncation
    store = Store(tmp_path, exclusive=True)
    assert WritePipeline(store, Outbox(store)).replay() == 20
    assert run(store, "memory.stats", {})["total_entries"] == 20
    store.close()


def test_both_segments_are_replayed_in_stamp_order(tmp_path):
    """A crash after a batch went to the fold thread and before it committed leaves
    records in both segments; the replay takes them all, oldest stamp first."""
    crash_with_journaled_sets(tmp_path, 60, hand_off_at=40)
    sizes = [(tmp_path / f"journal.{i}").stat().st_size for i in (0, 1)]
    assert all(sizes), sizes
    recovered = Journal(tmp_path).read_all()
    assert [r[1]["entry"]["entry_id"] for r in recovered] == [f"e{i}" for i in range(60)]
    store = Store(tmp_path, exclusive=True)
    assert WritePipeline(store, Outbox(store)).replay() == 60
    assert run(store, "memory.stats", {})["total_entries"] == 60
    assert [(tmp_path / f"journal.{i}").stat().st_size for i in (0, 1)] == [0, 0]
    store.close()


def test_reads_see_journaled_sets_at_once(daemon):
    mem = daemon.memory()
    for i in range(50):
        mem.set("s", f"k{i}", i)
        assert mem.get(f"k{i}") == i                # read-your-writes, no waiting
    assert mem.get_stats()["total_entries"] == 50


def test_the_fold_thread_folds_and_checkpoints_without_reads(daemon):
    """With no read to force it, journaled writes still reach SQLite (the fold thread),
    and the WAL is checkpointed while the daemon serves."""
    mem = daemon.memory()
    for i in range(100):
        mem.set("s", f"f{i}", i)
    eventually(lambda: daemon.registry().node_info()["unfolded"] == 0, timeout=10,
               message="journaled sets folded")
    info = daemon.registry().node_info()
    assert info["folded"] >= 1
    first = info["checkpoints"]
    eventually(lambda: daemon.registry().node_info()["checkpoints"] >= first + 2, timeout=10,
               message="two more checkpoints")


def test_a_retried_set_folds_once_with_its_tags_once(tmp_path):
    """A client retrying a set (same entry_id) is journaled twice with two stamps; the
    fold stores one entry and no stray tag rows (which would make match_all lie)."""
    store = Store(tmp_path, exclusive=True)
    pipeline = WritePipeline(store, Outbox(store))
    pipeline.replay()
    entry = {"entry_id": "same", "type": "state", "key": "k", "value": 1, "session_id": "s",
             "timestamp": "t", "ttl": None, "tags": ["a", "b"], "metadata": {}}
    frames = [pipeline.log("memory.set", validate_args("memory.set", {"entry": dict(entry)}))
              for _ in range(2)]
    pipeline.append(frames)
    assert pipeline.hand_off()
    assert pipeline.fold_handed_off() == 2
    assert pipeline.finish_hand_off()
    assert run(store, "memory.stats", {})["total_entries"] == 1
    assert store.conn.execute("SELECT COUNT(*) FROM memory_tags").fetchone()[0] == 2
    found = run(store, "memory.by_tags", {"tags": ["a", "b"], "match_all": True})
    assert [e["entry_id"] for e in found] == ["same"]
    assert [(tmp_path / f"journal.{i}").stat().st_size for i in (0, 1)] == [0, 0]
    store.close()


def test_a_send_to_a_forgotten_session_waits_for_it_again(daemon):
    """Sends are answered from the journal; a session forgotten by clear_offline is
    unknown again at once: a send to it waits until the id registers again."""
    reg, hub = daemon.registry(), daemon.hub()
    reg.register("from", "F", "T")
    reg.register("gone", "G", "T")
    one = hub.send("from", "gone", "notification", "one", "body")
    reg.unregister("gone")
    hub.send("from", "gone", "notification", "two", "kept for an offline session")
    assert reg.clear_offline() >= 1
    three = hub.send("from", "gone", "notification", "three", "body")
    assert hub.get_message_status(three.message_id)["state"] == "waiting"
    assert hub.get_message_status(one.message_id)["state"] == "stored"
    assert [m.subject for m in hub.get_messages("gone")] == ["one", "two", "three"]
    reg.register("gone", "G", "T")
    assert hub.get_message_status(three.message_id)["state"] == "stored"
    assert [m.subject for m in hub.get_messages("gone")] == ["one", "two", "three"]


def _message(mid: str, to: str) -> dict:
    return validate_args("message.send", {"message": {
        "message_id": mid, "type": "request", "from_session": "a", "to_session": to,
        "subject": "s", "body": "b", "data": {}, "timestamp": "t", "in_reply_to": None,
        "priority": "normal"}})


def test_a_journal_of_the_earlier_shape_is_replayed_with_its_planned_routes(tmp_path):
    """Journals written before the routes field kept a send's planned outbox seqs in its
    args ("_routes"): they replay with exactly those seqs, and sets as before."""
    store = Store(tmp_path, exclusive=True)
    other = "f" * 32
    with store.write():                     # the recipient is hosted by another daemon
        store.conn.execute("INSERT INTO sessions (session_id, agent_name, agent_type, status,"
                           " started_at, last_ping, capabilities, metadata, host, deleted,"
                           " origin, version, hlc) VALUES ('far', 'far', 't', 'active', 't',"
                           " 0, ?, ?, ?, 0, ?, 1, 1)", (b"\x90", b"\x80", other, other))
    store.close()
    send = _message("m-old", "far")
    send["_routes"] = [[other, 1, 7]]
    entry = validate_args("memory.set", {"entry": {
        "entry_id": "e-old", "type": "state", "key": "k-old", "value": 1, "session_id": "s",
        "timestamp": "t", "ttl": None, "tags": [], "metadata": {}}})
    (tmp_path / "journal.0").write_bytes(Journal.frame([["memory.set", entry, 1, 10],
                                                        ["message.send", send, 0, 11]]))
    store = Store(tmp_path, exclusive=True)
    assert WritePipeline(store, Outbox(store, routing=True)).replay() == 2
    assert run(store, "memory.get", {"key": "k-old"})["value"] == 1
    with store.read():
        queued = store.conn.execute("SELECT dest, lane, seq, message_id FROM outbox").fetchall()
    assert queued == [(other, 1, 7, "m-old")]
    store.close()


def test_a_journaled_send_carries_its_routes_in_their_own_field(tmp_path):
    """The journal record is [command, args, version, hlc, routes]: the request's args are
    written as validated, nothing private is added to them."""
    store = Store(tmp_path, exclusive=True)
    pipeline = WritePipeline(store, Outbox(store, routing=True))
    pipeline.replay()
    rec = pipeline.log("message.send", _message("m-new", "nobody"))
    pipeline.append([rec])
    (on_disk,) = Journal(tmp_path).read_all()
    assert len(on_disk) == 5 and on_disk[0] == "message.send" and on_disk[4] == []
    assert set(on_disk[1]) == {"message"}
    store.close()
