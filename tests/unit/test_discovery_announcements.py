"""LAN discovery without any network: what an mDNS announcement must say to be believed,
the discovery table's limits, cluster names, the interfaces mDNS runs on (never loopback)
and the daemon's refusal of bad discovery flags. The lab tests, with real hosts, are in
tests/lab/test_discovery.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshd.config import Config
from meshd.errors import InvalidArgument
from meshd.mesh.discovery import choose_interfaces
from meshd.wire import discovery as wd
from support.daemons import subprocess_env

NODE = "0123456789abcdef0123456789abcdef"
GOOD = {b"node": NODE.encode(), b"cluster": b"default", b"proto": b"1", b"port": b"7747"}


# --- what an announcement must say (no network) -----------------------------------------------

def test_a_well_formed_announcement_is_believed():
    ann = wd.parse(GOOD, 7747, ["10.1.2.3", "fe80::1", "127.0.0.1"], "default")
    assert (ann.node_id, ann.port, ann.addresses) == (NODE, 7747, ("10.1.2.3",))
    assert ann.peer_addresses() == ["10.1.2.3:7747"]


@pytest.mark.parametrize("props, srv_port, addrs, reason", [
    ({}, 7747, ["10.1.2.3"], "malformed"),
    ({**GOOD, b"node": None}, 7747, ["10.1.2.3"], "malformed"),
    ({**GOOD, b"node": b"NOT-A-NODE"}, 7747, ["10.1.2.3"], "malformed"),
    ({**GOOD, b"node": b"\xff" * 32}, 7747, ["10.1.2.3"], "malformed"),
    ({**GOOD, b"proto": b"2"}, 7747, ["10.1.2.3"], "protocol"),
    ({**GOOD, b"proto": b"one"}, 7747, ["10.1.2.3"], "protocol"),
    ({**GOOD, b"cluster": b"other"}, 7747, ["10.1.2.3"], "cluster"),
    ({**GOOD, b"port": b"99999"}, 7747, ["10.1.2.3"], "malformed"),
    (GOOD, 7748, ["10.1.2.3"], "malformed"),
    (GOOD, None, ["10.1.2.3"], "malformed"),
    (GOOD, 7747, [], "malformed"),
    (GOOD, 7747, ["127.0.0.1", "0.0.0.0", "224.0.0.251", "garbage"], "malformed"),
])
def test_a_bad_announcement_is_ignored_with_its_reason(props, srv_port, addrs, reason):
    with pytest.raises(wd.Ignored) as err:
        wd.parse(props, srv_port, addrs, "default")
    assert err.value.reason == reason


def test_announcements_name_the_cluster_key_and_only_matching_ones_count():
    keyed = {**GOOD, b"key": b"0123456789abcdef"}
    assert wd.parse(keyed, 7747, ["10.1.2.3"], "default", "0123456789abcdef").node_id == NODE
    assert wd.txt(NODE, "default", 7747, "0", 1, "0123456789abcdef")["key"] == "0123456789abcdef"
    assert "key" not in wd.txt(NODE, "default", 7747, "0", 1)
    for props, ours in [(keyed, ""), (GOOD, "0123456789abcdef"),
                        ({**GOOD, b"key": b"fedcba9876543210"}, "0123456789abcdef"),
                        ({**GOOD, b"key": b""}, "")]:
        with pytest.raises(wd.Ignored) as err:
            wd.parse(props, 7747, ["10.1.2.3"], "default", ours)
        assert err.value.reason in ("key", "malformed")


class _Resolved:
    """What zeroconf hands `_heard` for a resolved name (input data, not the thing under
    test)."""

    def __init__(self, node: str, addr: str, port: int = 7747) -> None:
        self.properties = {b"node": node.encode(), b"cluster": b"default", b"proto": b"1",
                           b"port": str(port).encode()}
        self.port = port
        self._addr = addr

    def parsed_addresses(self) -> list[str]:
        return [self._addr]


def test_a_full_table_evicts_the_oldest_silent_announcement_never_a_member():
    from meshd.mesh.discovery import Discovery
    member = "a" * 32
    gone: list[list[str]] = []
    disc = Discovery(Config(discovery_max_peers=2, discovery_evict_after=0.0), "f" * 32,
                     "10.0.0.100:7747", lambda node, addrs: None, gone.append,
                     is_member=lambda node, addrs: node == member and "10.0.0.1:7747" in addrs)
    disc._heard("real._meshd._tcp.local.", _Resolved(member, "10.0.0.1"))
    # A fake that copies the member's id at another address is not that member.
    disc._heard("fake._meshd._tcp.local.", _Resolved(member, "10.0.0.9"))
    disc._heard("new._meshd._tcp.local.", _Resolved("b" * 32, "10.0.0.2"))
    assert sorted(disc._names) == ["new._meshd._tcp.local.", "real._meshd._tcp.local."]
    assert gone == [["10.0.0.9:7747"]] and disc.counters["evicted"] == 1
    # An address another announcement still gives is not given up with the evicted one.
    disc._heard("again._meshd._tcp.local.", _Resolved("c" * 32, "10.0.0.2"))
    assert "new._meshd._tcp.local." not in disc._names
    assert gone[-1] == []
    # The member itself is never evicted, however old.
    for i in range(5):
        disc._heard(f"x{i}._meshd._tcp.local.", _Resolved(f"{i}" * 32, f"10.0.1.{i}"))
    assert "real._meshd._tcp.local." in disc._names and len(disc._names) == 2


def test_cluster_names_are_checked():
    assert wd.check_cluster("team-a.prod_1") == "team-a.prod_1"
    for bad in ["", "-x", "a b", "x" * 64, "é"]:
        with pytest.raises(InvalidArgument):
            wd.check_cluster(bad)


def test_discovery_never_runs_on_loopback():
    """A daemon bound to loopback (every test daemon on this machine) gets no interface."""
    assert choose_interfaces(Config(bind="127.0.0.1:0"), "127.0.0.1") == []
    assert choose_interfaces(Config(interfaces=("127.0.0.1",)), "127.0.0.1") == []
    assert choose_interfaces(Config(bind="10.9.8.7:7747"), "10.9.8.7") == ["10.9.8.7"]
    assert choose_interfaces(Config(interfaces=("10.1.1.1", "127.0.0.1")), "x") == ["10.1.1.1"]


def test_the_daemon_rejects_bad_discovery_flags(tmp_path):
    for args in (["--cluster", "bad name"], ["--interface", "eth0"],
                 ["--discovery-max-peers", "0"], ["--discovery-max-resolves", "x"]):
        r = subprocess.run([sys.executable, "-m", "meshd", "--data-dir", str(tmp_path / "d"),
                            "--socket", str(tmp_path / "s.sock"), *args],
                           capture_output=True, text=True, env=subprocess_env(), timeout=30)
        assert r.returncode == 2, r.stderr
        assert args[0] in r.stderr
