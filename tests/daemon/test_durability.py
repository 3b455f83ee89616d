"""Durability: every write the daemon acknowledged survives kill -9 (and SIGTERM), the
node keeps its identity, and a data directory or socket is never served by two daemons.

A writer subprocess streams memory.set / session.register / hub.send calls as fast as it
can and logs each acknowledged id (after the call returned, one flushed line each); the
test kills the daemon while writes are in flight, restarts it on the same data directory
and checks that every logged id is stored exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support.daemons import Daemon, eventually, subprocess_env

RECIPIENT = "rcpt"
SENDER = "w-sender"

WRITER = textwrap.dedent('''
    import sys
    from sessions import CollaborationHub, MessageType, SessionRegistry, SharedMemory

    prefix, log_path, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    registry = SessionRegistry(timeout=2.0)
    hub = CollaborationHub(timeout=2.0)
    memory = SharedMemory(timeout=2.0)
    with open(log_path, "a", buffering=1) as log:
        for i in range(limit):
            try:
                kind = i % 3
                if kind == 0:
                    e = memory.set("w-writer", f"{prefix}-k{i}", {"i": i, "p": prefix},
                                   tags=[prefix])
                    line = f"m {e.entry_id} {e.key}"
                elif kind == 1:
                    s = registry.register(f"{prefix}-s{i}", "Writer", "Test")
                    line = f"s {s.session_id}"
                else:
                    m = hub.send("w-sender", "rcpt", MessageType.NOTIFICATION,
                                 f"{prefix}-{i}", "body")
                    line = f"h {m.message_id} {m.subject}"
            except Exception as exc:
                print(f"writer stopped after {i} writes: {type(exc).__name__}: {exc}",
                      file=sys.stderr, flush=True)
                sys.exit(3)
            log.write(line + "\\n")
            log.flush()
    sys.exit(0)
''')


# The same, pipelined: 32 calls in flight on one asyncio connection, so the daemon gets
# batch frames and answers from the journal while its fold thread commits.
ASYNC_WRITER = textwrap.dedent('''
    import asyncio, sys
    from sessions import MessageType
    from sessions.aio import AsyncClient, AsyncCollaborationHub, AsyncSharedMemory

    prefix, log_path, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def main():
        client = AsyncClient(timeout=2.0)
        memory, hub = AsyncSharedMemory(client=client), AsyncCollaborationHub(client=client)
        todo, failed = iter(range(limit)), []
        with open(log_path, "a", buffering=1) as log:
            async def worker():
                for i in todo:
                    if failed:
                        return
                    try:
                        if i % 2 == 0:
                            e = await memory.set("w-writer", f"{prefix}-k{i}",
                                                 {"i": i, "p": prefix}, tags=[prefix])
                            line = f"m {e.entry_id} {e.key}"
                        else:
                            m = await hub.send("w-sender", "rcpt", MessageType.NOTIFICATION,
                                               f"{prefix}-{i}", "body")
                            line = f"h {m.message_id} {m.subject}"
                    except Exception as exc:
                        failed.append(f"{type(exc).__name__}: {exc}")
                        return
                    log.write(line + "\\n")
                    log.flush()
            await asyncio.gather(*(worker() for _ in range(32)))
        if failed:
            print(f"writer stopped: {failed[0]}", file=sys.stderr, flush=True)
            sys.exit(3)

    asyncio.run(main())
''')


def _acks(log_path: Path) -> list[list[str]]:
    """Complete lines of the writer's log (a torn last line was never fully logged)."""
    try:
        text = log_path.read_text()
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines(keepends=True) if line.endswith("\n")]


class Writer:
    def __init__(self, daemon: Daemon, tmp: Path, prefix: str, limit: int = 100_000,
                 pipelined: bool = False) -> None:
        self.prefix = prefix
        self.in_flight = 32 if pipelined else 1
        self.log = tmp / f"{prefix}.acks"
        script = tmp / ("async_writer.py" if pipelined else "writer.py")
        if not script.exists():
            script.write_text(ASYNC_WRITER if pipelined else WRITER)
        self.stderr_path = tmp / f"{prefix}.err"
        err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(script), prefix, str(self.log),
                                      str(limit)], env=daemon.env(), stdout=err, stderr=err)
        err.close()

    def acks(self) -> list[list[str]]:
        return _acks(self.log)

    def wait_acks(self, n: int, timeout: float = 30.0) -> None:
        def enough() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"writer exited early ({self.proc.returncode}): "
                                     f"{self.stderr()}")
            return len(self.acks()) >= n
        eventually(enough, timeout=timeout, interval=0.005, message=f"{n} writer acks")

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"writer did not stop within {timeout}s after the daemon "
                                 f"went away: {self.stderr()}") from None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _setup_sessions(daemon: Daemon) -> None:
    reg = daemon.registry()
    reg.register(RECIPIENT, "Recipient", "Test")
    reg.register(SENDER, "Sender", "Test")


def _check_all_present(daemon: Daemon, writers: list[Writer]) -> int:
    """Every acknowledged id of every writer is stored exactly once; returns how many acks.
    Also: at most the writes a writer had in flight when the daemon died are stored
    without having been logged."""
    memory, registry, hub = daemon.memory(), daemon.registry(), daemon.hub()
    sessions = {s.session_id for s in registry.list_sessions(include_offline=True)}
    inbox = hub.get_messages(RECIPIENT)
    inbox_ids = [m.message_id for m in inbox]
    assert len(inbox_ids) == len(set(inbox_ids)), "a message is in the inbox twice"
    total = 0
    for w in writers:
        acks = w.acks()
        total += len(acks)
        entries = memory.search(f"{w.prefix}-k*")
        by_id: dict[str, list] = {}
        for e in entries:
            by_id.setdefault(e.entry_id, []).append(e)
        missing: list[str] = []
        for kind, ident, *rest in acks:
            if kind == "m":
                found = by_id.get(ident, [])
                if len(found) != 1 or found[0].key != rest[0]:
                    missing.append(f"memory {rest[0]} {ident} (found {len(found)})")
                    continue
                i = int(rest[0].rsplit("-k", 1)[1])
                assert found[0].value == {"i": i, "p": w.prefix}
                if i % 150 == 0:                    # spot-check the read path too
                    assert memory.get(rest[0]) == {"i": i, "p": w.prefix}
            elif kind == "s":
                if ident not in sessions:
                    missing.append(f"session {ident}")
            elif kind == "h":
                n = inbox_ids.count(ident)
                if n != 1:
                    missing.append(f"message {ident} {rest[0]} (in inbox {n} times)")
            else:
                raise AssertionError(f"bad ack line {kind} {ident}")
        assert not missing, (f"{len(missing)} of {len(acks)} acknowledged writes of {w.prefix} "
                             f"are lost after restart: {missing[:10]}")
        # Nothing stored that the writer did not try: at most its in-flight writes.
        logged = {a[1] for a in acks}
        unlogged = ([e.entry_id for e in entries if e.entry_id not in logged]
                    + [s for s in sessions if s.startswith(f"{w.prefix}-s")
                       and s not in logged]
                    + [m.message_id for m in inbox
                       if m.subject.startswith(f"{w.prefix}-") and m.message_id not in logged])
        assert len(unlogged) <= w.in_flight, (f"{w.prefix}: stored but never acknowledged: "
                                              f"{unlogged}")
    return total


def _kill_rounds(daemon: Daemon, tmp: Path, targets: list[int], kill: str = "kill9",
                 pipelined: bool = False) -> None:
    _setup_sessions(daemon)
    node_id = daemon.registry().node_info()["node_id"]
    writers: list[Writer] = []
    try:
        for n, target in enumerate(targets):
            w = Writer(daemon, tmp, f"r{n}", pipelined=pipelined)
            writers.append(w)
            w.wait_acks(target)
            if kill == "kill9":
                daemon.kill9()                      # while the writer has a call in flight
                assert os.path.exists(daemon.socket), "kill -9 should leave the socket file"
            else:
                assert daemon.stop() == 0, f"SIGTERM exit code != 0:\n{daemon.log()}"
            code = w.wait_exit()
            assert code == 3, f"writer should fail when the daemon dies, got {code}: {w.stderr()}"
            daemon.start()                          # same data dir; stale socket is removed
            assert daemon.registry().node_info()["node_id"] == node_id, "node id changed"
            total = _check_all_present(daemon, writers)
            assert total >= sum(targets[:n + 1])
    finally:
        for w in writers:
            w.kill()


@pytest.mark.slow
def test_kill9_during_writes_loses_no_acknowledged_write(make_daemon, short_tmp):
    d = make_daemon()
    _kill_rounds(d, short_tmp, [150, 400, 250])


def test_kill9_during_pipelined_writes_loses_no_acknowledged_write(make_daemon, short_tmp):
    """Batch frames, journal answers and the fold thread, killed mid-stream, twice."""
    d = make_daemon()
    _kill_rounds(d, short_tmp, [2000, 3000], pipelined=True)


def test_kill9_with_fsync_durability(make_daemon, short_tmp):
    d = make_daemon(args=["--durability", "fsync"])
    assert d.registry().node_info()["durability"] == "fsync"
    _kill_rounds(d, short_tmp, [200])


def test_sigterm_during_writes_exits_0_and_keeps_every_ack(make_daemon, short_tmp):
    d = make_daemon()
    _kill_rounds(d, short_tmp, [300], kill="sigterm")
    assert "stopped" in d.log()


def test_node_id_is_stable_across_restarts(make_daemon):
    d = make_daemon()
    other = make_daemon("other")
    node_id = d.registry().node_info()["node_id"]
    assert isinstance(node_id, str) and len(node_id) >= 16
    assert other.registry().node_info()["node_id"] != node_id, "two data dirs, one node id"
    d.kill9()
    d.start()
    assert d.registry().node_info()["node_id"] == node_id
    assert d.stop() == 0
    d.start()
    info = d.registry().node_info()
    assert info["node_id"] == node_id and info["pid"] == d.pid


def _run_meshd(socket: str, data_dir: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "meshd", "--socket", socket, "--data-dir", data_dir,
           "--preset", "test"]
    try:
        return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:     # it served instead of refusing
        raise AssertionError(f"second meshd did not refuse within {timeout}s: {exc.stderr}")


def test_directory_mode_and_a_daemon_never_share_a_directory(make_daemon, short_tmp):
    """A directory-mode client (SharedMemory(path)) pointed at a running daemon's data dir
    is refused: writing beside the daemon could shadow its journaled, acknowledged sets.
    And a daemon does not start in a directory a directory-mode client has open."""
    from meshd.errors import StoreError
    from sessions import SharedMemory
    d = make_daemon()
    d.memory().set("s", "k", "acknowledged")
    with pytest.raises(StoreError, match="use it through its socket"):
        SharedMemory(d.data_dir).set("s", "k", "beside it")
    assert d.memory().get("k") == "acknowledged"
    d.stop()
    assert d.restart().memory().get("k") == "acknowledged"
    shared = short_tmp / "shared-dir"
    SharedMemory(str(shared)).set("s", "k", 1)           # stays open in this process
    r = _run_meshd(str(short_tmp / "third.sock"), str(shared))
    assert r.returncode != 0 and "is using the data directory" in r.stderr, r.stderr


def test_second_daemon_on_same_data_dir_refuses(make_daemon, short_tmp):
    d = make_daemon()
    d.registry().register("keep", "Keep", "Test")
    other_socket = str(short_tmp / "second.sock")
    r = _run_meshd(other_socket, d.data_dir)
    assert r.returncode != 0
    assert "is using the data directory" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(other_socket)
    assert d.alive()
    assert d.registry().get("keep") is not None      # the first still serves its data


def test_second_daemon_on_live_socket_refuses(make_daemon, short_tmp):
    d = make_daemon()
    r = _run_meshd(d.socket, str(short_tmp / "second-data"))
    assert r.returncode != 0
    assert "already serving on" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # The refusing daemon must not have removed or stolen the live daemon's socket.
    assert os.path.exists(d.socket)
    assert d.alive()
    assert d.registry().node_info()["pid"] == d.pid


def test_stale_socket_from_kill9_does_not_prevent_restart(make_daemon):
    d = make_daemon()
    d.registry().register("survivor", "S", "Test")
    d.kill9()
    assert os.path.exists(d.socket), "expected a stale socket file after kill -9"
    started = time.monotonic()
    d.start()
    assert time.monotonic() - started < 15
    assert d.registry().get("survivor") is not None
    assert d.registry().node_info()["pid"] == d.pid
