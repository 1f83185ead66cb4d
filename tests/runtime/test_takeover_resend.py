"""A node that takes over an SA with our request in flight sends it again: at once when
a worker routed the peer's datagram to it (the workers already see the dead owner gone),
half a TTL later when a command made it load the SA (a worker's view may still list the
dead owner, and the peer's answer would be relayed there). A real store, supervisor and
sessions; the dead owner's record is written as its persistence would have."""

from __future__ import annotations

import os

import trio
import trio.testing

from cluster.ike.events import TERMINATED
from cluster.ike.message import decode_untrusted
from cluster.ike.snapshot import SECRET_FIELDS, snapshot_of
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


async def _resent_after(by_datagram: bool, clock: trio.testing.MockClock) -> float:
    """Node A died with its Delete of the IKE SA in flight; node B takes the SA over: how
    long after that it sends the same Delete again."""
    client, gateway = psk_pair()
    run_handshake(client, gateway)
    drain(gateway)
    gateway.delete_ike(0.0, TERMINATED)
    (delete,) = gateway.datagrams_to_send()  # lost with node A
    store, key = MemoryStore(), ClusterKey(os.urandom(32))
    sa = sa_key(gateway.spi_i, gateway.spi_r)
    fence = await store.run(Acquire(sa, "A", TTL))
    assert fence is not None
    record = snapshot_of(gateway, 0.0)
    record["worker"] = ""
    await store.run(PutSa(sa, pack_snapshot(record, SECRET_FIELDS, key, sa), "A", fence))
    await store.run(Release(sa, "A", fence))  # (its lease ran out)
    writer = StoreWriter(store)
    sent: list[tuple[float, bytes]] = []
    supervisor = Supervisor(session_factory=lambda *a: None,  # type: ignore[arg-type,return-value]
                            send=lambda d: sent.append((trio.current_time(), d.data)),
                            event_sink=lambda e: None,
                            stats=RuntimeStats(), half_open_timeout=30.0)
    persistence = SaPersistence(writer, key, "B", gateway.sa.policy, supervisor,
                                lease_ttl=TTL, worker_of=lambda remote: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await nursery.start(supervisor.run)
        await nursery.start(persistence.run)
        now = trio.current_time()
        if by_datagram:  # the peer's liveness check, routed here by a worker
            assert client.check_liveness(1.0)
            (probe,) = client.datagrams_to_send()
            header = decode_untrusted(probe.data).header
            persistence.on_unknown_sa(header, probe.data, probe.remote, probe.local, now)
        else:  # an operator's terminate, arriving here
            persistence.load_then(sa, lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        assert supervisor.actor_for(gateway.spi_r) is not None  # (B holds the SA)
        while not any(data == delete.data for _, data in sent):
            clock.jump(0.1)
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return min(at for at, data in sent if data == delete.data) - now


async def test_brought_by_the_peers_datagram_the_request_goes_again_at_once(
        mock_clock: trio.testing.MockClock) -> None:
    assert await _resent_after(True, mock_clock) == 0.0


async def test_loaded_for_a_command_the_request_waits_for_the_workers_views(
        mock_clock: trio.testing.MockClock) -> None:
    assert TTL / 2 <= await _resent_after(False, mock_clock) < TTL / 2 + 0.2
