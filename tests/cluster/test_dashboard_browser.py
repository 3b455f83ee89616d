"""The dashboard in a real browser: three daemons on loopback, one serving `--http`, the page
opened in headless Chromium (Debian's `chromium`, driven over the Chrome DevTools Protocol
with aiohttp's websocket client). A session registered and a message sent after the page
loaded appear without a reload; an agent's hostile message body shows as text; a human sends
from the page's form. With MESHD_WRITE_SCREENSHOT=1 the page is saved as docs/dashboard.png.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import ROOT
from support.daemons import Daemon, eventually, wait_converged

aiohttp = pytest.importorskip("aiohttp", reason="the dashboard needs aiohttp (meshd[http])")

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"needs Debian's chromium at {CHROMIUM} (.ci/run installs it as root: "
           "apt-get install chromium)")

HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'



def dashboard_url(d: Daemon) -> str:
    """The dashboard's address (it serves just after the local API does)."""
    return str(eventually(lambda: (d.registry().node_info().get("http") or {}).get("url"),
                          timeout=10, message="the dashboard serving")).rstrip("/")


class Browser:
    """A headless Chromium we started (stopped by its process group id), one page of it."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "--window-size=1400,1100", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._ids = itertools.count(1)
        active = profile / "DevToolsActivePort"

        def port() -> int | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            lines = active.read_text().split() if active.exists() else []
            return int(lines[0]) if lines else None

        self.port = eventually(port, timeout=30, interval=0.1, message="chromium's DevTools port")
        self.ws_url = eventually(self._page_target, timeout=15, interval=0.1,
                                 message="a page target in chromium")

    def _page_target(self) -> str | None:
        async def run() -> str | None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
                async with s.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                    targets = await r.json(content_type=None)
            pages = [t for t in targets if t.get("type") == "page"]
            return pages[0]["webSocketDebuggerUrl"] if pages else None
        return asyncio.run(run())

    def cdp(self, method: str, params: dict[str, Any] | None = None, timeout: float = 20) -> Any:
        """One DevTools command on the page, over a websocket; its result."""
        msg_id = next(self._ids)

        async def run() -> Any:
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(self.ws_url, max_msg_size=64 * 1024 * 1024,
                                        timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                    await ws.send_str(json.dumps({"id": msg_id, "method": method,
                                                  "params": params or {}}))
                    async with asyncio.timeout(timeout):
                        async for frame in ws:
                            data = json.loads(frame.data)
                            if data.get("id") == msg_id:
                                if "error" in data:
                                    raise RuntimeError(f"{method}: {data['error']}")
                                return data.get("result")
            raise RuntimeError(f"{method}: the connection closed")
        return asyncio.run(run())

    def js(self, expression: str) -> Any:
        r = self.cdp("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                          "awaitPromise": True})
        if r.get("exceptionDetails"):
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def text(self) -> str:
        return str(self.js("document.body ? document.body.innerText : ''") or "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)     # chromium and its helpers
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        try:                                            # helpers still exiting: now
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def browser() -> Iterator[Browser]:
    profile = Path(tempfile.mkdtemp(prefix="mchrome"))
    b: Browser | None = None
    try:
        b = Browser(profile)
        yield b
    finally:
        if b is not None:
            b.stop()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_updates_live_in_a_real_browser(make_daemon: Callable[..., Daemon],
                                             short_tmp: Path, browser: Browser) -> None:
    token = "browser-test-token-0123456789abcdef"
    tf = short_tmp / "token"
    tf.write_text(token)
    tf.chmod(0o600)
    n0 = make_daemon("n0", args=["--bind", "127.0.0.10:0", "--http", "127.0.0.1:0",
                                 "--http-token-file", str(tf)])
    base = dashboard_url(n0)    # (port 0: a free one)
    assert n0.peer_address
    n1 = make_daemon("n1", args=["--bind", "127.0.0.11:0", "--join", n0.peer_address])
    n2 = make_daemon("n2", args=["--bind", "127.0.0.12:0", "--join", n0.peer_address])
    nodes = [n0, n1, n2]
    wait_converged(nodes)
    n0.registry().register("planner", "Planner", "claude", capabilities=["planning"])
    n2.registry().register("reviewer", "Reviewer", "codex", capabilities=["review"])
    n2.registry().update_status("reviewer", "working", current_task="reviewing PR 42")
    n0.memory().set("planner", "plan/dashboard", "ship the status beacon", tags=["beacon"])

    browser.cdp("Page.enable")
    browser.cdp("Page.navigate", {"url": f"{base}/#token={token}"})
    eventually(lambda: "live" in browser.text() and all(
        d.node_id in browser.text() for d in nodes), timeout=30, interval=0.2,
        message="the page showing three hosts, live")
    eventually(lambda: "reviewing PR 42" in browser.text(), timeout=20, interval=0.2,
               message="a session of another host on the page")
    assert "token=" not in browser.js("location.href")       # the token left the address bar
    browser.js("window.__loaded_once = 'yes'")               # gone if the page reloads

    # After the page loaded: a new session on another host, and messages through the SDK.
    n1.registry().register("tester", "Tester", "gemini", capabilities=["testing"])
    # (Mail is routed, not replicated: a daemon shows what its own sessions sent and got.)
    sent = n1.hub().send("tester", "planner", "request", "please review the dashboard",
                         "the page should update by itself")
    n1.hub().send("tester", "planner", "notification", "hostile body below", HOSTILE)
    eventually(lambda: all(t in browser.text() for t in (
        "tester", "please review the dashboard", "the page should update by itself",
        "hostile body below")), timeout=30, interval=0.2,
        message="the new session and messages on the page without a reload")
    assert browser.js("window.__loaded_once") == "yes"
    # The hostile body is text: shown literally, no element made of it, no script ran.
    assert "<script>" in browser.text()
    assert browser.js("document.querySelectorAll('#messages img, #messages script').length") == 0
    assert browser.js("document.title") == "meshd dashboard"
    eventually(lambda: n1.hub().get_message_status(sent.message_id)["state"] in ("stored", "read"),
               timeout=20, message="the message stored on the planner's host")
    eventually(lambda: "stored" in browser.js(
        "document.querySelector('[data-message=\"%s\"]').innerText" % sent.message_id),
        timeout=20, interval=0.2, message="the message's receipt on the page")

    # A human, Alexa, sends from the page's form (token and Origin from a real browser).
    browser.js("""(() => {
        document.getElementById('send-from').value = 'Alexa';
        const to = document.getElementById('send-to');
        to.value = 'reviewer';
        document.getElementById('send-subject').value = 'from the dashboard';
        document.getElementById('send-body').value = 'Alexa says hi';
        document.getElementById('send-form').requestSubmit();
    })()""")
    got = eventually(lambda: [m for m in n2.hub().get_messages("reviewer")
                              if m.from_session == "Alexa"], timeout=20,
                     message="Alexa's message in the reviewer's inbox on another host")
    assert got[0].subject == "from the dashboard" and got[0].body == "Alexa says hi"
    eventually(lambda: "Alexa says hi" in browser.text(), timeout=20, interval=0.2,
               message="Alexa's message on the page")

    # Memory search from the page.
    browser.js("document.getElementById('memory-q').value = 'plan';"
               "document.getElementById('memory-form').requestSubmit()")
    eventually(lambda: "ship the status beacon" in browser.text(), timeout=10, interval=0.2,
               message="the memory entry found from the page")

    if os.environ.get("MESHD_WRITE_SCREENSHOT") == "1":
        browser.cdp("Emulation.setDeviceMetricsOverride",
                    {"width": 1400, "height": 1100, "deviceScaleFactor": 1, "mobile": False})
        browser.js("document.getElementById('send-result').textContent = ''")
        shot = browser.cdp("Page.captureScreenshot", {"format": "png",
                                                      "captureBeyondViewport": True})
        (ROOT / "docs" / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))
