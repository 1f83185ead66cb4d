"""cluster.metrics: names, types and labels, what events and counters do to them, [metrics]."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import METRICS_PORT, MetricsConfig, load_config
from cluster.errors import ConfigError
from cluster.esp.counters import SaCounters, SadCounters
from cluster.ike.constants import ExchangeType
from cluster.ike.events import (
    KEPT,
    MOBIKE_UPDATE,
    REAUTHENTICATED,
    REPLACED,
    TERMINATED,
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaFailed,
    IkeSaMoved,
    IkeSaRekeyed,
)
from cluster.ike.identity import parse_identity
from cluster.ike.pools import AddressPool
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from cluster.metrics import (
    DATA_PLANE_KEYS_UNUSED,
    RELAY_DROP_REASONS,
    RUNTIME_FIELDS_USED_OTHERWISE,
    Metrics,
    delete_label,
    error_label,
    exchange_label,
    serve_metrics,
)
from cluster.relay import RelayDrops
from cluster.runtime.channel import ChannelStats
from cluster.runtime.crl_fetch import RevocationStats
from cluster.runtime.radius_accounting import AccountingStats
from cluster.runtime.radius_client import RadiusStats
from cluster.runtime.radius_dae import DaeStats
from cluster.runtime.stats import RuntimeStats
from cluster.store import Member, StoreStats
from cluster.transforms import ENCR_ALGORITHMS
from cluster.worker import IoCounters
from tests.ike.sessions import psk_pair, run_handshake, transfer

# name as the text parser reports it (no _total) -> type
COMMON = {
    "ike_cluster_node_info": "gauge",
    "ike_cluster_ike_sas": "gauge",
    "ike_cluster_child_sas": "gauge",
    "ike_cluster_half_open_ike_sas": "gauge",
    "ike_cluster_sa_actors": "gauge",
    "ike_cluster_ike_sas_established": "counter",
    "ike_cluster_ike_sas_failed": "counter",
    "ike_cluster_ike_sas_deleted": "counter",
    "ike_cluster_ike_sas_rekeyed": "counter",
    "ike_cluster_ike_sas_moved": "counter",
    "ike_cluster_child_sas_established": "counter",
    "ike_cluster_child_sas_deleted": "counter",
    "ike_cluster_exchanges": "counter",
    "ike_cluster_handshake_duration_seconds": "histogram",
    "ike_cluster_retransmissions": "counter",
    "ike_cluster_datagrams": "counter",
    "ike_cluster_datagrams_dropped": "counter",
    "ike_cluster_cookies_sent": "counter",
    "ike_cluster_cookies_accepted": "counter",
    "ike_cluster_notifies_suppressed": "counter",
    "ike_cluster_natt_keepalives_received": "counter",
    "ike_cluster_actor_failures": "counter",
    "ike_cluster_actors_relinquished": "counter",
}
DATA_PLANE = {
    "ike_cluster_esp_packets": "counter",
    "ike_cluster_esp_bytes": "counter",
    "ike_cluster_esp_dropped_packets": "counter",
    "ike_cluster_esp_acquires": "counter",
}
# a node of a cluster: watch_store, watch_relay, watch_failover, watch_members
CLUSTER = {
    "ike_cluster_store_round_trips": "counter",
    "ike_cluster_store_operations": "counter",
    "ike_cluster_store_errors": "counter",
    "ike_cluster_store_lease_lost": "counter",
    "ike_cluster_store_round_trip_seconds": "counter",
    "ike_cluster_relay_datagrams": "counter",
    "ike_cluster_relay_dropped": "counter",
    "ike_cluster_relay_pings": "counter",
    "ike_cluster_relay_ping_seconds": "counter",
    "ike_cluster_takeovers": "counter",
    "ike_cluster_takeover_failures": "counter",
    "ike_cluster_lease_held_dropped": "counter",
    "ike_cluster_persist_failures": "counter",
    "ike_cluster_members": "gauge",
    "ike_cluster_identity_announcements": "counter",
    "ike_cluster_identity_replaced_ike_sas": "counter",
    "ike_cluster_terminations": "counter",
    "ike_cluster_operator_rekeys": "counter",
}
# watch_revocation: every running node (single node and cluster responder)
REVOCATION = {"ike_cluster_revocation_checks": "counter"}
# watch_radius: likewise (eap-radius round trips)
RADIUS = {"ike_cluster_radius_requests": "counter", "ike_cluster_radius_accounting": "counter"}
DAE = {"ike_cluster_radius_dae_requests": "counter"}  # with [radius.dae]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> tuple[dict[str, str], Samples]:
    """The exposition text parsed back: family types, and every sample by name and labels."""
    text = generate_latest(metrics.registry).decode()
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def fresh(*connections: str) -> Metrics:
    return Metrics("gw1", connections=connections, registry=CollectorRegistry())


def feed(metrics: Metrics, *sessions: IkeSession) -> list[Event]:
    events = []
    for session in sessions:
        while (event := session.next_event()) is not None:
            events.append(event)
            metrics.record(event)
    return events


# --- names, types, labels ----------------------------------------------------------------


def test_families_have_prometheus_names_and_types() -> None:
    metrics = fresh("rw")
    types, samples = scrape(metrics)
    assert types == COMMON
    assert value(samples, "ike_cluster_node_info", node="gw1") == 1
    assert value(samples, "ike_cluster_ike_sas_established_total", connection="rw") == 0
    for exchange in ("IKE_SA_INIT", "IKE_AUTH", "CREATE_CHILD_SA", "INFORMATIONAL"):
        for role in ("responder", "initiator"):
            key = {"exchange": exchange, "role": role, "result": "ok"}
            assert value(samples, "ike_cluster_exchanges_total", **key) == 0
    for role in ("responder", "initiator"):
        assert value(samples, "ike_cluster_handshake_duration_seconds_count", role=role) == 0


def test_the_data_plane_adds_esp_families() -> None:
    metrics = fresh()
    stats = {**IoCounters().as_dict(), **SadCounters().as_dict()}
    stats.update({f"sa_{k}": v for k, v in SaCounters().as_dict().items()})
    stats.update(sa_packets_in=7, sa_bytes_out=1400, sa_replay_drops=2, no_sa_in=3,
                 malformed_in=1, sa_malformed_drops=4)
    metrics.watch_data_plane(lambda: stats)
    metrics.publish()
    types, samples = scrape(metrics)
    assert types == COMMON | DATA_PLANE
    assert value(samples, "ike_cluster_esp_packets_total", direction="in") == 7
    assert value(samples, "ike_cluster_esp_bytes_total", direction="out") == 1400
    assert value(samples, "ike_cluster_esp_dropped_packets_total", reason="replay") == 2
    assert value(samples, "ike_cluster_esp_dropped_packets_total", reason="no_sa_inbound") == 3
    assert value(samples, "ike_cluster_esp_dropped_packets_total", reason="malformed") == 5


def test_moves_are_counted_by_what_moved_them() -> None:
    metrics = fresh()
    ike = (bytes(range(8)), bytes(range(8, 16)))
    for reason in ("NAT mapping changed", MOBIKE_UPDATE, MOBIKE_UPDATE):
        metrics.record(IkeSaMoved(*ike, ("10.0.0.1", 4500), ("192.0.2.9", 4500), reason))
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_ike_sas_moved_total", reason="nat") == 1
    assert value(samples, "ike_cluster_ike_sas_moved_total", reason="mobike") == 2


def test_pools_publish_size_online_and_offline_once_each() -> None:
    pool = AddressPool.parse("rw", "10.99.3.0/29")
    metrics = fresh()
    metrics.watch_pools([pool, pool])  # two connections naming one pool
    alice, bob = parse_identity("alice@example.test"), parse_identity("bob@example.test")
    lease = pool.acquire(alice)
    assert lease is not None and pool.acquire(bob) is not None
    pool.release(lease)
    metrics.publish()
    types, samples = scrape(metrics)
    assert types["ike_cluster_pool_addresses"] == "gauge"
    assert [value(samples, "ike_cluster_pool_addresses", pool="rw", state=state)
            for state in ("size", "online", "offline")] == [6, 1, 1]


def test_every_runtime_counter_has_a_place() -> None:
    """A new RuntimeStats field must be published or named as published otherwise."""
    metrics = fresh()
    stats = RuntimeStats()
    for number, f in enumerate(fields(RuntimeStats), start=1_000_001):
        setattr(stats, f.name, number)
    metrics.watch_runtime(stats.as_dict, dict, lambda: 0)
    metrics.publish()
    _, samples = scrape(metrics)
    published = set(samples.values())
    for number, f in enumerate(fields(RuntimeStats), start=1_000_001):
        if f.name in RUNTIME_FIELDS_USED_OTHERWISE:
            continue
        assert number in published, f"RuntimeStats.{f.name} is not published"


def test_every_data_plane_counter_has_a_place() -> None:
    keys = [*IoCounters().as_dict(), *SadCounters().as_dict()]
    keys += [f"sa_{k}" for k in SaCounters().as_dict()]
    metrics = fresh()
    for key in keys:
        if key in DATA_PLANE_KEYS_UNUSED:
            continue
        stats = dict.fromkeys(keys, 0)
        stats[key] = 1000003
        metrics.watch_data_plane(stats.copy)
        metrics.publish()
        _, samples = scrape(metrics)
        assert 1000003 in samples.values(), f"DataPlane.stats()[{key!r}] is not published"


def _member(node: str, role: str) -> Member:
    return Member(node, role, 0.0, 0.5, {})


def test_the_cluster_counters_are_published_and_move() -> None:
    metrics = fresh()
    store = StoreStats()
    relay: dict[str, int] = {}
    failover: dict[str, int] = {}
    members: list[Member] = []
    metrics.watch_store(lambda: store)
    metrics.watch_relay(lambda: relay)
    metrics.watch_failover(lambda: failover)
    metrics.watch_members(lambda: members)
    identities = ChannelStats()
    metrics.watch_channel(identities.as_dict)
    revocation = RevocationStats()
    metrics.watch_revocation(revocation.as_dict)
    radius, accounting, dae = RadiusStats(), AccountingStats(), DaeStats()
    metrics.watch_radius(radius.as_dict, accounting.as_dict, dae.as_dict)
    metrics.publish()
    types, samples = scrape(metrics)
    assert types == COMMON | CLUSTER | REVOCATION | RADIUS | DAE
    assert value(samples, "ike_cluster_store_round_trips_total") == 0
    assert value(samples, "ike_cluster_relay_dropped_total", reason="bad_mac") == 0
    assert value(samples, "ike_cluster_members", role="responder") == 0
    assert value(samples, "ike_cluster_members", role="worker") == 0

    store.round_trips, store.ops, store.errors, store.lease_lost = 40, 90, 3, 2
    store.seconds = 0.125
    relay.update(sent=11, received=12, rtt_count=3, rtt_microseconds=1500,
                 dropped_bad_mac=4, dropped_no_responder=5,
                 dropped_send_failed=1)
    failover.update(takeovers=7, takeover_failures=1, lease_held=6, persist_failures=2)
    identities.sent, identities.received, identities.lost = 8, 9, 1
    identities.malformed, identities.ended, identities.terminated = 2, 5, 3
    identities.rekeyed = 4
    revocation.crl_fetched, revocation.ocsp_failed = 4, 1
    radius.answered, radius.timeouts, radius.retransmits, radius.invalid = 6, 1, 2, 3
    accounting.sent, accounting.failed, accounting.dropped = 9, 2, 1
    dae.disconnected, dae.invalid = 4, 5
    members += [_member("r1", "responder"), _member("r2", "responder"), _member("w1", "worker")]
    _, unchanged = scrape(metrics)
    assert unchanged == samples  # read at publish time only
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_store_round_trips_total") == 40
    assert value(samples, "ike_cluster_store_operations_total") == 90
    assert value(samples, "ike_cluster_store_errors_total") == 3
    assert value(samples, "ike_cluster_store_lease_lost_total") == 2
    assert value(samples, "ike_cluster_store_round_trip_seconds_total") == 0.125
    assert value(samples, "ike_cluster_relay_datagrams_total", direction="sent") == 11
    assert value(samples, "ike_cluster_relay_datagrams_total", direction="received") == 12
    assert value(samples, "ike_cluster_relay_pings_total") == 3
    assert value(samples, "ike_cluster_relay_ping_seconds_total") == pytest.approx(0.0015)
    assert value(samples, "ike_cluster_relay_dropped_total", reason="bad_mac") == 4
    assert value(samples, "ike_cluster_relay_dropped_total", reason="no_responder") == 5
    assert value(samples, "ike_cluster_relay_dropped_total", reason="send_failed") == 1
    assert value(samples, "ike_cluster_takeovers_total") == 7
    assert value(samples, "ike_cluster_takeover_failures_total") == 1
    assert value(samples, "ike_cluster_lease_held_dropped_total") == 6
    assert value(samples, "ike_cluster_persist_failures_total") == 2
    assert value(samples, "ike_cluster_members", role="responder") == 2
    assert value(samples, "ike_cluster_members", role="worker") == 1
    for event, count in (("sent", 8), ("received", 9), ("lost", 1), ("malformed", 2)):
        assert value(samples, "ike_cluster_identity_announcements_total", event=event) == count
    assert value(samples, "ike_cluster_identity_replaced_ike_sas_total") == 5
    assert value(samples, "ike_cluster_terminations_total") == 3
    assert value(samples, "ike_cluster_operator_rekeys_total") == 4
    assert value(samples, "ike_cluster_revocation_checks_total", source="crl", result="ok") == 4
    assert value(samples, "ike_cluster_revocation_checks_total", source="ocsp",
                 result="failed") == 1
    for result, count in (("answered", 6), ("timeouts", 1), ("retransmits", 2), ("invalid", 3)):
        assert value(samples, "ike_cluster_radius_requests_total", result=result) == count
    for result, count in (("sent", 9), ("failed", 2), ("dropped", 1)):
        assert value(samples, "ike_cluster_radius_accounting_total", result=result) == count
    for result, count in (("disconnected", 4), ("not_found", 0), ("invalid", 5)):
        assert value(samples, "ike_cluster_radius_dae_requests_total", result=result) == count

    # a responder dies, the store goes away for a while
    store.errors += 5
    failover["takeovers"] += 3
    del members[0]
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_store_errors_total") == 8
    assert value(samples, "ike_cluster_takeovers_total") == 10
    assert value(samples, "ike_cluster_members", role="responder") == 1


def test_every_relay_drop_reason_has_its_label() -> None:
    assert {f.name for f in fields(RelayDrops)} < set(RELAY_DROP_REASONS)
    metrics = fresh()
    stats: dict[str, int] = {}
    metrics.watch_relay(lambda: stats)
    for number, reason in enumerate(RELAY_DROP_REASONS, start=1_000_001):
        stats["dropped_" + reason] = number
    stats["dropped_something_new"] = 9
    metrics.publish()
    _, samples = scrape(metrics)
    for number, reason in enumerate(RELAY_DROP_REASONS, start=1_000_001):
        assert value(samples, "ike_cluster_relay_dropped_total", reason=reason) == number
    assert value(samples, "ike_cluster_relay_dropped_total", reason="other") == 9


def test_member_roles_are_bounded() -> None:
    metrics = fresh()
    members = [_member("a", "responder"), _member("b", "Evil\nrole"), _member("c", "x" * 99)]
    metrics.watch_members(lambda: members)
    metrics.publish()
    _, samples = scrape(metrics)
    roles = {dict(labels)["role"]: v for (name, labels), v in samples.items()
             if name == "ike_cluster_members"}
    assert roles == {"responder": 1, "worker": 0, "other": 2}


def test_label_values_are_bounded() -> None:
    assert error_label("ok") == "ok"
    assert error_label("NoProposalChosen") == "no_proposal_chosen"
    assert error_label("InvalidKePayload") == "invalid_ke_payload"
    assert error_label("AuthenticationFailed") == "authentication_failed"
    assert error_label("ValueError") == "other"
    assert error_label("<script>") == "other"
    assert delete_label("deleted by peer") == "peer"
    assert delete_label("replaced (INITIAL_CONTACT)") == "replaced"
    assert delete_label("expired") == "expired"
    assert [delete_label(r) for r in (TERMINATED, REPLACED, KEPT, REAUTHENTICATED)] == [
        "terminated", "replaced", "refused", "reauthenticated"]
    assert delete_label("anything a peer could make us write") == "other"
    assert exchange_label(ExchangeType.IKE_AUTH) == "IKE_AUTH"
    assert exchange_label(240) == "other"


# --- events -------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["responder", "initiator"])
def test_a_handshake_and_its_deletion_move_the_sa_metrics(side: str) -> None:
    metrics = fresh("rw")  # of one end: the gateway, or the client when it is a node
    client, gateway = psk_pair()
    ours = gateway if side == "responder" else client
    run_handshake(client, gateway)
    assert gateway.state is State.ESTABLISHED
    feed(metrics, ours)
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_ike_sas") == 1
    assert value(samples, "ike_cluster_child_sas") == 1
    assert value(samples, "ike_cluster_ike_sas_established_total", connection="rw") == 1
    assert value(samples, "ike_cluster_child_sas_established_total", connection="rw") == 1
    for exchange in ("IKE_SA_INIT", "IKE_AUTH"):
        key = {"exchange": exchange, "role": side, "result": "ok"}
        assert value(samples, "ike_cluster_exchanges_total", **key) == 1

    client.delete_ike(1.0)
    for _ in range(3):
        transfer(client, gateway, 1.0)
        transfer(gateway, client, 1.0)
    feed(metrics, ours)
    metrics.publish()
    _, samples = scrape(metrics)
    reason = "peer" if side == "responder" else "local"
    assert value(samples, "ike_cluster_ike_sas") == 0
    assert value(samples, "ike_cluster_child_sas") == 0
    assert value(samples, "ike_cluster_ike_sas_deleted_total", reason=reason) == 1
    assert value(samples, "ike_cluster_child_sas_deleted_total", reason=reason) == 1
    key = {"exchange": "INFORMATIONAL", "role": side, "result": "ok"}
    assert value(samples, "ike_cluster_exchanges_total", **key) == 1


def test_a_refused_authentication_is_counted_by_its_error() -> None:
    metrics = fresh("rw")
    client, gateway = psk_pair(client_secret=b"wrong")
    run_handshake(client, gateway)
    events = feed(metrics, gateway)
    [failed] = [e for e in events if isinstance(e, IkeSaFailed)]
    assert failed.error == "AuthenticationFailed"
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_ike_sas_failed_total",
                 reason="authentication_failed") == 1
    key = {"exchange": "IKE_AUTH", "role": "responder", "result": "authentication_failed"}
    assert value(samples, "ike_cluster_exchanges_total", **key) == 1
    assert value(samples, "ike_cluster_ike_sas") == 0


def test_a_silent_peer_is_a_timeout_after_counted_retransmissions() -> None:
    metrics = fresh()
    client, _ = psk_pair()
    client.datagrams_to_send()
    tries = client.sa.policy.retransmission.tries
    while not client.closed:
        timer = client.get_timer()
        assert timer is not None
        client.handle_timer(timer)
    assert client.retransmits_sent == tries
    [failed] = [e for e in feed(metrics, client) if isinstance(e, IkeSaFailed)]
    assert failed.error == ""
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_ike_sas_failed_total", reason="timeout") == 1


def _child(ike: tuple[bytes, bytes], spi_in: bytes) -> ChildSaEstablished:
    return ChildSaEstablished(
        ike[0], ike[1], "net", "tunnel", spi_in, b"\x00\x00\x00\x09",
        ENCR_ALGORITHMS["aes256gcm16"], None, False,
        b"", b"", b"", b"")


def test_children_follow_an_ike_rekey_and_go_with_a_failed_actor() -> None:
    metrics = fresh("rw")
    old, new = (b"i" * 8, b"r" * 8), (b"I" * 8, b"R" * 8)
    metrics.record(IkeSaEstablished(old[0], old[1], "rw", "a", "b", ("h", 1), ("p", 2), "x",
                                    False))
    metrics.record(_child(old, b"\x01" * 4))
    metrics.record(IkeSaRekeyed(old[0], old[1], new[0], new[1], False))
    metrics.record(_child(new, b"\x02" * 4))
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_ike_sas") == 1
    assert value(samples, "ike_cluster_child_sas") == 2
    assert value(samples, "ike_cluster_ike_sas_rekeyed_total") == 1
    assert value(samples, "ike_cluster_child_sas_established_total", connection="rw") == 2
    # what the supervisor sends when an actor dies: no ChildSaDeleted came first
    metrics.record(IkeSaDeleted(new[0], new[1], "actor failed"))
    metrics.record(ChildSaDeleted(new[0], new[1], "net", b"\x01" * 4, b"", "deleted by us"))
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_ike_sas") == 0
    assert value(samples, "ike_cluster_child_sas") == 0
    assert value(samples, "ike_cluster_ike_sas_deleted_total", reason="actor_failure") == 1
    assert value(samples, "ike_cluster_child_sas_deleted_total", reason="actor_failure") == 2


def test_handshake_durations_fall_into_buckets_by_role() -> None:
    metrics = fresh()
    metrics.observe_handshake(0.003, False)
    metrics.observe_handshake(0.005, False)  # on a bound: le is inclusive
    metrics.observe_handshake(45.0, True)
    metrics.publish()
    _, samples = scrape(metrics)
    name = "ike_cluster_handshake_duration_seconds"
    assert value(samples, name + "_bucket", role="responder", le="0.0025") == 0
    assert value(samples, name + "_bucket", role="responder", le="0.005") == 2
    assert value(samples, name + "_bucket", role="responder", le="+Inf") == 2
    assert value(samples, name + "_sum", role="responder") == pytest.approx(0.008)
    assert value(samples, name + "_bucket", role="initiator", le="30.0") == 0
    assert value(samples, name + "_count", role="initiator") == 1


def test_counters_are_read_at_publish_time_and_merged() -> None:
    metrics = fresh()
    stats = RuntimeStats()
    sessions: dict[str, int] = {}
    half_open = [0]
    metrics.watch_runtime(stats.as_dict, lambda: sessions, lambda: half_open[0])
    stats.datagrams_in, stats.datagrams_out = 10, 8
    stats.dropped_no_sa, stats.half_open_expired, stats.cookies_sent = 2, 3, 4
    stats.actors_started, stats.actors_retired = 5, 1
    sessions.update(retransmits_sent=6, retransmits_answered=1, dropped_integrity=7)
    half_open[0] = 9
    _, before = scrape(metrics)
    assert value(before, "ike_cluster_datagrams_total", direction="in") == 0  # not yet published
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_datagrams_total", direction="in") == 10
    assert value(samples, "ike_cluster_datagrams_total", direction="out") == 8
    assert value(samples, "ike_cluster_datagrams_dropped_total", reason="no_sa") == 2
    assert value(samples, "ike_cluster_datagrams_dropped_total", reason="integrity") == 7
    assert value(samples, "ike_cluster_ike_sas_failed_total", reason="half_open_timeout") == 3
    assert value(samples, "ike_cluster_cookies_sent_total") == 4
    assert value(samples, "ike_cluster_sa_actors") == 4
    assert value(samples, "ike_cluster_half_open_ike_sas") == 9
    assert value(samples, "ike_cluster_retransmissions_total", direction="out") == 6
    assert value(samples, "ike_cluster_retransmissions_total", direction="in") == 1


# --- the HTTP endpoint --------------------------------------------------------------------


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return str(response.read().decode())


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_scrape_gets_fresh_values_and_the_endpoint_stops_with_the_task(
        host: str) -> None:
    metrics = fresh()
    stats = RuntimeStats()
    metrics.watch_runtime(stats.as_dict, dict, lambda: 0)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_metrics, metrics, host, 0, 0.02)
        assert bound[0] == host and bound[1] > 0
        url = f"http://[{host}]:{bound[1]}/metrics" if ":" in host else \
            f"http://{host}:{bound[1]}/metrics"
        text = await trio.to_thread.run_sync(_get, url)
        assert 'ike_cluster_datagrams_total{direction="in"} 0.0' in text
        stats.datagrams_in = 3
        with trio.fail_after(5):
            while 'ike_cluster_datagrams_total{direction="in"} 3.0' not in text:
                await trio.sleep(0.02)
                text = await trio.to_thread.run_sync(_get, url)
        nursery.cancel_scope.cancel()
    with pytest.raises(urllib.error.URLError):
        await trio.to_thread.run_sync(_get, url)


async def test_scrapes_within_the_interval_reuse_the_last_values() -> None:
    metrics = fresh()
    stats = RuntimeStats()
    reads = 0

    def read() -> dict[str, int]:
        nonlocal reads
        reads += 1
        return stats.as_dict()

    metrics.watch_runtime(read, dict, lambda: 0)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0, 3600.0)
        stats.datagrams_in = 5
        url = f"http://127.0.0.1:{port}/metrics"
        for _ in range(3):
            text = await trio.to_thread.run_sync(_get, url)
            assert 'ike_cluster_datagrams_total{direction="in"} 0.0' in text
        assert reads == 1  # the publish at start; scrapes did not make the loop read again
        nursery.cancel_scope.cancel()


async def test_a_taken_address_fails_at_start() -> None:
    metrics = fresh()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0, 1.0)
        with pytest.raises(OSError):
            await nursery.start(serve_metrics, fresh(), "127.0.0.1", port, 1.0)
        nursery.cancel_scope.cancel()


# --- [metrics] in the configuration -------------------------------------------------------

BASE = """
[node]
id = "gw1"
[ike]
addresses = ["127.0.0.1"]
[connections.rw]
version = 2
local = { auth = "psk", id = "gw.example.test" }
remote = { auth = "psk", id = "%any" }
[connections.rw.children.net]
local_ts = ["10.99.2.0/24"]
[secrets.rw]
ids = ["gw.example.test", "%any"]
secret = "s"
"""


@pytest.fixture
def config_with(tmp_path: Path) -> Callable[[str], Path]:
    def write(extra: str) -> Path:
        path = tmp_path / "node.toml"
        path.write_text(BASE + extra)
        return path

    return write


def test_no_metrics_table_serves_nothing(config_with: Callable[[str], Path]) -> None:
    assert load_config(config_with("")).metrics is None


@pytest.mark.parametrize(("table", "expected"), [
    ("[metrics]\n", MetricsConfig()),
    ('[metrics]\nlisten = "0.0.0.0:9100"\n', MetricsConfig(host="0.0.0.0", port=9100)),
    ('[metrics]\nlisten = "[::1]:9464"\ninterval = "5s"\n',
     MetricsConfig(host="::1", port=9464, interval=5.0)),
    ('[metrics]\nlisten = "[::]"\n', MetricsConfig(host="::", port=METRICS_PORT)),
    ('[metrics]\nlisten = "10.0.0.1"\ninterval = 0.25\n',
     MetricsConfig(host="10.0.0.1", interval=0.25)),
    ('[metrics]\nlisten = "127.0.0.1:0"\n', MetricsConfig(port=0)),
])
def test_metrics_table(config_with: Callable[[str], Path], table: str,
                       expected: MetricsConfig) -> None:
    assert load_config(config_with(table)).metrics == expected


def test_listen_is_shown_as_written() -> None:
    assert MetricsConfig(host="::1", port=9464).listen == "[::1]:9464"
    assert MetricsConfig().listen == f"127.0.0.1:{METRICS_PORT}"


@pytest.mark.parametrize(("table", "message"), [
    ('listen = "::1:9464"', "metrics.listen: '::1:9464': an IPv6 address goes in brackets"),
    ('listen = "[::1]9464"', "metrics.listen: '[::1]9464' is not [IPv6 address]:port"),
    ('listen = "[127.0.0.1]:80"', "metrics.listen: '[127.0.0.1]:80' is not [IPv6 address]"),
    ('listen = "localhost:9464"', "metrics.listen: 'localhost' is not an IPv4 or IPv6 address"),
    ('listen = "127.0.0.1:70000"', "metrics.listen: '70000' is not a TCP port"),
    ('listen = "127.0.0.1:"', "metrics.listen: '' is not a TCP port"),
    ('listen = "127.0.0.1:-1"', "metrics.listen: '-1' is not a TCP port"),
    ("listen = 9464", "metrics.listen: expected a string, got an integer"),
    ("interval = 0", "metrics.interval: must be between 0.01 s and 1 h"),
    ('interval = "2h"', "metrics.interval: must be between 0.01 s and 1 h"),
    ('interval = "soon"', "metrics.interval: 'soon' is not a duration"),
    ('lisen = "127.0.0.1:9464"', "metrics.lisen: unknown key (did you mean 'listen'?)"),
])
def test_bad_metrics_table_names_key_and_reason(
    config_with: Callable[[str], Path], table: str, message: str
) -> None:
    path = config_with(f"[metrics]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}")


def test_sas_moving_between_responders_move_the_gauges_not_the_counters() -> None:
    metrics = fresh("rw")
    metrics.sa_arrived(b"i" * 8, b"r" * 8, "rw", [b"c001", b"c002"])
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_ike_sas") == 1
    assert value(samples, "ike_cluster_child_sas") == 2
    assert value(samples, "ike_cluster_ike_sas_established_total", connection="rw") == 0
    metrics.sa_left(b"i" * 8, b"r" * 8)
    metrics.publish()
    _, samples = scrape(metrics)
    assert value(samples, "ike_cluster_ike_sas") == 0
    assert value(samples, "ike_cluster_child_sas") == 0
    assert not any(name.endswith("deleted_total") and v for (name, _), v in samples.items())
