"""Other local users: they must not be able to take the daemon's socket (its directory is
checked by the daemon and by every client), nor read its files (owner-only), nor make the
daemon delete a file by pointing --socket at it.

The tests run as root, so "another user" is uid 65534 (nobody), given a directory with
chown; and a socket some other program listens on stands in for a planted one.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from support.daemons import CHILD_CWD, Daemon, run_cli, subprocess_env

NOBODY = 65534


def refused(socket_path: str, data_dir: str, env: dict[str, str] | None = None,
            timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a daemon that must refuse to start; it fails the test if it serves instead."""
    cmd = [sys.executable, "-m", "meshd", "--data-dir", data_dir, "--no-mesh",
           "--preset", "test"] + (["--socket", socket_path] if socket_path else [])
    try:
        r = subprocess.run(cmd, env=env or subprocess_env(), capture_output=True, text=True,
                           timeout=timeout, cwd=CHILD_CWD)
    except subprocess.TimeoutExpired as exc:      # (run() killed it)
        raise AssertionError(f"meshd served instead of refusing: {exc.stderr!r}") from None
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r


def theirs(path: Path, mode: int = 0o700) -> Path:
    """A directory another user made (and owns)."""
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, mode)
    return path


class Planted:
    """A socket someone else listens on: it must never see a client connect."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def connections(self) -> int:
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1

    def close(self) -> None:
        self.sock.close()


# --- 6: the socket's directory -----------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@needs_root
def test_the_daemon_refuses_a_socket_directory_owned_by_another_user(short_tmp):
    d = theirs(short_tmp / "theirs")
    r = refused(str(d / "meshd.sock"), str(short_tmp / "data"))
    assert f"{d} belongs to uid {NOBODY}" in r.stderr, r.stderr
    assert os.listdir(d) == []
    assert not (short_tmp / "data").exists()         # refused before anything was opened


def test_the_daemon_refuses_a_socket_directory_writable_by_others(short_tmp):
    d = short_tmp / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    r = refused(str(d / "meshd.sock"), str(short_tmp / "data"))
    assert f"{d} is writable by other users (mode 0777)" in r.stderr, r.stderr
    assert os.listdir(d) == []


@needs_root
def test_the_default_socket_directory_made_first_by_another_user_is_refused(short_tmp):
    """The issue's case: the per-user directory under a shared place exists already, made
    by someone else with mode 0777 (here under XDG_RUNTIME_DIR, which the default uses
    before /tmp/meshd-UID, so the test touches no shared path)."""
    runtime = short_tmp / "xdg"
    runtime.mkdir(mode=0o700)
    planted = theirs(runtime / "meshd", 0o777)
    env = subprocess_env(XDG_RUNTIME_DIR=str(runtime))
    r = refused("", str(short_tmp / "data"), env=env)
    assert str(planted) in r.stderr and "belongs to uid" in r.stderr, r.stderr
    assert os.listdir(planted) == []


@needs_root
@pytest.mark.parametrize("kind", ["owned by another user", "writable by others"])
def test_clients_refuse_a_socket_in_a_directory_another_user_controls(short_tmp, kind):
    from sessions import DaemonUnavailable, SharedMemory
    from sessions.aio import AsyncSharedMemory
    if kind == "owned by another user":
        d, expected = theirs(short_tmp / "theirs", 0o755), f"belongs to uid {NOBODY}"
    else:
        d, expected = short_tmp / "open", "is writable by other users"
        d.mkdir()
        os.chmod(d, 0o777)
    planted = Planted(d / "meshd.sock")
    try:
        with pytest.raises(DaemonUnavailable, match=expected):
            SharedMemory(socket=planted.path, timeout=2).set("victim", "secret", "value")

        async def aio_set() -> None:
            await AsyncSharedMemory(socket=planted.path, timeout=2).set("v", "secret", "v")
        import asyncio
        with pytest.raises(DaemonUnavailable, match=expected):
            asyncio.run(aio_set())
        r = run_cli(["memory-set", "victim", "secret", "value"],
                    subprocess_env(MESHD_SOCKET=planted.path))
        assert r.returncode == 1 and expected in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert planted.connections() == 0, "a client connected to the planted socket"
    finally:
        planted.close()


def test_a_private_socket_directory_still_serves(daemon):
    """The fixtures' directories (owner-only) are what a user has: nothing changes there."""
    assert stat.S_IMODE(os.stat(os.path.dirname(daemon.socket)).st_mode) & 0o022 == 0
    daemon.memory().set("s", "k", 1)
    assert daemon.memory().get("k") == 1


# --- 7: file modes -----------------------------------------------------------------------------

def data_files(data_dir: str) -> dict[str, int]:
    return {name: stat.S_IMODE(os.stat(os.path.join(data_dir, name)).st_mode)
            for name in os.listdir(data_dir)}


def test_a_new_data_dir_is_owner_only_and_so_is_every_file_in_it(make_daemon):
    old = os.umask(0o022)                    # the usual umask, which made them 0644
    try:
        d = make_daemon(args=["--no-mesh"])
    finally:
        os.umask(old)
    d.memory().set("s", "k", "secret")
    d.registry().register("s", "S", "T")
    assert stat.S_IMODE(os.stat(d.data_dir).st_mode) == 0o700
    files = data_files(d.data_dir)
    assert {"meshd.db", "meshd.db-wal", "journal.0", "journal.1"} <= set(files), files
    assert {n: m for n, m in files.items() if m & 0o077} == {}, files


def test_files_an_open_data_dir_had_are_tightened_at_start_and_logged(make_daemon, short_tmp):
    data = short_tmp / "d-data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)                    # an existing data dir every user may enter
    d = make_daemon(args=["--no-mesh"], start=False)
    old = os.umask(0o022)
    try:
        d.start()
        d.memory().set("s", "k", "secret")
        assert d.stop() == 0
        for name in ("meshd.db", "journal.0"):      # as an older meshd left them
            os.chmod(data / name, 0o644)
        d.start()
    finally:
        os.umask(old)
    assert d.memory().get("k") == "secret"
    files = data_files(d.data_dir)
    assert {n: m for n, m in files.items() if m & 0o077} == {}, files
    log = d.log()
    for name in ("meshd.db", "journal.0"):
        assert f"{data / name} was readable by other users (mode 0644): made it owner-only" \
            in log, log


# --- 8: what may be in the socket's place ------------------------------------------------------

@pytest.mark.parametrize("kind", ["regular file", "directory", "symbolic link"])
def test_a_socket_path_that_is_not_a_socket_is_refused_and_left_alone(short_tmp, kind):
    path = short_tmp / "precious"
    target = short_tmp / "target.txt"
    target.write_text("keep me")
    if kind == "regular file":
        path.write_text("keep me")
    elif kind == "directory":
        path.mkdir()
        (path / "inside").write_text("keep me")
    else:
        path.symlink_to(target)
    r = refused(str(path), str(short_tmp / "data"))
    assert f"{path} exists and is a {kind}, not a socket" in r.stderr, r.stderr
    if kind == "regular file":
        assert path.read_text() == "keep me"
    elif kind == "directory":
        assert (path / "inside").read_text() == "keep me"
    else:
        assert path.is_symlink() and os.readlink(path) == str(target)
    assert target.read_text() == "keep me"


def test_a_socket_someone_answers_on_is_not_taken(short_tmp):
    """Not only another meshd: any program listening there keeps its socket."""
    other = Planted(short_tmp / "busy.sock")
    try:
        r = refused(other.path, str(short_tmp / "data"))
        assert "already serving on" in r.stderr, r.stderr
        assert stat.S_ISSOCK(os.lstat(other.path).st_mode)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(other.path)                   # still the same listener
        probe.close()
    finally:
        other.close()


def test_a_stale_socket_is_replaced(short_tmp):
    """Only a socket nobody answers on (a daemon killed with -9) gives way."""
    path = short_tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()                                       # bound, never listening: stale
    d = Daemon(str(path), str(short_tmp / "data"), str(short_tmp / "d.log"), args=["--no-mesh"])
    try:
        d.start()
        d.memory().set("s", "k", 1)
        assert d.memory().get("k") == 1
    finally:
        d.stop()
