"""What a cluster worker tells the responders about ESP arriving: the Child SAs that
received some since the last sweep go to the responder of each one's IKE SA (by
rendezvous), ACTIVE_MAX to an envelope; those whose IKE SA it does not know, to none.
The relay and data plane are stand-ins (the codec is tested in tests/unit/test_relay.py;
the whole path with strongSwan in tests/interop/test_cluster.py)."""

from __future__ import annotations

from cluster.relay import ACTIVE_MAX, Kind, parse_child_active
from cluster.rendezvous import choose
from cluster.worker.edge import ActivityReports

RESPONDERS = ("responder-1", "responder-2")


class Relay:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Kind, list[bytes]]] = []

    def responder_for(self, spi_i: bytes) -> str:
        return choose(spi_i, RESPONDERS)

    def send_to(self, responder: str, kind: Kind, data: bytes) -> None:
        self.sent.append((responder, kind, parse_child_active(data)))


class Plane:
    def __init__(self, ike_of: dict[bytes, tuple[bytes, bytes]]) -> None:
        self.ike_of = ike_of

    def ike_sa_of(self, spi_in: bytes) -> tuple[bytes, bytes] | None:
        return self.ike_of.get(spi_in)


def test_active_child_sas_go_to_their_ike_sas_responders_in_envelopes_of_at_most_the_max(
) -> None:
    spis = [n.to_bytes(4, "big") for n in range(1, 3 * ACTIVE_MAX)]
    ike_of = {spi: (spi * 2, b"r" * 8) for spi in spis}
    relay = Relay()
    reports = ActivityReports(relay, Plane(ike_of))  # type: ignore[arg-type]
    reports.active([*spis, b"\xee\xee\xee\xee"])  # (the last: no IKE SA known here)
    told: dict[str, list[bytes]] = {}
    for responder, kind, batch in relay.sent:
        assert kind is Kind.CHILD_ACTIVE and 0 < len(batch) <= ACTIVE_MAX
        told.setdefault(responder, []).extend(batch)
    expected: dict[str, list[bytes]] = {}
    for spi in spis:
        expected.setdefault(choose(ike_of[spi][0], RESPONDERS), []).append(spi)
    assert told == expected and len(expected) == 2
    assert reports.sent == len(relay.sent) == sum(
        -(-len(v) // ACTIVE_MAX) for v in expected.values())
