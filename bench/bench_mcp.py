#!/usr/bin/env python3
"""meshd MCP benchmark: a tool call through `sessions mcp` (stdio), next to the SDK call
it wraps, in the same run against the same daemon.

    python bench/bench_mcp.py [--quick] [--calls N] [--rounds R] [--mode legacy|auto]

In one run on this host it starts:
  1. a real `python -m meshd` on a temporary socket and data dir (--no-mesh);
  2. `python -m sessions mcp --session bench-mcp` as a child of this process, driven by
     the `mcp` SDK's own client over stdio (the handshake era by default, which is what
     Claude Code speaks to a stdio server; --mode auto lets the client pick 2026-07-28);
and measures, in rounds that alternate every operation (so drift in a shared VM's speed
weighs on every row alike), p50/p99 of:
  - the MCP ping (a JSON-RPC round trip over the pipes, no tool, no daemon): the floor;
  - message send: the blocking SDK, the asyncio SDK, the `send_message` tool (which first
    checks that the recipient exists: two daemon calls), and the tool with
    queue_if_unknown=true (one daemon call, as the SDK);
  - memory get: the blocking SDK, the asyncio SDK, the `memory_get` tool;
and the CPU each call costs the bench process, the MCP server and the daemon.

It prints a table. It is a measurement, not a test: it never asserts a time. Everything
stays on this host; every wait is bounded (SDK calls 10 s, MCP calls 10 s, start-up 15 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from _common import ENV, ROOT, BenchError, cpu_ns, eventually, pct_us, stop_pid  # noqa: E402

SDK_TIMEOUT = 10.0
CALL_TIMEOUT = 10.0
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
PEER = "bench-peer"
ME = "bench-mcp"


def mcp_server_pid() -> int | None:
    """The `sessions mcp` child the SDK's stdio client started (it does not expose it)."""
    for path in Path("/proc/self/task").glob("*/children"):
        for pid in path.read_text().split():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"sessions" in cmd and b"mcp" in cmd:
                return int(pid)
    return None


async def main_async(args: argparse.Namespace, sock: str, state: str,
                     daemon_pid: int) -> dict[str, Any]:
    from mcp import Client, StdioServerParameters
    from sessions import CollaborationHub, SessionRegistry, SharedMemory
    from sessions.aio import AsyncCollaborationHub, AsyncSharedMemory

    reg = SessionRegistry(socket=sock, timeout=SDK_TIMEOUT)
    reg.register(PEER, "Peer", "bench")
    hub = CollaborationHub(socket=sock, timeout=SDK_TIMEOUT)
    mem = SharedMemory(socket=sock, timeout=SDK_TIMEOUT)
    ahub = AsyncCollaborationHub(socket=sock, timeout=SDK_TIMEOUT)
    amem = AsyncSharedMemory(socket=sock, timeout=SDK_TIMEOUT)
    mem.set(ME, "k1", {"plan": "x" * 64, "step": 1}, tags=["bench"])

    env = dict(ENV, MESHD_SOCKET=sock, XDG_STATE_HOME=state)
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "sessions", "mcp", "--session", ME], env=env,
                                   cwd=str(ROOT))
    t0 = time.monotonic()
    async with Client(params, mode=args.mode, read_timeout_seconds=CALL_TIMEOUT) as c:
        async def tool(name: str, **a: Any) -> None:
            r = await c.call_tool(name, a, read_timeout_seconds=CALL_TIMEOUT)
            if r.is_error:
                raise BenchError(f"{name} failed: {r.content[0].text}")

        deadline = time.monotonic() + START_TIMEOUT
        while True:                          # the server joins the mesh in the background
            r = await c.call_tool("whoami", {})
            if not r.is_error:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"sessions mcp did not join: {r.content[0].text}")
            await asyncio.sleep(0.05)
        startup = time.monotonic() - t0
        server_pid = mcp_server_pid()

        def sync(fn: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                fn()
            return run

        async def ping() -> None:
            await c.session.send_ping()

        ops: dict[str, Callable[[], Awaitable[None]]] = {
            "MCP ping (pipes + JSON-RPC only)": ping,
            "send: SDK, blocking": sync(lambda: hub.send(ME, PEER, "request", "s", "body")),
            "send: SDK, asyncio": lambda: ahub.send(ME, PEER, "request", "s", "body"),
            "send: MCP send_message": lambda: tool("send_message", to=PEER, subject="s",
                                                   body="body"),
            "send: MCP, queue_if_unknown": lambda: tool("send_message", to=PEER, subject="s",
                                                        body="body", queue_if_unknown=True),
            "get: SDK, blocking": sync(lambda: mem.get("k1")),
            "get: SDK, asyncio": lambda: amem.get("k1"),
            "get: MCP memory_get": lambda: tool("memory_get", key="k1"),
        }
        lat: dict[str, list[int]] = {n: [] for n in ops}
        cpu: dict[str, list[int]] = {n: [0, 0, 0, 0] for n in ops}   # bench, mcp, daemon, n
        for fn in ops.values():                                       # warm-up
            for _ in range(args.warm):
                await fn()
        per_round = max(1, args.calls // args.rounds)
        clock = time.perf_counter_ns
        for _ in range(args.rounds):
            for name, fn in ops.items():
                c0 = time.process_time_ns()
                m0 = cpu_ns(server_pid) or 0 if server_pid else 0
                d0 = cpu_ns(daemon_pid) or 0
                for _ in range(per_round):
                    t = clock()
                    await fn()
                    lat[name].append(clock() - t)
                cpu[name][0] += time.process_time_ns() - c0
                cpu[name][1] += (cpu_ns(server_pid) or 0) - m0 if server_pid else 0
                cpu[name][2] += (cpu_ns(daemon_pid) or 0) - d0
                cpu[name][3] += per_round
        protocol = c.protocol_version
    await ahub.close()
    await amem.close()
    return {"lat": lat, "cpu": cpu, "startup": startup, "protocol": protocol,
            "server_pid": server_pid}


def report(res: dict[str, Any], args: argparse.Namespace, wall: float, stopped: str) -> None:
    lat, cpu = res["lat"], res["cpu"]
    base = {"send": "send: SDK, blocking", "get": "get: SDK, blocking"}
    print()
    print(f"meshd MCP benchmark: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"MCP protocol {res['protocol']} over stdio")
    n = len(next(iter(lat.values())))
    print(f"{n} calls per row in {args.rounds} alternating rounds after {args.warm} warm-up "
          f"calls; ratios are over the blocking SDK call of the same operation")
    print()
    w = 86
    print(f"{'operation':<36}{'p50 µs':>9}{'p99 µs':>10}{'p50 ratio':>11}{'p99 ratio':>11}")
    print("-" * w)
    for name, samples in lat.items():
        p50, p99 = pct_us(samples, 0.5), pct_us(samples, 0.99)
        ref = base.get(name.split(":")[0])
        if ref and ref != name:
            r50 = f"{p50 / pct_us(lat[ref], 0.5):>10.1f}x"
            r99 = f"{p99 / pct_us(lat[ref], 0.99):>10.1f}x"
        else:
            r50 = r99 = f"{'-':>11}"
        print(f"{name:<36}{p50:>9.1f}{p99:>10.1f}{r50}{r99}")
    print()
    print("CPU per call (µs): the bench process (client), the sessions mcp process, the daemon")
    print(f"  {'operation':<34}{'client':>9}{'mcp server':>12}{'daemon':>9}")
    for name, (cb, cm, cd, k) in cpu.items():
        print(f"  {name:<34}{cb / k / 1000:>9.1f}{cm / k / 1000:>12.1f}{cd / k / 1000:>9.1f}")
    print()
    print(f"sessions mcp: joined the mesh {res['startup']:.2f}s after launch (process start, "
          f"imports, handshake, registration); daemon {stopped}; total {wall:.1f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run with small counts (smoke)")
    ap.add_argument("--calls", type=int, default=None, help="calls per row (default 2000)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 10)")
    ap.add_argument("--mode", choices=["legacy", "auto"], default="legacy",
                    help="MCP protocol negotiation of the client (default legacy: handshake)")
    args = ap.parse_args()
    args.calls = max(10, min(args.calls or (200 if args.quick else 2000), 100_000))
    args.rounds = max(1, min(args.rounds or (2 if args.quick else 10), args.calls))
    args.warm = 20 if args.quick else 100
    try:
        import mcp  # noqa: F401
    except ImportError:
        print("bench_mcp needs the MCP SDK: pip install 'meshd[mcp]'", file=sys.stderr)
        return 2

    tmp = tempfile.mkdtemp(prefix="mbm", dir="/tmp")       # short: ipc paths <= 107 bytes
    sock, log_path = f"{tmp}/meshd.sock", f"{tmp}/meshd.log"
    t0 = time.monotonic()
    stopped = "not started"
    proc = None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshd", "--socket", sock, "--data-dir", f"{tmp}/data",
                 "--log-level", "warning", "--no-mesh"],
                stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=str(ROOT))
        from sessions import SessionRegistry
        eventually(lambda: os.path.exists(sock) and bool(
            SessionRegistry(socket=sock, timeout=1.0).node_info()), START_TIMEOUT,
            "meshd to answer node.info")
        res = asyncio.run(main_async(args, sock, f"{tmp}/state", proc.pid))
    finally:
        if proc is not None:
            stopped = stop_pid(proc, STOP_TIMEOUT)
        problems = [line for line in Path(log_path).read_text(errors="replace").splitlines()
                    if "ERROR" in line or "Traceback" in line] if os.path.exists(log_path) else []
        shutil.rmtree(tmp, ignore_errors=True)
    report(res, args, time.monotonic() - t0, stopped)
    for line in problems[:20]:
        print("  daemon log: " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
