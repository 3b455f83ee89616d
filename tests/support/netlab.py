"""A lab of test hosts: Linux network namespaces joined by a bridge.

Each host is a namespace with one veth interface and a private address (10.77.0.10+i/24).
The bridge lives in a namespace of its own (the "switch"), so nothing is added to this
machine's own network: no interface, route or address outside the lab's namespaces.
`cut(i)` takes host i's cable out of the switch and `heal(i)` plugs it back. Processes run
inside a host with `popen(i, argv)`. `close()` stops every process it started (by pid) and
deletes every namespace; the `netlab` fixture calls it also when a test fails.

Needs root and `ip` (iproute2); `skip_reason()` says why not when it cannot run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from typing import Any

SUBNET = "10.77.0"
# Every namespace this process asked for, whether or not it was deleted since: at the end of
# the run conftest checks that none of them is left (support.leaks).
MADE: set[str] = set()


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs `ip` from iproute2 to create network namespaces"
    probe = f"mlp{uuid.uuid4().hex[:6]}"
    MADE.add(probe)
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    if args[:2] == ("netns", "add"):
        MADE.add(args[2])
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Lab:
    def __init__(self, hosts: int) -> None:
        self.tag = uuid.uuid4().hex[:5]                 # names stay under 15 characters
        self.switch = f"ml{self.tag}sw"
        self.hosts = [f"ml{self.tag}h{i}" for i in range(hosts)]
        self.procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def address(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")
        for i, ns in enumerate(self.hosts):
            _ip("netns", "add", ns)
            self._made.append(ns)
            host_end, switch_end = f"ml{self.tag}a{i}", f"ml{self.tag}b{i}"
            _ip("link", "add", host_end, "netns", ns, "type", "veth", "peer", "name",
                switch_end, "netns", self.switch)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", host_end, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.switch, "link", "set", switch_end, "master", "br0")
            _ip("-n", self.switch, "link", "set", switch_end, "up")

    def _cable(self, i: int) -> str:
        return f"ml{self.tag}b{i}"

    def cut(self, i: int) -> None:
        """Unplug host i from the switch: it can no longer reach anyone, nor be reached."""
        _ip("-n", self.switch, "link", "set", self._cable(i), "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.switch, "link", "set", self._cable(i), "up")

    def popen(self, i: int, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[i], *argv], **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
