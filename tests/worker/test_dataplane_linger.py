"""A Child SA deleted after a rekey keeps decrypting for REKEYED_LINGER seconds (what
strongSwan calls delete_rekeyed_delay), so ESP the peer sent on it before switching
that arrives late is not lost; it sends nothing meanwhile. Any other SA goes at once.

Stand-in TUN and routes as in test_dataplane_batches; the SADs and ESP are real, and
the peer's SAD produces the packets.
"""

from __future__ import annotations

import os

import msgpack
import pytest
import trio
import trio.testing

from cluster.esp import ChildSaParams, Sad
from cluster.ike.events import ChildSaDeleted, IkeSaDeleted
from cluster.store.memory import MemoryStore
from cluster.store.sealing import ClusterKey
from cluster.worker.dataplane import REKEYED_LINGER, DataPlane
from cluster.worker.edge import KeySubscriber
from cluster.worker.keys import Limits
from tests.esp.pairs import mirror, packet, params

from .test_dataplane_batches import FakeRoutes, FakeTun, Sent

OLD, NEW = b"\xc0\x00\x00\x01", b"\xc0\x00\x00\x02"
IKE = (b"i" * 8, b"r" * 8)
INNER = packet("10.99.2.7", "10.99.1.5")  # from behind the peer (B) to behind us (A)
OUTER = packet("10.99.1.5", "10.99.2.7")  # the other way


def ours(spi_in: bytes) -> ChildSaParams:
    return params(encap=True, spi_in=spi_in, spi_out=b"\xc1" + spi_in[1:])


class Rig:
    """Our data plane with SA OLD, the peer's SAD with its mirror."""

    def __init__(self, fd: int, read_fd: int) -> None:
        self.plane = DataPlane(FakeTun([fd]), FakeRoutes(), [], Limits())  # type: ignore[arg-type]
        self.sent = Sent()
        self.plane.udp_send = self.sent
        self.read_fd = read_fd
        self.old, self.new = ours(OLD), ours(NEW)
        self.plane.install(self.old, IKE)
        self.peer = Sad()
        self.peer.install(mirror(self.old))

    def esp_on(self, child: ChildSaParams) -> bytes:
        """An ESP packet the peer sends on `child` (its mirror in the peer's SAD)."""
        sa = self.peer.get(child.spi_out)
        assert sa is not None and sa.outbound is not None
        return sa.outbound.encapsulate(INNER)

    def deliver(self, esp: bytes) -> bool:
        """Whether the packet came out of the TUN, decrypted."""
        self.plane.receive_esp([esp])
        self.plane.flush()
        try:
            written = os.read(self.read_fd, 1 << 16)
        except BlockingIOError:
            return False
        assert written.endswith(INNER)
        return True

    def sent_on(self) -> bytes:
        """The SPI our last outbound packet used."""
        self.plane.send_packets([OUTER])
        return self.sent.calls[-1][0][:4]


async def run_timer(plane: DataPlane, nursery: trio.Nursery) -> None:
    nursery.start_soon(plane._linger_timer)
    await trio.testing.wait_all_tasks_blocked()


async def test_we_rekeyed_the_old_sa_receives_for_the_linger_then_goes(
        tun_pair: tuple[int, int], mock_clock: trio.testing.MockClock) -> None:
    rig = Rig(*tun_pair)
    late = rig.esp_on(rig.old)  # sent before the peer switched, arrives after the Delete
    rig.plane.replace(OLD, rig.new, IKE)
    rig.peer.install(mirror(rig.new))
    async with trio.open_nursery() as nursery:
        await run_timer(rig.plane, nursery)
        rig.plane.on_ike_event(ChildSaDeleted(*IKE, "net", OLD, rig.old.spi_out, "deleted by us"))
        assert rig.deliver(late)
        assert rig.sent_on() == rig.new.spi_out
        assert set(rig.plane.lingering) == {OLD}
        mock_clock.jump(REKEYED_LINGER - 0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.deliver(rig.esp_on(rig.old))
        mock_clock.jump(0.2)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.plane.sad.get(OLD) is None and not rig.plane.lingering
        assert not rig.deliver(rig.esp_on(rig.old))
        assert rig.plane.sad.counters.no_sa_in == 1
        assert rig.deliver(rig.esp_on(rig.new))
        nursery.cancel_scope.cancel()


async def test_the_peer_rekeyed_its_delete_moves_our_sending_and_the_old_sa_lingers(
        tun_pair: tuple[int, int], mock_clock: trio.testing.MockClock) -> None:
    rig = Rig(*tun_pair)
    rig.plane.succeed(OLD, rig.new, IKE)
    assert rig.sent_on() == rig.old.spi_out  # the peer may not have the new SA yet
    async with trio.open_nursery() as nursery:
        await run_timer(rig.plane, nursery)
        rig.plane.on_ike_event(ChildSaDeleted(*IKE, "net", OLD, rig.old.spi_out,
                                              "deleted by peer"))
        assert rig.sent_on() == rig.new.spi_out
        assert rig.deliver(rig.esp_on(rig.old))
        rig.plane.delete(OLD)  # again (a resent Delete, or the store's remove): no change
        mock_clock.jump(REKEYED_LINGER / 2)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.deliver(rig.esp_on(rig.old))
        mock_clock.jump(REKEYED_LINGER / 2 + 0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert not rig.deliver(rig.esp_on(rig.old))
        nursery.cancel_scope.cancel()


def test_an_sa_no_rekey_replaced_goes_at_once(tun_pair: tuple[int, int]) -> None:
    rig = Rig(*tun_pair)
    rig.plane.on_ike_event(ChildSaDeleted(*IKE, "net", OLD, rig.old.spi_out, "deleted by peer"))
    assert rig.plane.sad.get(OLD) is None and not rig.plane.lingering
    assert not rig.deliver(rig.esp_on(rig.old))
    rig.plane.send_packets([OUTER])
    assert not rig.sent.calls and rig.plane.sad.counters.no_sa_out == 1


def test_the_ike_sa_deleted_ends_the_linger_at_once(tun_pair: tuple[int, int]) -> None:
    rig = Rig(*tun_pair)
    rig.plane.clock = lambda: 0.0
    rig.plane.replace(OLD, rig.new, IKE)
    rig.plane.delete(OLD)
    assert set(rig.plane.lingering) == {OLD}
    rig.plane.on_ike_event(IkeSaDeleted(*IKE, "deleted by peer"))
    assert len(rig.plane.sad) == 0 and not rig.plane.lingering
    assert not rig.deliver(rig.esp_on(rig.old))


def test_a_new_sa_may_take_a_lingering_spi(tun_pair: tuple[int, int]) -> None:
    rig = Rig(*tun_pair)
    rig.plane.clock = lambda: 0.0
    rig.plane.replace(OLD, rig.new, IKE)
    rig.plane.delete(OLD)
    again = ours(OLD)  # other keys under the same SPI
    rig.plane.install(again, IKE)
    assert not rig.plane.lingering
    child = rig.plane.sad.get(OLD)
    assert child is not None and child.params is again and not child.retiring


async def test_the_cluster_worker_lingers_on_remove_and_its_resync_keeps_the_linger(
        tun_pair: tuple[int, int]) -> None:
    rig = Rig(*tun_pair)
    rig.plane.clock = lambda: 0.0
    other = ours(b"\xc0\x00\x00\x09")  # installed, and not in the store's table
    rig.plane.install(other, IKE)
    rig.plane.replace(OLD, rig.new, IKE)
    keys = KeySubscriber(MemoryStore(), "w1", ClusterKey(os.urandom(32)), rig.plane, Limits())
    keys.apply(msgpack.packb(["remove", OLD]))
    assert set(rig.plane.lingering) == {OLD} and keys.removed == 1
    keys.apply(msgpack.packb(["remove", OLD]))
    assert keys.removed == 1
    await keys.resync(restoring=True)  # marks the (empty) table as ours
    await keys.resync()
    assert rig.plane.sad.get(OLD) is not None and set(rig.plane.lingering) == {OLD}
    assert rig.plane.sad.get(NEW) is None and rig.plane.sad.get(other.spi_in) is None
    assert keys.removed == 3


@pytest.mark.parametrize("spi", [OLD, b"\xde\xad\xbe\xef"])
def test_deleting_an_unknown_or_removed_sa_is_harmless(tun_pair: tuple[int, int],
                                                       spi: bytes) -> None:
    rig = Rig(*tun_pair)
    rig.plane.remove(OLD)
    rig.plane.delete(spi)
    assert len(rig.plane.sad) == 0 and not rig.plane.lingering


def collided(rig: Rig) -> ChildSaParams:
    """Both ends rekeyed OLD at once (RFC 7296 2.8.1): the peer's request made the SA
    returned (it waits to send), then the answer to ours made NEW (it sends)."""
    theirs = ours(b"\xc0\x00\x00\x03")
    rig.plane.succeed(OLD, theirs, IKE)
    rig.plane.replace(OLD, rig.new, IKE)
    return theirs


def deleted(rig: Rig, child: ChildSaParams, by: str) -> None:
    rig.plane.on_ike_event(ChildSaDeleted(*IKE, "net", child.spi_in, child.spi_out,
                                          f"deleted by {by}"))


async def test_after_a_rekey_collision_we_won_we_never_send_on_the_peers_redundant_sa(
        tun_pair: tuple[int, int], mock_clock: trio.testing.MockClock) -> None:
    """Both ends rekeyed at once and ours won (RFC 7296 2.8.1): we delete the old SA, the
    peer deletes its redundant one. The peer may never have installed that one (our
    answer to its request can be lost), so neither our Delete of the old SA nor the end
    of its linger makes it send: we go on sending on ours. (Before, a lost answer cost
    every packet until the peer deleted its SA.)"""
    rig = Rig(*tun_pair)
    redundant = collided(rig)
    rig.peer.install(mirror(rig.new))
    async with trio.open_nursery() as nursery:
        await run_timer(rig.plane, nursery)
        deleted(rig, rig.old, "us")
        assert rig.sent_on() == rig.new.spi_out
        mock_clock.jump(REKEYED_LINGER + 0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.plane.sad.get(OLD) is None
        assert rig.sent_on() == rig.new.spi_out
        assert rig.plane.sad.waiting == {redundant.spi_in: OLD}  # it still receives
        deleted(rig, redundant, "peer")
        assert rig.sent_on() == rig.new.spi_out
        assert rig.deliver(rig.esp_on(rig.new))
        nursery.cancel_scope.cancel()


def test_after_a_rekey_collision_we_lost_the_old_sa_sends_until_the_peer_deletes_it(
        tun_pair: tuple[int, int]) -> None:
    """Ours was the redundant SA and we deleted it: the old SA, which the peer still
    has, sends again (not nothing at all); the peer's Delete of it moves us to its SA."""
    rig = Rig(*tun_pair)
    rig.plane.clock = lambda: 0.0
    winner = collided(rig)
    deleted(rig, rig.new, "us")
    assert rig.sent_on() == rig.old.spi_out
    deleted(rig, rig.old, "peer")
    assert rig.sent_on() == winner.spi_out
    assert set(rig.plane.lingering) == {OLD}


def test_after_a_rekey_collision_we_lost_the_peers_delete_may_come_first(
        tun_pair: tuple[int, int]) -> None:
    """The peer deleted the old SA before our Delete of our redundant one was answered:
    we send on ours until it goes (the peer has it until then), then on the peer's."""
    rig = Rig(*tun_pair)
    rig.plane.clock = lambda: 0.0
    winner = collided(rig)
    deleted(rig, rig.old, "peer")
    assert rig.sent_on() == rig.new.spi_out
    deleted(rig, rig.new, "us")
    assert rig.sent_on() == winner.spi_out
