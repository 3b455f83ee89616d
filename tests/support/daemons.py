"""Real `meshd` processes on short ipc paths, the environment their children get, the CLI as
a user runs it, `eventually`, and what a cluster of daemons sees of itself."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from support import ROOT


def _runs_from_checkout() -> bool:
    """True when `meshd` is imported from this tree (editable install, `python -m pytest`
    from the root); False when the tests exercise an installed wheel, as CI does."""
    import importlib.util
    spec = importlib.util.find_spec("meshd")
    # (.venv may sit inside the checkout: compare with the tree's own file, not the prefix.)
    return bool(spec and spec.origin
                and Path(spec.origin).resolve() == ROOT / "meshd" / "__init__.py")


FROM_CHECKOUT = _runs_from_checkout()
# Children run from outside the checkout, so `python -m meshd` finds the installed package,
# never the tree's copy through the current directory.
CHILD_CWD = tempfile.gettempdir()


def eventually(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll `pred` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:            # the condition may raise until it holds
            last_exc = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} did not hold within {timeout}s"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: the code under test the tests import too (the
    checkout when run from it, else the installed wheel, never mixed)."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "sdk")] if FROM_CHECKOUT else []
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("MESHD_SOCKET", None)
    # A daemon a test starts with defaults listens for peers on loopback, on a free port.
    env["MESHD_BIND"] = "127.0.0.1:0"
    # Never mDNS on this machine's own network: only lab tests (namespaces) turn it on.
    env["MESHD_DISCOVERY"] = "0"
    env.pop("MESHD_ADVERTISE", None)
    # No config file of this machine's user (or root's /etc/meshd/meshd.toml) in a test:
    # the tests that read one say so (tests/daemon/test_config_file.py).
    env["MESHD_CONFIG"] = "/dev/null"
    env.update(extra)
    return env


@dataclass
class Daemon:
    """A real meshd process on its own socket and data directory."""

    socket: str
    data_dir: str
    log_path: str
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    peer_address: str | None = None
    wrap: list[str] = field(default_factory=list)    # e.g. ["ip", "netns", "exec", NS]

    def start(self, timeout: float = 15.0) -> "Daemon":
        # Never the default peer port on every interface: loopback, a free port, unless
        # the test chose (--bind) or wants no mesh at all (--no-mesh).
        net = [] if {"--bind", "--no-mesh"} & set(self.args) else ["--bind", "127.0.0.1:0"]
        cmd = [*self.wrap, sys.executable, "-m", "meshd", "--socket", self.socket, "--data-dir",
               self.data_dir, "--preset", "test", "--log-level", "info", *net, *self.args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=subprocess_env(),
                                     cwd=CHILD_CWD)
        log.close()
        self.wait_ready(timeout)
        info = self.registry(timeout=5).node_info()
        self.node_id, self.peer_address = info["node_id"], info.get("peer_address")
        if "--bind" in self.args and self.peer_address:
            i = self.args.index("--bind") + 1
            if self.args[i].endswith(":0"):       # keep the port it got across restarts
                self.args[i] = self.peer_address
        return self

    def wait_ready(self, timeout: float) -> None:
        from sessions import SessionRegistry

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshd exited with {self.proc.returncode}:\n{self.log()}")
            if not os.path.exists(self.socket):
                return False
            SessionRegistry(socket=self.socket, timeout=1.0).node_info()
            return True

        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except RuntimeError:
                raise
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.kill9()
                raise RuntimeError(f"meshd did not become ready in {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if os.environ.get("MESHD_TEST_DUMP_HANGS") and shutil.which("py-spy"):
                    dump = subprocess.run(["py-spy", "dump", "--pid", str(self.proc.pid)],
                                          capture_output=True, text=True, timeout=30).stdout
                    with open(os.environ["MESHD_TEST_DUMP_HANGS"], "a") as f:
                        f.write(f"--- {self.log_path}\n{dump}\n{self.log()}\n")
                self.kill9()
        return self.proc.returncode

    def restart(self) -> "Daemon":
        self.stop()
        return self.start()

    def env(self, **extra: str) -> dict[str, str]:
        return subprocess_env(MESHD_SOCKET=self.socket, **extra)

    # SDK objects bound to this daemon
    def registry(self, **kw: Any) -> Any:
        from sessions import SessionRegistry
        return SessionRegistry(socket=self.socket, **kw)

    def hub(self, **kw: Any) -> Any:
        from sessions import CollaborationHub
        return CollaborationHub(socket=self.socket, **kw)

    def memory(self, **kw: Any) -> Any:
        from sessions import SharedMemory
        return SharedMemory(socket=self.socket, **kw)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m sessions ARGS` as a user would."""
    return subprocess.run([sys.executable, "-m", "sessions", *args], env=env, cwd=CHILD_CWD,
                          capture_output=True, text=True, timeout=timeout, input=input)


def python_on_path(tmp: Path) -> str:
    """A bin dir whose `python` is this interpreter (the one the package is installed in),
    for putting first on a child's PATH."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return str(bindir)


def peer_states(d: Daemon) -> dict[str, str]:
    """node_id -> state, as daemon `d` sees its peers."""
    return {p["node_id"]: p["state"] for p in d.registry(timeout=5).peers()}


def wait_converged(nodes: list[Daemon], timeout: float = 30.0) -> None:
    """Every running node sees every other running node alive."""
    live = [d for d in nodes if d.alive()]

    def converged() -> bool:
        for d in live:
            states = peer_states(d)
            if any(states.get(o.node_id) != "alive" for o in live if o is not d):
                return False
        return True

    eventually(converged, timeout=timeout, interval=0.05,
               message=f"{len(live)} nodes seeing each other alive")


def collect_events(stream: Any, until: Callable[[list[Any]], Any], timeout: float = 10.0
                   ) -> list[Any]:
    """Events read from a stream with `next(timeout=)` (a monitor, a memory watch) until
    `until(events)` holds or `timeout` seconds passed."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        ev = stream.next(timeout=0.2)
        if ev is not None:
            got.append(ev)
    return got
