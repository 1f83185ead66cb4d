"""`ike-cluster run` with [metrics]: scrape /metrics over HTTP around a real handshake."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cluster.config import load_config
from cluster.ike.constants import NON_ESP_MARKER
from cluster.ike.policy import ConnectionConfig, ResponderPolicy
from cluster.single_node import single_node
from tests.unit.test_metrics import COMMON, DATA_PLANE, RADIUS, REVOCATION
from tests.worker.namespaces import netns, require_netns, run_in_netns

from .conftest import Setup, free_port_pair, initiator_settings, write_responder_config
from .initiator_peer import InitiatorPeer

# the expected families, one table for the unit and the scrape tests
TYPES = COMMON | REVOCATION | RADIUS
ESP = DATA_PLANE
PROCESS = {"process_cpu_seconds": "counter", "process_resident_memory_bytes": "gauge",
           "process_open_fds": "gauge"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Scrape:
    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]


class RecordingPeer(InitiatorPeer):
    """Remembers what it sent, so the test can send a request again."""

    sent: list[tuple[bytes, tuple[str, int]]]

    async def flush(self) -> None:
        for datagram in self.session.datagrams_to_send():
            data = datagram.data
            if datagram.remote[1] == self.natt_port:
                data = NON_ESP_MARKER + data  # RFC 3948 2.2
            self.sent.append((data, datagram.remote))
            await self.sock.sendto(data, datagram.remote)


def _free_tcp_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


async def scrape(url: str) -> Scrape:
    return Scrape(await trio.to_thread.run_sync(_get, url))


async def scrape_until(url: str, done: Callable[[Scrape], bool], timeout: float = 5.0) -> Scrape:
    """Values are published every [metrics] interval: scrape until they show."""
    with trio.fail_after(timeout):
        while not done(result := await scrape(url)):
            await trio.sleep(0.02)
    return result


@pytest.fixture
def metrics_setup(tmp_path: Path) -> tuple[Setup, str]:
    ike_port, natt_port = free_port_pair()
    path = write_responder_config(tmp_path, ("127.0.0.1",), ike_port, natt_port)
    port = _free_tcp_port("::1")
    path.write_text(path.read_text() + f'[metrics]\nlisten = "[::1]:{port}"\ninterval = 0.05\n')
    connection, policy = initiator_settings(tmp_path)
    return Setup(load_config(path), connection, policy), f"http://[::1]:{port}/metrics"


async def test_a_handshake_moves_the_scraped_metrics(metrics_setup: tuple[Setup, str]) -> None:
    setup, url = metrics_setup
    config = setup.node_config
    async with trio.open_nursery() as nursery:
        nursery.start_soon(single_node, config)
        with trio.fail_after(5):
            while True:
                try:
                    before = await scrape(url)
                    break
                except urllib.error.URLError:
                    await trio.sleep(0.02)

        ours = {n: t for n, t in before.types.items() if n.startswith("ike_cluster_")}
        assert ours == TYPES  # no data plane here: no esp_* families
        for name, kind in PROCESS.items():
            assert before.types.get(name) == kind, name
        assert set(before.types) == set(TYPES) | {
            n for n in before.types if n.startswith("process_")}
        assert before("ike_cluster_node_info", node="rt-test") == 1
        assert before("ike_cluster_ike_sas") == 0
        assert before("ike_cluster_ike_sas_established_total", connection="rw") == 0
        init = {"exchange": "IKE_SA_INIT", "role": "responder", "result": "ok"}
        auth = {"exchange": "IKE_AUTH", "role": "responder", "result": "ok"}
        assert before("ike_cluster_exchanges_total", **init) == 0
        assert before("ike_cluster_exchanges_total", **auth) == 0
        histogram = "ike_cluster_handshake_duration_seconds"
        assert before(histogram + "_count", role="responder") == 0

        peer = await RecordingPeer.open((config.addresses[0], config.ike_port), config.natt_port,
                                        setup.connection, setup.initiator_policy)
        assert isinstance(peer, RecordingPeer)
        peer.sent = []
        try:
            await peer.establish()
            after = await scrape_until(url, lambda s: s("ike_cluster_ike_sas") == 1)
            assert after("ike_cluster_child_sas") == 1
            assert after("ike_cluster_ike_sas_established_total", connection="rw") == 1
            assert after("ike_cluster_child_sas_established_total", connection="rw") == 1
            assert after("ike_cluster_exchanges_total", **init) == 1
            assert after("ike_cluster_exchanges_total", **auth) == 1
            assert after(histogram + "_count", role="responder") == 1
            assert 0 < after(histogram + "_sum", role="responder") < 5
            assert after(histogram + "_bucket", role="responder", le="+Inf") == 1
            assert after("ike_cluster_half_open_ike_sas") == 0
            assert after("ike_cluster_sa_actors") == 1
            # two requests in, two responses out
            assert after("ike_cluster_datagrams_total", direction="in") == 2
            assert after("ike_cluster_datagrams_total", direction="out") == 2
            assert after("ike_cluster_retransmissions_total", direction="in") == 0

            # the IKE_AUTH request once more: answered from the cache, counted
            data, remote = peer.sent[-1]
            await peer.sock.sendto(data, remote)
            again = await scrape_until(
                url, lambda s: s("ike_cluster_retransmissions_total", direction="in") == 1)
            assert again("ike_cluster_ike_sas_established_total", connection="rw") == 1

            await peer.delete()
        finally:
            peer.close()
        gone = await scrape_until(url, lambda s: s("ike_cluster_ike_sas") == 0)
        assert gone("ike_cluster_child_sas") == 0
        assert gone("ike_cluster_ike_sas_deleted_total", reason="peer") == 1
        assert gone("ike_cluster_child_sas_deleted_total", reason="peer") == 1
        info = {"exchange": "INFORMATIONAL", "role": "responder", "result": "ok"}
        assert gone("ike_cluster_exchanges_total", **info) == 1
        # the retired SA's session counters stay in the totals
        assert gone("ike_cluster_retransmissions_total", direction="in") == 1
        assert gone("ike_cluster_sa_actors") == 0
        nursery.cancel_scope.cancel()
    with pytest.raises(urllib.error.URLError):
        await scrape(url)  # the endpoint went with the node


# --- with the data plane: its counters reach the scrape too (root, in a namespace) --------


def _node_with_data_plane(config_path: Path, url: str, connection: ConnectionConfig,
                          policy: ResponderPolicy) -> tuple[dict[str, str], dict[str, float]]:
    """In the namespace: a node with [worker] and [metrics], one handshake, one stray ESP."""

    async def main() -> tuple[dict[str, str], dict[str, float]]:
        config = load_config(config_path)
        server = (config.addresses[0], config.ike_port)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(single_node, config)
            with trio.fail_after(10):
                while True:
                    try:
                        before = await scrape(url)
                        break
                    except urllib.error.URLError:
                        await trio.sleep(0.05)
            peer = await InitiatorPeer.open(server, config.natt_port, connection, policy)
            try:
                await peer.establish()
                # ESP in UDP for an SPI nobody has (no non-ESP marker: RFC 3948 2.2)
                await peer.sock.sendto(b"\x00\x00\x10\x01" + bytes(24),
                                       (server[0], config.natt_port))
            finally:
                peer.close()
            after = await scrape_until(url, lambda s: s(
                "ike_cluster_esp_dropped_packets_total", reason="no_sa_inbound") == 1)
            nursery.cancel_scope.cancel()
        return after.types, {
            "before_no_sa": before("ike_cluster_esp_dropped_packets_total",
                                   reason="no_sa_inbound"),
            "child_sas": after("ike_cluster_child_sas"),
            "packets_in": after("ike_cluster_esp_packets_total", direction="in"),
        }

    return trio.run(main)


def test_the_data_plane_counters_are_scraped(tmp_path: Path) -> None:
    require_netns()
    path = write_responder_config(tmp_path, ("127.0.0.1",), 1500, 14500)
    path.write_text(path.read_text() + '[worker]\ntun = "ikm0"\n'
                    '[metrics]\nlisten = "127.0.0.1:9464"\ninterval = 0.05\n')
    connection, policy = initiator_settings(tmp_path)
    with netns() as name:
        types, values = run_in_netns(name, _node_with_data_plane, path,
                                     "http://127.0.0.1:9464/metrics", connection, policy)
    assert {n: t for n, t in types.items() if n.startswith("ike_cluster_")} == TYPES | ESP
    assert values == {"before_no_sa": 0, "child_sas": 1, "packets_in": 0}
