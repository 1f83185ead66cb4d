"""An IKE SA whose rekey a responder started has that responder as its initiator (RFC
7296 2.18): the peer's messages then carry the responder flag and name the SA by our
SPI. Another node that takes such an SA over (a hand-over: its new SPI hashes
elsewhere; or its owner died) must load it for those messages and route them to it,
as it does for SAs the peer initiated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from cluster.ike.message import decode_untrusted
from cluster.ike.session import IkeSession
from cluster.ike.state import State
from cluster.rendezvous import choose
from cluster.runtime.persistence import sa_key
from tests.ike.sessions import drain, psk_pair, run_handshake
from tests.runtime.test_takeover_resend import TTL, NodeB, node_b_after_a_died


def _rekeyed_by_the_gateway() -> tuple[IkeSession, IkeSession]:
    client, gateway = psk_pair()
    run_handshake(client, gateway)
    old = gateway.spi_i, gateway.spi_r
    gateway.rekey_ike(1.0)
    run_handshake(gateway, client)  # CREATE_CHILD_SA, then the old SA's Delete
    assert (gateway.spi_i, gateway.spi_r) != old and gateway.sa.is_initiator
    assert (client.spi_i, client.spi_r) == (gateway.spi_i, gateway.spi_r)
    drain(gateway)
    return client, gateway


def _deliver(b: NodeB, sender: IkeSession) -> int:
    """The peer's datagrams, as a worker relays them to node B."""
    datagrams = sender.datagrams_to_send()
    for d in datagrams:
        header = decode_untrusted(d.data).header
        b.supervisor.route(header, d.data, d.remote, d.local, trio.current_time())
    return len(datagrams)


async def test_the_peers_request_loads_an_sa_we_rekeyed_and_is_answered() -> None:
    client, gateway = _rekeyed_by_the_gateway()
    async with node_b_after_a_died(gateway, a_alive=True) as b:
        assert client.check_liveness(2.0)
        assert not decode_untrusted(client.sa.pending.data[0]).header.is_initiator  # type: ignore[union-attr]
        assert _deliver(b, client) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert b.supervisor.holder_of(gateway.spi_i, gateway.spi_r) is not None
        assert len(b.sent) == 1  # the answer
        client.receive_datagram_untrusted(b.sent[0][1], gateway.sa.remote, gateway.sa.local,
                                          2.1)
        assert client.sa.pending is None and client.state is State.ESTABLISHED


async def test_a_terminate_of_an_sa_we_rekeyed_gets_the_peers_answer() -> None:
    client, gateway = _rekeyed_by_the_gateway()
    async with node_b_after_a_died(gateway, a_alive=True) as b:
        b.persistence.load_then(sa_key(gateway.spi_i, gateway.spi_r),
                                lambda: b.supervisor.delete_ike(gateway.spi_i, gateway.spi_r))
        await trio.testing.wait_all_tasks_blocked()
        (delete,) = [data for _, data in b.sent]
        client.receive_datagram_untrusted(delete, gateway.sa.remote, gateway.sa.local, 2.0)
        assert client.state is State.CLOSED
        assert _deliver(b, client) == 1  # its answer, relayed to B
        await trio.testing.wait_all_tasks_blocked()
        assert b.supervisor.holder_of(gateway.spi_i, gateway.spi_r) is None  # deleted


@asynccontextmanager
async def _held_by_b() -> AsyncIterator[tuple[IkeSession, IkeSession, NodeB]]:
    """(client, gateway, node B): an established SA, which node B loaded and holds."""
    client, gateway = psk_pair()
    run_handshake(client, gateway)
    drain(gateway)
    async with node_b_after_a_died(gateway) as b:
        b.persistence.load_then(sa_key(gateway.spi_i, gateway.spi_r), lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        yield client, gateway, b


async def _hand_over_round(b: NodeB, clock: trio.testing.MockClock, new_spi_i: bytes,
                           old_spi_i: bytes) -> None:
    """Another responder joins to which the new SPIs hash (the old ones still to B);
    B's next hand-over round, once a TTL has passed."""
    other = next(n for n in (f"C{i}" for i in range(1000))
                 if choose(new_spi_i, ("B", n)) == n and choose(old_spi_i, ("B", n)) == "B")
    b.persistence.responders = ("B", other)
    clock.jump(TTL)
    await trio.testing.wait_all_tasks_blocked()
    b.persistence.hand_over()
    await trio.testing.wait_all_tasks_blocked()


async def test_an_sa_the_peer_rekeyed_stays_until_the_old_sa_is_deleted(
        mock_clock: trio.testing.MockClock) -> None:
    """Found with strongSwan under IKE loss: the peer rekeys the IKE SA, our answer is
    lost, and the new SPIs hash to another responder. The old SA, which snapshots do not
    hold, and whose SPIs still lead here, must answer the peer's retransmission from its
    cache, and then its Delete: the SA is handed over only after that."""
    async with _held_by_b() as (client, gateway, b):
        old = gateway.spi_i, gateway.spi_r
        client.rekey_ike(2.0)
        (request,) = client.datagrams_to_send()
        header = decode_untrusted(request.data).header
        b.supervisor.route(header, request.data, request.remote, request.local,
                           trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        assert len(b.sent) == 1  # the answer, lost
        actor = b.supervisor.actor_for(old[1])  # (the old SA's SPIs still lead to it)
        assert actor is not None and actor.session.spi_i != old[0]
        await _hand_over_round(b, mock_clock, actor.session.spi_i, old[0])
        assert b.persistence.stats.handovers == 0 and actor.session.awaiting_peer_delete
        # the peer's retransmission, answered from the old SA's cache
        client.handle_timer(client.get_timer() or 0.0)
        (again,) = client.datagrams_to_send()
        assert again.data == request.data
        b.supervisor.route(header, again.data, again.remote, again.local, trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        assert len(b.sent) == 2 and b.sent[1][1] == b.sent[0][1]
        client.receive_datagram_untrusted(b.sent[1][1], request.remote, request.local, 10.0)
        assert (client.spi_i, client.spi_r) == (actor.session.spi_i, actor.session.spi_r)
        assert _deliver(b, client) == 1  # its Delete of the old SA
        await trio.testing.wait_all_tasks_blocked()
        assert not actor.session.awaiting_peer_delete
        b.persistence.hand_over()
        await trio.testing.wait_all_tasks_blocked()
        assert b.persistence.stats.handovers == 1


async def test_an_sa_we_rekeyed_goes_at_once_with_our_delete_of_the_old_sa_in_flight(
        mock_clock: trio.testing.MockClock) -> None:
    """Our own IKE rekey: we delete the old SA ourselves, and only the peer's answer to
    that Delete would come on the old SPIs. Waiting for it would keep the new SA's
    messages, which the workers route to its new owner, unanswered meanwhile (seen
    with strongSwan under IKE loss: 12 s, and a Child SA reached its life_time)."""
    async with _held_by_b() as (client, gateway, b):
        old = gateway.spi_i, gateway.spi_r
        actor = b.supervisor.holder_of(*old)
        assert actor is not None
        actor.mailbox.put_nowait(lambda session, now: session.rekey_ike(now))
        await trio.testing.wait_all_tasks_blocked()
        for _, data in b.sent:
            client.receive_datagram_untrusted(data, gateway.sa.remote, gateway.sa.local, 1.0)
        assert _deliver(b, client) == 1  # the answer: rekeyed; our Delete of the old SA
        await trio.testing.wait_all_tasks_blocked()
        assert actor.session.spi_i != old[0] and actor.session.sa.is_initiator
        await _hand_over_round(b, mock_clock, actor.session.spi_i, old[0])
        assert b.persistence.stats.handovers == 1
