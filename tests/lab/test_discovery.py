"""LAN discovery over mDNS: real daemons on real hosts (network namespaces on a bridge, see
support/netlab.py) that find each other with no --join at all, stay apart by cluster, are
seen by an mDNS implementation that is not ours (dig), and ignore what foreign announcers
say. Announcement parsing and interface choice, without any network, are checked in
tests/unit/test_discovery_announcements.py.

The lab tests need root (CI runs as root) and skip with the reason otherwise. mDNS only
ever runs inside the lab's namespaces: daemons on this machine's own network are started
with discovery off (support.daemons) and a loopback bind, where it refuses to run anyway.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
import time
from typing import Callable, Iterator

import pytest

from support import netlab, script
from support.daemons import Daemon, eventually, peer_states, run_cli, wait_converged
from support.mesh import wait_same_state
from meshd.wire import discovery as wd

REASON = netlab.skip_reason()
needs_lab = pytest.mark.skipif(REASON is not None, reason=REASON or "")


# --- the lab --------------------------------------------------------------------------------

@pytest.fixture
def lab() -> Iterator[Callable[[int], netlab.Lab]]:
    made: list[netlab.Lab] = []

    def make(n: int) -> netlab.Lab:
        made.append(netlab.Lab(n))
        return made[-1]
    try:
        yield make
    finally:
        for lb in made:
            lb.close()


@pytest.fixture
def lan(lab, short_tmp) -> Iterator[Callable[..., list[Daemon]]]:
    """lan(n, args_for=lambda i: [...]) -> n daemons, one per lab host, with discovery on,
    the default bind (0.0.0.0:7747) and no --join. All are stopped at the end. With
    `first`, on hosts first..first+n-1 (more daemons in a lab that already has some)."""
    started: list[Daemon] = []

    def make(n: int, args_for: Callable[[int], list[str]] = lambda i: [],
             hosts: netlab.Lab | None = None, first: int = 0) -> list[Daemon]:
        lb = hosts or lab(first + n)
        nodes = []
        for i in range(first, first + n):
            d = Daemon(socket=str(short_tmp / f"h{i}.sock"),
                       data_dir=str(short_tmp / f"h{i}-data"),
                       log_path=str(short_tmp / f"h{i}.log"),
                       args=["--bind", "0.0.0.0:7747", "--discovery", *args_for(i)],
                       wrap=["ip", "netns", "exec", lb.hosts[i]])
            started.append(d)
            nodes.append(d.start())
        return nodes
    try:
        yield make
    finally:
        for d in started:
            d.stop(timeout=10)


def discovery_stats(d: Daemon) -> dict:
    return d.registry(timeout=5).node_info()["mesh"]["discovery"]


@needs_lab
def test_hosts_find_each_other_replicate_and_talk_with_mdns_alone(lan):
    nodes = lan(4)
    wait_converged(nodes, timeout=20)
    for d in nodes:
        st = discovery_stats(d)
        assert st["state"] == "on" and st["cluster"] == "default"
        # Each also heard the three others' announcements itself (some joined it first).
        eventually(lambda d=d: discovery_stats(d)["counters"].get("found", 0) >= 3,
                   timeout=15, message="the three other announcements heard")
        assert all(p["address"].startswith(netlab.SUBNET) for p in d.registry().peers())
    r = run_cli(["--socket", nodes[0].socket, "peers"], env=nodes[0].env())
    assert r.returncode == 0, r.stderr
    assert f"mDNS discovery: on {netlab.SUBNET}.10, cluster 'default', 3 peer(s)" in r.stdout
    for i, d in enumerate(nodes):
        d.registry().register(f"s{i}", f"S{i}", "claude")
    for d in nodes:
        eventually(lambda d=d: len(d.registry().list_sessions()) == 4, timeout=15,
                   message="sessions replicated")
    nodes[0].memory().set("s0", "plan", {"step": 1})
    eventually(lambda: nodes[3].memory().get("plan") == {"step": 1}, timeout=15,
               message="memory replicated")
    nodes[1].hub().send("s1", "s3", "request", "over the LAN", "hello")
    nodes[2].hub().broadcast("s2", "to all", "hi")
    eventually(lambda: sorted(m.subject for m in nodes[3].hub().get_messages("s3"))
               == ["over the LAN", "to all"], timeout=15, message="direct + broadcast")
    for i in (0, 1):
        eventually(lambda i=i: [m.subject for m in nodes[i].hub().get_messages(f"s{i}")]
                   == ["to all"], timeout=15, message="broadcast everywhere")
    assert nodes[2].hub().get_messages("s2") == []


@needs_lab
def test_a_cut_host_is_declared_dead_and_rejoins_after_healing(lab, lan):
    hosts = lab(3)
    nodes = lan(3, hosts=hosts)
    wait_converged(nodes, timeout=20)
    nodes[0].registry().register("s0", "S0", "claude")
    nodes[2].registry().register("s2", "S2", "gpt")
    eventually(lambda: len(nodes[1].registry().list_sessions()) == 2, timeout=15)
    hosts.cut(2)
    for d in nodes[:2]:
        eventually(lambda d=d: peer_states(d).get(nodes[2].node_id) == "dead", timeout=20,
                   message="the cut-off host declared dead")
    eventually(lambda: set(peer_states(nodes[2]).values()) == {"dead"}, timeout=20,
               message="the cut-off host seeing the others dead")
    for i in range(20):
        nodes[0].memory().set("s0", f"maj-{i}", i)
    nodes[2].memory().set("s2", "minority", "kept")
    msg = nodes[0].hub().send("s0", "s2", "request", "across the cut", "x")
    hosts.heal(2)
    wait_converged(nodes, timeout=30)
    eventually(lambda: nodes[2].memory().get("maj-19") == 19, timeout=20,
               message="the healed host caught up")
    eventually(lambda: nodes[1].memory().get("minority") == "kept", timeout=20,
               message="its own writes reached the others")
    eventually(lambda: [m.subject for m in nodes[2].hub().get_messages("s2")]
               == ["across the cut"], timeout=20, message="the queued message, once")
    eventually(lambda: nodes[0].hub().get_message_status(msg.message_id)["state"] == "stored",
               timeout=20)
    wait_same_state(nodes)


@needs_lab
def test_two_clusters_on_one_bridge_stay_apart(lan):
    nodes = lan(4, args_for=lambda i: ["--cluster", "blue" if i % 2 else "green"])
    stay_apart(nodes, "ignored.cluster")


def stay_apart(nodes: list[Daemon], ignored: str) -> None:
    """Even and odd hosts form two clusters, and each host heard the other two announce
    and turned them down (counted as `ignored`)."""
    pairs = (nodes[0::2], nodes[1::2])
    for pair in pairs:
        wait_converged(pair, timeout=20)
    for d in nodes:
        eventually(lambda d=d: discovery_stats(d)["counters"].get(ignored, 0) >= 2,
                   timeout=15, message=f"the other cluster's announcements counted {ignored}")
    for pair in pairs:
        for d in pair:
            assert set(peer_states(d)) == {o.node_id for o in pair if o is not d}


@needs_lab
def test_hosts_with_another_cluster_key_or_none_stay_apart(lan, short_tmp):
    key = short_tmp / "cluster.key"
    subprocess.run([sys.executable, "-m", "meshd", "--gen-key", str(key)], check=True,
                   capture_output=True, timeout=30)
    nodes = lan(4, args_for=lambda i: ["--key-file", str(key)] if i % 2 else [])
    stay_apart(nodes, "ignored.key")             # (turned down before any handshake)
    for d in nodes[1::2]:
        assert d.registry().node_info()["mesh"]["transport"]["security"]["mode"] == "curve"


@needs_lab
def test_a_restarted_or_reinstalled_daemon_is_found_again(lan, short_tmp):
    nodes = lan(3)
    wait_converged(nodes, timeout=20)
    old_id = nodes[2].node_id
    nodes[2].restart()                          # SIGTERM: leaves, says goodbye, comes back
    assert nodes[2].node_id == old_id
    wait_converged(nodes, timeout=20)
    # kill -9 and a wiped data directory: a new node id the others never heard of, whose
    # only way in is its mDNS announcement and its own browsing.
    nodes[2].kill9()
    shutil.rmtree(nodes[2].data_dir)
    nodes[2].start()
    assert nodes[2].node_id != old_id
    wait_converged(nodes, timeout=20)
    for d in nodes[:2]:
        eventually(lambda d=d: peer_states(d).get(old_id) == "dead", timeout=20,
                   message="the old identity declared dead")


@needs_lab
def test_a_vanished_announcement_does_not_drop_a_live_member(lab, lan):
    """A goodbye for node 0's service (spoofed from another host) makes the others forget
    the announcement; node 0 still answers probes, so it stays alive: membership decides."""
    hosts = lab(3)
    nodes = lan(2, hosts=hosts)
    wait_converged(nodes, timeout=20)
    eventually(lambda: discovery_stats(nodes[1])["peers_heard"] == 1, timeout=15)
    name = wd.instance_name(nodes[0].node_id)
    props = json.dumps(wd.txt(nodes[0].node_id, "default", 7747, "x", 1))
    r = subprocess.run(["ip", "netns", "exec", hosts.hosts[2], sys.executable,
                        str(script("mdns_announcer.py")), "goodbye",
                        hosts.address(2), name, "7747", hosts.address(0), props],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    eventually(lambda: discovery_stats(nodes[1])["counters"].get("removed", 0) >= 1,
               timeout=15, message="the goodbye heard")
    # (node 0 may well be heard again at once: it is still there and still announced.)
    # Watch for a while (10 probe rounds of the test preset): never suspect, never dead.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert peer_states(nodes[1])[nodes[0].node_id] == "alive"
        time.sleep(0.1)


@needs_lab
def test_interface_choice_decides_where_mdns_runs(lab, lan):
    """--interface names the address mDNS uses; one this host does not have turns
    discovery off with the reason, and the daemon goes on serving (and --join works)."""
    hosts = lab(3)
    nodes = lan(3, hosts=hosts, args_for=lambda i: [
        ["--interface", hosts.address(0)],
        ["--interface", f"{netlab.SUBNET}.200", "--join", f"{hosts.address(0)}:7747"],
        [],
    ][i])
    assert discovery_stats(nodes[0])["interfaces"] == [hosts.address(0)]
    st = discovery_stats(nodes[1])
    assert st["state"].startswith("failed"), st
    wait_converged(nodes, timeout=20)          # node 1 through --join, node 2 by mDNS
    assert discovery_stats(nodes[1])["counters"] == {}
    r = run_cli(["--socket", nodes[1].socket, "peers"], env=nodes[1].env())
    assert "mDNS discovery: failed" in r.stdout, r.stdout


@needs_lab
@pytest.mark.skipif(shutil.which("dig") is None,
                    reason="needs dig (Debian package bind9-dnsutils; .ci/run installs it)")
def test_dig_sees_our_announcement(lab, lan):
    hosts = lab(2)
    d = lan(1, hosts=hosts)[0]

    def dig(name: str, rtype: str) -> str:
        r = subprocess.run(["ip", "netns", "exec", hosts.hosts[1], "dig", "-p", "5353",
                            f"@{hosts.address(0)}", name, rtype, "+time=1", "+tries=1",
                            "+noall", "+answer"], capture_output=True, text=True, timeout=10)
        return r.stdout

    instance = f"{d.node_id}._meshd._tcp.local."
    # Until its probing is done (about a second) the daemon does not answer for the name.
    eventually(lambda: instance in dig("_meshd._tcp.local", "PTR").split(), timeout=15,
               message="our instance in dig's PTR answer")
    srv = dig(instance, "SRV").split()
    assert srv[-4:] == ["0", "0", "7747", f"meshd-{d.node_id[:12]}.local."]
    txt = dig(instance, "TXT")
    for field in (f'"node={d.node_id}"', '"cluster=default"', '"proto=1"', '"port=7747"'):
        assert field in txt
    a = dig(f"meshd-{d.node_id[:12]}.local", "A").split()
    assert a[-1] == hosts.address(0)


@needs_lab
def test_foreign_and_malformed_announcements_are_ignored(lab, lan):
    hosts = lab(3)
    nodes = lan(2, hosts=hosts)
    wait_converged(nodes, timeout=20)
    announcer = hosts.popen(2, [sys.executable, str(script("mdns_announcer.py")),
                                hosts.address(2), f"{netlab.SUBNET}.99"],
                            stdout=subprocess.PIPE, text=True)
    line = announcer.stdout.readline() if announcer.stdout else ""
    assert line, "the foreign announcer did not start"
    silent = json.loads(line)["silent_node"]

    def ignored_all(d: Daemon) -> bool:
        c = discovery_stats(d)["counters"]
        # no-txt, bad-node, not-utf8, port-mismatch, no-port, loopback; old-proto; cluster
        return (c.get("ignored.malformed", 0) >= 6 and c.get("ignored.protocol", 0) >= 1
                and c.get("ignored.cluster", 0) >= 1)
    for d in nodes:
        eventually(lambda d=d: ignored_all(d), timeout=20,
                   message=f"every bad announcement counted: {discovery_stats(d)}")
        # The silent one was well formed: it is knocked at, with backoff ...
        eventually(lambda d=d: discovery_stats(d)["counters"].get("found", 0) >= 2,
                   timeout=20, message="the silent announcement taken as a seed")
    for d in nodes:
        # ... but never becomes a member; the real cluster is untouched and answering.
        assert set(peer_states(d)) == {o.node_id for o in nodes if o is not d}
        assert silent not in peer_states(d)
        assert d.alive()
    wait_converged(nodes, timeout=10)


# --- floods of announcements ------------------------------------------------------------------

ANNOUNCER = str(script("mdns_announcer.py"))
FLOOD, CAP = 40, 8


def start_announcer(hosts: netlab.Lab, i: int, *args: str) -> dict:
    """Run mdns_announcer.py on lab host i (stopped by the lab) and return its ready line."""
    proc = hosts.popen(i, [sys.executable, ANNOUNCER, *args], stdout=subprocess.PIPE,
                       text=True)
    assert proc.stdout is not None
    # poll, not select: the descriptor may be above FD_SETSIZE late in a long run
    poller = select.poll()
    poller.register(proc.stdout, select.POLLIN)
    line = proc.stdout.readline() if poller.poll(30_000) else ""
    assert line, "the announcer did not start within 30 s"
    return json.loads(line)


class Watch:
    """Discovery stats read through the daemon's local socket, with the worst seen kept:
    how long node info + the peer list took, and the largest `peers_heard`/`resolving`
    (`eventually` retries on a failed assert, so limits are checked on what was seen)."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.slowest = 0.0
        self.most: dict[str, int] = {"peers_heard": 0, "resolving": 0}

    def stats(self) -> dict:
        t0 = time.monotonic()
        st = self.d.registry(timeout=5).node_info()["mesh"]["discovery"]
        self.d.registry(timeout=5).peers()
        self.slowest = max(self.slowest, time.monotonic() - t0)
        for key in self.most:
            self.most[key] = max(self.most[key], st.get(key, 0))
        return st

    def counter(self, name: str) -> int:
        return self.stats()["counters"].get(name, 0)


@needs_lab
def test_a_flood_of_fake_peers_is_capped_and_join_still_works(lab, lan):
    """A host announces 40 well-formed meshd nodes of our cluster at addresses where nothing
    answers. A daemon remembering at most 8 takes 8 (and knocks at them in vain), drops the
    rest, keeps answering its socket, and makes none a member. A real host arriving after
    the table is full, with no --join, still gets in over mDNS: the oldest silent entry
    makes room for it (after discovery_evict_after, 2 s in the test preset)."""
    hosts = lab(3)
    capped = lan(1, hosts=hosts, args_for=lambda i: ["--discovery-max-peers", str(CAP)])[0]
    watch = Watch(capped)
    assert watch.stats()["max_peers"] == CAP
    fakes = set(start_announcer(hosts, 1, "flood", hosts.address(1), str(FLOOD),
                                f"{netlab.SUBNET}.100")["nodes"])
    assert len(fakes) == FLOOD
    eventually(lambda: watch.stats()["peers_heard"] == CAP
               and watch.counter("dropped.too_many") >= FLOOD - CAP, timeout=20,
               message="the table full and the rest dropped")
    # Watch it knock at the 8 silent ones for a while (several join retries of the test
    # preset): never more heard, never a member, the socket answering throughout.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert watch.stats()["peers_heard"] == CAP
        assert peer_states(capped) == {}
        time.sleep(0.1)
    assert watch.counter("evicted") == 0        # nothing new asked for room meanwhile
    real = lan(1, hosts=hosts, first=2, args_for=lambda i: [
        "--discovery-max-peers", str(CAP)])[0]
    wait_converged([capped, real], timeout=20)
    real_watch = Watch(real)
    eventually(lambda: real_watch.counter("dropped.too_many") >= FLOOD + 1 - CAP, timeout=20,
               message="the real host flooded as well (40 fakes + the capped daemon)")
    # Every name taken counts once in `found`: the capped daemon took the real host's
    # announcement (9 in all) by forgetting one silent fake, never holding more than 8.
    assert watch.counter("found") == CAP + 1, watch.stats()
    assert watch.counter("evicted") >= 1, watch.stats()
    for d, other in ((capped, real), (real, capped)):
        assert set(peer_states(d)) == {other.node_id}
        assert not fakes & set(peer_states(d))
        assert d.alive()
    for w in (watch, real_watch):
        assert w.most["peers_heard"] <= CAP, w.most
        assert w.slowest < 2.0, f"node info + peers took {w.slowest:.2f}s under the flood"


@needs_lab
def test_names_that_never_resolve_hold_at_most_the_resolve_cap(lab, lan):
    """30 PTR records whose SRV/TXT nobody answers: each would hold a resolver for about
    20 s (4 tries of 3 s, with backoff). A daemon resolving at most 4 at once drops the
    other 26, stays responsive, and frees its 4 slots when the tries run out."""
    hosts = lab(2)
    d = lan(1, hosts=hosts, args_for=lambda i: ["--discovery-max-resolves", "4"])[0]
    watch = Watch(d)
    assert watch.stats()["max_resolves"] == 4
    r = subprocess.run(["ip", "netns", "exec", hosts.hosts[1], sys.executable, ANNOUNCER,
                        "ptr-only", hosts.address(1), "30"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    eventually(lambda: watch.stats()["resolving"] == 4
               and watch.counter("dropped.too_many") >= 26, timeout=10,
               message="4 names resolving, the rest dropped")
    eventually(lambda: watch.counter("unresolved") >= 4 and watch.stats()["resolving"] == 0,
               timeout=45, message="the 4 resolves given up and their slots freed")
    st = watch.stats()
    assert st["peers_heard"] == 0 and st["counters"]["dropped.too_many"] == 26, st
    assert watch.most["resolving"] <= 4, watch.most
    assert watch.slowest < 2.0, f"node info + peers took {watch.slowest:.2f}s"
    assert peer_states(d) == {} and d.alive()


@needs_lab
def test_an_open_daemon_on_a_real_network_says_so(lan, short_tmp):
    """Unauthenticated peers on a non-loopback address: one warning at start saying how
    to set a cluster key, and `info`/`peers` show the security mode."""
    from support.daemons import subprocess_env
    key = short_tmp / "cluster.key"
    r = subprocess.run([sys.executable, "-m", "meshd", "--gen-key", str(key)],
                       capture_output=True, text=True, timeout=30, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    open_node, keyed = lan(2, args_for=lambda i: ["--key-file", str(key)] if i else [])
    assert open_node.log().count("peers are not authenticated") == 1
    assert "--key-file" in open_node.log() and "--gen-key" in open_node.log()
    assert "peers are not authenticated" not in keyed.log()
    out = run_cli(["peers"], env=open_node.env()).stdout
    assert "Security: OPEN: peers are not authenticated" in out, out
    out = run_cli(["info"], env=keyed.env()).stdout
    assert "cluster key" in out and "traffic encrypted" in out, out
