"""swanctl's `inactivity`: a Child SA that carried no packet either way for its timeout
is reported once (SaIdle, which has the responder delete it); traffic in either
direction keeps it. Real SADs and ESP, a stand-in TUN (as in test_dataplane_linger)."""

from __future__ import annotations

import trio
import trio.testing

from cluster.esp import SaIdle
from cluster.worker.dataplane import ACTIVITY_CHECK, IDLE_CHECK

from .test_dataplane_linger import IKE, NEW, OLD, Rig


async def test_an_idle_child_sa_is_reported_once_and_traffic_either_way_keeps_it(
        tun_pair: tuple[int, int], mock_clock: trio.testing.MockClock) -> None:
    rig = Rig(*tun_pair)
    events: list[object] = []
    rig.plane.on_esp_event = events.append
    rig.plane.watch_idle(OLD, 10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.plane._idle_watch)
        for _ in range(3):  # a packet in, then one out, 8 s apart: never 10 s idle
            mock_clock.jump(8.0)
            assert rig.deliver(rig.esp_on(rig.old))
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(IDLE_CHECK)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(8.0)
            rig.sent_on()
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(IDLE_CHECK)
            await trio.testing.wait_all_tasks_blocked()
        assert events == []
        for _ in range(12):  # then nothing for 12 s
            mock_clock.jump(IDLE_CHECK)
            await trio.testing.wait_all_tasks_blocked()
        assert len(events) == 1 and isinstance(events[0], SaIdle)
        assert events[0].spi_in == OLD and events[0].spi_out == rig.old.spi_out
        assert 10.0 <= events[0].seconds <= 10.0 + 2 * IDLE_CHECK
        for _ in range(20):
            mock_clock.jump(IDLE_CHECK)
            await trio.testing.wait_all_tasks_blocked()
        assert len(events) == 1  # once
        nursery.cancel_scope.cancel()


async def test_a_rekeyed_away_or_removed_sa_is_not_reported(
        tun_pair: tuple[int, int], mock_clock: trio.testing.MockClock) -> None:
    rig = Rig(*tun_pair)
    events: list[object] = []
    rig.plane.on_esp_event = events.append
    rig.plane.watch_idle(OLD, 2.0)
    rig.plane.replace(OLD, rig.new, IKE)
    rig.plane.delete(OLD)  # lingers: receives, sends nothing, no longer the one in use
    assert OLD in rig.plane.lingering
    mock_clock.jump(5.0)
    rig.plane.check_idle()
    rig.plane.watch_idle(NEW, 2.0)
    rig.plane.delete(NEW)  # gone for good
    mock_clock.jump(5.0)
    rig.plane.check_idle()
    assert events == []


async def test_a_restarted_worker_watches_and_reports_the_child_sas_it_restores(
        tun_pair: tuple[int, int]) -> None:
    """A worker that starts again installs its table's Child SAs: their inactivity
    timeout applies again, and its updown hook hears of each."""
    from dataclasses import replace

    from cluster.ike.events import ChildSaEstablished
    from cluster.runtime.persistence import seal_child
    from cluster.store.interface import PutChild
    from cluster.store.memory import MemoryStore
    from cluster.store.sealing import ClusterKey
    from cluster.worker.edge import KeySubscriber
    from cluster.worker.keys import Limits
    from tests.ike.sessions import drain, psk_pair, run_handshake

    client, gateway = psk_pair()
    run_handshake(client, gateway)
    (event,) = [e for e in drain(gateway) if isinstance(e, ChildSaEstablished)]
    event = replace(event, inactivity=30.0)
    assert event.connection == "rw" and event.remote_id == "client.example.test"
    store, key = MemoryStore(), ClusterKey(bytes(range(32)))
    await store.run(PutChild("w1", event.spi_in, seal_child(key, "w1", event)))
    rig = Rig(*tun_pair)
    keys = KeySubscriber(store, "w1", key, rig.plane, Limits())
    told: list[ChildSaEstablished] = []
    keys.on_install = told.append
    await keys.resync(restoring=True)
    assert rig.plane.sad.get(event.spi_in) is not None and told == [event]
    assert rig.plane._idle[event.spi_in][0] == 30.0


async def test_the_child_sas_that_received_esp_are_told_every_activity_check(
        tun_pair: tuple[int, int], mock_clock: trio.testing.MockClock) -> None:
    """What puts the IKE side's liveness checks off (RFC 7296 2.4): each sweep names the
    Child SAs whose inbound packet count changed since the last one, and only those
    (our own sending is no sign of the peer)."""
    rig = Rig(*tun_pair)
    told: list[list[bytes]] = []
    rig.plane.on_activity = told.append
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.plane._activity_watch)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.deliver(rig.esp_on(rig.old))
        mock_clock.jump(ACTIVITY_CHECK)
        await trio.testing.wait_all_tasks_blocked()
        assert told == [[OLD]]
        rig.sent_on()  # outbound only
        mock_clock.jump(ACTIVITY_CHECK)
        await trio.testing.wait_all_tasks_blocked()
        assert told == [[OLD]]
        assert rig.deliver(rig.esp_on(rig.old))
        mock_clock.jump(ACTIVITY_CHECK)
        await trio.testing.wait_all_tasks_blocked()
        assert told == [[OLD], [OLD]]
        nursery.cancel_scope.cancel()
