"""Per-SA and per-SAD counters as plain integers, and the one drop exception.

The hot path does `counters.packets_in += 1`; the metrics layer reads them
periodically. Every dropped packet increments exactly one counter, and `EspDrop.reason`
is that counter's name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ParseError


class EspDrop(ParseError):
    """A packet was dropped (and already counted); `reason` is the counter's name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class SaCounters:
    packets_in: int = 0
    bytes_in: int = 0  # inner packet bytes delivered
    packets_out: int = 0
    bytes_out: int = 0  # inner packet bytes protected
    replay_drops: int = 0  # duplicate or older than the window
    integrity_failures: int = 0  # ICV / AEAD tag did not verify
    pad_errors: int = 0  # pad length too large or padding bytes not 1, 2, 3...
    dummy_drops: int = 0  # next header 59 (RFC 4303 2.6), dropped on purpose
    policy_drops: int = 0  # inner packet outside the SA's selectors, or not protectable
    malformed_drops: int = 0  # too short, misaligned, bad inner header
    seq_exhausted_drops: int = 0  # outbound refused: the sequence number would wrap
    expired_drops: int = 0  # the SA was removed while a caller still held it
    ecn_drops: int = 0  # CE on the outer header, Not-ECT inside (RFC 6040 4.2)

    def traffic(self) -> tuple[int, int, int, int]:
        """(bytes in, bytes out, packets in, packets out): what RADIUS accounting reports."""
        return self.bytes_in, self.bytes_out, self.packets_in, self.packets_out

    def add(self, other: SaCounters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class SadCounters:
    no_sa_in: int = 0  # ESP with an SPI we do not know
    no_sa_out: int = 0  # a packet from the TUN that no SA covers: never sent in the clear
    malformed_in: int = 0  # too short to carry an SPI and a sequence number
    malformed_out: int = 0  # not a parsable IPv4/IPv6 packet

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
