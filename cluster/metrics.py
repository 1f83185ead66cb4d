"""Prometheus metrics of a node: what its SAs, sockets and data plane are doing.

Nothing here sits on a packet path. Two kinds of sources feed it, both plain ints:
- SA events: `Metrics.record` is part of the event sink, one dict update per event
  (an SA or an exchange, never a packet);
- the counters the runtime and the data plane keep themselves (`RuntimeStats`,
  `Supervisor.session_counters()`, `DataPlane.stats()`), handed over as callables
  because this layer may not import them; likewise the cluster's (`StoreStats`, the
  relay's and the failover's counters, the membership view), whose families appear
  only on nodes that watch them.

`publish()` runs in the event loop's thread, reads all of them and builds the metric
families; the HTTP server's threads only serialise families already built. So no thread
reads a dict the event loop is changing. A scrape asks the loop for a `publish()` when
the last one is older than `interval` and otherwise serves that one: nothing runs while
nobody scrapes, and a scrape flood costs the loop at most one publish per `interval`
(reading the sessions' counters is O(live SAs), about 60 ms per 100,000 SAs here).

Label values are bounded: connection names come from the configuration, reasons and
results are mapped onto small fixed sets, anything unforeseen becomes "other".
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import re
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, MetricsHandler, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .errors import IkeError
from .ike.constants import ExchangeType
from .ike.events import (
    AUTH_EXPIRED,
    KEPT,
    MOBIKE_UPDATE,
    PEER_NOT_RESPONDING,
    REAUTHENTICATED,
    REPLACED,
    TERMINATED,
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    ExchangeCompleted,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaMoved,
    IkeSaRekeyed,
)
from .ike.pools import AddressPool
from .relay import RelayDrops

if TYPE_CHECKING:  # types only: the store client is not needed to publish its counters
    from .store import Member, StoreStats

logger = logging.getLogger(__name__)

PREFIX = "ike_cluster_"
# IKE_SA_INIT to established: one round trip plus a few ms of crypto on a LAN, seconds
# when a peer retransmits or sits behind a slow link
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0)
ROLES = ("responder", "initiator")
SCRAPE_TIMEOUT = 10.0  # seconds a scraper may take to send its request
POLL_INTERVAL = 0.1  # the HTTP thread's shutdown check

Reader = Callable[[], Mapping[str, int]]
IkeKey = tuple[bytes, bytes]  # (spi_i, spi_r)

# Free-text deletion reasons of the session and the supervisor -> label values.
_DELETE_REASONS = {
    "deleted by peer": "peer",
    "deleted by us": "local",  # rekeyed-away SAs, the data plane's limits, IKE life_time
    "expired": "expired",  # a Child SA at its life_time (RFC 4301 4.4.2.1)
    PEER_NOT_RESPONDING: "timeout",  # RFC 7296 2.4: retransmissions ran out
    "actor failed": "actor_failure",
    "unknown to the peer": "unknown_to_peer",  # RFC 7296 2.25
    "replaced (INITIAL_CONTACT)": "replaced",  # RFC 7296 2.4
    REPLACED: "replaced",
    KEPT: "refused",
    TERMINATED: "terminated",
    AUTH_EXPIRED: "auth_expired",
    REAUTHENTICATED: "reauthenticated",  # RFC 7296 2.8.3: a new IKE SA of ours took over
}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _ike_errors() -> dict[str, str]:
    found: dict[str, str] = {}
    pending: list[type[IkeError]] = [IkeError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = _snake(cls.__name__)
        pending += cls.__subclasses__()
    return found


_ERROR_LABELS = _ike_errors()


def error_label(name: str) -> str:
    """An `IkeError` subclass name -> its label ("NoProposalChosen" -> "no_proposal_chosen");
    "ok" stays; anything else is "other"."""
    if name == "ok":
        return name
    label = _ERROR_LABELS.get(name)
    if label is None:
        _ERROR_LABELS.update(_ike_errors())  # a subclass defined since
        label = _ERROR_LABELS.get(name, "other")
    return label


def delete_label(reason: str) -> str:
    return _DELETE_REASONS.get(reason, "other")


def failure_label(event: IkeSaFailed) -> str:
    if event.error:
        return error_label(event.error)
    return "timeout" if event.reason == PEER_NOT_RESPONDING else "other"


def exchange_label(exchange: int) -> str:
    try:
        return ExchangeType(exchange).name
    except ValueError:
        return "other"


@dataclass(slots=True)
class _IkeSaRecord:
    connection: str
    # inbound SPIs of its Child SAs: a few at most, and a list is 160 bytes smaller than a set
    children: list[bytes] = field(default_factory=list)


class _Histogram:
    """Bucket counts of one label set: observed in the loop's thread, read by `publish`."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0


class Metrics:
    """The node's metrics; `record` goes into the event sink, `serve_metrics` serves them."""

    def __init__(self, node_id: str = "", *, connections: Iterable[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)  # process_cpu_seconds_total, RSS, open fds
        self.registry = registry
        self.node_id = node_id
        names = tuple(connections)
        # event-driven counts
        self._ike_established = dict.fromkeys(names, 0)
        self._child_established = dict.fromkeys(names, 0)
        self._ike_failed: dict[str, int] = {}
        self._ike_deleted: dict[str, int] = {}
        self._child_deleted: dict[str, int] = {}
        self._ike_rekeyed = 0
        # IKE SAs that moved to new peer addresses: the NAT's new mapping or MOBIKE
        self._ike_moved = {"nat": 0, "mobike": 0}
        self._exchanges: dict[tuple[str, str, str], int] = {
            (e.name, role, "ok"): 0 for e in ExchangeType for role in ROLES
        }
        self._ike: dict[IkeKey, _IkeSaRecord] = {}  # established IKE SAs
        self._child_ike: dict[bytes, IkeKey] = {}  # Child SA spi_in -> its IKE SA
        self._handshakes = {role: _Histogram(len(HANDSHAKE_BUCKETS) + 1) for role in ROLES}
        # what the runtime and the data plane count, read at publish time
        self._runtime: Reader | None = None
        self._sessions: Reader | None = None
        self._half_open: Callable[[], int] | None = None
        self._data_plane: Reader | None = None
        # the cluster's: store client, relay, failover, membership
        self._store: Callable[[], StoreStats] | None = None
        self._relay: Reader | None = None
        self._failover: Reader | None = None
        self._channel: Reader | None = None
        self._revocation: Reader | None = None
        self._radius: Reader | None = None
        self._accounting: Reader | None = None
        self._dae: Reader | None = None
        self._members: Callable[[], Sequence[Member]] | None = None
        self._pools: tuple[AddressPool, ...] = ()
        self._families: tuple[Metric, ...] = ()
        self._published_at = 0.0  # time.monotonic() of the last publish
        self._collector = _Published(self)
        registry.register(self._collector)
        self.publish()

    # --- sources -----------------------------------------------------------------

    def watch_runtime(self, stats: Reader, sessions: Reader, half_open: Callable[[], int]) -> None:
        """`RuntimeStats.as_dict`, `Supervisor.session_counters` and its half-open count."""
        self._runtime, self._sessions, self._half_open = stats, sessions, half_open

    def watch_data_plane(self, stats: Reader) -> None:
        """`DataPlane.stats`."""
        self._data_plane = stats

    def watch_store(self, stats: Callable[[], StoreStats]) -> None:
        """The store client's `StoreStats` (e.g. `lambda: store.stats`)."""
        self._store = stats

    def watch_relay(self, stats: Reader) -> None:
        """"sent", "received" and "dropped_<reason>" of this node's relay socket."""
        self._relay = stats

    def watch_failover(self, stats: Reader) -> None:
        """"takeovers", "takeover_failures", "lease_held" and "persist_failures"."""
        self._failover = stats

    def watch_revocation(self, stats: Reader) -> None:
        """`RevocationStats`: CRL downloads and OCSP questions, and how they went."""
        self._revocation = stats

    def watch_radius(self, stats: Reader, accounting: Reader | None = None,
                     dae: Reader | None = None) -> None:
        """`RadiusStats`: round trips to the RADIUS servers of eap-radius connections;
        `AccountingStats`: the accounting requests and how they went; `DaeStats`: the
        Disconnect-Requests taken (when [radius.dae] is set)."""
        self._radius, self._accounting, self._dae = stats, accounting, dae

    def watch_channel(self, stats: Reader) -> None:
        """A cluster responder's `ChannelStats`: announcements of SAs that end the other
        SAs of their identities (INITIAL_CONTACT, unique = "replace"), terminations."""
        self._channel = stats

    def watch_members(self, members: Callable[[], Sequence[Member]]) -> None:
        """The live members as this node last saw them (`Membership.members`)."""
        self._members = members

    def watch_pools(self, pools: Iterable[AddressPool]) -> None:
        """The virtual IP pools whose leases to count (each once)."""
        self._pools = tuple({id(p): p for p in pools}.values())

    def observe_handshake(self, seconds: float, we_initiated: bool) -> None:
        """The supervisor's `handshake_observer`."""
        histogram = self._handshakes[ROLES[we_initiated]]
        histogram.counts[bisect.bisect_left(HANDSHAKE_BUCKETS, seconds)] += 1
        histogram.total += seconds

    def record(self, event: Event) -> None:
        """The event sink's share: called in the event loop for every SA event."""
        if isinstance(event, ExchangeCompleted):
            key = (exchange_label(event.exchange), ROLES[not event.as_responder],
                   error_label(event.result))
            self._exchanges[key] = self._exchanges.get(key, 0) + 1
        elif isinstance(event, IkeSaEstablished):
            key_ike = (event.spi_i, event.spi_r)
            if key_ike not in self._ike:
                self._ike[key_ike] = _IkeSaRecord(event.connection)
                _count(self._ike_established, event.connection)
        elif isinstance(event, ChildSaEstablished):
            if event.spi_in not in self._child_ike:
                key_ike = (event.ike_spi_i, event.ike_spi_r)
                self._child_ike[event.spi_in] = key_ike
                record = self._ike.get(key_ike)
                if record is not None:
                    record.children.append(event.spi_in)
                _count(self._child_established, record.connection if record else "unknown")
        elif isinstance(event, ChildSaDeleted):
            self._forget_child(event.spi_in)
            _count(self._child_deleted, delete_label(event.reason))
        elif isinstance(event, IkeSaDeleted):
            label = delete_label(event.reason)
            record = self._ike.pop((event.spi_i, event.spi_r), None)
            # the session deletes its Child SAs first; after an actor failure nobody did
            for spi_in in list(record.children if record else ()):
                self._forget_child(spi_in)
                _count(self._child_deleted, label)
            _count(self._ike_deleted, label)
        elif isinstance(event, IkeSaFailed):
            _count(self._ike_failed, failure_label(event))
        elif isinstance(event, IkeSaMoved):
            self._ike_moved["mobike" if event.reason == MOBIKE_UPDATE else "nat"] += 1
        elif isinstance(event, IkeSaRekeyed):
            self._ike_rekeyed += 1
            record = self._ike.pop((event.old_spi_i, event.old_spi_r), None)
            if record is not None:
                new = (event.spi_i, event.spi_r)
                self._ike[new] = record
                for spi_in in record.children:
                    self._child_ike[spi_in] = new

    def sa_arrived(self, spi_i: bytes, spi_r: bytes, connection: str,
                   children: Sequence[bytes]) -> None:
        """An established SA this node took over from another: counted as active here,
        not as established again."""
        key = (spi_i, spi_r)
        if key in self._ike:
            return
        self._ike[key] = _IkeSaRecord(connection, list(children))
        for spi_in in children:
            self._child_ike[spi_in] = key

    def sa_left(self, spi_i: bytes, spi_r: bytes) -> None:
        """An SA another node acts for now: no longer active here, and not deleted."""
        record = self._ike.pop((spi_i, spi_r), None)
        for spi_in in record.children if record is not None else ():
            self._child_ike.pop(spi_in, None)

    def _forget_child(self, spi_in: bytes) -> None:
        key = self._child_ike.pop(spi_in, None)
        record = self._ike.get(key) if key is not None else None
        if record is not None and spi_in in record.children:
            record.children.remove(spi_in)

    # --- publishing --------------------------------------------------------------

    def publish(self) -> None:
        """Read every source and build the families a scrape serves (event loop only)."""
        runtime = dict(self._runtime()) if self._runtime else {}
        sessions = dict(self._sessions()) if self._sessions else {}
        families: list[Metric] = []
        add = families.append

        info = GaugeMetricFamily(PREFIX + "node_info", "This node (value 1).", labels=["node"])
        info.add_metric([self.node_id], 1)
        add(info)
        add(GaugeMetricFamily(PREFIX + "ike_sas", "Established IKE SAs.", len(self._ike)))
        add(GaugeMetricFamily(PREFIX + "child_sas", "Established Child SAs.",
                              len(self._child_ike)))
        add(GaugeMetricFamily(PREFIX + "half_open_ike_sas",
                              "IKE SAs past IKE_SA_INIT, not yet authenticated.",
                              self._half_open() if self._half_open else 0))
        add(GaugeMetricFamily(
            PREFIX + "sa_actors", "IKE SA actors alive (half-open and established).",
            runtime.get("actors_started", 0) - runtime.get("actors_retired", 0)))
        add(_counter("ike_sas_established_total", "IKE SAs established.", "connection",
                     self._ike_established))
        failed = dict(self._ike_failed)
        if runtime.get("half_open_expired"):
            failed["half_open_timeout"] = runtime["half_open_expired"]
        add(_counter("ike_sas_failed_total", "IKE SAs that never came up.", "reason", failed))
        add(_counter("ike_sas_deleted_total", "Established IKE SAs deleted.", "reason",
                     self._ike_deleted))
        add(CounterMetricFamily(PREFIX + "ike_sas_rekeyed_total", "IKE SA rekeys completed.",
                                self._ike_rekeyed))
        add(_counter("ike_sas_moved_total", "IKE SAs moved to the peer's new address: its "
                     "NAT's new mapping (nat) or its MOBIKE update (mobike).", "reason",
                     self._ike_moved))
        add(_counter("child_sas_established_total", "Child SAs established (rekeys included).",
                     "connection", self._child_established))
        add(_counter("child_sas_deleted_total", "Child SAs deleted.", "reason",
                     self._child_deleted))
        exchanges = CounterMetricFamily(
            PREFIX + "exchanges_total", "IKE request/response exchanges completed.",
            labels=["exchange", "role", "result"])
        for labels, value in sorted(self._exchanges.items()):
            exchanges.add_metric(labels, value)
        add(exchanges)
        add(self._handshake_family())
        add(_counter("retransmissions_total",
                     "IKE requests retransmitted: out, ours after a timeout; in, the peer's,"
                     " answered again from the cached response.", "direction",
                     {"out": sessions.get("retransmits_sent", 0),
                      "in": sessions.get("retransmits_answered", 0)}))
        add(_counter("datagrams_total", "UDP datagrams on the IKE sockets.", "direction",
                     {"in": runtime.get("datagrams_in", 0),
                      "out": runtime.get("datagrams_out", 0)}))
        add(_counter("datagrams_dropped_total", "IKE datagrams dropped, by reason.", "reason",
                     _dropped(runtime, sessions)))
        for name, key, text in _RUNTIME_COUNTERS:
            add(CounterMetricFamily(PREFIX + name, text, runtime.get(key, 0)))
        if self._data_plane is not None:
            families += _data_plane_families(self._data_plane())
        if self._store is not None:
            families += _store_families(self._store())
        if self._relay is not None:
            families += _relay_families(self._relay())
        if self._failover is not None:
            families += _failover_families(self._failover())
        if self._channel is not None:
            families += _channel_families(self._channel())
        if self._revocation is not None:
            families.append(_revocation_family(self._revocation()))
        for reader, (name, text, results) in zip(
                (self._radius, self._accounting, self._dae), _RADIUS_FAMILIES, strict=True):
            if reader is not None:
                stats = reader()
                families.append(_counter(name, text, "result",
                                         {k: stats.get(k, 0) for k in results}))
        if self._members is not None:
            add(_members_family(self._members()))
        if self._pools:
            add(_pools_family(self._pools))
        self._families = tuple(families)
        self._published_at = time.monotonic()

    def _publish_logged(self) -> None:
        try:
            self.publish()
        except Exception:
            # a metrics bug must not stop the node; the values just stop moving
            logger.exception("publishing metrics failed")

    def refresh_from_thread(self, token: trio.lowlevel.TrioToken, max_age: float) -> None:
        """From another thread: have the event loop publish if the values are older than
        `max_age` (waits for it). Once the loop has ended, the last values stay."""
        if time.monotonic() - self._published_at < max_age:
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._publish_logged, trio_token=token)

    def _handshake_family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            PREFIX + "handshake_duration_seconds",
            "From the first IKE_SA_INIT to the IKE SA established (IKE_AUTH done).",
            labels=["role"])
        for role, histogram in self._handshakes.items():
            buckets, cumulative = [], 0
            for bound, count in zip((*HANDSHAKE_BUCKETS, "+Inf"), histogram.counts, strict=True):
                cumulative += count
                buckets.append((str(bound), float(cumulative)))
            family.add_metric([role], buckets, histogram.total)
        return family


# (metric name, RuntimeStats field, help): counters that are one field each
_RUNTIME_COUNTERS = (
    ("cookies_sent_total", "cookies_sent", "Stateless COOKIE replies sent (RFC 7296 2.6)."),
    ("cookies_accepted_total", "cookies_accepted", "IKE_SA_INIT admitted with a valid cookie."),
    ("notifies_suppressed_total", "notifies_suppressed",
     "Notifies to unauthenticated peers not sent (notify_rate)."),
    ("natt_keepalives_received_total", "natt_keepalives",
     "NAT-T keepalives received (RFC 3948 2.3)."),
    ("actor_failures_total", "actor_failures", "IKE SA actors torn down by an exception."),
    ("actors_relinquished_total", "actors_relinquished",
     "IKE SA actors ended because another node acts for their SA now (failover)."),
)
# RuntimeStats fields published elsewhere or not at all (tests check every field is placed)
RUNTIME_FIELDS_USED_OTHERWISE = frozenset({
    "datagrams_in", "datagrams_out", "actors_started", "actors_retired", "half_open_expired",
    "cookies_expired",  # a subset of cookies_sent
    "ike_sas_established", "ike_sas_deleted",  # the events say more (connection, reason)
})


def _dropped(runtime: Mapping[str, int], sessions: Mapping[str, int]) -> dict[str, int]:
    """`dropped_<reason>` of the runtime (before an SA) and the sessions (inside one)."""
    out: dict[str, int] = {}
    for source in (runtime, sessions):
        for key, value in source.items():
            if key.startswith("dropped_"):
                out[key[8:]] = out.get(key[8:], 0) + value
    return out


# DataPlane.stats() key -> esp_dropped_packets_total reason
_ESP_DROPS = {
    "sa_replay_drops": "replay",
    "sa_integrity_failures": "integrity",
    "sa_pad_errors": "padding",
    "sa_dummy_drops": "dummy",  # RFC 4303 2.6, dropped on purpose
    "sa_policy_drops": "policy",
    "sa_malformed_drops": "malformed",
    "malformed_in": "malformed",
    "malformed_out": "malformed",
    "sa_seq_exhausted_drops": "sequence_exhausted",
    "sa_expired_drops": "sa_expired",
    "sa_ecn_drops": "ecn",  # CE outside, Not-ECT inside (RFC 6040 4.2)
    "no_sa_in": "no_sa_inbound",  # an SPI we do not know
    "no_sa_out": "no_sa_outbound",  # no SA covers the packet: never sent in the clear
    "esp_send_errors": "send_error",
    "esp_receive_errors": "receive_error",
    "tun_write_errors": "tun_write_error",
}
# wire-level I/O of the raw sockets and the TUN only (ESP in UDP passes the IKE sockets)
DATA_PLANE_KEYS_UNUSED = frozenset({
    "tun_read_packets", "tun_read_bytes", "tun_write_packets", "tun_write_bytes",
    "esp_sent_packets", "esp_sent_bytes", "esp_received_packets", "esp_received_bytes",
})


def _data_plane_families(stats: Mapping[str, int]) -> list[Metric]:
    drops: dict[str, int] = {}
    for key, reason in _ESP_DROPS.items():
        drops[reason] = drops.get(reason, 0) + stats.get(key, 0)
    return [
        _counter("esp_packets_total", "Packets carried by Child SAs (in: decrypted, out:"
                 " encrypted).", "direction",
                 {"in": stats.get("sa_packets_in", 0), "out": stats.get("sa_packets_out", 0)}),
        _counter("esp_bytes_total", "Inner packet bytes carried by Child SAs.", "direction",
                 {"in": stats.get("sa_bytes_in", 0), "out": stats.get("sa_bytes_out", 0)}),
        _counter("esp_dropped_packets_total", "ESP and TUN packets dropped, by reason.",
                 "reason", drops),
        CounterMetricFamily(PREFIX + "esp_acquires_total",
                            "Packets that found no SA but a start_action = \"trap\" child:"
                            " each asked for its connection.", stats.get("acquires", 0)),
    ]


# --- the cluster -------------------------------------------------------------------------

# "dropped_<reason>" of watch_relay: the envelope checks, then the relay's own
RELAY_DROP_REASONS = (*(f.name for f in fields(RelayDrops)),
                      "no_responder", "no_worker", "send_failed")
# watch_failover key -> (metric name, help)
_FAILOVER_COUNTERS = (
    ("takeovers", "takeovers_total",
     "IKE SAs loaded from the store and continued by this node (failover)."),
    ("takeover_failures", "takeover_failures_total",
     "IKE SAs this node tried to load from the store and could not continue."),
    ("lease_held", "lease_held_dropped_total",
     "IKE datagrams dropped because another node holds the SA's lease."),
    ("persist_failures", "persist_failures_total",
     "IKE responses withheld because the SA's snapshot could not be stored."),
)
MEMBER_ROLES = ("responder", "worker")  # always published, 0 when none is alive
_ROLE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _store_families(stats: StoreStats) -> list[Metric]:
    return [
        CounterMetricFamily(PREFIX + "store_round_trips_total",
                            "Store round trips completed (one pipeline each).", stats.round_trips),
        CounterMetricFamily(PREFIX + "store_operations_total",
                            "Store operations carried by those round trips.", stats.ops),
        CounterMetricFamily(PREFIX + "store_errors_total",
                            "Store round trips and subscription reads that failed.",
                            stats.errors),
        CounterMetricFamily(PREFIX + "store_lease_lost_total",
                            "Fenced store writes refused: another node had taken the SA over.",
                            stats.lease_lost),
        CounterMetricFamily(PREFIX + "store_round_trip_seconds_total",
                            "Time spent in completed store round trips (divided by their rate:"
                            " the mean latency).", stats.seconds),
    ]


def _relay_families(stats: Mapping[str, int]) -> list[Metric]:
    drops = dict.fromkeys(RELAY_DROP_REASONS, 0)
    for key, count in stats.items():
        if key.startswith("dropped_"):
            reason = key[8:] if key[8:] in drops else "other"
            drops[reason] = drops.get(reason, 0) + count
    return [
        _counter("relay_datagrams_total", "Relay datagrams accepted from other nodes (received)"
                 " and sent to them.", "direction",
                 {"sent": stats.get("sent", 0), "received": stats.get("received", 0)}),
        _counter("relay_dropped_total", "Relay datagrams dropped, by reason.", "reason", drops),
        CounterMetricFamily(PREFIX + "relay_pings_total",
                            "PINGs to other nodes answered by a PONG (relay round trips).",
                            stats.get("rtt_count", 0)),
        CounterMetricFamily(PREFIX + "relay_ping_seconds_total",
                            "Time those relay round trips took (divided by their rate: the "
                            "mean latency).", stats.get("rtt_microseconds", 0) / 1e6),
    ]


def _failover_families(stats: Mapping[str, int]) -> list[Metric]:
    return [CounterMetricFamily(PREFIX + name, text, stats.get(key, 0))
            for key, name, text in _FAILOVER_COUNTERS]


# watch_radius's readers: (name, help, the results counted)
_RADIUS_FAMILIES = (
    ("radius_requests_total", "Round trips to the RADIUS servers of eap-radius connections: "
     "answered, timeouts (a server answered no try), skipped (a server that did not answer "
     "lately, passed over), and the datagrams sent again or refused as no valid answer.",
     ("answered", "timeouts", "skipped", "retransmits", "invalid")),
    ("radius_accounting_total", "RADIUS Accounting-Requests (Start, Interim-Update, Stop): "
     "sent (a server answered), failed (none did), dropped (queue full).",
     ("sent", "failed", "dropped")),
    ("radius_dae_requests_total", "RADIUS Dynamic Authorization requests (RFC 5176): "
     "disconnected (Disconnect-ACK), limited (CoA-ACK: a new Session-Timeout), not_found "
     "(NAK), unsupported (CoA-NAK: no Session-Timeout), invalid (dropped: the secret did "
     "not verify).", ("disconnected", "limited", "not_found", "unsupported", "invalid")),
)


def _revocation_family(stats: Mapping[str, int]) -> Metric:
    family = CounterMetricFamily(
        PREFIX + "revocation_checks_total", "CRL downloads and OCSP questions about peers' "
        "certificates: ok, or failed (no answer, or one that does not count).",
        labels=["source", "result"])
    for source, ok, failed in (("crl", "crl_fetched", "crl_failed"),
                               ("ocsp", "ocsp_answered", "ocsp_failed")):
        family.add_metric([source, "ok"], stats.get(ok, 0))
        family.add_metric([source, "failed"], stats.get(failed, 0))
    return family


def _channel_families(stats: Mapping[str, int]) -> list[Metric]:
    return [
        _counter("identity_announcements_total", "Announcements of IKE SAs that end the other"
                 " SAs of their identities on every responder (INITIAL_CONTACT, unique ="
                 " replace): sent, received from other responders, lost (not sent),"
                 " malformed.", "event",
                 {k: stats.get(k, 0) for k in ("sent", "received", "lost", "malformed")}),
        CounterMetricFamily(PREFIX + "identity_replaced_ike_sas_total",
                            "IKE SAs of this responder ended by another responder's"
                            " announcement.", stats.get("ended", 0)),
        CounterMetricFamily(PREFIX + "terminations_total",
                            "IKE SAs this responder deleted because `ike-cluster terminate`"
                            " asked.", stats.get("terminated", 0)),
        CounterMetricFamily(PREFIX + "operator_rekeys_total",
                            "IKE and Child SAs this responder started to rekey because"
                            " `ike-cluster rekey` asked.", stats.get("rekeyed", 0)),
    ]


def _members_family(members: Sequence[Member]) -> GaugeMetricFamily:
    counts = dict.fromkeys(MEMBER_ROLES, 0)
    for member in members:
        role = member.role if _ROLE.fullmatch(member.role) else "other"
        counts[role] = counts.get(role, 0) + 1
    family = GaugeMetricFamily(PREFIX + "members", "Live cluster members, by role.",
                               labels=["role"])
    for role, count in sorted(counts.items()):
        family.add_metric([role], count)
    return family


def _pools_family(pools: Sequence[AddressPool]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        PREFIX + "pool_addresses", "Virtual IP pool addresses: size, online (leased to an "
        "IKE SA), offline (kept for the identity that last had it).", labels=["pool", "state"])
    for pool in pools:
        for state, value in (("size", pool.size), ("online", pool.online),
                             ("offline", pool.offline)):
            family.add_metric([pool.name, state], value)
    return family


def _count(counts: dict[str, int], label: str) -> None:
    counts[label] = counts.get(label, 0) + 1


def _counter(name: str, text: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, text, labels=[label])
    for value_label, value in sorted(values.items()):
        family.add_metric([value_label], value)
    return family


class _Published(Collector):
    """What a scrape sees: the families of the last `publish()`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # set by serve_metrics: the scrape threads ask the loop for fresh values
        self.refresh: Callable[[], None] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.refresh is not None:
            self.refresh()
        return iter(self._metrics._families)  # one atomic read of a tuple


# --- the HTTP endpoint -----------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look our own name up in DNS
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


def open_http_server(registry: CollectorRegistry, host: str, port: int) -> ThreadingHTTPServer:
    """Bind the scrape endpoint (any path answers; OSError when the address is taken)."""
    handler = type("Handler", (MetricsHandler,),
                   {"registry": registry, "timeout": SCRAPE_TIMEOUT})
    server_class = type("Server", (_HttpServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    server: ThreadingHTTPServer = server_class((host, port), handler)
    return server


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    interval: float,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `/metrics` from a thread until cancelled; values at most `interval` s old.

    `task_status` gets the bound (host, port): port 0 picks a free one."""
    server = open_http_server(metrics.registry, host, port)
    thread = threading.Thread(target=server.serve_forever, args=(POLL_INTERVAL,),
                              name="metrics-http", daemon=True)
    token = trio.lowlevel.current_trio_token()
    collector = metrics._collector
    try:
        metrics.publish()
        collector.refresh = functools.partial(metrics.refresh_from_thread, token, interval)
        thread.start()
        bound = server.server_address
        task_status.started((str(bound[0]), int(bound[1])))
        await trio.sleep_forever()
    finally:
        collector.refresh = None
        with trio.CancelScope(shield=True):
            if thread.is_alive():
                await trio.to_thread.run_sync(server.shutdown)
        server.server_close()
