"""The daemon process itself: readiness notification, socket and data paths and modes,
signals, identity, and logging."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from support.daemons import Daemon, eventually, subprocess_env
from meshd.config import candidate_socket_paths, default_data_dir, default_socket_path


def test_sd_notify_ready_once_serving(short_tmp):
    notify_path = str(short_tmp / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(15)
    sock = str(short_tmp / "n.sock")
    proc = subprocess.Popen([sys.executable, "-m", "meshd", "--socket", sock, "--data-dir",
                             str(short_tmp / "data")], env=subprocess_env(NOTIFY_SOCKET=notify_path),
                            stderr=subprocess.PIPE)
    try:
        msg = listener.recv(4096).decode()
        assert "READY=1" in msg.splitlines()
        # READY means serving: the socket answers right away
        from sessions import SessionRegistry
        assert SessionRegistry(socket=sock, timeout=5).node_info()["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        listener.close()


def test_socket_is_owner_only_and_removed_on_sigterm(daemon):
    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o600
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.socket)


def test_system_mode_socket_is_group_accessible(make_daemon):
    d = make_daemon(args=["--system"])
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660


def test_sigint_stops_cleanly(daemon):
    os.kill(daemon.pid, signal.SIGINT)
    assert daemon.proc.wait(10) == 0


def test_env_variables_choose_paths(short_tmp):
    sock, data = str(short_tmp / "e.sock"), str(short_tmp / "edata")
    proc = subprocess.Popen([sys.executable, "-m", "meshd"],
                            env=subprocess_env(MESHD_SOCKET=sock, MESHD_DATA_DIR=data),
                            stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: os.path.exists(sock), timeout=15, message="socket from MESHD_SOCKET")
        assert os.path.exists(os.path.join(data, "meshd.db"))
    finally:
        proc.terminate()
        proc.wait(10)


def test_default_paths():
    env = {"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/u"}
    assert default_socket_path(env) == "/run/user/1000/meshd/meshd.sock"
    assert default_socket_path(env, system=True) == "/run/meshd/meshd.sock"
    assert default_socket_path({"MESHD_SOCKET": "/x.sock"}) == "/x.sock"
    assert default_socket_path({"RUNTIME_DIRECTORY": "/run/meshd"}) == "/run/meshd/meshd.sock"
    assert candidate_socket_paths(env) == ["/run/user/1000/meshd/meshd.sock",
                                           "/run/meshd/meshd.sock"]
    assert default_data_dir(env) == "/home/u/.local/state/meshd"
    assert default_data_dir({"XDG_STATE_HOME": "/s"}) == "/s/meshd"
    assert default_data_dir({"STATE_DIRECTORY": "/var/lib/meshd"}) == "/var/lib/meshd"
    assert default_data_dir({}, system=True) == "/var/lib/meshd"


def test_node_id_is_stable_and_logs_are_one_line_per_event(make_daemon):
    d = make_daemon()
    first = d.registry().node_info()["node_id"]
    d.restart()
    assert d.registry().node_info()["node_id"] == first
    d.stop()
    lines = [line for line in d.log().splitlines() if line.strip()]
    assert any("ready" in line and first in line for line in lines)
    assert all(" INFO " in line or " WARNING " in line or " ERROR " in line for line in lines)


def test_missing_daemon_is_a_clear_error(short_tmp):
    from sessions import DaemonUnavailable, SharedMemory
    path = str(short_tmp / "nobody.sock")
    with pytest.raises(DaemonUnavailable) as e:
        SharedMemory(socket=path).get("k")
    assert path in str(e.value) and "meshd" in str(e.value)
    # a stale socket file (daemon killed) is reported at once, not after the timeout
    d = Daemon(str(short_tmp / "s.sock"), str(short_tmp / "sdata"), str(short_tmp / "s.log"))
    d.start()
    d.kill9()
    assert os.path.exists(d.socket)
    t0 = time.monotonic()
    with pytest.raises(DaemonUnavailable):
        SharedMemory(socket=d.socket, timeout=30).get("k")
    assert time.monotonic() - t0 < 5


def test_calls_time_out_when_the_daemon_hangs(daemon):
    from sessions import SharedMemory, Timeout
    mem = SharedMemory(socket=daemon.socket, timeout=0.5)
    mem.set("s", "k", 1)
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            mem.get("k")
        assert time.monotonic() - t0 < 3
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert eventually(lambda: mem.get("k") == 1, timeout=10, message="answers after SIGCONT")


def test_watchdog_pings_when_systemd_asks(short_tmp):
    notify_path = str(short_tmp / "wd")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(10)
    proc = subprocess.Popen([sys.executable, "-m", "meshd", "--socket", str(short_tmp / "w.sock"),
                             "--data-dir", str(short_tmp / "wdata")],
                            env=subprocess_env(NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="400000"),
                            stderr=subprocess.DEVNULL)
    try:
        seen = []
        deadline = time.monotonic() + 10
        while seen.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            seen.extend(listener.recv(4096).decode().splitlines())
        assert seen.count("WATCHDOG=1") >= 3, seen
    finally:
        proc.terminate()
        proc.wait(10)
        listener.close()
