"""A foreign mDNS announcer for the discovery tests: announces `_meshd._tcp.local.` services
that meshd must not believe, from inside a lab namespace, until SIGTERM.

It uses python-zeroconf directly (none of meshd's code), the way another implementation
or a misconfigured host on the LAN would announce. Usage:
    python mdns_announcer.py INTERFACE_ADDR SILENT_ADDR
Prints one JSON line {"ready": true, "silent_node": ...} once every service is registered.
    python mdns_announcer.py goodbye INTERFACE_ADDR NAME PORT ADDR TXT_JSON
announces NAME briefly and says goodbye for it (TTL 0), then exits.
    python mdns_announcer.py flood INTERFACE_ADDR N FIRST_SILENT_ADDR
announces N well-formed meshd services of cluster "default", each with its own node id and
a silent address (FIRST_SILENT_ADDR, the next one, ...), until SIGTERM; prints
{"ready": true, "nodes": [...]} once they are registered.
    python mdns_announcer.py ptr-only INTERFACE_ADDR N
sends PTR records for N service names whose SRV/TXT/A nobody ever answers (so each one
keeps a resolver busy until it gives up), prints {"sent": [...]} and exits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import sys

from zeroconf import DNSOutgoing, DNSPointer, IPVersion, const
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

TYPE = "_meshd._tcp.local."
GOOD = {"node": "", "cluster": "default", "proto": "1", "port": "7747"}
SILENT_NODE = "5" * 32


def services(iface: str, silent: str) -> list[AsyncServiceInfo]:
    def svc(label: str, props: dict, port: int = 7747, addr: str = iface) -> AsyncServiceInfo:
        return AsyncServiceInfo(TYPE, f"{label}.{TYPE}", port=port, properties=props,
                                server=f"foreign-{label}.local.", parsed_addresses=[addr])
    node = lambda c: c * 32                       # noqa: E731 - a well-formed node id
    return [
        svc("no-txt", {}),                                          # malformed: nothing
        svc("bad-node", {**GOOD, "node": "not a node id"}),         # malformed node
        svc("not-utf8", {**GOOD, "node": b"\xff\xfe" * 16}),        # malformed encoding
        svc("port-mismatch", {**GOOD, "node": node("a")}, port=7748),  # TXT 7747, SRV 7748
        svc("no-port", {k: v for k, v in {**GOOD, "node": node("b")}.items() if k != "port"}),
        svc("old-proto", {**GOOD, "node": node("c"), "proto": "99"}),  # another protocol
        svc("other-cluster", {**GOOD, "node": node("d"), "cluster": "elsewhere"}),
        svc("loopback", {**GOOD, "node": node("e")}, addr="127.0.0.1"),
        # Well formed, but nobody answers at that address: retried, never a member.
        svc("silent", {**GOOD, "node": SILENT_NODE}, addr=silent),
    ]


def flood_services(n: int, first_silent: str) -> list[AsyncServiceInfo]:
    """N services that pass every check of meshd's parser but point at addresses where
    nothing answers: a broken or hostile host announcing many fake nodes."""
    base = ipaddress.IPv4Address(first_silent)
    infos = []
    for i in range(n):
        node = f"f100d{i:027x}"                       # 32 hex digits, one id each
        infos.append(AsyncServiceInfo(
            TYPE, f"{node}.{TYPE}", port=7747, properties={**GOOD, "node": node},
            server=f"flood-{i}.local.", parsed_addresses=[str(base + i)]))
    return infos


async def serve(iface: str, infos: list[AsyncServiceInfo], ready: dict) -> None:
    """Register every service, print `ready`, and answer for them until SIGTERM."""
    zc = AsyncZeroconf(interfaces=[iface], ip_version=IPVersion.V4Only)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    announced = await asyncio.gather(*(zc.async_register_service(i) for i in infos))
    await asyncio.gather(*announced)
    print(json.dumps({"ready": True, **ready}), flush=True)
    try:
        await asyncio.wait_for(stop.wait(), 300)      # bounded, even if nobody stops us
    except asyncio.TimeoutError:
        pass
    await zc.async_close()


async def main(iface: str, silent: str) -> None:
    infos = services(iface, silent)
    await serve(iface, infos, {"silent_node": SILENT_NODE, "names": [i.name for i in infos]})


async def flood(iface: str, n: int, first_silent: str) -> None:
    infos = flood_services(n, first_silent)
    await serve(iface, infos, {"nodes": [i.properties[b"node"].decode() for i in infos]})


async def ptr_only(iface: str, n: int) -> None:
    """Point at N instances without ever giving their records: a resolver asking for
    their SRV/TXT gets no answer and waits out its timeout and retries."""
    zc = AsyncZeroconf(interfaces=[iface], ip_version=IPVersion.V4Only)
    await zc.zeroconf.async_wait_for_start()
    names = [f"{'e' * 27}{i:05x}.{TYPE}" for i in range(n)]
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    for name in names:
        out.add_answer_at_time(DNSPointer(TYPE, const._TYPE_PTR, const._CLASS_IN, 120, name), 0)
    zc.zeroconf.async_send(out)                       # a UDP send goes out at once
    print(json.dumps({"sent": names}), flush=True)
    await zc.async_close()


async def goodbye(iface: str, name: str, port: int, addr: str, props: str) -> None:
    """Say goodbye (TTL 0) for someone else's service, as a confused or hostile host
    would: listeners drop it from their caches although its owner is still up."""
    zc = AsyncZeroconf(interfaces=[iface], ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(TYPE, name, port=port, properties=json.loads(props),
                            server=f"spoof-{port}.local.", parsed_addresses=[addr])
    await (await zc.async_register_service(info, cooperating_responders=True))
    await (await zc.async_unregister_service(info))
    print(json.dumps({"goodbye": name}), flush=True)
    await zc.async_close()


if __name__ == "__main__":
    if sys.argv[1] == "goodbye":
        asyncio.run(goodbye(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5],
                            sys.argv[6]))
    elif sys.argv[1] == "flood":
        asyncio.run(flood(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    elif sys.argv[1] == "ptr-only":
        asyncio.run(ptr_only(sys.argv[2], int(sys.argv[3])))
    else:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
