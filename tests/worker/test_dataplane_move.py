"""ESP follows its IKE SA to the peer's new address (IkeSaMoved): after a NAT rebinding
every UDP-encapsulated SA, after a MOBIKE update (RFC 4555) every tunnel-mode SA.
Transport mode without encapsulation stays: its packets carry the SA's own addresses.
"""

from __future__ import annotations

from cluster.ike.events import MOBIKE_UPDATE, IkeSaMoved
from cluster.worker.dataplane import DataPlane
from cluster.worker.keys import Limits
from tests.esp.pairs import params

from .test_dataplane_batches import FakeRoutes, FakeTun

IKE = (b"i" * 8, b"r" * 8)
OTHER_IKE = (b"j" * 8, b"s" * 8)
NEW = ("192.0.2.77", 4500)


def test_a_move_takes_along_the_sas_that_can_follow(tun_pair: tuple[int, int]) -> None:
    plane = DataPlane(FakeTun([tun_pair[0]]), FakeRoutes(), [], Limits())  # type: ignore[arg-type]
    sas = {
        "tunnel": params(spi_in=b"\xc0\x00\x00\x01"),
        "tunnel_encap": params(encap=True, spi_in=b"\xc0\x00\x00\x02"),
        "transport": params(mode="transport", spi_in=b"\xc0\x00\x00\x03"),
        "transport_encap": params(mode="transport", encap=True, spi_in=b"\xc0\x00\x00\x04"),
    }
    for child in sas.values():
        plane.install(child, IKE)
    elsewhere = params(spi_in=b"\xc0\x00\x00\x05")
    plane.install(elsewhere, OTHER_IKE)
    plane.on_ike_event(IkeSaMoved(*IKE, ("10.0.0.1", 4500), NEW, MOBIKE_UPDATE))

    def remote(spi_in: bytes) -> tuple[str, int]:
        child = plane.sad.get(spi_in)
        assert child is not None and child.outbound is not None
        return child.outbound.remote

    assert {name: remote(p.spi_in) == NEW for name, p in sas.items()} == {
        "tunnel": True, "tunnel_encap": True, "transport": False, "transport_encap": True}
    assert remote(elsewhere.spi_in) == elsewhere.remote
