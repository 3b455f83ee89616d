"""Keep-alive: a session reads OFFLINE `--stale-after` seconds after its last ping. An
agent that listens (an open stream, a handler, `sessions watch`) or asks to be kept alive
(`registry.keepalive`, `sessions register --keepalive`) stays online.

Daemons here run with --stale-after 2, so staleness shows within seconds.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from support.daemons import CHILD_CWD, eventually

STALE = 2.0


def status(reg, sid: str) -> str:
    return reg.get(sid).status.value


def stays(pred, seconds: float) -> bool:
    """`pred` holds at every look for `seconds` (bounded: the negative of `eventually`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pred():
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def stale_daemon(make_daemon):
    return make_daemon(args=["--stale-after", str(STALE)])


def test_without_pings_a_session_goes_offline(stale_daemon):
    reg = stale_daemon.registry()
    reg.register("idle-1", "I", "T")
    eventually(lambda: status(reg, "idle-1") == "offline", timeout=STALE + 5,
               message="a silent session going offline")


def test_registry_keepalive_holds_a_session_online_until_stopped(stale_daemon):
    from sessions import NotFound
    reg = stale_daemon.registry()
    reg.register("kept", "K", "T")
    with reg.keepalive("kept", interval=0.3) as ka:
        assert stays(lambda: status(reg, "kept") == "active", STALE * 2)
        assert ka.running and ka.pings >= 3
    assert not ka.running
    eventually(lambda: status(reg, "kept") == "offline", timeout=STALE + 5,
               message="offline once the keep-alive stopped")
    with pytest.raises(NotFound, match="nobody"):
        reg.keepalive("nobody").start()


def test_async_keepalive(stale_daemon):
    from sessions.aio import AsyncSessionRegistry

    async def main() -> None:
        reg = AsyncSessionRegistry(socket=stale_daemon.socket)
        await reg.register("akept", "A", "T")
        async with reg.keepalive("akept", interval=0.3) as ka:
            deadline = time.monotonic() + STALE * 2
            while time.monotonic() < deadline:
                assert (await reg.get("akept")).status.value == "active"
                await asyncio.sleep(0.1)
            assert ka.pings >= 3
        await reg.close()

    asyncio.run(main())


def test_an_open_stream_keeps_its_session_alive(stale_daemon):
    reg, hub = stale_daemon.registry(), stale_daemon.hub()
    reg.register("listener", "L", "T")
    reg.register("other", "O", "T")
    stream = hub.subscribe("listener")
    try:
        assert stays(lambda: status(reg, "listener") == "active", STALE * 2)
        assert status(reg, "other") == "offline"          # nobody listens for it
    finally:
        stream.close()
    eventually(lambda: status(reg, "listener") == "offline", timeout=STALE + 5,
               message="offline once nobody listens")
    # an unregistered session is not brought back by a stream
    reg.register("gone", "G", "T")
    reg.unregister("gone")
    with hub.subscribe("gone"):
        assert stays(lambda: status(reg, "gone") == "offline", 1.5)


def test_cli_register_keepalive_until_ctrl_c(stale_daemon):
    reg = stale_daemon.registry()
    proc = subprocess.Popen([sys.executable, "-m", "sessions", "register", "cli-kept", "C", "T",
                             "--keepalive", "--interval", "0.3"], env=stale_daemon.env(),
                            cwd=CHILD_CWD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        eventually(lambda: reg.get("cli-kept") is not None, timeout=10,
                   message="the CLI registering")
        assert stays(lambda: status(reg, "cli-kept") == "active", STALE * 2)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    assert "Registered session: cli-kept" in out and "Ctrl-C" in err and "Traceback" not in err
    eventually(lambda: status(reg, "cli-kept") == "offline", timeout=STALE + 5,
               message="offline after Ctrl-C")
