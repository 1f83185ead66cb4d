"""Traffic selectors as the data plane matches them (RFC 4301 4.4.1, RFC 7296 2.9).

A Child SA covers a packet when its source falls in one of the local selectors and its
destination in one of the remote selectors (outbound; the reverse inbound). IKEv2
selector sets combine as a cross product, so the two sides are checked independently.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .ip import NO_PORTS


@dataclass(frozen=True, slots=True)
class Selector:
    """An address range, an IP protocol (0 = any) and a port range.

    Ports `0..65535` match anything, including packets without ports. A range with
    start > end (IKEv2's 65535..0) is OPAQUE: it matches only packets without ports.
    For ICMP the "port" is type << 8 | code (RFC 7296 3.13.1).
    """

    version: int  # 4 or 6
    start: bytes  # packed address
    end: bytes
    protocol: int = 0
    start_port: int = 0
    end_port: int = 65535

    def __post_init__(self) -> None:
        size = {4: 4, 6: 16}.get(self.version)
        if size is None or len(self.start) != size or len(self.end) != size:
            raise ValueError(f"selector addresses do not fit IPv{self.version}")
        if self.start > self.end:
            raise ValueError("selector start address is above its end address")
        if not 0 <= self.protocol <= 255:
            raise ValueError("selector protocol out of range")
        if not (0 <= self.start_port <= 65535 and 0 <= self.end_port <= 65535):
            raise ValueError("selector port out of range")

    @classmethod
    def from_network(cls, network: str, protocol: int = 0, start_port: int = 0,
                     end_port: int = 65535) -> Selector:
        net = ipaddress.ip_network(network, strict=False)
        return cls(net.version, net.network_address.packed, net.broadcast_address.packed,
                   protocol, start_port, end_port)

    @classmethod
    def from_range(cls, start: bytes, end: bytes, protocol: int = 0, start_port: int = 0,
                   end_port: int = 65535) -> Selector:
        """From packed addresses, e.g. an IKEv2 TrafficSelector's start_addr/end_addr."""
        return cls(4 if len(start) == 4 else 6, start, end, protocol, start_port, end_port)

    def with_address(self, address: bytes) -> Selector:
        """The same protocol and ports on one host (transport mode behind a NAT)."""
        return Selector.from_range(address, address, self.protocol, self.start_port,
                                   self.end_port)

    @property
    def is_host(self) -> bool:
        return self.start == self.end

    def covers(self, version: int, address: bytes, protocol: int, port: int) -> bool:
        return _covers(_compile(self), version, address, protocol, port)


# (version, start, end, protocol, port low, port high, any port, opaque only)
_Compiled = tuple[int, bytes, bytes, int, int, int, bool, bool]


def _compile(sel: Selector) -> _Compiled:
    any_port = sel.start_port == 0 and sel.end_port == 65535
    opaque = sel.start_port > sel.end_port
    return (sel.version, sel.start, sel.end, sel.protocol, sel.start_port, sel.end_port,
            any_port, opaque)


def _covers(c: _Compiled, version: int, address: bytes, protocol: int, port: int) -> bool:
    ver, start, end, proto, low, high, any_port, opaque = c
    if ver != version or not start <= address <= end:
        return False
    if proto and proto != protocol:
        return False
    if any_port:
        return True
    if opaque:
        return port == NO_PORTS
    return low <= port <= high


class SelectorSet:
    """Selectors of one side of an SA, precompiled for the per-packet check.

    When no selector restricts protocol or ports (the usual subnet-to-subnet SA),
    `address_only` is true and `covers_address` is all a packet needs: the caller can
    skip parsing the upper-layer header.
    """

    __slots__ = ("_compiled", "address_only", "ranges", "selectors")

    def __init__(self, selectors: Iterable[Selector]) -> None:
        self.selectors = tuple(selectors)
        self._compiled = tuple(_compile(s) for s in self.selectors)
        self.ranges = tuple((s.start, s.end) for s in self.selectors)
        self.address_only = all(s.protocol == 0 and (s.start_port, s.end_port) == (0, 65535)
                                for s in self.selectors)

    def covers_address(self, address: bytes) -> bool:
        """Whether an address (4 or 16 bytes) is in one of the ranges, ignoring the rest."""
        for start, end in self.ranges:
            if start <= address <= end and len(start) == len(address):
                return True
        return False

    def covers(self, version: int, address: bytes, protocol: int, port: int) -> bool:
        for ver, start, end, proto, low, high, any_port, opaque in self._compiled:
            if ver != version or not start <= address <= end:
                continue
            if proto and proto != protocol:
                continue
            if any_port or (port == NO_PORTS if opaque else low <= port <= high):
                return True
        return False

    def hosts(self) -> tuple[bytes, ...] | None:
        """The single-host addresses when every selector is one host, else None."""
        if not self.selectors or False in [s.is_host for s in self.selectors]:
            return None
        return tuple(dict.fromkeys([s.start for s in self.selectors]))
