"""Fixtures and hooks for every test: real `meshd` processes on short ipc paths, each
stopped by its pid when the test ends (also on failure); the kind of each test from its
directory; and a check that no test leaves a daemon or a lab's namespace behind.

tests/ holds one directory per kind, fastest first (README.md, "Contributing"):
  unit/     no daemon process: pure functions, in-process stores, the fake network
  daemon/   one real daemon per test, no peers
  cluster/  several daemons on loopback            (marked slow)
  lab/      hosts made of network namespaces       (marked slow, netns; needs root and `ip`)
so `pytest -m "not slow"` runs unit/ and daemon/. Shared helpers are in support/, which test
files import (`from support.daemons import Daemon, eventually`); they never import each
other. support/ is importable because pytest puts this file's directory, tests/, on sys.path
when it imports it (the default "prepend" import mode; there is no __init__.py in tests/).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from support import leaks
from support.daemons import Daemon

TESTS = Path(__file__).resolve().parent
KINDS = ("unit", "daemon", "cluster", "lab")
SLOW = {"cluster", "lab"}


@pytest.hookimpl(tryfirst=True)       # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its kind, the directory it is in (cluster and lab tests are slow),
    and run the kinds fastest first, each in its files' order: a break shows early."""
    order: dict[str, int] = {}
    for item in items:
        try:
            kind = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:              # a test from elsewhere, named on the command line
            continue
        if kind not in KINDS:
            raise pytest.UsageError(f"{item.path}: a test file goes in one of tests/"
                                    f"{{{','.join(KINDS)}}}/, by the slowest thing it starts")
        order[item.nodeid] = KINDS.index(kind)
        item.add_marker(kind)
        if kind in SLOW:
            item.add_marker("slow")
        if kind == "lab":
            item.add_marker("netns")
    items.sort(key=lambda item: order.get(item.nodeid, len(KINDS)))


@pytest.fixture(autouse=True)
def no_daemon_left_behind() -> Iterator[None]:
    """After each test (its fixtures torn down), no meshd daemon it started may still run
    below this process: any that does is killed (SIGKILL, by pid) and the test errors, naming
    it. Daemons of a wider fixture (a module's shared daemon) were there before and count
    only at the end of the run."""
    before = set(leaks.daemons_below())
    yield
    left = {pid: cmd for pid, cmd in leaks.daemons_below().items() if pid not in before}
    if left:
        leaks.kill(list(left))
        pytest.fail("the test left meshd running (killed now):\n"
                    + "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in sorted(left.items())),
                    pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """At the end of the run: no daemon below this process, no namespace of a lab."""
    problems = []
    daemons = leaks.daemons_below()
    if daemons:
        leaks.kill(list(daemons))
        problems += [f"meshd left running (killed now): pid {pid}: {cmd}"
                     for pid, cmd in sorted(daemons.items())]
    namespaces = leaks.lab_namespaces_left()
    if namespaces:
        leaks.delete_namespaces(namespaces)
        problems.append(f"network namespaces left by a lab (deleted now): {sorted(namespaces)}")
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "left behind by the tests", red=True, bold=True)
        for line in problems:
            if reporter is not None:
                reporter.write_line(line, red=True, bold=True)
            else:
                print(f"left behind by the tests: {line}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- daemons -------------------------------------------------------------------------------------

@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: ipc:// socket paths are limited to 107 bytes."""
    d = tempfile.mkdtemp(prefix="mt", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_daemon(short_tmp: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: make_daemon(name="d", args=[...], start=True) -> Daemon; all are stopped."""
    made: list[Daemon] = []

    def make(name: str = "d", args: list[str] | None = None, start: bool = True) -> Daemon:
        d = Daemon(socket=str(short_tmp / f"{name}.sock"), data_dir=str(short_tmp / f"{name}-data"),
                   log_path=str(short_tmp / f"{name}.log"), args=list(args or []))
        made.append(d)
        return d.start() if start else d

    try:
        yield make
    finally:
        for d in made:
            d.stop(timeout=5)


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()


# --- clusters ----------------------------------------------------------------------------------

@pytest.fixture
def make_cluster(make_daemon: Callable[..., Daemon]) -> Callable[..., list[Daemon]]:
    """make_cluster(n, args=[...]) -> n daemons, node i on 127.0.0.(10+i) with a free port,
    every other node joining node 0; all are stopped by the make_daemon fixture."""

    def make(n: int, args: list[str] | None = None, first: int = 0) -> list[Daemon]:
        nodes: list[Daemon] = []
        for i in range(first, first + n):
            extra = ["--bind", f"127.0.0.{10 + i}:0", *(args or [])]
            if nodes:
                assert nodes[0].peer_address
                extra += ["--join", nodes[0].peer_address]
            nodes.append(make_daemon(f"n{i}", args=extra))
        return nodes

    return make
