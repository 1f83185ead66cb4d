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


PEER_IN, PEER_OUT = b"\xc0\x00\x00\x03", b"\xc1\x00\x00\x03"


def collided() -> Sad:
    """Both ends rekeyed OLD at once (RFC 7296 2.8.1): the peer's request made PEER (it
    waits to send), ours made NEW (it sends)."""
    ours = Sad()
    ours.install(params(spi_in=OLD_IN, spi_out=OLD_OUT))
    ours.succeed(OLD_IN, params(spi_in=PEER_IN, spi_out=PEER_OUT))
    ours.replace(OLD_IN, params(spi_in=NEW_IN, spi_out=NEW_OUT))
    return ours


def sending(sad: Sad) -> bytes | None:
    sa = sad.outbound_for(packet(host(NET_A), host(NET_B)))
    return None if sa is None else sa.spi


def test_a_collision_we_won_keeps_sending_on_ours_when_the_old_sa_goes() -> None:
    """The peer's SA is the redundant one: the peer deletes it, and may never have
    installed it (our answer to its request can be lost), so it never sends."""
    ours = collided()
    assert sending(ours) == NEW_OUT
    ours.deleted(OLD_IN)
    ours.remove(OLD_IN)
    assert sending(ours) == NEW_OUT
    assert ours.waiting == {PEER_IN: OLD_IN}
    ours.remove(PEER_IN)
    assert sending(ours) == NEW_OUT and len(ours) == 1


def test_a_collision_we_lost_sends_on_the_old_sa_until_the_peer_deletes_it() -> None:
    """Ours is the redundant one and goes first: the old SA, which the peer still has,
    sends again; once the peer deletes it, the peer's SA takes over."""
    ours = collided()
    ours.remove(NEW_IN)
    assert sending(ours) == OLD_OUT
    ours.deleted(OLD_IN)
    ours.remove(OLD_IN)
    assert sending(ours) == PEER_OUT
    assert ours.waiting == {} and len(ours) == 1


def test_an_old_sa_deleted_does_not_send_again_when_its_replacement_goes() -> None:
    ours = Sad()
    ours.install(params(spi_in=OLD_IN, spi_out=OLD_OUT))
    ours.replace(OLD_IN, params(spi_in=NEW_IN, spi_out=NEW_OUT))
    ours.deleted(OLD_IN)  # lingering: it decrypts late packets, never sends
    ours.remove(NEW_IN)
    assert sending(ours) is None
    assert ours.get(OLD_IN) is not None


def test_a_collision_we_lost_whose_old_sa_the_peer_deleted_first_moves_to_the_peers() -> None:
    """The peer's Delete of the old SA came before ours of our redundant SA: we go on
    sending on ours (the peer keeps it until our Delete), then on the peer's SA."""
    ours = collided()
    ours.deleted(OLD_IN)  # lingering
    assert sending(ours) == NEW_OUT
    ours.remove(NEW_IN)
    assert sending(ours) == PEER_OUT
    ours.remove(OLD_IN)  # its linger over
    assert sending(ours) == PEER_OUT and len(ours) == 1 and ours.waiting == {}


def test_an_sa_of_ours_rekeyed_again_does_not_bring_back_what_it_replaced() -> None:
    ours = collided()
    ours.deleted(OLD_IN)
    ours.remove(OLD_IN)
    ours.replace(NEW_IN, params(spi_in=b"\xc0\x00\x00\x04", spi_out=b"\xc1\x00\x00\x04"))
    ours.deleted(NEW_IN)
    ours.remove(NEW_IN)  # it no longer sent: nothing falls back to the peer's old SA
    assert sending(ours) == b"\xc1\x00\x00\x04"
    assert ours.waiting == {PEER_IN: OLD_IN}
