"""What a cluster worker tells the responders for RADIUS accounting: each Child SA's
traffic as it is removed (CHILD_TRAFFIC), and every USAGE_INTERVAL what the Child SAs
still up carried so far when it changed (CHILD_USAGE). Real SADs and ESP, the relay
replaced by a recorder (its codec is tested in tests/unit/test_relay.py)."""

from __future__ import annotations

import trio
import trio.testing

from cluster.relay import Kind, parse_child_traffic
from cluster.worker.edge import TrafficReports

from .test_dataplane_linger import IKE, OLD, Rig


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
        reports.removed(OLD)
        assert relay.calls[-1][1] is Kind.CHILD_TRAFFIC
        assert relay.calls[-1][2][3][2:] == (2, 1)
        nursery.cancel_scope.cancel()
