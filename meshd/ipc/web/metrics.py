"""Prometheus metrics of a daemon, for `/metrics` on its HTTP server (`meshd --http`).

Everything but the request latencies is read from `Daemon.info()` (and, when given, the
mesh's member table) when Prometheus scrapes, by a custom collector on a registry of our
own: nothing is kept twice, and a daemon nobody scrapes pays nothing. Request latencies
come from the IPC server (`IPCServer(observe=metrics.observe)`, see `meshd.ipc.timing` for
what is timed) into a histogram per command. The process's RSS and CPU come from
prometheus_client's process collector.

Label values that come from the mesh (destinations, peers) or from counter names are
bounded: past MAX_NODES destinations / peers (the largest kept) or MAX_NAMES names per
metric (by name), the rest are summed under the label value "other".

`render()` reads the daemon's state: call it on the daemon's event loop (as an aiohttp
handler is). This module is the only one that imports prometheus_client (the optional
extra `meshd[http]`): the daemon runs without it. The metrics are listed in docs/dashboard.md
("Metrics").
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, TypeVar

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric, SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.registry import Collector

from meshd.wire.ipc import REGISTRY

log = logging.getLogger("meshd.metrics")

Info = Callable[[], dict[str, Any]]
Peers = Callable[[], list[dict[str, Any]]]

#: Destinations (outboxes) and peers (replication) with a label of their own at most.
MAX_NODES = 20
#: Distinct values of a label taken from counter names (reasons, events) at most.
MAX_NAMES = 50
OTHER = "other"
K = TypeVar("K")
#: Seconds; IPC requests take from ~50 us (a ping in a batch) to seconds (a claim waiting
#: for a busy resource, a search over a big store).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Member states as the membership names them (each always exported, 0 when none).
MEMBER_STATES = ("alive", "suspect", "dead", "left")


class Metrics:
    """`info` is `Daemon.info`; `peers` (optional) the mesh's member table (`Mesh.peers`),
    for members by state and replication lag per peer."""

    def __init__(self, info: Info, peers: Peers | None = None,
                 registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._collector = _InfoCollector(info, peers)
        self.registry.register(self._collector)
        self.latency = Histogram(
            "meshd_ipc_request_duration_seconds",
            "Seconds from serving a local API request until its answer was ready, by "
            "command (a store batch's requests each get the whole batch's duration).",
            ["command"], buckets=LATENCY_BUCKETS, registry=self.registry)
        if process:
            ProcessCollector(registry=self.registry)

    def observe(self, command: str, seconds: float) -> None:
        """One served request of `command` took `seconds` (`meshd.ipc.timing`)."""
        self.latency.labels(command if command in REGISTRY else OTHER).observe(seconds)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its content type: Prometheus text format, or OpenMetrics when
        `accept` (the request's Accept header) asks for it."""
        if not accept:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


# --- reading info() ------------------------------------------------------------------------

def _bounded(values: dict[str, float], limit: int, by_value: bool = False,
             merge: Callable[[float, float], float] = lambda a, b: a + b) -> dict[str, float]:
    """At most `limit` keys (the largest values, or the first names) and OTHER for the
    rest, merged (summed unless told otherwise)."""
    if len(values) <= limit:
        return values
    keys = (sorted(values, key=lambda k: (-values[k], k)) if by_value else sorted(values))
    out = {k: values[k] for k in keys[:limit - 1]}
    rest = [values[k] for k in keys[limit - 1:]]
    total = rest[0]
    for v in rest[1:]:
        total = merge(total, v)
    out[OTHER] = total
    return out


def _regroup(values: dict[K, float], rekey: Callable[[K], K],
             merge: Callable[[float, float], float]) -> dict[K, float]:
    """The values under new keys (a peer outside the kept set becomes OTHER), merging
    those that meet."""
    out: dict[K, float] = {}
    for key, value in values.items():
        new = rekey(key)
        out[new] = merge(out[new], value) if new in out else value
    return out


def _kept(keep: set[str]) -> Callable[[str], str]:
    return lambda node: node if node in keep else OTHER


def _labelled(family: CounterMetricFamily | GaugeMetricFamily,
              values: dict[str, float]) -> CounterMetricFamily | GaugeMetricFamily:
    for key, value in _bounded(values, MAX_NAMES).items():
        family.add_metric([key], value)
    return family


def _counter(name: str, doc: str, value: Any) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value or 0))


def _gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value or 0))


def _split(counters: dict[str, Any], named: dict[str, str]) -> tuple[
        dict[str, float], dict[str, float], dict[str, float]]:
    """A component's counters: those `named` (counter -> label value), the `dropped.*` ones
    by reason, and the rest by name."""
    picked: dict[str, float] = {}
    dropped: dict[str, float] = {}
    rest: dict[str, float] = {}
    for key, value in (counters or {}).items():
        if key in named:
            picked[named[key]] = picked.get(named[key], 0) + value
        elif key.startswith("dropped."):
            dropped[key[len("dropped."):]] = value
        else:
            rest[key] = value
    return picked, dropped, rest


class _InfoCollector(Collector):
    def __init__(self, info: Info, peers: Peers | None) -> None:
        self._info = info
        self._peers = peers
        self.failures = 0

    def collect(self) -> Iterator[Metric]:
        try:
            info = self._info()
            peers = self._peers() if self._peers is not None else None
            metrics = list(self._all(info, peers))
        except Exception:                   # a scrape during start or stop: say so, go on
            log.warning("reading the daemon's state for /metrics failed", exc_info=True)
            self.failures += 1
            metrics = []
        yield from metrics
        yield _counter("meshd_metrics_collect_failures_total",
                       "Scrapes for which the daemon's state could not be read.", self.failures)

    def _all(self, info: dict[str, Any], peers: list[dict[str, Any]] | None
             ) -> Iterable[Metric]:
        build = InfoMetricFamily("meshd_build", "The daemon's version and protocol.")
        build.add_metric([], {"version": str(info.get("version", "")),
                              "protocol": str(info.get("protocol", "")),
                              "durability": str(info.get("durability", ""))})
        yield build
        yield _gauge("meshd_uptime_seconds", "Seconds since the daemon started.",
                     info.get("uptime"))
        yield from self._ipc(info)
        yield from self._journal(info)
        yield from self._streams(info)
        mesh = info.get("mesh")
        if mesh:
            yield from self._mesh(mesh, peers)

    # --- local API -----------------------------------------------------------------------

    def _ipc(self, info: dict[str, Any]) -> Iterable[Metric]:
        counters: dict[str, Any] = info.get("counters") or {}
        yield _counter("meshd_ipc_requests_received_total",
                       "Local API requests read (each item of a batch frame counts).",
                       counters.get("requests"))
        requests = CounterMetricFamily(
            "meshd_ipc_requests_total",
            "Local API requests answered, by command and outcome (ok: by command; error "
            "and rejected: by the error code's metric, command \"\").",
            labels=["command", "outcome"])
        errors: dict[str, float] = {}
        rejected: dict[str, float] = {}
        dropped: dict[str, float] = {}
        other: dict[str, float] = {}
        for key, value in counters.items():
            kind, _, name = key.partition(".")
            if kind == "ok" and name:
                requests.add_metric([name if name in REGISTRY else OTHER, "ok"], value)
            elif kind == "error" and name:
                errors[name] = value
            elif kind == "rejected" and name:
                rejected[name] = value
            elif kind == "dropped" and name:
                dropped[name] = value
            elif key != "requests":
                other[key] = value
        requests.add_metric(["", "error"], sum(errors.values()))
        requests.add_metric(["", "rejected"], sum(rejected.values()))
        yield requests
        yield _labelled(CounterMetricFamily(
            "meshd_ipc_errors_total", "Local API requests that failed, by error code.",
            labels=["code"]), errors)
        yield _labelled(CounterMetricFamily(
            "meshd_ipc_rejected_total", "Local API requests refused before running, by "
            "reason (error code).", labels=["reason"]), rejected)
        yield _labelled(CounterMetricFamily(
            "meshd_ipc_replies_dropped_total", "Replies that could not be sent to a local "
            "client, by reason.", labels=["reason"]), dropped)
        yield _labelled(CounterMetricFamily(
            "meshd_ipc_events_total", "Other local API events (internal_errors, "
            "batch_retries, turns_deferred, keepalive.pings, ...), by name.",
            labels=["event"]), other)

    def _journal(self, info: dict[str, Any]) -> Iterable[Metric]:
        counters: dict[str, Any] = info.get("counters") or {}
        writes = CounterMetricFamily(
            "meshd_journal_writes_total", "Memory sets and sends acknowledged, by command "
            "(from the journal; in a batch frame with other commands, straight to SQLite).",
            labels=["command"])
        for command in ("memory.set", "message.send"):
            writes.add_metric([command], counters.get(f"ok.{command}", 0))
        yield writes
        yield _counter("meshd_journal_folded_records_total", "Journaled writes the fold "
                       "thread committed to SQLite (folds on the loop, before a read, are "
                       "not counted).", info.get("folded"))
        yield _gauge("meshd_journal_unfolded_records", "Journaled writes not yet in SQLite.",
                     info.get("unfolded"))
        yield _counter("meshd_journal_fold_errors_total", "Folds into SQLite that failed "
                       "(retried).", counters.get("fold_errors"))
        yield _counter("meshd_checkpoints_total", "WAL checkpoints taken by the fold thread.",
                       info.get("checkpoints"))
        if "checkpoint_seconds" in info:
            yield SummaryMetricFamily(
                "meshd_checkpoint_duration_seconds", "Seconds spent in WAL checkpoints.",
                count_value=float(info.get("checkpoints") or 0),
                sum_value=float(info.get("checkpoint_seconds") or 0))

    def _streams(self, info: dict[str, Any]) -> Iterable[Metric]:
        streams: dict[str, Any] = info.get("streams") or {}
        yield _gauge("meshd_stream_subscriptions", "Open stream subscriptions (watch, "
                     "subscribe, memory watch).", info.get("subscriptions"))
        yield _gauge("meshd_stream_unacked_bytes", "Bytes pushed to stream clients and not "
                     "yet acknowledged (the stream backlog).", streams.get("unacked_bytes"))
        yield _gauge("meshd_stream_followed_keys", "Sessions (or whole-node streams) "
                     "followed by at least one subscription.", streams.get("followed"))
        yield _gauge("meshd_stream_paused_subscriptions", "Subscriptions paused until their "
                     "client acknowledges.", streams.get("paused"))
        yield _counter("meshd_stream_pushed_total", "Events pushed to stream clients.",
                       info.get("pushed"))
        yield _counter("meshd_stream_refused_total", "Subscriptions refused (limits).",
                       streams.get("refused"))
        yield _counter("meshd_stream_dropped_subscriptions_total", "Subscriptions dropped "
                       "(idle or gone clients).", info.get("dropped_subscriptions"))
        monitor: dict[str, Any] = dict(info.get("monitor") or {})
        yield _gauge("meshd_monitor_subscriptions", "Open `sessions monitor` subscriptions.",
                     monitor.pop("subscriptions", 0))
        yield _gauge("meshd_monitor_queued_events", "Monitor events waiting for slow "
                     "subscribers.", monitor.pop("queued", 0))
        yield _labelled(CounterMetricFamily(
            "meshd_monitor_events_total", "The monitor's events, by name (events taken, "
            "pushed, dropped for slow subscribers, refused and expired subscriptions).",
            labels=["event"]), monitor)

    # --- mesh ------------------------------------------------------------------------------

    def _mesh(self, mesh: dict[str, Any], peers: list[dict[str, Any]] | None
              ) -> Iterable[Metric]:
        members = GaugeMetricFamily("meshd_members", "Other daemons of the mesh this one "
                                    "knows, by state.", labels=["state"])
        if peers is not None:
            states: dict[str, float] = {s: 0 for s in MEMBER_STATES}
            for p in peers:
                state = str(p.get("state"))
                states[state if state in states else OTHER] = states.get(
                    state if state in states else OTHER, 0) + 1
            for state, n in states.items():
                members.add_metric([state], n)
        else:           # (only counts in info: alive and the others)
            members.add_metric(["alive"], mesh.get("alive") or 0)
            members.add_metric(["not_alive"], (mesh.get("members") or 0)
                               - (mesh.get("alive") or 0))
        yield members
        yield _gauge("meshd_pending_joins", "Joins under way.", len(mesh.get("pending_joins")
                                                                    or ()))
        yield _counter("meshd_membership_refutations_total", "Times this daemon refuted "
                       "a false suspicion about itself.", mesh.get("refutations"))
        yield _counter("meshd_membership_wrong_node_pings_total", "Pings that reached "
                       "another node than meant.", mesh.get("wrong_node_pings"))
        yield from self._component("membership", (mesh.get("membership") or {}).get(
            "counters"))
        if peers is not None:
            yield from self._lag(peers)
        yield from self._transport(mesh.get("transport") or {})
        replication = mesh.get("replication") or {}
        yield from self._component("replication", replication.get("counters"))
        yield from self._routing(mesh.get("routing") or {})
        if mesh.get("auth"):
            yield from self._component("auth", mesh["auth"])
        if mesh.get("claims"):
            yield from self._claims(mesh["claims"])

    def _component(self, name: str, counters: dict[str, Any] | None,
                   named: dict[str, str] | None = None) -> Iterable[Metric]:
        _, dropped, rest = _split(counters or {}, named or {})
        yield _labelled(CounterMetricFamily(
            f"meshd_{name}_dropped_total", f"What the {name} layer dropped, by reason.",
            labels=["reason"]), dropped)
        yield _labelled(CounterMetricFamily(
            f"meshd_{name}_events_total", f"Events of the {name} layer, by name (its "
            f"counters in `sessions info`).", labels=["event"]), rest)

    def _lag(self, peers: list[dict[str, Any]]) -> Iterable[Metric]:
        behind: dict[str, float] = {}
        ahead: dict[str, float] = {}
        age: dict[str, float] = {}
        for p in peers:
            if p.get("behind") is None or p.get("state") in ("left", "dead"):
                continue
            node = str(p.get("node_id"))
            behind[node] = p["behind"]
            ahead[node] = p.get("ahead") or 0
            age[node] = p.get("digest_age") or 0
        # The same peers in all three: those with the largest lag either way.
        lag = _bounded({n: behind[n] + ahead[n] for n in behind}, MAX_NODES, by_value=True)
        keep = set(lag) - {OTHER}
        families = [
            (GaugeMetricFamily("meshd_replication_peer_behind_records", "Records this daemon "
                               "holds that a live peer lacked at its last digest (its lag), "
                               "per peer.", labels=["peer"]), behind, operator.add),
            (GaugeMetricFamily("meshd_replication_peer_ahead_records", "Records a live peer "
                               "held at its last digest that this daemon lacks (our lag), "
                               "per peer.", labels=["peer"]), ahead, operator.add),
            (GaugeMetricFamily("meshd_replication_peer_digest_age_seconds", "Seconds since "
                               "a live peer's last digest (its lag figures are that old).",
                               labels=["peer"]), age, max)]
        for family, values, merge in families:
            for node, value in sorted(_regroup(values, _kept(keep), merge).items()):
                family.add_metric([node], value)
            yield family

    def _transport(self, transport: dict[str, Any]) -> Iterable[Metric]:
        frames, dropped, rest = _split(transport.get("counters") or {}, {
            "frames_in": "in", "frames_out": "out", "frames_handled": "handled"})
        handled = frames.pop("handled", 0)
        nbytes, _, rest = _split(rest, {"bytes_in": "in", "bytes_out": "out"})
        if "frames_dropped" in rest:
            dropped["frames_dropped"] = rest.pop("frames_dropped")
        yield _labelled(CounterMetricFamily(
            "meshd_transport_frames_total", "Peer frames received (in) and sent (out).",
            labels=["direction"]), {"in": 0, "out": 0, **frames})
        yield _counter("meshd_transport_frames_handled_total", "Peer frames received and "
                       "handed to the mesh.", handled)
        yield _labelled(CounterMetricFamily(
            "meshd_transport_bytes_total", "Peer bytes received and sent.",
            labels=["direction"]), nbytes)
        yield _labelled(CounterMetricFamily(
            "meshd_transport_dropped_frames_total", "Peer frames dropped, by reason.",
            labels=["reason"]), dropped)
        yield _labelled(CounterMetricFamily(
            "meshd_transport_events_total", "Other transport events, by name.",
            labels=["event"]), rest)
        yield _gauge("meshd_transport_connections", "Peer connections open.",
                     transport.get("connections"))
        yield _gauge("meshd_transport_transient_connections", "Short-lived connections "
                     "open (joins, relays).", transport.get("transient"))

    def _routing(self, routing: dict[str, Any]) -> Iterable[Metric]:
        named, dropped, rest = _split(routing.get("counters") or {}, {
            "route_frames": "route_frames", "routed_in": "routed_in",
            "acked_items": "acked_items", "expired": "message", "expired_receipts": "receipt",
            "expired_waiting": "waiting"})
        yield _counter("meshd_routing_frames_sent_total", "Frames of routed messages sent "
                       "to other daemons.", named.get("route_frames"))
        yield _counter("meshd_routing_items_received_total", "Routed items received from "
                       "other daemons.", named.get("routed_in"))
        yield _counter("meshd_routing_items_acked_total", "Outbox items the destination "
                       "acknowledged (delivered).", named.get("acked_items"))
        expired = CounterMetricFamily(
            "meshd_routing_items_expired_total", "Items that expired undelivered: messages "
            "in an outbox, read receipts, messages waiting for an unknown session.",
            labels=["kind"])
        for kind in ("message", "receipt", "waiting"):
            expired.add_metric([kind], named.get(kind, 0))
        yield expired
        yield _labelled(CounterMetricFamily(
            "meshd_routing_dropped_items_total", "Routed items dropped, by reason.",
            labels=["reason"]), dropped)
        yield _labelled(CounterMetricFamily(
            "meshd_routing_events_total", "Other routing events (resends, route_errors, "
            "...), by name.", labels=["event"]), rest)
        yield _gauge("meshd_outbox_cached_bytes", "Bytes of outbox items cached in memory.",
                     routing.get("cached_bytes"))
        items: dict[tuple[str, str], float] = defaultdict(float)
        per_node: dict[str, float] = defaultdict(float)
        ages: dict[str, float] = {}
        for q in routing.get("outbox") or ():
            node, lane = str(q.get("node")), str(q.get("lane"))
            items[node, lane] += q.get("items") or 0
            per_node[node] += q.get("items") or 0
            age = q.get("oldest_age")
            if age is not None:
                ages[node] = max(ages.get(node, 0.0), float(age))
        keep = set(_bounded(dict(per_node), MAX_NODES, by_value=True)) - {OTHER}
        depth = GaugeMetricFamily("meshd_outbox_items", "Items queued for another daemon, "
                                  "per destination node and lane.",
                                  labels=["destination", "lane"])
        kept = _kept(keep)
        for (node, lane), n in sorted(_regroup(
                dict(items), lambda k: (kept(k[0]), k[1]), operator.add).items()):
            depth.add_metric([node, lane], n)
        yield depth
        oldest = GaugeMetricFamily("meshd_outbox_oldest_item_age_seconds", "Age of the "
                                   "oldest item queued per destination node.",
                                   labels=["destination"])
        for node, age in sorted(_regroup(ages, kept, max).items()):
            oldest.add_metric([node], age)
        yield oldest

    def _claims(self, claims: dict[str, Any]) -> Iterable[Metric]:
        held = GaugeMetricFamily("meshd_claims_held", "Claim leases this daemon holds for "
                                 "its sessions, by scope.", labels=["scope"])
        held.add_metric([str(claims.get("scope"))], claims.get("held") or 0)
        yield held
        yield _labelled(CounterMetricFamily(
            "meshd_claims_events_total", "Claim rounds' events as proposer, by name.",
            labels=["event"]), claims.get("counters") or {})
        acceptor = claims.get("acceptor")
        if acceptor:
            yield _gauge("meshd_claims_acceptor_resources", "Resources this voter tracks.",
                         acceptor.get("resources"))
            yield _gauge("meshd_claims_acceptor_quarantine_seconds", "Seconds this voter "
                         "still sits out after a restart.", acceptor.get("quarantine_left"))
            yield _labelled(CounterMetricFamily(
                "meshd_claims_acceptor_events_total", "This voter's answers, by name "
                "(promise, accept, ...).", labels=["event"]), acceptor.get("counters") or {})
