"""start_action = "trap" in the data plane: the trapped remote selectors are routed into
the TUN at once, and a packet between the trap's selectors that no SA covers asks for
the connection (and is dropped and counted, never sent in the clear)."""

from __future__ import annotations

import ipaddress

from cluster.esp import Selector
from cluster.worker.dataplane import DataPlane
from cluster.worker.keys import Limits
from tests.esp.pairs import packet, params

from .test_dataplane_batches import FakeRoutes, FakeTun, Sent


def net(first: str, last: str, protocol: int = 0) -> Selector:
    return Selector.from_range(ipaddress.ip_address(first).packed,
                               ipaddress.ip_address(last).packed, protocol)


def trapped(fd: int) -> tuple[DataPlane, FakeRoutes, list[str], Sent]:
    routes = FakeRoutes()
    plane = DataPlane(FakeTun([fd]), routes, [], Limits())  # type: ignore[arg-type]
    asked: list[str] = []
    plane.on_acquire = asked.append
    plane.udp_send = sent = Sent()
    plane.trap("site", (net("10.99.1.0", "10.99.1.255"),), (net("10.99.2.0", "10.99.2.255"),))
    plane.trap("icmp-only", (net("10.99.1.0", "10.99.1.255"),),
               (net("10.77.0.0", "10.77.255.255", protocol=1),))
    return plane, routes, asked, sent


def test_a_trap_routes_its_remote_selectors_into_the_tun(tun_pair: tuple[int, int]) -> None:
    _, routes, asked, _ = trapped(tun_pair[0])
    assert routes.routes == ["10.99.2.0/24", "10.77.0.0/16"] and asked == []


def test_a_packet_without_an_sa_asks_for_its_trap_and_is_dropped(
        tun_pair: tuple[int, int]) -> None:
    plane, _, asked, sent = trapped(tun_pair[0])
    plane.send_packets([packet("10.99.1.5", "10.99.2.7"), packet("10.99.1.5", "10.99.2.8")])
    assert asked == ["site", "site"] and plane.acquires == 2
    assert sent.calls == [] and plane.sad.counters.no_sa_out == 2
    # another source, UDP where the trap wants ICMP, no trap at all: nothing asked
    plane.send_packets([packet("10.98.1.5", "10.99.2.7"), packet("10.99.1.5", "10.77.0.1"),
                        packet("10.99.1.5", "10.55.0.1")])
    assert asked == ["site", "site"] and plane.sad.counters.no_sa_out == 5
    plane.send_packets([packet("10.99.1.5", "10.77.0.1", protocol=1)])
    assert asked == ["site", "site", "icmp-only"]


def test_once_the_sa_is_up_its_packets_ask_for_nothing(tun_pair: tuple[int, int]) -> None:
    plane, _, asked, sent = trapped(tun_pair[0])
    plane.install(params(encap=True))  # 10.99.1.0/24 <-> 10.99.2.0/24, as the trap
    plane.send_packets([packet("10.99.1.5", "10.99.2.7")])
    assert asked == [] and len(sent.datagrams()) == 1
