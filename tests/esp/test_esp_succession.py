"""A rekey the peer started: receive on the new SA at once, send on it only once the peer
can receive it (it used the new SA, or deleted the old one)."""

from __future__ import annotations

from cluster.esp import Sad
from tests.esp.pairs import NET_A, NET_B, mirror, packet, params

OLD_IN, OLD_OUT = b"\xc0\x00\x00\x01", b"\xc1\x00\x00\x01"
NEW_IN, NEW_OUT = b"\xc0\x00\x00\x02", b"\xc1\x00\x00\x02"


def host(net: str) -> str:
    return net.split("/")[0][:-1] + "5"


def test_the_successor_receives_at_once_but_does_not_send_yet() -> None:
    ours = Sad()
    old = params(spi_in=OLD_IN, spi_out=OLD_OUT)
    new = params(spi_in=NEW_IN, spi_out=NEW_OUT)
    ours.install(old)
    ours.succeed(OLD_IN, new)
    outgoing = packet(host(NET_A), host(NET_B))
    sa = ours.outbound_for(outgoing)
    assert sa is not None and sa.spi == OLD_OUT  # still the old one
    peer = Sad()
    peer.install(mirror(new))
    esp = peer.outbound_for(packet(host(NET_B), host(NET_A)))
    assert esp is not None
    ours.decapsulate_untrusted(esp.encapsulate(packet(host(NET_B), host(NET_A))))
    assert ours.waiting == {NEW_IN: OLD_IN}


def test_activation_moves_sending_to_the_successor() -> None:
    ours = Sad()
    ours.install(params(spi_in=OLD_IN, spi_out=OLD_OUT))
    ours.succeed(OLD_IN, params(spi_in=NEW_IN, spi_out=NEW_OUT))
    ours.activate(NEW_IN)
    sa = ours.outbound_for(packet(host(NET_A), host(NET_B)))
    assert sa is not None and sa.spi == NEW_OUT
    assert ours.waiting == {}


def test_removing_the_old_sa_activates_its_successor() -> None:
    ours = Sad()
    ours.install(params(spi_in=OLD_IN, spi_out=OLD_OUT))
    ours.succeed(OLD_IN, params(spi_in=NEW_IN, spi_out=NEW_OUT))
    assert ours.successor_of(OLD_IN) == NEW_IN
    ours.remove(OLD_IN)
    sa = ours.outbound_for(packet(host(NET_A), host(NET_B)))
    assert sa is not None and sa.spi == NEW_OUT
    assert ours.waiting == {} and len(ours) == 1
