"""LAN discovery over mDNS/DNS-SD (python-zeroconf, on this daemon's event loop).

The daemon announces `_meshd._tcp.local.` (see `meshd.wire.discovery` for the records) and
browses for the same type. Each announcement that passes the checks is handed to
`on_found`, which joins it through the same path as `--join`; when an announcement goes
away `on_gone` only stops those join attempts: whether a member is alive is membership's
call (a host can stop answering mDNS and still be up, or go down without a goodbye).

Where it listens: the addresses given with `--interface`, else the bind address when it is
a specific one, else every non-loopback IPv4 address of this host. Loopback is never used:
multicast does not work there, and a daemon bound to 127.0.0.1 is a test or a local-only
daemon that should not talk to the LAN.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from typing import Any, Callable

from meshd import __version__
from meshd.config import Config
from meshd.wire import discovery as wd
from meshd.wire.peer import PEER_PROTOCOL_VERSION, parse_address

log = logging.getLogger("meshd.discovery")

OnFound = Callable[[str, list[str]], None]      # (node id, ["ip:port", ...])
OnGone = Callable[[list[str]], None]


def _usable(addr: str) -> bool:
    try:
        ip = ipaddress.IPv4Address(addr)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast)


def choose_interfaces(config: Config, advertised_host: str) -> list[str]:
    """The IPv4 addresses to run mDNS on (see the module docstring); [] = nowhere."""
    if config.interfaces:
        return [a for a in config.interfaces if _usable(a)]
    bind_host, _ = parse_address(config.bind)
    if _usable(bind_host):
        return [bind_host]
    if bind_host not in ("0.0.0.0", "*", ""):
        return []                           # bound to loopback (or v6): stay off the LAN
    import ifaddr                            # comes with zeroconf
    found = [str(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips
             if ip.is_IPv4 and _usable(str(ip.ip))]
    if _usable(advertised_host) and advertised_host in found:
        found.remove(advertised_host)
        found.insert(0, advertised_host)
    return list(dict.fromkeys(found))


class Discovery:
    """Announce this node and report the meshd peers of our cluster heard on the LAN."""

    def __init__(self, config: Config, node_id: str, address: str, on_found: OnFound,
                 on_gone: OnGone, key_id: str = "",
                 is_member: Callable[[str, list[str]], bool] = lambda node_id, addrs: False
                 ) -> None:
        self.config = config
        self.node_id = node_id
        self.key_id = key_id                    # our cluster key's fingerprint, "" = none
        self.address = address                  # advertised "host:port" of the peer port
        self.on_found = on_found
        self.on_gone = on_gone
        # (node id, announced addresses) -> an up member at one of them (it answered)
        self.is_member = is_member
        self.interfaces: list[str] = []
        self.counters: Counter[str] = Counter()
        self.state = "off"
        self._zc: Any = None                    # zeroconf.asyncio.AsyncZeroconf
        self._browser: Any = None
        self._info: Any = None
        self._names: dict[str, list[str]] = {}  # service name -> the addresses it gave
        self._heard_at: dict[str, tuple[str, float]] = {}   # name -> (node id, first heard)
        self._tasks: set[asyncio.Task[None]] = set()
        self._resolving: set[str] = set()
        self._started = 0.0

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        host, port = parse_address(self.address)
        self.interfaces = choose_interfaces(self.config, host)
        if not self.interfaces:
            self.state = "no usable interface"
            log.warning("mDNS discovery is off: no non-loopback IPv4 interface to use "
                        "(bind %s, --interface %s)", self.config.bind,
                        list(self.config.interfaces) or "not given")
            return
        announce = [host] if _usable(host) else self.interfaces[:1]
        self._started = time.monotonic()
        try:
            self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        except OSError as exc:
            self.state = f"failed: {exc}"
            log.error("mDNS discovery is off: cannot open mDNS sockets on %s: %s",
                      self.interfaces, exc)
            return
        self._info = AsyncServiceInfo(
            wd.SERVICE_TYPE, wd.instance_name(self.node_id), port=port,
            properties=wd.txt(self.node_id, self.config.cluster, port, __version__,
                              PEER_PROTOCOL_VERSION, self.key_id),
            server=f"meshd-{self.node_id[:12]}.local.", parsed_addresses=announce)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [wd.SERVICE_TYPE],
                                            handlers=[self._on_service])
        self._spawn(self._register())
        self.state = "on"
        log.info("mDNS discovery on %s, cluster %r, announcing %s", self.interfaces,
                 self.config.cluster, self.address)

    async def _register(self) -> None:
        try:
            # No probing for name conflicts (RFC 6762 8.1 costs 1-1.5 s here): the
            # instance and host names carry this node's 128-bit random id, so only a
            # cloned data directory could collide, and that shows up anyway as an
            # announcement of our id from elsewhere (counted as ignored.self, logged).
            done = await self._zc.async_register_service(self._info,
                                                         cooperating_responders=True)
            await done
            self.counters["announced"] += 1
            log.info("announced %s after %.2fs", self._info.name,
                     time.monotonic() - self._started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:        # a name conflict means a cloned node id
            self.counters["announce_failed"] += 1
            log.error("cannot announce this node over mDNS: %s: %s", type(exc).__name__, exc)

    async def stop(self) -> None:
        """Say goodbye (so peers stop trying this address at once) and close, bounded."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:                     # gone before the Zeroconf they use is closed
            await asyncio.wait(tasks, timeout=2.0)
        if self._zc is None:
            return
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
            if self.counters["announced"]:
                await asyncio.wait_for(self._zc.async_unregister_all_services(), 2.0)
        except (asyncio.TimeoutError, Exception) as exc:
            log.warning("mDNS goodbye did not complete: %s", exc)
        try:
            await asyncio.wait_for(self._zc.async_close(), 2.0)
        except (asyncio.TimeoutError, Exception) as exc:
            log.warning("closing mDNS did not complete: %s", exc)
        self._zc = None
        self.state = "off"

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- browsing ----------------------------------------------------------------------------

    def _on_service(self, zeroconf: Any, service_type: str, name: str, state_change: Any
                    ) -> None:
        from zeroconf import ServiceStateChange
        if name.lower() == wd.instance_name(self.node_id).lower():
            return
        if state_change is ServiceStateChange.Removed:
            self.counters["removed"] += 1
            gone = self._names.pop(name, None)
            self._heard_at.pop(name, None)
            if gone:
                log.info("announcement of %s went away (membership decides whether it is "
                         "down)", name)
                self.on_gone(gone)
            return
        self.counters["heard"] += 1
        if name in self._resolving:
            return
        if self._too_many(name):
            self.counters["dropped.too_many"] += 1      # a flood of announcements
            return
        self._resolving.add(name)
        self._spawn(self._resolve(name))

    def _too_many(self, name: str) -> bool:
        """Bounds against a flood of announcements (a hostile or broken host): names being
        resolved at once, and peers of our cluster remembered (each knocked at with
        backoff). A name counts once it resolved to a well-formed announcement of our
        cluster, whether or not anything answers at its address. When the table is full,
        the oldest entry whose node is not an up member, heard at least
        `discovery_evict_after` ago, makes room for a new one (so announcements that
        never answer cannot keep real peers out for good); members are never evicted."""
        return (len(self._resolving) >= self.config.discovery_max_resolves
                or self._table_full(name))

    def _table_full(self, name: str) -> bool:
        """Checked again once a name resolved: a burst of announcements starts many
        resolves while the table still has room, and only some of them may take it."""
        return (name not in self._names and len(self._names) >= self.config.discovery_max_peers
                and self._evictable() is None)

    def _evictable(self) -> str | None:
        """The oldest remembered name that never became (or is no longer) an up member
        and is old enough to give up on; None if there is none."""
        cutoff = time.monotonic() - self.config.discovery_evict_after
        oldest: tuple[float, str] | None = None
        for name, (node_id, since) in self._heard_at.items():
            if since <= cutoff and (oldest is None or since < oldest[0]) \
                    and not self.is_member(node_id, self._names.get(name, [])):
                oldest = (since, name)
        return None if oldest is None else oldest[1]

    def _make_room(self, keep: list[str]) -> None:
        """Evict one entry for a new announcement giving the addresses `keep`."""
        victim = self._evictable()
        if victim is None:
            return
        addrs = self._names.pop(victim, [])
        self._heard_at.pop(victim, None)
        self.counters["evicted"] += 1
        log.info("forgetting mDNS service %s (never answered) to make room for a new one",
                 victim)
        # (Not an address another announcement still gives: a reinstalled host at the
        # same address must go on being knocked at.)
        still = {a for other in self._names.values() for a in other} | set(keep)
        self.on_gone([a for a in addrs if a not in still])

    async def _resolve(self, name: str) -> None:
        """Fetch SRV/TXT/A for one name (usually already cached from the announcement),
        retrying with backoff a few times when a responder is slow or silent."""
        try:
            await self._resolve_once(name)
        finally:
            self._resolving.discard(name)

    async def _resolve_once(self, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        delay = 0.5
        for attempt in range(4):
            info = AsyncServiceInfo(wd.SERVICE_TYPE, name)
            try:
                ok = await info.async_request(self._zc.zeroconf,
                                              self.config.discovery_resolve_timeout * 1000)
            except Exception as exc:             # a closing zeroconf, a malformed record
                self.counters["unresolved"] += 1
                log.debug("resolving %s failed: %s", name, exc)
                return
            if ok:
                self._heard(name, info)
                return
            await asyncio.sleep(delay)
            delay *= 2
        self.counters["unresolved"] += 1
        log.info("mDNS service %s did not resolve; ignored until it announces again", name)

    def _heard(self, name: str, info: Any) -> None:
        try:
            props = info.properties or {}
            ann = wd.parse(props, info.port, info.parsed_addresses(), self.config.cluster,
                           self.key_id)
        except wd.Ignored as exc:
            self.counters[f"ignored.{exc.reason}"] += 1
            log.info("ignoring mDNS service %s: %s", name, exc)
            return
        except Exception as exc:                 # anything odd inside a foreign record
            self.counters["ignored.malformed"] += 1
            log.info("ignoring mDNS service %s: %s", name, exc)
            return
        if ann.node_id == self.node_id:
            self.counters["ignored.self"] += 1    # our id under another name: a clone?
            log.warning("mDNS service %s claims this node's id %s", name, self.node_id)
            return
        if self._table_full(name):
            self.counters["dropped.too_many"] += 1
            return
        addrs = ann.peer_addresses()
        if name not in self._names and len(self._names) >= self.config.discovery_max_peers:
            self._make_room(addrs)
        if self._names.get(name) != addrs:
            self.counters["found"] += 1
            log.info("found peer %s at %s over mDNS", ann.node_id[:12], ", ".join(addrs))
        self._names[name] = addrs
        if self._heard_at.get(name, ("",))[0] != ann.node_id:
            self._heard_at[name] = (ann.node_id, time.monotonic())
        self.on_found(ann.node_id, addrs)

    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "cluster": self.config.cluster,
                "interfaces": self.interfaces, "peers_heard": len(self._names),
                "resolving": len(self._resolving),
                "max_peers": self.config.discovery_max_peers,
                "max_resolves": self.config.discovery_max_resolves,
                "counters": dict(self.counters)}
