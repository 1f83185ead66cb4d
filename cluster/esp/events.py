"""What the SAD tells its runtime, as small frozen dataclasses (drained with Sad.next_event)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SaSoftExpired:
    """A soft lifetime was reached: rekey this Child SA. Emitted once per SA.

    `reason` names the limit: "bytes_in", "bytes_out", "packets_in", "packets_out", or
    "sequence" when the outbound sequence number nears its end.
    """

    spi_in: bytes
    spi_out: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class SaHardExpired:
    """A hard lifetime was reached; the SA is already gone from the SAD."""

    spi_in: bytes
    spi_out: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class SaSequenceExhausted:
    """The outbound sequence number would wrap (RFC 4303 3.3.3): nothing more is sent
    on this SA. Inbound keeps working until the SA is replaced or removed."""

    spi_in: bytes
    spi_out: bytes


@dataclass(frozen=True, slots=True)
class SaIdle:
    """No packet either way for the Child SA's inactivity timeout (swanctl's
    `inactivity`): delete it. Emitted once per SA, by the data plane's runtime."""

    spi_in: bytes
    spi_out: bytes
    seconds: float


EspEvent = SaSoftExpired | SaHardExpired | SaSequenceExhausted | SaIdle
