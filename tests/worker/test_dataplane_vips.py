"""Our own virtual IP (assigned by the responder we initiated to) goes on the TUN with its
IKE SA, follows an IKE rekey, and leaves with the last IKE SA that holds it."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.ike.events import IkeSaDeleted, IkeSaEstablished, IkeSaRekeyed
from cluster.worker.dataplane import DataPlane
from cluster.worker.keys import Limits

from .test_dataplane_batches import FakeRoutes, FakeTun

OLD, NEW = (b"i" * 8, b"r" * 8), (b"j" * 8, b"s" * 8)


@dataclass
class AddressTun(FakeTun):
    addresses: list[str] = field(default_factory=list)

    def add_address(self, interface: str) -> None:
        if interface not in self.addresses:  # as the TUN's: already present is fine
            self.addresses.append(interface)

    def remove_address(self, interface: str) -> None:
        self.addresses.remove(interface)


def established(*vips: str, spis: tuple[bytes, bytes] = OLD) -> IkeSaEstablished:
    return IkeSaEstablished(*spis, "rw", "client", "gw", ("10.99.0.1", 500),
                            ("10.99.0.2", 500), "aes256gcm16", False, own_virtual_ips=vips)


def test_the_address_lives_on_the_tun_as_long_as_its_ike_sa(tun_pair: tuple[int, int]) -> None:
    tun = AddressTun([tun_pair[0]])
    plane = DataPlane(tun, FakeRoutes(), [], Limits())  # type: ignore[arg-type]
    plane.on_ike_event(established())  # a responder's SA, or no address asked for
    assert tun.addresses == []
    plane.on_ike_event(established("10.99.3.1", "fd99:3::1"))
    assert tun.addresses == ["10.99.3.1/32", "fd99:3::1/128"]
    plane.on_ike_event(IkeSaRekeyed(*OLD, *NEW, we_initiated=True))
    plane.on_ike_event(IkeSaDeleted(*OLD, "rekeyed away"))  # not the holder any more
    assert tun.addresses == ["10.99.3.1/32", "fd99:3::1/128"]
    plane.on_ike_event(IkeSaDeleted(*NEW, "deleted by peer"))
    assert tun.addresses == []


def test_a_reauthentication_holding_the_same_address_keeps_it(
        tun_pair: tuple[int, int]) -> None:
    """Make-before-break: the new IKE SA was given the same address while the old one
    was up; deleting the old one leaves the address to the new one."""
    tun = AddressTun([tun_pair[0]])
    plane = DataPlane(tun, FakeRoutes(), [], Limits())  # type: ignore[arg-type]
    plane.on_ike_event(established("10.99.3.1"))
    plane.on_ike_event(established("10.99.3.1", "10.99.3.9", spis=NEW))
    plane.on_ike_event(IkeSaDeleted(*OLD, "reauthenticated"))
    assert "10.99.3.1/32" in tun.addresses and "10.99.3.9/32" in tun.addresses
    plane.on_ike_event(IkeSaDeleted(*NEW, "deleted by peer"))
    assert set(tun.addresses) == set()
