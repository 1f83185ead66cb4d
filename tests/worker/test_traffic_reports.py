"""What a cluster worker tells the responders for RADIUS accounting: each Child SA's
traffic as it leaves the SAD for good (CHILD_TRAFFIC: a delete, the end of a rekeyed
SA's linger, its hard lifetime), and every USAGE_INTERVAL what the Child SAs still
there carried so far when it changed (CHILD_USAGE). Real SADs and ESP, the relay
replaced by a recorder (its codec is tested in tests/unit/test_relay.py)."""

from __future__ import annotations

from dataclasses import replace

import trio
import trio.testing

from cluster.ike.events import ChildSaDeleted
from cluster.relay import Kind, parse_child_traffic
from cluster.worker.dataplane import REKEYED_LINGER
from cluster.worker.edge import TrafficReports
from tests.esp.pairs import mirror

from .test_dataplane_linger import IKE, NEW, OLD, Rig, ours, run_timer


class Requests:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, Kind, tuple[bytes, bytes, bytes, tuple[int, ...]]]] = []

    def request(self, spi_i: bytes, kind: Kind, data: bytes) -> None:
        self.calls.append((spi_i, kind, parse_child_traffic(data)))


async def test_usage_is_told_while_it_changes_and_the_removal_with_the_total(
        tun_pair: tuple[int, int], mock_clock: trio.testing.MockClock) -> None:
    rig = Rig(*tun_pair)
    relay = Requests()
    reports = TrafficReports(relay, rig.plane)  # type: ignore[arg-type]
    rig.plane.on_removed = reports.removed
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reports.run)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(TrafficReports.USAGE_INTERVAL)
        await trio.testing.wait_all_tasks_blocked()
        assert relay.calls == []  # nothing carried yet: nothing to tell
        assert rig.deliver(rig.esp_on(rig.old))
        rig.sent_on()
        mock_clock.jump(TrafficReports.USAGE_INTERVAL)
        await trio.testing.wait_all_tasks_blocked()
        [(spi_i, kind, (_, spi_r, spi_in, traffic))] = relay.calls
        assert (spi_i, spi_r, spi_in, kind) == (IKE[0], IKE[1], OLD, Kind.CHILD_USAGE)
        assert traffic[2:] == (1, 1) and traffic[0] > 0 and traffic[1] > 0
        mock_clock.jump(TrafficReports.USAGE_INTERVAL)
        await trio.testing.wait_all_tasks_blocked()
        assert len(relay.calls) == 1  # unchanged: not told again
        assert rig.deliver(rig.esp_on(rig.old))
        rig.plane.on_ike_event(ChildSaDeleted(*IKE, "net", OLD, rig.old.spi_out, "deleted"))
        assert rig.plane.sad.get(OLD) is None
        assert relay.calls[-1][1] is Kind.CHILD_TRAFFIC
        assert relay.calls[-1][2][3][2:] == (2, 1)
        nursery.cancel_scope.cancel()
    assert len(relay.calls) == 2


async def test_a_rekeyed_sa_is_told_when_its_linger_ends_with_what_came_late(
        tun_pair: tuple[int, int], mock_clock: trio.testing.MockClock) -> None:
    rig = Rig(*tun_pair)
    relay = Requests()
    rig.plane.on_removed = TrafficReports(relay, rig.plane).removed  # type: ignore[arg-type]
    late = rig.esp_on(rig.old)  # the peer sent it before it switched to the new SA
    rig.plane.replace(OLD, rig.new, IKE)
    async with trio.open_nursery() as nursery:
        await run_timer(rig.plane, nursery)
        rig.plane.on_ike_event(ChildSaDeleted(*IKE, "net", OLD, rig.old.spi_out, "rekeyed"))
        assert relay.calls == []  # it lingers: not yet
        assert rig.deliver(late)
        mock_clock.jump(REKEYED_LINGER + 0.1)
        await trio.testing.wait_all_tasks_blocked()
        [(_, kind, (_, _, spi_in, traffic))] = relay.calls
        assert (kind, spi_in, traffic[2]) == (Kind.CHILD_TRAFFIC, OLD, 1)
        nursery.cancel_scope.cancel()


def test_an_sa_its_hard_lifetime_removed_is_told_in_full(tun_pair: tuple[int, int]) -> None:
    rig = Rig(*tun_pair)
    relay = Requests()
    rig.plane.on_removed = TrafficReports(relay, rig.plane).removed  # type: ignore[arg-type]
    limited = replace(ours(NEW), hard_packets=3)
    rig.plane.install(limited, IKE)
    rig.peer.install(mirror(limited))
    for _ in range(2):
        assert rig.deliver(rig.esp_on(limited))
    assert relay.calls == []
    rig.deliver(rig.esp_on(limited))  # the third packet reaches the hard limit
    assert rig.plane.sad.get(NEW) is None
    [(spi_i, kind, (_, spi_r, spi_in, traffic))] = relay.calls
    assert (spi_i, spi_r, kind, spi_in) == (IKE[0], IKE[1], Kind.CHILD_TRAFFIC, NEW)
    assert traffic[1:] == (0, 3, 0) and traffic[0] > 0  # all three, the last one too
