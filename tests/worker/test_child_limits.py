"""What a cluster worker asks of the responders when a Child SA reaches a limit in its
data plane: rekey it (soft), delete it (inactivity), or expire it (a hard limit or
exhausted sequence numbers, which removed it from the SAD already: the request must go
out all the same). Each is repeated a few times while it still matters. The relay and
data plane are stand-ins (the codec is tested in tests/unit/test_relay.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from cluster.esp import SaHardExpired, SaIdle, SaSequenceExhausted, SaSoftExpired
from cluster.relay import LIMIT_EXPIRED, LIMIT_HARD, LIMIT_SOFT, Kind, parse_child_limit
from cluster.worker.edge import ChildLimits

SPI_IN, SPI_OUT = b"\x0a\x00\x00\x01", b"\x0b\x00\x00\x01"
IKE = (b"i" * 8, b"r" * 8)


class Relay:
    def __init__(self) -> None:
        self.limits: list[tuple[bytes, int]] = []

    def request(self, spi_i: bytes, kind: Kind, data: bytes) -> None:
        assert kind is Kind.CHILD_LIMIT and spi_i == IKE[0]
        spi_i, spi_r, spi_in, limit = parse_child_limit(data)
        assert (spi_i, spi_r) == IKE
        self.limits.append((spi_in, limit))


class Sad:
    def __init__(self, present: bool) -> None:
        self.present = present

    def get(self, spi_in: bytes) -> object | None:
        return object() if self.present and spi_in == SPI_IN else None


class Plane:
    def __init__(self, present: bool) -> None:
        self.sad = Sad(present)
        self.ike: tuple[bytes, bytes] | None = IKE

    def ike_sa_of(self, spi_in: bytes) -> tuple[bytes, bytes] | None:
        return self.ike if spi_in == SPI_IN else None


@pytest.mark.parametrize(("event", "present", "limit"), [
    (SaSoftExpired(SPI_IN, SPI_OUT, "bytes"), True, LIMIT_SOFT),
    (SaIdle(SPI_IN, SPI_OUT, 60.0), True, LIMIT_HARD),
    (SaHardExpired(SPI_IN, SPI_OUT, "bytes"), False, LIMIT_EXPIRED),  # gone from the SAD
    (SaSequenceExhausted(SPI_IN, SPI_OUT), False, LIMIT_EXPIRED),
])
async def test_each_limit_is_asked_for_and_repeated_while_it_matters(
        mock_clock: trio.testing.MockClock, event: object, present: bool, limit: int) -> None:
    relay, plane = Relay(), Plane(present)
    limits = ChildLimits(relay, plane)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(limits.run)
        await trio.testing.wait_all_tasks_blocked()
        limits.on_esp_event(event)
        assert relay.limits == [(SPI_IN, limit)]
        mock_clock.jump(ChildLimits.RESEND_INTERVAL)
        await trio.testing.wait_all_tasks_blocked()
        assert relay.limits == [(SPI_IN, limit)] * 2  # its responder may have been loading
        # then it matters no more: the responder acted (the SA went, or its IKE SA)
        plane.sad.present = False
        plane.ike = None
        mock_clock.jump(ChildLimits.RESEND_INTERVAL)
        await trio.testing.wait_all_tasks_blocked()
        assert len(relay.limits) == 2
        nursery.cancel_scope.cancel()
