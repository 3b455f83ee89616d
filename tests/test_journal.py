"""The journal in front of SQLite: a crash after acknowledging journaled sets, before they
reach SQLite, loses none of them; a torn tail is ignored; folding twice changes nothing."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, subprocess_env
from meshd.state import Store
from meshd.state.journal import Journal
from meshd.wire.ipc import validate_args

CRASHER = r"""
import os, sys
from meshd.state import Store
from meshd.wire.ipc import validate_args
store = Store(sys.argv[1], exclusive=True)
store.enable_journal(fsync=False)
frames = []
for i in range(int(sys.argv[2])):
    args = validate_args("memory.set", {"entry": {
        "entry_id": f"e{i}", "type": "state", "key": f"k{i}", "value": i, "session_id": "s",
        "timestamp": "t", "ttl": None, "tags": ["x"], "metadata": {}}})
    frames.append(store.log_write("memory.set", args))
store.journal.append(frames)     # acknowledged from here on
print(store.version, flush=True)
os._exit(0)                      # dies before anything reaches SQLite
"""


def crash_with_journaled_sets(data_dir, n: int) -> int:
    r = subprocess.run([sys.executable, "-c", CRASHER, str(data_dir), str(n)],
                       env=subprocess_env(), cwd=str(ROOT), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_journaled_sets_survive_a_crash_before_folding(tmp_path):
    version = crash_with_journaled_sets(tmp_path, 200)
    assert (tmp_path / "journal").stat().st_size > 0
    store = Store(tmp_path, exclusive=True)
    assert store.execute("memory.stats", {})["total_entries"] == 0   # not folded yet
    assert store.enable_journal(fsync=False) == 200
    assert store.execute("memory.stats", {})["total_entries"] == 200
    assert [e["value"] for e in store.execute("memory.get_all", {"key": "k7"})] == [7]
    assert len(store.execute("memory.by_tags", {"tags": ["x"], "match_all": False})) == 200
    assert (tmp_path / "journal").stat().st_size == 0
    assert store.version >= version                 # stamps are never handed out twice
    with store.write():
        store.execute("memory.set", validate_args("memory.set", {"entry": {
            "entry_id": "new", "type": "state", "key": "k-new", "value": 1, "session_id": "s",
            "timestamp": "t", "ttl": None, "tags": [], "metadata": {}}}))
    assert store.execute("memory.get", {"key": "k-new"})["value"] == 1
    store.close()


def test_torn_tail_is_ignored_and_folding_twice_changes_nothing(tmp_path):
    crash_with_journaled_sets(tmp_path, 20)
    journal = tmp_path / "journal"
    whole = journal.read_bytes()
    with open(journal, "ab") as f:
        f.write(Journal.frame(["memory.set", {}, 999, 1])[:-3])     # a torn last write
    assert len(Journal(tmp_path).read_all()) == 20
    store = Store(tmp_path, exclusive=True)
    assert store.enable_journal(fsync=False) == 20
    store.close()
    journal.write_bytes(whole)                   # as if the crash came before the truncation
    store = Store(tmp_path, exclusive=True)
    assert store.enable_journal(fsync=False) == 20
    assert store.execute("memory.stats", {})["total_entries"] == 20
    store.close()


def test_reads_see_journaled_sets_at_once(daemon):
    mem = daemon.memory()
    for i in range(50):
        mem.set("s", f"k{i}", i)
        assert mem.get(f"k{i}") == i                # read-your-writes, no waiting
    assert mem.get_stats()["total_entries"] == 50
