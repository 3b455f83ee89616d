"""Three hosts on one machine: three meshd daemons on loopback form a mesh, and sessions on
different "hosts" message each other and share memory, as they would across a LAN.

    python examples/three_hosts.py

No daemon needed (a directory argument is ignored): it starts three meshd in a temp
directory, each listening for peers on 127.0.0.1 (a free port, no mDNS), the 2nd and 3rd
joining the 1st; whatever happens, it stops them (SIGTERM, then SIGKILL) and removes the
directory. An SDK object picks its host with `socket=`, e.g. SessionRegistry(socket=...).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import _common  # noqa: F401  (SDK errors as one line, exit status 1)
from sessions import CollaborationHub, MessageType, SessionRegistry, SessionsError, SharedMemory

SESSIONS = ["alpha-001", "beta-002", "gamma-003"]    # one on each host
daemons: list[subprocess.Popen] = []


def wait_for(what, check, timeout=20.0):
    """Poll check() until it returns something true (SDK errors count as "not yet")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except SessionsError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"❌ {what}: not within {timeout:g} s")


def start_meshd(tmp, name, join=None):
    """A meshd with its socket, data and log in `tmp`; returns (socket, peer address)."""
    sock, log = os.path.join(tmp, f"{name}.sock"), os.path.join(tmp, f"{name}.log")
    cmd = [sys.executable, "-m", "meshd", "--socket", sock, "--data-dir", os.path.join(tmp, name),
           "--bind", "127.0.0.1:0", "--no-discovery", "--preset", "test", "--log-level", "warning"]
    cmd += ["--join", join] if join else []            # the 1st one's peer address
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}  # flags only
    with open(log, "wb") as out:
        daemons.append(proc := subprocess.Popen(cmd, stdout=out, stderr=out, env=env))
    # (flushed: a test reads these pids even if this script gets killed)
    print(f"started meshd pid {proc.pid} ({name}{' joining ' + join if join else ''})", flush=True)

    def ready():
        if proc.poll() is not None:
            last = (open(log).read().strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"❌ meshd {name} exited with status {proc.returncode}: {last}")
        return os.path.exists(sock) and SessionRegistry(socket=sock, timeout=1).node_info()
    return sock, wait_for(f"meshd {name} answering on {sock}", ready)["peer_address"]


def inbox_has(hub, session_id, message):
    return lambda: any(m.message_id == message.message_id for m in hub.get_messages(session_id))


signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # a `kill` of this script cleans up too
tmp = tempfile.mkdtemp(prefix="meshd3-", dir="/tmp")    # short: socket paths are limited
print(f"the three hosts keep their sockets, data and logs in {tmp}")
try:
    sock1, address = start_meshd(tmp, "h1")
    socks = [sock1] + [start_meshd(tmp, name, address)[0] for name in ("h2", "h3")]
    regs = [SessionRegistry(socket=s) for s in socks]
    hubs = [CollaborationHub(socket=s) for s in socks]
    wait_for("every host seeing the two others alive", lambda: all(
        sum(p["state"] == "alive" for p in reg.peers()) == 2 for reg in regs))
    for host, (reg, sid) in enumerate(zip(regs, SESSIONS), 1):
        reg.register(sid, sid.split("-")[0].title(), "Claude")
        print(f"registered {sid} on host {host}")
    # Registrations replicate: host 1 soon lists all three (a broadcast reaches those it knows).
    wait_for("host 1 listing the three sessions", lambda: {
        s.session_id for s in regs[0].list_sessions()} >= set(SESSIONS))

    msg = hubs[2].send("gamma-003", "beta-002", MessageType.REQUEST, "Hello from host 3", "Hi!")
    wait_for("the message reaching host 2", inbox_has(hubs[1], "beta-002", msg))
    print(f"host 2 received: {msg.format_signal()}")
    news = hubs[0].broadcast("alpha-001", "Standup", "Status, everyone?")
    for host in (2, 3):
        wait_for(f"the broadcast reaching host {host}",
                 inbox_has(hubs[host - 1], SESSIONS[host - 1], news))
        print(f"host {host} received: {news.format_signal()}")

    SharedMemory(socket=socks[1]).set("beta-002", "build", {"status": "green"}, tags=["ci"])
    memory3 = SharedMemory(socket=socks[2])
    value = wait_for("memory replicating to host 3", lambda: memory3.get("build"))
    print(f"host 3 reads 'build', set on host 2: {value}")
    print("host 1's peers:")
    for peer in regs[0].peers():
        print(f"  {peer['node_id'][:12]} at {peer['address']}: {peer['state']}")
finally:
    for proc in daemons:
        proc.terminate()                  # SIGTERM to each (a no-op if it already exited)
    for proc in daemons:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()                   # SIGKILL: it did not stop within 10 s
            proc.wait(10)
    shutil.rmtree(tmp, ignore_errors=True)
    print("stopped meshd pids", ", ".join(f"{p.pid} (status {p.returncode})" for p in daemons))
