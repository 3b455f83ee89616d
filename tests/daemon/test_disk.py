"""The disk under the daemon misbehaving: damaged journal segments and database pages,
a disk that fills up, a WAL that a burst (or a crash) left large.

Damage is made the way it comes: bytes flipped or cut off in real files. A full disk is a
real one: a 20 MB tmpfs mounted for the test (root only; skipped otherwise), unmounted
when it ends, also on failure.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from support.daemons import CHILD_CWD, Daemon, eventually, run_cli, subprocess_env
from meshd.state.db import WAL_KEEP
from meshd.state.journal import Journal

#: Leaves `committed` sets in SQLite and `frames` x `per_frame` more acknowledged in the
#: journal only (one append per frame, as the daemon does per batch; after `split` frames
#: a batch goes to the fold thread, never folded, and the rest to the other segment), then
#: dies; prints where each frame ends in its segment.
CRASHER = r"""
import json, os, sys
from meshd.state import Store
from meshd.state.outbox import Outbox
from meshd.state.pipeline import WritePipeline
from meshd.wire.ipc import validate_args
data_dir, committed, frames, per_frame, size, split = sys.argv[1], *map(int, sys.argv[2:])
store = Store(data_dir, exclusive=True)
pipeline = WritePipeline(store, Outbox(store))
pipeline.replay()
def entry(i):
    return validate_args("memory.set", {"entry": {
        "entry_id": f"e{i}", "type": "state", "key": f"k{i}", "value": f"{i:06d}" + "v" * size,
        "session_id": "s", "timestamp": "t", "ttl": None, "tags": ["x"], "metadata": {}}})
pipeline.append([pipeline.log("memory.set", entry(i)) for i in range(committed)])
pipeline.flush()
ends, i = [], committed
for f in range(frames):
    if f == split:
        assert pipeline.hand_off()
    pipeline.append([pipeline.log("memory.set", entry(j)) for j in range(i, i + per_frame)])
    i += per_frame
    ends.append(os.fstat(pipeline.journal.fds[pipeline.journal.active]).st_size)
print(json.dumps(ends), flush=True)
os._exit(0)
"""

#: One big transaction and no checkpoint, then death: the WAL stays as large as it grew.
BIG_WAL = r"""
import os, sys
from meshd.state import Store
from meshd.state.commands import Commands
from meshd.wire.ipc import validate_args
store = Store(sys.argv[1], exclusive=True)
run = Commands(store).run
with store.write():
    for i in range(int(sys.argv[2])):
        run("memory.set", validate_args("memory.set", {"entry": {
            "entry_id": f"b{i}", "type": "state", "key": f"b{i}", "value": "w" * 2000,
            "session_id": "s", "timestamp": "t", "ttl": None, "tags": [], "metadata": {}}}))
os._exit(0)
"""


def run_script(script: str, *args: object) -> str:
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=subprocess_env(),
                       cwd=CHILD_CWD, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def value(i: int, size: int) -> str:
    return f"{i:06d}" + "v" * size


# --- 11: a damaged journal ---------------------------------------------------------------------

def test_one_flipped_byte_anywhere_loses_only_the_batch_it_hit(tmp_path):
    """Any single damaged byte, in a length, a CRC or a payload, costs the records of its
    own frame and nothing after it (before: everything after it in the segment)."""
    journal = Journal(tmp_path)
    frames = [[["memory.set", {"entry": {"entry_id": f"e{f}-{r}", "value": "v" * (f * 7 % 50)}},
                f * 10 + r + 1, 1000 + f * 10 + r] for r in range(8)] for f in range(30)]
    starts = []
    for records in frames:
        starts.append(os.fstat(journal.fds[0]).st_size)
        journal.append(records)
    journal.close()
    whole = (tmp_path / "journal.0").read_bytes()
    rng = random.Random(13)
    positions = sorted({*rng.sample(range(len(whole)), 60),
                        *(starts[5] + k for k in range(10)), len(whole) - 1})
    for pos in positions:
        hit = max(i for i, s in enumerate(starts) if s <= pos)
        damaged = bytearray(whole)
        damaged[pos] ^= 0xFF
        (tmp_path / "journal.0").write_bytes(bytes(damaged))
        reader = Journal(tmp_path)
        got = reader.read_all()
        reader.close()
        expected = [r for i, records in enumerate(frames) if i != hit for r in records]
        assert got == expected, f"byte {pos} (frame {hit})"
        assert len(reader.damage) == 1, (pos, reader.damage)
        d = reader.damage[0]
        assert (d.segment, d.offset, d.lost) == ("journal.0", starts[hit], 8), (pos, d)


def test_a_cut_segment_keeps_every_whole_frame_and_says_what_was_cut(tmp_path, caplog):
    """(Before: the cut frame went without a word.)"""
    journal = Journal(tmp_path)
    for f in range(5):
        journal.append([["memory.set", {"n": f}, f * 3 + r + 1, f * 3 + r + 1] for r in range(3)])
    cut = os.fstat(journal.fds[0]).st_size - 7
    journal.close()
    os.truncate(tmp_path / "journal.0", cut)
    reader = Journal(tmp_path)
    assert len(reader.read_all()) == 12
    assert f"{tmp_path / 'journal.0'}: " in caplog.text and "to the end: about 3 journaled " \
        "write(s) lost" in caplog.text, caplog.text
    [d] = reader.damage
    assert d.tail and d.lost == 3 and d.offset + d.size == cut
    reader.close()


def test_a_damaged_journal_is_logged_and_counted_in_sessions_info(short_tmp):
    """The daemon replays every batch but the damaged one, and says which segment, where
    and how many writes it lost: in its log and in `sessions info`."""
    d = Daemon(str(short_tmp / "d.sock"), str(short_tmp / "data"), str(short_tmp / "d.log"),
               args=["--no-mesh"])
    ends = json.loads(run_script(CRASHER, d.data_dir, 0, 20, 10, 20, 20))
    path = Path(d.data_dir) / "journal.0"
    data = bytearray(path.read_bytes())
    data[ends[4] + 40] ^= 0x01                # one bit, inside the sixth batch
    path.write_bytes(bytes(data))
    try:
        d.start()
        mem = d.memory()
        assert mem.get_stats()["total_entries"] == 190
        assert mem.get("k49") == value(49, 20) and mem.get("k60") == value(60, 20)
        assert mem.get("k50") is None and mem.get("k59") is None
        counters = d.registry().node_info()["counters"]
        assert counters["journal.damaged"] == 1 and counters["journal.lost_writes"] == 10
        assert f"journal.0: {ends[5] - ends[4]} unreadable byte(s) at offset {ends[4]}" in d.log()
        assert "about 10 journaled write(s) lost" in d.log()
        r = run_cli(["info"], d.env())
        assert r.returncode == 0 and "journal.lost_writes" in r.stdout, r.stdout + r.stderr
    finally:
        d.stop()


# --- 11: a damaged database page ---------------------------------------------------------------

def test_a_damaged_database_page_is_refused_at_start_with_what_to_do(short_tmp):
    d = Daemon(str(short_tmp / "d.sock"), str(short_tmp / "data"), str(short_tmp / "d.log"),
               args=["--no-mesh"])
    try:
        d.start()
        mem = d.memory()
        for i in range(300):
            mem.set("s", f"key-{i}", "x" * 200)
        assert d.stop() == 0
    finally:
        d.stop()
    db = Path(d.data_dir) / "meshd.db"
    conn = sqlite3.connect(db)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'memory'").fetchone()[0]
    conn.close()
    with open(db, "r+b") as f:                # the b-tree page header of the memory table
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * 12)
    conn = sqlite3.connect(db)
    try:                                      # (the damage is real)
        assert conn.execute("PRAGMA quick_check").fetchone()[0] != "ok"
    except sqlite3.DatabaseError as exc:
        assert "malformed" in str(exc)
    finally:
        conn.close()
    cmd = [sys.executable, "-m", "meshd", "--socket", d.socket, "--data-dir", d.data_dir,
           "--no-mesh", "--preset", "test"]
    try:
        r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                           timeout=30, cwd=CHILD_CWD)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"meshd served from a damaged database: {exc.stderr!r}") from None
    assert r.returncode != 0
    assert f"the database {db} is damaged" in r.stderr, r.stderr
    assert ".recover" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(d.socket)


# --- 12: the WAL is cut back -------------------------------------------------------------------

def test_a_wal_left_large_is_cut_back_and_stays_small(short_tmp):
    """A WAL grown by a burst kept its size for good (truncated only past 256 MiB), space
    a full disk then lacks: it is cut back after checkpoints."""
    d = Daemon(str(short_tmp / "d.sock"), str(short_tmp / "data"), str(short_tmp / "d.log"),
               args=["--no-mesh"])
    run_script(BIG_WAL, d.data_dir, 4000)
    wal = Path(d.data_dir) / "meshd.db-wal"
    assert wal.stat().st_size > 2 * WAL_KEEP
    try:
        d.start()
        mem = d.memory()
        assert mem.get_stats()["total_entries"] == 4000
        eventually(lambda: wal.stat().st_size <= WAL_KEEP, timeout=10,
                   message="the WAL cut back to WAL_KEEP")
        for i in range(1500):                 # another burst: the same once checkpointed
            mem.set("s", f"n{i}", "z" * 3000)
        eventually(lambda: wal.stat().st_size <= WAL_KEEP, timeout=10,
                   message="the WAL cut back after a burst")
        assert mem.get("n1499") == "z" * 3000
    finally:
        d.stop()


# --- 12: a full disk ---------------------------------------------------------------------------

class SmallDisk:
    """A 20 MB tmpfs; its daemons are stopped before it is unmounted."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "disk"
        self.daemons: list[Daemon] = []
        self.filler = self.path / "filler"

    def daemon(self, name: str = "d") -> Daemon:
        d = Daemon(str(self.root / f"{name}.sock"), str(self.path / f"{name}-data"),
                   str(self.root / f"{name}.log"), args=["--no-mesh"])
        self.daemons.append(d)
        return d

    def fill(self, leave: int = 0) -> None:
        """Take all the free space but `leave` bytes, with a file that is not the daemon's."""
        with open(self.filler, "ab") as f:
            for chunk in (1 << 20, 1 << 12):
                while True:
                    free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
                    if free - leave < chunk:
                        break
                    try:
                        f.write(b"\0" * chunk)
                        f.flush()
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
                        break

    def free(self) -> None:
        self.filler.unlink()

    def grow(self, size: str) -> None:
        r = subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[SmallDisk]:
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    disk = SmallDisk(short_tmp)
    disk.path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs",
                        str(disk.path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        for d in disk.daemons:
            d.stop(timeout=5)
        if subprocess.run(["umount", str(disk.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk.path)], capture_output=True)


def test_on_a_full_disk_the_daemon_starts_serves_reads_and_catches_up_later(small_disk):
    """Before: it did not even start ("disk I/O error": the WAL index file it made first),
    and a running one failed every read once a journaled write could not be folded."""
    d = small_disk.daemon()
    # 100 in SQLite, 100 acknowledged in the journal only, in both of its segments
    run_script(CRASHER, d.data_dir, 100, 10, 10, 1000, 5)
    small_disk.fill()
    d.start()
    mem = d.memory(timeout=5)
    assert mem.get("k0") == value(0, 1000)
    assert len(mem.search("k9?")) == 10 and mem.get_stats()["total_entries"] >= 100
    assert d.registry().node_info()["pid"] == d.pid
    from sessions import SessionsError
    with pytest.raises(SessionsError, match="No space left|full"):
        mem.set("s", "refused", "x" * 50_000)        # (a small one may fit in the slack)
    assert mem.get("k1") == value(1, 1000)            # reads go on after refused writes
    small_disk.free()
    eventually(lambda: mem.get_stats()["total_entries"] == 200, timeout=15,
               message="the journaled sets folded once there is room")
    assert [mem.get(f"k{i}") for i in (100, 150, 199)] == [value(i, 1000) for i in (100, 150, 199)]
    assert mem.delete("k150") == 1 and mem.delete("k199") == 1
    d.kill9()                                 # the folded records must not come back
    d.start()
    mem = d.memory()
    assert mem.get("k150") is None and mem.get("k199") is None
    mem.set("s", "after", "yes")
    assert mem.get_stats()["total_entries"] == 199
    assert d.stop() == 0
    assert [Path(d.data_dir, f"journal.{i}").stat().st_size for i in (0, 1)] == [0, 0]


def test_filling_the_disk_loses_nothing_acknowledged_and_restarts_in_modest_space(small_disk):
    """The issue's run: a 20 MB disk, 4 MB of it someone else's, filled by sets until the
    daemon refuses them; reads still work; the filler goes (20% free) and a clean restart
    serves every acknowledged set, with the WAL cut back."""
    with open(small_disk.filler, "wb") as f:
        f.write(b"\0" * (4 << 20))
    d = small_disk.daemon()
    d.start()
    mem = d.memory(timeout=5)
    acked: list[str] = []
    error: Exception | None = None
    deadline = time.monotonic() + 120
    while error is None and time.monotonic() < deadline:
        key = f"k{len(acked)}"
        try:
            mem.set("s", key, value(len(acked), 2000))
        except Exception as exc:
            error = exc
        else:
            acked.append(key)
    assert error is not None and ("No space left" in str(error) or "full" in str(error)), error
    assert len(acked) > 1000
    assert mem.get("k0") == value(0, 2000)
    assert len(mem.search("k1?")) == 10
    assert d.stop() == 0
    small_disk.free()
    d.start()
    mem = d.memory(timeout=5)
    assert mem.get("k0") == value(0, 2000)             # it restarted and serves reads
    # Acknowledged sets the full disk kept in the journal fold once they fit. With 20%
    # free that depends on how much WAL the fill left for SQLite to copy back first (it
    # needs room to do so); so, like an operator would, give the disk more room when
    # they have not all folded, and then none may be missing.
    if mem.get_stats()["total_entries"] != len(acked):
        small_disk.grow("40m")
    eventually(lambda: mem.get_stats()["total_entries"] == len(acked), timeout=20,
               message=f"all {len(acked)} acknowledged sets visible after the restart "
                       f"(log: {d.log()[-1500:]})")
    for i in random.Random(12).sample(range(len(acked)), 50) + [len(acked) - 1]:
        assert mem.get(f"k{i}") == value(i, 2000), i
    wal = Path(d.data_dir) / "meshd.db-wal"
    eventually(lambda: not wal.exists() or wal.stat().st_size <= WAL_KEEP, timeout=10,
               message="the WAL cut back")
    mem.set("s", "after", "yes")                   # acknowledged: journaled, folded soon
    eventually(lambda: mem.get("after") == "yes", timeout=10, message="the set after")
