"""What a test must not leave behind: `meshd` daemons still running below this pytest
process, and network namespaces a lab (support.netlab) made and did not delete.
tests/conftest.py checks both: daemons after every test, namespaces at the end of the run.

Only what this process started counts: other test runs on the same machine (their daemons,
their labs) are never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) of every process, from /proc/PID/stat."""
    out: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:                         # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # the name, in parentheses, may hold spaces
        out[int(entry)] = (int(fields[1]), fields[0])
    return out


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_daemon(argv: list[str]) -> bool:
    """`meshd --socket ...` or `python -m meshd --socket ...`."""
    if not any(a == "--socket" or a.startswith("--socket=") for a in argv):
        return False
    if argv and os.path.basename(argv[0]) == "meshd":
        return True
    return any(a == "-m" and b == "meshd" for a, b in zip(argv, argv[1:]))


def daemons_below(root: int | None = None) -> dict[int, str]:
    """pid -> command line of each running meshd daemon descended from `root` (this
    process by default), however deep (a daemon started through `ip netns exec`, a shell)."""
    root = os.getpid() if root is None else root
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if procs[pid][1] == "Z":                # exited, not yet reaped: not running
            continue
        argv = _argv(pid)
        if is_daemon(argv):
            found[pid] = " ".join(argv)
    return found


def kill(pids: list[int], timeout: float = 5.0) -> None:
    """SIGKILL each pid and wait (bounded) until it has exited."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _processes()
        if all(pid not in state or state[pid][1] == "Z" for pid in pids):
            return
        time.sleep(0.02)


# --- network namespaces -----------------------------------------------------------------------

def namespaces() -> set[str]:
    """The names `ip netns list` gives (empty when there is no `ip`, or no right to ask)."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        return set()
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


def lab_namespaces_left() -> set[str]:
    """Namespaces a lab of this process made (netlab.MADE) that still exist."""
    netlab = sys.modules.get("support.netlab")
    if netlab is None or not netlab.MADE:       # no lab ran, or every one was closed
        return set()
    return namespaces() & set(netlab.MADE)


def delete_namespaces(names: set[str]) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
