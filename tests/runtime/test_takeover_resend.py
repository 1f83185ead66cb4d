"""A node that takes an SA over answers for it at once, but its own requests (the dead
owner's request in flight, the command it loaded the SA for) go at once only when a
worker routed something to it (a datagram of the peer's, a Child SA limit: the workers
then see the dead owner gone) or the owner is alive (a hand-over); loaded for another
command after the owner died, they wait half a TTL, since a worker's view may still
list the dead owner and the peer's answer would be relayed there. A real store,
supervisor and sessions; the owner's record is written as its persistence would have."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from cluster.ike.events import TERMINATED
from cluster.ike.message import decode_untrusted
from cluster.ike.session import IkeSession
from cluster.ike.snapshot import SECRET_FIELDS, snapshot_of
from cluster.rendezvous import choose
from cluster.runtime.persistence import SaPersistence, sa_key
from cluster.runtime.stats import RuntimeStats
from cluster.runtime.supervisor import Supervisor
from cluster.store.interface import Acquire, PutSa, Release
from cluster.store.memory import MemoryStore
from cluster.store.sealing import ClusterKey
from cluster.store.snapshot import pack_snapshot
from cluster.store.writer import StoreWriter
from tests.ike.sessions import drain, psk_pair, run_handshake

TTL = 3.0


@dataclass
class NodeB:
    persistence: SaPersistence
    supervisor: Supervisor
    sent: list[tuple[float, bytes]]  # (when, datagram) of everything B sent


@asynccontextmanager
async def node_b_after_a_died(gateway: IkeSession, *, a_alive: bool = False,
                              a_holds: bool = False) -> AsyncIterator[NodeB]:
    """Node A stored `gateway` and died (its lease ran out); node B runs on the store.
    `a_alive`: A let the SA go instead (a hand-over) and B sees it among the responders.
    `a_holds`: A's lease on it runs a lease TTL more."""
    store, key = MemoryStore(), ClusterKey(os.urandom(32))
    sa = sa_key(gateway.spi_i, gateway.spi_r)
    fence = await store.run(Acquire(sa, "A", TTL))
    assert fence is not None
    record = snapshot_of(gateway, 0.0)
    record["worker"] = ""
    await store.run(PutSa(sa, pack_snapshot(record, SECRET_FIELDS, key, sa), "A", fence))
    if not a_holds:
        await store.run(Release(sa, "A", fence))
    writer = StoreWriter(store)
    sent: list[tuple[float, bytes]] = []
    supervisor = Supervisor(session_factory=lambda *a: None,  # type: ignore[arg-type,return-value]
                            send=lambda d: sent.append((trio.current_time(), d.data)),
                            event_sink=lambda e: None, stats=RuntimeStats(),
                            half_open_timeout=30.0)
    persistence = SaPersistence(writer, key, "B", gateway.sa.policy, supervisor,
                                lease_ttl=TTL, worker_of=lambda remote: None)
    persistence.responders = ("A", "B") if a_alive else ("B",)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await nursery.start(supervisor.run)
        await nursery.start(persistence.run)
        yield NodeB(persistence, supervisor, sent)
        nursery.cancel_scope.cancel()


async def _resent_after(by_datagram: bool, clock: trio.testing.MockClock) -> float:
    """Node A died with its Delete of the IKE SA in flight; node B takes the SA over: how
    long after that it sends the same Delete again."""
    client, gateway = psk_pair()
    run_handshake(client, gateway)
    drain(gateway)
    gateway.delete_ike(0.0, TERMINATED)
    (delete,) = gateway.datagrams_to_send()  # lost with node A
    async with node_b_after_a_died(gateway) as b:
        now = trio.current_time()
        if by_datagram:  # the peer's liveness check, routed here by a worker
            assert client.check_liveness(1.0)
            (probe,) = client.datagrams_to_send()
            header = decode_untrusted(probe.data).header
            b.persistence.on_unknown_sa(header, probe.data, probe.remote, probe.local, now)
        else:  # an operator's terminate, arriving here
            b.persistence.load_then(sa_key(gateway.spi_i, gateway.spi_r), lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        assert b.supervisor.actor_for(gateway.spi_r) is not None  # (B holds the SA)
        while not any(data == delete.data for _, data in b.sent):
            clock.jump(0.1)
            await trio.testing.wait_all_tasks_blocked()
    return min(at for at, data in b.sent if data == delete.data) - now


async def test_brought_by_the_peers_datagram_the_request_goes_again_at_once(
        mock_clock: trio.testing.MockClock) -> None:
    assert await _resent_after(True, mock_clock) == 0.0


async def test_loaded_for_a_command_the_request_waits_for_the_workers_views(
        mock_clock: trio.testing.MockClock) -> None:
    assert TTL / 2 <= await _resent_after(False, mock_clock) < TTL / 2 + 0.2


@pytest.mark.parametrize(("how", "waits"), [
    ("terminate after the owner died", True),
    ("the worker's Child SA limit", False),  # routed here by the worker's view
    ("terminate after a hand-over", False),  # the owner is alive: no view is stale
])
async def test_the_command_an_sa_was_loaded_for_waits_only_where_a_view_may_be_stale(
        mock_clock: trio.testing.MockClock, how: str, waits: bool) -> None:
    client, gateway = psk_pair()
    run_handshake(client, gateway)
    drain(gateway)
    ran: list[float] = []
    async with node_b_after_a_died(gateway, a_alive="hand-over" in how) as b:
        now = trio.current_time()
        b.persistence.load_then(sa_key(gateway.spi_i, gateway.spi_r),
                                lambda: ran.append(trio.current_time()),
                                routed="limit" in how)
        await trio.testing.wait_all_tasks_blocked()
        assert b.supervisor.actor_for(gateway.spi_r) is not None
        mock_clock.jump(TTL / 2)
        await trio.testing.wait_all_tasks_blocked()
        assert ran == [now + TTL / 2 if waits else now]


async def test_an_sa_whose_spi_leads_elsewhere_is_handed_over_with_our_request_in_flight(
        mock_clock: trio.testing.MockClock) -> None:
    """Rendezvous hashing gives the SA to another live responder (after an IKE rekey of
    ours, its SPI is new): the peer's answer to our request in flight is routed there, so
    the SA goes at once, request and all (the new owner sends it again), instead of
    waiting here for an answer that cannot come until the retransmissions run out."""
    client, gateway = psk_pair()
    run_handshake(client, gateway)
    drain(gateway)
    async with node_b_after_a_died(gateway, a_alive=True) as b:
        b.persistence.load_then(sa_key(gateway.spi_i, gateway.spi_r), lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        actor = b.supervisor.actor_for(gateway.spi_r)
        assert actor is not None
        actor.mailbox.put_nowait(lambda session, now: session.check_liveness(now))
        await trio.testing.wait_all_tasks_blocked()
        assert actor.session.sa.pending is not None  # (our liveness check is out)
        other = next(n for n in (f"C{i}" for i in range(100))
                     if choose(gateway.spi_i, ("B", n)) == n)
        b.persistence.responders = ("B", other)
        mock_clock.jump(TTL)  # (a node keeps an SA it took over for a lease TTL)
        b.persistence.hand_over()
        await trio.testing.wait_all_tasks_blocked()
        assert b.supervisor.actor_for(gateway.spi_r) is None
        assert b.persistence.stats.handovers == 1
