"""The install request for one Child SA: everything the data plane needs, nothing IKE-specific.

The worker translates `cluster.ike.events.ChildSaEstablished` into this (and the
cluster's key distribution carries it to other nodes), so `esp` never imports `ike`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..transforms import EncrAlgorithm, IntegAlgorithm
from .selector import Selector

Address = tuple[str, int]  # (IP address text, UDP port; the port matters with encap only)


@dataclass(frozen=True, slots=True)
class ChildSaParams:
    spi_in: bytes  # ours: the peer sends with it
    spi_out: bytes  # the peer's: we send with it
    encr: EncrAlgorithm
    integ: IntegAlgorithm | None  # None with AEAD algorithms
    esn: bool
    encr_key_in: bytes = field(repr=False)  # key | salt for AEAD (RFC 4106 8.1, RFC 7634 2)
    integ_key_in: bytes = field(repr=False)
    encr_key_out: bytes = field(repr=False)
    integ_key_out: bytes = field(repr=False)
    mode: str = "tunnel"  # or "transport"
    local: Address = ("", 0)
    remote: Address = ("", 0)
    encap: bool = False  # ESP in UDP (RFC 3948)
    # the outer header takes each packet's DSCP (RFC 4301 5.1.2.1; swanctl's
    # copy_dscp = out, its default), or keeps 0 (copy_dscp = no)
    copy_dscp: bool = True
    # tunnel mode: the ECN field goes on the outer header, and a CE mark on a received
    # one into the packet (RFC 6040 normal mode; swanctl's copy_ecn = yes, its default)
    copy_ecn: bool = True
    # tunnel mode: each packet padded with zeros to at least this many bytes before it is
    # encrypted (RFC 4303 2.7 TFC padding; swanctl's tfc_padding); 0: none
    tfc_padding: int = 0
    local_ts: tuple[Selector, ...] = ()
    remote_ts: tuple[Selector, ...] = ()
    replay_window: int = 1024
    # lifetimes per direction (RFC 4301 4.4.2.1); None = unlimited
    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_packets: int | None = None
    hard_packets: int | None = None
    # the first packet goes out with initial_seq + 1; a restarted worker jumps ahead
    initial_seq: int = 0
