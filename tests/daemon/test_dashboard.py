"""The dashboard's JSON API (`meshd --http`, docs/dashboard.md) on a real daemon, through
aiohttp's client: what the page shows, a human session sending, and the guards (token,
Origin, Host, sizes, limits) refusing what they must. Message bodies are untrusted: the API
gives them back as JSON text and the page never turns data into HTML."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from support.daemons import CHILD_CWD, Daemon, eventually, subprocess_env

aiohttp = pytest.importorskip("aiohttp", reason="the dashboard needs aiohttp (meshd[http])")

HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><script>alert(1)</script>'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def dashboard_url(d: Daemon) -> str:
    """The dashboard's address (it serves just after the local API does)."""
    return str(eventually(lambda: (d.registry().node_info().get("http") or {}).get("url"),
                          timeout=10, message="the dashboard serving")).rstrip("/")


def logged_token(d: Daemon) -> str:
    m = eventually(lambda: re.search(r"#token=([A-Za-z0-9_-]+)", d.log()), timeout=5,
                   message="the dashboard's token in the log")
    return m.group(1)


def web_daemon(make_daemon: Callable[..., Daemon], *extra: str) -> tuple[Daemon, str]:
    d = make_daemon(args=["--http", "127.0.0.1:0", *extra])       # (port 0: a free one)
    return d, dashboard_url(d)


async def fetch(method: str, url: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.request(method, url, **kw) as r:
            text = await r.text()
            try:
                body: Any = await r.json(content_type=None)
            except ValueError:
                body = text
            return r.status, body, dict(r.headers)


def call(method: str, url: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
    return asyncio.run(fetch(method, url, **kw))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_api_shows_the_mesh_and_a_human_sends(make_daemon: Callable[..., Daemon]) -> None:
    d, base = web_daemon(make_daemon)
    token = logged_token(d)
    d.registry().register("worker-1", "Worker", "claude", capabilities=["python", "review"])
    d.registry().update_status("worker-1", "working", current_task="fix issue 17")
    hub = d.hub()
    sent = hub.send("worker-1", "worker-1", "request", "note to self", HOSTILE)
    d.memory().set("worker-1", "task/17", {"state": "open"}, tags=["dashboard"])
    h = auth(token)

    status, info, _ = call("GET", f"{base}/api/info", headers=h)
    assert status == 200 and info["node_id"] == d.node_id
    status, hosts, _ = call("GET", f"{base}/api/hosts", headers=h)
    assert [x["node_id"] for x in hosts["items"] if x["self"]] == [d.node_id]
    assert hosts["items"][0]["sessions"] == 1 and hosts["items"][0]["state"] == "alive"
    status, ss, _ = call("GET", f"{base}/api/sessions?limit=10", headers=h)
    (s,) = ss["items"]
    assert (s["session_id"], s["status"], s["current_task"], s["capabilities"]) == (
        "worker-1", "working", "fix issue 17", ["python", "review"])
    assert s["last_ping"] and s["host"] == d.node_id
    status, msgs, headers = call("GET", f"{base}/api/messages?limit=5", headers=h)
    assert headers["Content-Type"].startswith("application/json")
    (m,) = msgs["items"]
    assert m["message_id"] == sent.message_id and m["body"] == HOSTILE     # as text, unchanged
    assert m["state"] in ("stored", "read") and m["deliveries"][0]["session_id"] == "worker-1"
    status, mem, _ = call("GET", f"{base}/api/memory?q=task", headers=h)
    assert [e["key"] for e in mem["items"]] == ["task/17"] and mem["total"] == 1
    assert call("GET", f"{base}/api/memory?q=nothing*", headers=h)[1]["items"] == []
    status, out, _ = call("GET", f"{base}/api/outboxes", headers=h)
    assert status == 200 and out["items"] == []

    # Alexa, a human, answers from the page: registered as a human session, message stored.
    origin = {"Origin": base, "Content-Type": "application/json"}
    status, r, _ = call("POST", f"{base}/api/send", headers={**h, **origin},
                        json={"from": "Alexa", "to": "worker-1", "subject": "hello",
                              "body": "from a human", "in_reply_to": sent.message_id})
    assert status == 200, r
    alexa = d.registry().get("Alexa")
    assert alexa is not None and alexa.agent_type == "human"
    got = eventually(lambda: [x for x in hub.get_messages("worker-1")
                              if x.message_id == r["message_id"]], timeout=5)
    assert got[0].from_session == "Alexa" and got[0].body == "from a human"
    status, thread, _ = call("GET", f"{base}/api/threads/{sent.message_id}", headers=h)
    assert [x["message_id"] for x in thread["items"]] == [sent.message_id, r["message_id"]]
    # A broadcast (no `to`).
    status, r2, _ = call("POST", f"{base}/api/send", headers={**h, **origin},
                         json={"from": "Alexa", "subject": "all", "body": "hi everyone"})
    assert status == 200
    assert call("GET", f"{base}/api/messages/{r2['message_id']}", headers=h)[1]["type"] == \
        "broadcast"


def test_guards_refuse(make_daemon: Callable[..., Daemon]) -> None:
    d, base = web_daemon(make_daemon)
    token = logged_token(d)
    good = {"Authorization": f"Bearer {token}", "Origin": base,
            "Content-Type": "application/json"}
    msg = {"from": "Alexa", "subject": "s", "body": "b"}

    assert call("GET", f"{base}/api/sessions")[0] == 401                      # no token
    assert call("GET", f"{base}/api/sessions", headers=auth("x" * 43))[0] == 401
    assert call("GET", f"{base}/api/events")[0] == 401
    # state-changing: Origin of this very server, and the token in a header
    for headers, want in [
            ({k: v for k, v in good.items() if k != "Origin"}, 403),
            ({**good, "Origin": "http://evil.example"}, 403),
            ({**good, "Origin": "null"}, 403),
            ({**good, "Authorization": "Bearer wrong"}, 401),
            ({k: v for k, v in good.items() if k != "Authorization"}, 401),
            ({**good, "Content-Type": "text/plain"}, 415)]:
        status, body, _ = call("POST", f"{base}/api/send", headers=headers, json=msg)
        assert status == want, (headers, body)
    # the cookie (for the event stream) never authorizes a write
    status, _, _ = call("POST", f"{base}/api/send", json=msg,
                        headers={k: v for k, v in good.items() if k != "Authorization"},
                        cookies={"meshd_token": token})
    assert status == 401
    assert call("GET", f"{base}/api/sessions", cookies={"meshd_token": token})[0] == 200
    assert d.registry().get("Alexa") is None                 # nothing refused got through
    # DNS rebinding: a loopback dashboard answers to a loopback Host only
    assert call("GET", f"{base}/", headers={"Host": "evil.example"})[0] == 421
    assert call("GET", f"{base}/api/sessions",
                headers={**auth(token), "Host": f"evil.example:{base.rsplit(':', 1)[1]}"})[0] == 421
    # bounds
    status, _, _ = call("POST", f"{base}/api/send", headers=good,
                        data=b'{"from": "Alexa", "body": "' + b"x" * 70_000 + b'"}')
    assert status == 413
    assert call("GET", f"{base}/api/messages?limit=100000", headers=auth(token))[0] == 400
    assert call("GET", f"{base}/api/sessions?limit=-1", headers=auth(token))[0] == 400
    status, body, _ = call("POST", f"{base}/api/send", headers=good,
                           json={"from": "<script>", "body": "b"})
    assert status == 400
    # an online agent session cannot be impersonated as a human
    d.registry().register("worker-1", "Worker", "claude")
    assert call("POST", f"{base}/api/send", headers=good,
                json={"from": "worker-1", "body": "b"})[0] == 403


def test_event_streams_are_capped(make_daemon: Callable[..., Daemon]) -> None:
    d, base = web_daemon(make_daemon)
    token = logged_token(d)

    async def run() -> list[int]:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout, headers=auth(token)) as s:
            opened = [await s.get(f"{base}/api/events") for _ in range(16)]
            try:
                first = await opened[0].content.readuntil(b"\n\n")
                assert b"event: overview" in first or b"retry:" in first
                async with s.get(f"{base}/api/events") as extra:
                    return [r.status for r in opened] + [extra.status]
            finally:
                for r in opened:
                    r.close()

    statuses = asyncio.run(run())
    assert statuses[:16] == [200] * 16 and statuses[16] == 503


def test_page_is_static_escaped_and_locked_down(make_daemon: Callable[..., Daemon]) -> None:
    d, base = web_daemon(make_daemon)
    status, html, headers = call("GET", f"{base}/")
    assert status == 200 and "<script src=\"/static/app.js\"" in html
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "http://" not in html.replace("http-equiv", "") and "https://" not in html
    status, js, headers = call("GET", f"{base}/static/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    # Data is put on the page as text only.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink
    assert "https://" not in js and "http://" not in js      # nothing from the internet
    assert call("GET", f"{base}/static/../server.py")[0] == 404
    try:
        import meshd.ipc.web.metrics  # noqa: F401
    except ImportError:
        return
    status, text, headers = call("GET", f"{base}/metrics")       # (loopback: no token)
    assert status == 200 and "meshd_" in text and headers["Content-Type"].startswith("text/plain")


def test_token_file_and_non_loopback(make_daemon: Callable[..., Daemon], short_tmp: Path) -> None:
    token = "s3cret-token-for-the-dashboard-0123456789"
    tf = short_tmp / "token"
    tf.write_text(token + "\n")
    tf.chmod(0o600)
    d, base = web_daemon(make_daemon, "--http-token-file", str(tf))
    assert call("GET", f"{base}/api/info", headers=auth(token))[0] == 200
    assert token not in d.log()                               # a file's token is never logged

    def refused(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "meshd", "--socket", str(short_tmp / "x.sock"),
                            "--data-dir", str(short_tmp / "x-data"), "--preset", "test",
                            "--no-mesh", *args], env=subprocess_env(), cwd=CHILD_CWD,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0, r.stderr
        return r.stderr
    # A non-loopback address without a token file: refused before anything starts.
    err = refused("--http", f"0.0.0.0:{free_port()}")
    assert "--http-token-file" in err and "not a loopback address" in err
    assert "HOST:PORT" in refused("--http", "nonsense")
    # A token file others can read: refused, saying so.
    tf.chmod(0o644)
    err = refused("--http", f"0.0.0.0:{free_port()}", "--http-token-file", str(tf))
    assert "readable by others" in err
