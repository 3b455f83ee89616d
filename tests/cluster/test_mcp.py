"""`sessions mcp` driven by the `mcp` SDK's own client: real `python -m sessions mcp`
processes over stdio (one over streamable HTTP), talking to real daemons.

Every test runs its async body under `anyio.fail_after`, so no wait is unbounded; the
stdio servers are children of the client and are stopped when its context exits (stdin
closed, then SIGTERM/SIGKILL by the SDK); the few started with Popen are stopped by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

pytest.importorskip("mcp", reason="the MCP SDK is the optional extra meshd[mcp]")

import anyio  # noqa: E402
import jsonschema  # noqa: E402
from mcp import Client, StdioServerParameters  # noqa: E402
from mcp.types import ResourceUpdatedNotification  # noqa: E402

from support.daemons import (CHILD_CWD, Daemon, eventually, run_cli,  # noqa: E402
                             subprocess_env, wait_converged)

TOOLS = {"whoami", "list_sessions", "send_message", "reply", "broadcast", "check_inbox",
         "wait_for_messages", "get_thread", "message_status", "set_status", "memory_set",
         "memory_get", "memory_search", "memory_delete", "ask", "dispatch",
         "claim", "release", "list_claims",
         "memory_touch", "memory_history", "watch_memory", "memory_changes"}
BOUND = 90.0             # seconds any one test's async body may take


def params(d: Daemon | None, sid: str, state: Path, *extra: str,
           socket_path: str | None = None) -> StdioServerParameters:
    env = subprocess_env(MESHD_SOCKET=socket_path or (d.socket if d else ""),
                         XDG_STATE_HOME=str(state))
    return StdioServerParameters(command=sys.executable,
                                 args=["-m", "sessions", "mcp", "--session", sid, *extra],
                                 env=env, cwd=CHILD_CWD)


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with anyio.fail_after(BOUND):
            await body()
    anyio.run(bounded)


async def call(c: Client, tool: str, **args: Any) -> str:
    r = await c.call_tool(tool, args)
    text = r.content[0].text if r.content else ""
    assert not r.is_error, f"{tool}({args}) failed: {text}"
    return text


async def error(c: Client, tool: str, **args: Any) -> str:
    r = await c.call_tool(tool, args)
    text = r.content[0].text if r.content else ""
    assert r.is_error, f"{tool}({args}) should have failed, gave: {text}"
    return text


async def until(pred: Callable[[], Awaitable[Any]], what: str, timeout: float = 20.0) -> Any:
    """The async twin of support.daemons.eventually: poll (bounded) until `pred` is truthy."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = await pred()
            if value:
                return value
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s (last: {last!r})")
        await anyio.sleep(0.05)


def ids_in(text: str) -> list[str]:
    return [json.loads(line)["id"] for line in text.splitlines()[1:] if line.startswith("{")]


@pytest.fixture
def pair(make_cluster: Callable[..., list[Daemon]]) -> list[Daemon]:
    nodes = make_cluster(2)
    wait_converged(nodes)
    return nodes


# --- schemas ---------------------------------------------------------------------------------

def test_tool_list_and_schemas_validate(daemon: Daemon, short_tmp: Path) -> None:
    async def body() -> None:
        async with Client(params(daemon, "schema-1", short_tmp)) as c:
            tools = (await c.list_tools()).tools
            assert {t.name for t in tools} == TOOLS
            for t in tools:
                assert t.description and len(t.description) <= 600, (t.name, len(t.description))
                jsonschema.Draft202012Validator.check_schema(t.input_schema)
                assert t.input_schema["type"] == "object"
                for name, prop in t.input_schema.get("properties", {}).items():
                    assert "description" in prop or name in (
                        "include_offline", "unread_only", "mark_read", "all_entries",
                        "match_all_tags", "only_mine", "queue_if_unknown", "type",
                        "priority", "status"), (t.name, name)
            schema = {t.name: t.input_schema for t in tools}
            v = jsonschema.Draft202012Validator(schema["send_message"])
            assert v.is_valid({"to": "b", "subject": "s", "body": "x", "data": {"k": [1]}})
            assert not v.is_valid({"to": "b", "subject": "s"})                 # no body
            assert not v.is_valid({"to": "b", "subject": "s", "body": "x", "priority": "urgent"})
            w = jsonschema.Draft202012Validator(schema["wait_for_messages"])
            assert w.is_valid({"timeout_s": 600}) and not w.is_valid({"timeout_s": 601})
            assert "schema-1" in (c.instructions or "")
    run(body)


def test_identity_from_environment_variables(daemon: Daemon, short_tmp: Path) -> None:
    env = daemon.env(XDG_STATE_HOME=str(short_tmp), MESHD_SESSION="env-agent",
                     MESHD_SESSION_NAME="Envy", MESHD_AGENT_TYPE="Claude", MESHD_USER="Alexa",
                     MESHD_CAPABILITIES="python, review", MESHD_ON_EXIT="keep")
    p = StdioServerParameters(command=sys.executable, args=["-m", "sessions", "mcp"], env=env,
                              cwd=CHILD_CWD)

    async def body() -> None:
        async with Client(p) as c:
            me = json.loads(await until(lambda: call(c, "whoami"), "registered"))
            assert (me["id"], me["name"], me["type"], me["user"]) == (
                "env-agent", "Envy", "Claude", "Alexa")
            assert me["capabilities"] == ["python", "review"] and me["status"] == "active"
    run(body)
    assert daemon.registry().get("env-agent").status.value == "active"     # MESHD_ON_EXIT=keep


# --- two agents, two daemons -----------------------------------------------------------------

def test_two_agents_exchange_messages_and_wait_is_event_driven(pair: list[Daemon],
                                                               short_tmp: Path) -> None:
    n0, n1 = pair

    async def body() -> None:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client(params(n0, "alpha", short_tmp,
                                                              "--capabilities", "plan")))
            b = await stack.enter_async_context(Client(params(n1, "beta", short_tmp,
                                                              "--progress-every", "0.05")))
            await until(lambda: call(a, "whoami"), "alpha registered")
            await until(lambda: call(b, "whoami"), "beta registered")
            listed = await until(lambda: _has(a, "list_sessions", "beta"), "beta seen from n0")
            assert '"host_state":"alive"' in listed and '"host_state":"local"' in listed

            # wait_for_messages wakes within 100 ms of the send on the other host. The
            # send goes once the wait is blocked in the server (its first progress tick).
            latencies = []
            for i in range(5):
                async with anyio.create_task_group() as tg:
                    got: dict[str, Any] = {}
                    blocked = anyio.Event()

                    async def tick(p: float, total: float | None, msg: str | None) -> None:
                        blocked.set()

                    async def waiter() -> None:
                        r = await b.call_tool("wait_for_messages", {"timeout_s": 20},
                                              progress_callback=tick)
                        got["t"] = time.monotonic()
                        got["text"] = r.content[0].text
                    tg.start_soon(waiter)
                    await blocked.wait()
                    t0 = time.monotonic()
                    await call(a, "send_message", to="beta", subject=f"hello {i}", body="ping")
                latencies.append(got["t"] - t0)
                assert f"hello {i}" in got["text"] and '"from":"alpha"' in got["text"]
            print(f"send -> wait_for_messages returned: {[round(x * 1000, 1) for x in latencies]} ms")
            assert statistics.median(latencies) < 0.100, latencies
            assert max(latencies) < 2.0, latencies

            # Beta answers one through its own tools; alpha sees the threaded response.
            sent = await call(a, "send_message", to="beta", subject="question", body="2+2?",
                              data={"n": 2}, priority="high")
            qid = sent.split()[1]
            text = await call(b, "wait_for_messages", timeout_s=20)
            assert qid in text and '"priority":"high"' in text and '"data":{"n":2}' in text
            await call(b, "reply", message_id=qid, body="4")
            text = await call(a, "wait_for_messages", timeout_s=20)
            assert '"type":"response"' in text and f'"in_reply_to":"{qid}"' in text
            thread = await call(a, "get_thread", message_id=qid)
            assert thread.startswith("2 message(s)") and "Re: question" in thread
            status = await call(a, "message_status", message_id=qid)
            assert '"state":"read"' in status or '"state":"stored"' in status
            # wait_for_messages marked what it returned read; check_inbox agrees.
            assert (await call(b, "check_inbox")).startswith("0 message(s) unread")
            assert "question" in await call(b, "check_inbox", unread_only=False)
            # Nothing repeats: the cursor moved past everything handed out.
            assert (await call(b, "wait_for_messages", timeout_s=0.3)).startswith("no new")
            await call(b, "broadcast", subject="news", body="all hands")
            assert "all hands" in await call(a, "wait_for_messages", timeout_s=20)
    run(body)


async def _has(c: Client, tool: str, needle: str, **args: Any) -> str | None:
    text = await call(c, tool, **args)
    return text if needle in text else None


def test_ask_gets_the_reply_sent_through_the_other_agents_tools(pair: list[Daemon],
                                                               short_tmp: Path) -> None:
    n0, n1 = pair

    async def body() -> None:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client(params(n0, "asker", short_tmp)))
            b = await stack.enter_async_context(Client(params(n1, "answerer", short_tmp)))
            await until(lambda: call(b, "whoami"), "answerer registered")
            await until(lambda: _has(a, "list_sessions", "answerer"), "answerer seen from n0")
            result: dict[str, str] = {}

            async def asking() -> None:
                result["answer"] = await call(a, "ask", to="answerer", subject="Which port?",
                                              body="for the API", timeout_s=30)
            async with anyio.create_task_group() as tg:
                tg.start_soon(asking)
                request = await call(b, "wait_for_messages", timeout_s=20)
                assert "Which port?" in request and '"type":"request"' in request
                await call(b, "reply", message_id=ids_in(request)[0], body="8080",
                           data={"port": 8080})
            assert result["answer"].startswith("answer from answerer")
            assert '"body":"8080"' in result["answer"] and '"port":8080' in result["answer"]
            # The answer was handed out by ask: wait_for_messages does not repeat it.
            assert (await call(a, "wait_for_messages", timeout_s=0.5)).startswith("no new")
            # No answer in time: a normal result that says so, the request delivered.
            late = await call(a, "ask", to="answerer", subject="ping?", body="", timeout_s=0.5)
            assert late.startswith("no answer yet") and "delivered" in late
            assert "ping?" in await call(b, "wait_for_messages", timeout_s=20)
            assert "no session 'nobody-here'" in await error(a, "ask", to="nobody-here",
                                                             subject="s", body="b")
    run(body)


def test_dispatch_picks_as_documented(pair: list[Daemon], short_tmp: Path) -> None:
    n0, n1 = pair
    r0, r1 = n0.registry(), n1.registry()
    r1.register("rev-remote", "R", "GPT-4", capabilities=["review"])
    r0.register("rev-local", "L", "Claude", capabilities=["review"])
    r0.register("rev-busy", "B", "Claude", capabilities=["review"])
    r0.register("no-cap", "N", "Claude")
    for reg, sid in ((r1, "rev-remote"), (r0, "rev-local"), (r0, "no-cap")):
        reg.update_status(sid, "idle")
    r0.update_status("rev-busy", "working")
    eventually(lambda: (s := r0.get("rev-remote")) and s.status.value == "idle",
               message="rev-remote replicated to n0")

    async def body() -> None:
        async with Client(params(n0, "boss", short_tmp)) as a:
            async def to() -> str:
                text = await call(a, "dispatch", capability="review", subject="PR", body="go")
                return text.split()[-1]
            # idle first; never dispatched to before the others; this host before another
            assert [await to(), await to(), await to()] == ["rev-local", "rev-remote",
                                                            "rev-local"]
            r0.update_status("rev-local", "working")
            assert await to() == "rev-remote"
            err = await error(a, "dispatch", capability="cooking", subject="s", body="b")
            assert "cooking" in err and "list_sessions" in err
            r1.update_status("rev-remote", "waiting")
            await until(lambda: _remote_waiting(r0), "rev-remote waiting on n0")
            err = await error(a, "dispatch", capability="review", subject="s", body="b")
            assert "busy or offline" in err
    run(body)
    eventually(lambda: len(n0.hub().get_messages("rev-local")) == 2, message="rev-local got 2")
    eventually(lambda: len(n1.hub().get_messages("rev-remote")) == 2, message="remote got 2")
    assert n0.hub().get_messages("rev-busy") == [] and n0.hub().get_messages("no-cap") == []


async def _remote_waiting(reg: Any) -> bool:
    s = reg.get("rev-remote")
    return s is not None and s.status.value == "waiting"


# --- notifications ---------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:resources/subscribe is removed")
def test_resource_updated_reaches_subscribers_of_both_protocol_eras(daemon: Daemon,
                                                                    short_tmp: Path) -> None:
    hub = daemon.hub()

    async def body() -> None:
        updated = anyio.Event()

        async def handler(msg: Any) -> None:
            if isinstance(msg, Exception):
                raise msg
            if isinstance(msg, ResourceUpdatedNotification) and msg.params.uri == "inbox://watcher":
                updated.set()

        # Handshake era: resources/subscribe, then notifications/resources/updated.
        async with Client(params(daemon, "watcher", short_tmp), mode="legacy",
                          message_handler=handler) as c:
            assert c.server_capabilities.resources.subscribe
            await until(lambda: call(c, "whoami"), "watcher registered")
            uris = {str(r.uri) for r in (await c.list_resources()).resources}
            assert uris == {"inbox://watcher", "sessions://list", "memory://changes"}
            await c.subscribe_resource("inbox://watcher")
            hub.send("someone", "watcher", "notification", "hi", "there")
            with anyio.fail_after(10):
                await updated.wait()
            inbox = (await c.read_resource("inbox://watcher")).contents[0].text
            assert '"unread": 1' in inbox and '"subject":"hi"' in inbox.replace(" ", "")
            assert "watcher" in (await c.read_resource("sessions://list")).contents[0].text

        # 2026-07-28: subscriptions/listen with the inbox URI.
        async with Client(params(daemon, "watcher", short_tmp)) as c:
            assert not c.protocol_version.startswith("2025")
            await until(lambda: call(c, "whoami"), "watcher registered again")
            async with c.listen(resource_subscriptions=["inbox://watcher"]) as sub:
                hub.send("someone", "watcher", "notification", "again", "there")
                with anyio.fail_after(10):
                    async for event in sub:
                        assert str(event.uri) == "inbox://watcher"
                        break
    run(body)


def test_progress_notifications_while_waiting(daemon: Daemon, short_tmp: Path) -> None:
    async def body() -> None:
        async with Client(params(daemon, "patient", short_tmp, "--progress-every", "0.2")) as c:
            seen: list[float] = []

            async def progress(p: float, total: float | None, message: str | None) -> None:
                seen.append(p)
                assert total == 1.2 and message and "waiting" in message
            r = await c.call_tool("wait_for_messages", {"timeout_s": 1.2},
                                  progress_callback=progress)
            assert not r.is_error and r.content[0].text == (
                "no new messages in 1.2 s; call again to keep waiting")
            assert len(seen) >= 3 and seen == sorted(seen), seen
    run(body)


# --- errors ----------------------------------------------------------------------------------

def test_anticipated_failures_are_tool_errors(daemon: Daemon, short_tmp: Path) -> None:
    async def body() -> None:
        async with Client(params(daemon, "err-1", short_tmp)) as c:
            assert "less than or equal to 600" in await error(c, "wait_for_messages",
                                                              timeout_s=9999)
            assert "Field required" in await error(c, "send_message", to="x", subject="s")
            assert "unknown message id 'nope'" in await error(c, "reply", message_id="nope",
                                                              body="b")
            assert "unknown message id" in await error(c, "get_thread", message_id="nope")
            assert "unknown message id" in await error(c, "message_status", message_id="nope")
            assert "no session 'ghost'" in await error(c, "send_message", to="ghost",
                                                       subject="s", body="b")
            big = await error(c, "memory_set", key="big", value="x" * 1_200_000)
            assert "byte limit" in big and "file" in big
            assert "'idle'" in await error(c, "set_status", status="sleeping")
            # queue_if_unknown: the message waits for that id, as in the SDK.
            assert "sent" in await call(c, "send_message", to="ghost", subject="s", body="b",
                                        queue_if_unknown=True)
            # After all of that the server is still up.
            assert '"id":"err-1"' in await call(c, "whoami")
            await call(c, "memory_set", key="team/plan", value={"step": 1}, tags=["plan"],
                       ttl_s=60, type="decision")
            got = await call(c, "memory_get", key="team/plan")
            assert '"value":{"step":1}' in got and '"type":"decision"' in got
            assert "team/plan" in await call(c, "memory_search", pattern="team/*")
            assert "team/plan" in await call(c, "memory_search", tags=["plan"])
            daemon.memory().set("someone-else", "team/other", 1)
            mine = await call(c, "memory_search", pattern="team/*", by_session="err-1")
            assert mine.startswith("1 entry") and "team/other" not in mine
            assert (await call(c, "memory_search", pattern="team/*")).startswith("2 entries")
            assert (await call(c, "memory_search", by_session="nobody")).startswith("0 ent")
            assert "deleted 1 entry" in await call(c, "memory_delete", key="team/plan")
            assert "no value" in await call(c, "memory_get", key="team/plan")
    run(body)


def test_daemon_not_running_is_a_tool_error_then_joins_when_it_starts(
        make_daemon: Callable[..., Daemon], short_tmp: Path) -> None:
    later = make_daemon("later", start=False)

    async def body() -> None:
        async with Client(params(None, "early", short_tmp, socket_path=later.socket)) as c:
            assert {t.name for t in (await c.list_tools()).tools} == TOOLS
            text = await error(c, "whoami")
            assert "meshd is not running" in text and "`meshd`" in text, text
            await anyio.to_thread.run_sync(later.start)
            assert '"id":"early"' in await until(lambda: call(c, "whoami"), "joined")
    run(body)


# --- restarts --------------------------------------------------------------------------------

def test_cursor_survives_a_restart_of_the_server(daemon: Daemon, short_tmp: Path) -> None:
    hub, reg = daemon.hub(), daemon.registry()
    p = params(daemon, "durable", short_tmp)

    async def body() -> None:
        async with Client(p) as c:
            await until(lambda: call(c, "whoami"), "registered")
            hub.send("x", "durable", "request", "m1", "one")
            assert "m1" in await call(c, "wait_for_messages", timeout_s=20)
            hub.send("x", "durable", "request", "m2", "two")   # received, never handed out
            await until(lambda: _count(c), "m2 received by the reader")
        assert reg.get("durable").status.value == "offline"      # --on-exit offline
        hub.send("x", "durable", "request", "m3", "three")       # while no server runs
        async with Client(p) as c:
            await until(lambda: call(c, "whoami"), "registered again")
            assert reg.get("durable").status.value == "active"
            text = await call(c, "wait_for_messages", timeout_s=20)
            assert "m1" not in text and "m2" in text and "m3" in text, text
            assert len(ids_in(text)) == 2
            assert (await call(c, "wait_for_messages", timeout_s=0.3)).startswith("no new")
        saved = json.loads((short_tmp / "meshd" / "mcp" / "durable.cursor").read_text())
        assert saved == {"node_id": daemon.node_id, "cursor": 3}
    run(body)


async def _count(c: Client) -> bool:
    return '"unread":1' in await call(c, "whoami")


def test_daemon_restart_is_survived_with_nothing_missed(pair: list[Daemon],
                                                        short_tmp: Path) -> None:
    n0, n1 = pair
    n1.registry().register("sender", "S", "GPT-4")

    async def body() -> None:
        async with Client(params(n0, "sturdy", short_tmp)) as c:
            await until(lambda: call(c, "whoami"), "registered")
            eventually(lambda: n1.registry().get("sturdy"), message="sturdy seen from n1")
            await anyio.to_thread.run_sync(n0.stop)
            assert "meshd is not running" in await error(c, "whoami")
            for i in range(3):                         # queued on n1 while n0 is down
                n1.hub().send("sender", "sturdy", "request", f"while-down-{i}", "b")
            await anyio.to_thread.run_sync(n0.start)
            got: list[str] = []

            async def all_three() -> bool:
                got.append(await call(c, "wait_for_messages", timeout_s=5))
                return all(f"while-down-{i}" in "".join(got) for i in range(3))
            await until(all_three, "the queued messages", timeout=30)
            assert sum("".join(got).count(f"while-down-{i}") for i in range(3)) == 3
            assert '"status":"active"' in await call(c, "whoami")
    run(body)


# --- process life, transports, packaging ---------------------------------------------------

def _mcp_proc(d: Daemon, state: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "sessions", "mcp", *args],
                            env=d.env(XDG_STATE_HOME=str(state)), cwd=CHILD_CWD,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.mark.parametrize("on_exit,expected", [("offline", "offline"), ("keep", "active")])
def test_sigterm_with_stdin_open_exits_and_leaves_the_session_as_chosen(
        daemon: Daemon, short_tmp: Path, on_exit: str, expected: str) -> None:
    reg = daemon.registry()
    proc = _mcp_proc(daemon, short_tmp, "--session", f"term-{on_exit}", "--on-exit", on_exit)
    try:
        eventually(lambda: reg.get(f"term-{on_exit}"), message="registered")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert reg.get(f"term-{on_exit}").status.value == expected
    finally:
        _stop(proc)


def test_streamable_http_on_loopback(daemon: Daemon, short_tmp: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _mcp_proc(daemon, short_tmp, "--session", "web-1", "--http", f"127.0.0.1:{port}")
    try:
        eventually(lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True,
                   timeout=20, message="HTTP server listening")

        async def body() -> None:
            async with Client(f"http://127.0.0.1:{port}/mcp") as c:
                assert '"id":"web-1"' in await until(lambda: call(c, "whoami"), "registered")
        run(body)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        assert daemon.registry().get("web-1").status.value == "offline"
    finally:
        _stop(proc)


def test_http_refuses_a_non_loopback_address_unless_allowed(daemon: Daemon) -> None:
    r = run_cli(["mcp", "--session", "x", "--http", "0.0.0.0:8765"], daemon.env())
    assert r.returncode == 2 and "refusing" in r.stderr and "--allow-remote" in r.stderr
    r = run_cli(["mcp", "--session", "x", "--http", "nonsense"], daemon.env())
    assert r.returncode == 2 and "HOST:PORT" in r.stderr


def test_cli_works_without_the_extra_and_says_how_to_get_it(daemon: Daemon,
                                                            short_tmp: Path) -> None:
    fake = short_tmp / "nomcp" / "mcp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'mcp'\")\n")
    env = daemon.env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env.get("PYTHONPATH", "")])
    r = run_cli(["mcp", "--session", "x"], env)
    assert r.returncode == 1 and "meshd[mcp]" in r.stderr, r.stderr
    r = run_cli(["list"], env)
    assert r.returncode == 0, r.stderr
    probe = ("import sys, sessions, sessions.cli, sessions.mcp; "
             "print(any(m == 'mcp' or m.startswith('mcp.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], env=daemon.env(), cwd=CHILD_CWD,
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr


def test_watch_memory_keeps_changes_for_memory_changes(daemon: Daemon, short_tmp: Path) -> None:
    """watch_memory + memory_changes: a set by someone else is there once, with its value;
    memory_touch and memory_history work on the same key."""
    async def body() -> None:
        async with Client(params(daemon, "mw-1", short_tmp)) as c:
            await until(lambda: call(c, "whoami"), "registered")
            assert "watching proj/" in await call(c, "watch_memory", prefix="proj/")
            daemon.memory().set("other", "proj/x", {"v": 1}, ttl=60)
            daemon.memory().set("other", "elsewhere", 2)
            got = await call(c, "memory_changes", timeout_s=10)
            assert got.startswith("1 change") and '"key":"proj/x"' in got, got
            assert '"kind":"set"' in got and '"v":1' in got, got
            assert "touched 'proj/x'" in await call(c, "memory_touch", key="proj/x")
            hist = await call(c, "memory_history", key="proj/x")
            assert hist.startswith("2 versions") and '"op":"touch"' in hist, hist
            got = await call(c, "memory_changes", timeout_s=10)
            assert '"kind":"touch"' in got, got
    run(body)
