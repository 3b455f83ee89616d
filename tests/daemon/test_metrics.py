"""Prometheus metrics (`meshd.ipc.web.metrics`, docs/dashboard.md "Metrics"): the module
against the shape of a real daemon's `info()` (captured below), the IPC server's request
timing with an in-process daemon, and a scrape of `/metrics` from a real daemon (--http)."""

from __future__ import annotations

import asyncio
import copy
import threading
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="the metrics need the optional extra meshd[http]")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from meshd.ipc.web.metrics import MAX_NAMES, MAX_NODES, OTHER, Metrics  # noqa: E402

# `sessions info --json` of a daemon of three (voters for claims; one peer left, three
# messages queued for it), plus its `peers --json`: captured from real daemons, with the
# checkpoint time that the fold thread now reports and the "http" section of --http.
INFO = {'node_id': 'ab6c96ee589f40f1bc0c5cc93e5e8868',
 'version': '0.1.0',
 'protocol': 1,
 'pid': 9446,
 'socket': '/tmp/mx3/a.sock',
 'data_dir': '/tmp/mx3/a',
 'durability': 'process',
 'uptime': 17.244,
 'peer_address': '127.0.0.10:47310',
 'mesh': {'address': '127.0.0.10:47310',
          'incarnation': 1796422392449,
          'security': {'mode': 'open', 'encrypted': False, 'exposed': False},
          'pending_joins': [],
          'members': 2,
          'alive': 1,
          'refutations': 0,
          'wrong_node_pings': 0,
          'membership': {'candidates': 0,
                         'relays': 0,
                         'counters': {'candidates.verified': 2}},
          'transport': {'address': '127.0.0.10:47310',
                        'bound': 'tcp://127.0.0.10:47310',
                        'counters': {'frames_in': 285,
                                     'frames_out': 286,
                                     'frames_handled': 285,
                                     'dropped.peer_queue_full': 4},
                        'connections': 2,
                        'transient': 1,
                        'security': {'mode': 'none'}},
          'auth': None,
          'replication': {'pushed_through': 1,
                          'counters': {'pushed_chunks': 1,
                                       'records_in': 2,
                                       'records_changed': 2}},
          'routing': {'counters': {'route_frames': 1, 'acked_items': 1},
                      'cached_bytes': 0,
                      'outbox': [{'node': '1074bbb028654010b7dbda5bc9164250',
                                  'lane': 'normal',
                                  'items': 3}]},
          'discovery': {'state': 'off'},
          'claims': {'scope': 'mesh',
                     'voters': ['127.0.0.10:47310', '127.0.0.11:47311', '127.0.0.12:47312'],
                     'quorum': 2,
                     'held': 1,
                     'ballot': 5,
                     'floor': 1025,
                     'mutant': None,
                     'counters': {},
                     'acceptor': {'acceptor': '127.0.0.10:47310',
                                  'resources': 1,
                                  'floor': 1025,
                                  'quarantine_left': 0.0,
                                  'counters': {'promise': 5, 'accept': 5}}}},
 'counters': {'requests': 15,
              'ok.session.register': 1,
              'ok.message.send': 5,
              'ok.message.status': 5},
 'subscriptions': 0,
 'folded': 0,
 'checkpoints': 85,
 'unfolded': 0,
 'pushed': 0,
 'dropped_subscriptions': 0,
 'streams': {'unacked_bytes': 0, 'followed': 0, 'heads': 0, 'paused': 0, 'refused': 0},
 'checkpoint_seconds': 0.042,
 'http': None}

PEERS = [{'node_id': 'b0e3ef8853bd42568605e6aa804e6b79',
  'address': '127.0.0.11:47311',
  'state': 'alive',
  'incarnation': 1796422393973,
  'last_contact': 0.011,
  'since': 18.171,
  'behind': 0,
  'ahead': 0,
  'digest_age': 0.048},
 {'node_id': '1074bbb028654010b7dbda5bc9164250',
  'address': '127.0.0.12:47312',
  'state': 'left',
  'incarnation': 1796422393944,
  'last_contact': 8.131,
  'since': 8.131,
  'behind': 0,
  'ahead': 0,
  'digest_age': 8.402}]


def families(metrics: Metrics) -> dict[str, Any]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(family: Any, name: str | None = None) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted labels: value} of one family's samples (named `name`, default the family's,
    with _total for a counter)."""
    names = {name} if name else {family.name, f"{family.name}_total"}
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples
            if s.name in names}


def value(family: Any, **labels: str) -> float:
    return samples(family)[tuple(sorted(labels.items()))]


# Family name (as the parser gives it, without _total) -> type and label names.
EXPECTED = {
    "meshd_build_info": ("gauge", {"version", "protocol", "durability"}),   # (an info)
    "meshd_uptime_seconds": ("gauge", set()),
    "meshd_ipc_requests_received": ("counter", set()),
    "meshd_ipc_requests": ("counter", {"command", "outcome"}),
    "meshd_ipc_request_duration_seconds": ("histogram", {"command"}),
    "meshd_journal_writes": ("counter", {"command"}),
    "meshd_journal_folded_records": ("counter", set()),
    "meshd_journal_unfolded_records": ("gauge", set()),
    "meshd_checkpoints": ("counter", set()),
    "meshd_checkpoint_duration_seconds": ("summary", set()),
    "meshd_members": ("gauge", {"state"}),
    "meshd_replication_peer_behind_records": ("gauge", {"peer"}),
    "meshd_replication_peer_ahead_records": ("gauge", {"peer"}),
    "meshd_replication_events": ("counter", {"event"}),
    "meshd_transport_frames": ("counter", {"direction"}),
    "meshd_transport_dropped_frames": ("counter", {"reason"}),
    "meshd_routing_items_acked": ("counter", set()),
    "meshd_routing_items_expired": ("counter", {"kind"}),
    "meshd_routing_frames_sent": ("counter", set()),
    "meshd_outbox_items": ("gauge", {"destination", "lane"}),
    "meshd_stream_unacked_bytes": ("gauge", set()),
    "meshd_stream_subscriptions": ("gauge", set()),
    "meshd_claims_held": ("gauge", {"scope"}),
    "meshd_claims_acceptor_events": ("counter", {"event"}),
    "process_resident_memory_bytes": ("gauge", set()),
    "process_cpu_seconds": ("counter", set()),
}


def test_metrics_of_a_real_info_shape() -> None:
    m = Metrics(lambda: INFO, peers=lambda: PEERS)
    m.observe("session.register", 0.0003)
    m.observe("session.register", 0.002)
    m.observe("no.such.command", 0.1)            # (bounded: counted as "other")
    fams = families(m)
    for name, (kind, labels) in EXPECTED.items():
        assert name in fams, name
        assert fams[name].type == kind, name
        for s in fams[name].samples:
            assert set(s.labels) - {"le", "quantile"} == labels, (name, s)
    assert all(n.startswith(("meshd_", "process_")) for n in fams)
    # counters are exposed with _total, and values come from info()
    assert value(fams["meshd_ipc_requests"], command="message.send", outcome="ok") == 5
    assert value(fams["meshd_ipc_requests"], command="", outcome="error") == 0
    assert value(fams["meshd_journal_writes"], command="message.send") == 5
    assert samples(fams["meshd_checkpoints"], "meshd_checkpoints_total") == {(): 85}
    assert samples(fams["meshd_checkpoint_duration_seconds"],
                   "meshd_checkpoint_duration_seconds_sum") == {(): 0.042}
    assert value(fams["meshd_members"], state="alive") == 1
    assert value(fams["meshd_members"], state="left") == 1
    assert value(fams["meshd_members"], state="suspect") == 0
    # the peer that left has no lag figures; the live one has
    assert set(samples(fams["meshd_replication_peer_behind_records"])) == {
        (("peer", "b0e3ef8853bd42568605e6aa804e6b79"),)}
    assert value(fams["meshd_transport_dropped_frames"], reason="peer_queue_full") == 4
    assert value(fams["meshd_outbox_items"], destination="1074bbb028654010b7dbda5bc9164250",
                 lane="normal") == 3
    assert value(fams["meshd_routing_items_expired"], kind="message") == 0
    assert value(fams["meshd_claims_held"], scope="mesh") == 1
    assert value(fams["meshd_claims_acceptor_events"], event="promise") == 5
    hist = fams["meshd_ipc_request_duration_seconds"]
    counts = samples(hist, "meshd_ipc_request_duration_seconds_count")
    assert counts == {(("command", "session.register"),): 2, (("command", OTHER),): 1}
    buckets = {s.labels["le"]: s.value for s in hist.samples
               if s.name.endswith("_bucket") and s.labels["command"] == "session.register"}
    assert buckets["0.0005"] == 1 and buckets["0.0025"] == 2 and buckets["+Inf"] == 2
    assert fams["meshd_build_info"].samples[0].labels["version"] == "0.1.0"
    assert samples(fams["process_resident_memory_bytes"])[()] > 0


def test_a_lone_daemon_and_no_member_table() -> None:
    """No mesh (--no-mesh): no mesh metrics; a mesh without `peers`: members from counts."""
    lone = copy.deepcopy(INFO)
    lone["mesh"] = None
    fams = families(Metrics(lambda: lone, process=False))
    assert "meshd_members" not in fams and "meshd_ipc_requests" in fams
    fams = families(Metrics(lambda: INFO, process=False))
    assert samples(fams["meshd_members"]) == {(("state", "alive"),): 1,
                                              (("state", "not_alive"),): 1}
    assert "meshd_replication_peer_behind_records" not in fams


def test_label_cardinality_is_bounded() -> None:
    big = copy.deepcopy(INFO)
    mesh = big["mesh"]
    mesh["routing"]["outbox"] = [
        {"node": f"{i:032x}", "lane": lane, "items": i + 1, "oldest_age": float(i)}
        for i in range(300) for lane in ("high", "normal")]
    mesh["transport"]["counters"].update({f"dropped.reason{i}": 1 for i in range(500)})
    peers = [{"node_id": f"{i:032x}", "state": "alive", "behind": i, "ahead": 0,
              "digest_age": 1.0} for i in range(300)]
    fams = families(Metrics(lambda: big, peers=lambda: peers, process=False))

    outbox = samples(fams["meshd_outbox_items"])
    nodes = {dict(k)["destination"] for k in outbox}
    assert len(nodes) == MAX_NODES and OTHER in nodes
    assert sum(outbox.values()) == 2 * sum(i + 1 for i in range(300))       # nothing lost
    assert f"{299:032x}" in nodes and f"{0:032x}" not in nodes                # the deepest kept
    ages = samples(fams["meshd_outbox_oldest_item_age_seconds"])
    assert len(ages) == MAX_NODES and ages[(("destination", OTHER),)] == 300 - MAX_NODES

    dropped = samples(fams["meshd_transport_dropped_frames"])
    assert len(dropped) == MAX_NAMES
    assert sum(dropped.values()) == 500 + 4

    behind = samples(fams["meshd_replication_peer_behind_records"])
    assert len(behind) == MAX_NODES
    assert sum(behind.values()) == sum(range(300))
    assert len(samples(fams["meshd_members"])) == 4


def test_a_failing_info_does_not_fail_the_scrape() -> None:
    def broken() -> dict[str, Any]:
        raise AssertionError("stopping")
    m = Metrics(broken, process=False)
    fams = families(m)
    assert samples(fams["meshd_metrics_collect_failures"],
                   "meshd_metrics_collect_failures_total") == {(): 1}
    assert "meshd_ipc_requests" not in fams


def test_openmetrics_when_asked() -> None:
    body, content_type = Metrics(lambda: INFO, process=False).render(
        "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


# --- the IPC server's timing, in-process -------------------------------------------------------

@pytest.fixture
def served(short_tmp: Path, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[tuple[str, Metrics, asyncio.AbstractEventLoop]]:
    """A daemon run in this process (no mesh) whose IPC server tells a Metrics its
    requests' times, as `meshd --http` does; yields its socket, the Metrics, its loop."""
    import meshd.daemon
    from meshd.config import Config
    from meshd.ipc.server import IPCServer

    holder: dict[str, Any] = {}

    class TimedIPCServer(IPCServer):
        def __init__(self, *args: Any, **kw: Any) -> None:
            kw["observe"] = lambda c, s: holder["metrics"].observe(c, s)
            super().__init__(*args, **kw)
    monkeypatch.setattr(meshd.daemon, "IPCServer", TimedIPCServer)
    config = Config(socket_path=str(short_tmp / "m.sock"), data_dir=str(short_tmp / "data"),
                    mesh=False, discovery=False)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> meshd.daemon.Daemon:
        d = meshd.daemon.Daemon(config)
        holder["metrics"] = Metrics(d.info, process=False)
        await d.start()
        return d

    d = asyncio.run_coroutine_threadsafe(start(), loop).result(15)
    try:
        yield config.socket_path, holder["metrics"], loop
    finally:
        asyncio.run_coroutine_threadsafe(d.stop(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_the_ipc_server_times_requests(served: tuple[str, Metrics, Any]) -> None:
    from sessions import SessionRegistry, SharedMemory
    socket, metrics, loop = served
    reg = SessionRegistry(socket=socket, timeout=5)
    reg.register("s1", "agent", "claude")
    reg.list_sessions()
    reg.node_info()
    SharedMemory(socket=socket, timeout=5).set("s1", "k", "v")
    reg.update_status("nobody", "working")                       # (answers False)
    from sessions.claims import Claims
    Claims(socket=socket, timeout=5).acquire("printer", "s1", ttl=5)   # (answered later)

    async def render() -> bytes:                # on the daemon's loop, as aiohttp does
        return metrics.render()[0]
    body = asyncio.run_coroutine_threadsafe(render(), loop).result(5)
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    counts = samples(fams["meshd_ipc_request_duration_seconds"],
                     "meshd_ipc_request_duration_seconds_count")
    for command in ("session.register", "session.list", "node.info", "memory.set",
                    "session.update_status", "claim.acquire"):
        assert counts.get((("command", command),), 0) >= 1, (command, counts)
    assert value(fams["meshd_ipc_requests"], command="session.register", outcome="ok") == 1


# --- /metrics of a real daemon ----------------------------------------------------------------

def scrape(url: str) -> tuple[str, dict[str, Any]]:
    with urllib.request.urlopen(url + "metrics", timeout=10) as resp:
        content_type = resp.headers["Content-Type"]
        body = resp.read().decode()
    return content_type, {f.name: f for f in text_string_to_metric_families(body)}


@pytest.fixture
def http_daemon(make_daemon: Any) -> Any:
    pytest.importorskip("aiohttp", reason="meshd --http needs the optional extra meshd[http]")
    from support.daemons import eventually
    d = make_daemon(args=["--http", "127.0.0.1:0"])
    if "http" not in d.registry(timeout=5).node_info():
        pytest.skip("this meshd has no --http server")
    # (The local API serves before the web server has its port.)
    url = eventually(lambda: (d.registry(timeout=5).node_info()["http"] or {}).get("url"),
                     message="the web server's URL")
    return d, url


def test_scrape_metrics_from_a_daemon(http_daemon: Any) -> None:
    d, url = http_daemon
    reg = d.registry(timeout=5)
    reg.register("alice", "agent", "claude")
    reg.register("bob", "agent", "claude")
    d.hub(timeout=5).send("alice", "bob", "request", "hello", "a body")
    reg.list_sessions()
    with reg.monitor("info"):
        content_type, fams = scrape(url)
    assert content_type.startswith("text/plain")
    assert value(fams["meshd_ipc_requests"], command="session.register", outcome="ok") == 2
    # Commands the IPC layer answers itself count too (the fixture asked node.info).
    assert value(fams["meshd_ipc_requests"], command="node.info", outcome="ok") >= 1
    assert value(fams["meshd_ipc_requests"], command="node.monitor", outcome="ok") == 1
    assert samples(fams["meshd_monitor_subscriptions"])[()] == 1
    assert value(fams["meshd_journal_writes"], command="message.send") == 1
    assert fams["meshd_build_info"].samples[0].labels["version"] == INFO["version"]
    assert samples(fams["meshd_checkpoint_duration_seconds"],
                   "meshd_checkpoint_duration_seconds_count")[()] >= 0
    assert samples(fams["meshd_members"]) and "meshd_transport_frames" in fams
    assert samples(fams["process_resident_memory_bytes"])[()] > 1 << 20
    assert samples(fams["meshd_metrics_collect_failures"])[()] == 0


def test_scrape_shows_request_latencies(http_daemon: Any) -> None:
    """Needs the daemon to give the IPC server `observe=metrics.observe`."""
    d, url = http_daemon
    reg = d.registry(timeout=5)
    reg.register("alice", "agent", "claude")
    reg.node_info()
    _, fams = scrape(url)
    counts = samples(fams["meshd_ipc_request_duration_seconds"],
                     "meshd_ipc_request_duration_seconds_count")
    assert counts.get((("command", "session.register"),), 0) >= 1, counts
    assert counts.get((("command", "node.info"),), 0) >= 2, counts
