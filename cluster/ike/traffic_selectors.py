"""Traffic selectors (RFC 7296 2.9, 3.13.1) and the responder's narrowing."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from .constants import TsType

_PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmp6": 58, "sctp": 132}


@dataclass(frozen=True, slots=True)
class TrafficSelector:
    """An address range, a port range and an IP protocol (0 = any)."""

    ts_type: TsType
    protocol: int
    start_port: int
    end_port: int
    start_addr: bytes
    end_addr: bytes

    @classmethod
    def from_network(cls, network: str, protocol: int = 0,
                     start_port: int = 0, end_port: int = 65535) -> TrafficSelector:
        net = ipaddress.ip_network(network, strict=False)
        ts_type = TsType.IPV4_ADDR_RANGE if net.version == 4 else TsType.IPV6_ADDR_RANGE
        return cls(ts_type, protocol, start_port, end_port,
                   net.network_address.packed, net.broadcast_address.packed)

    @classmethod
    def for_host(cls, address: str) -> TrafficSelector:
        return cls.from_network(address)

    def __str__(self) -> str:
        start = ipaddress.ip_address(self.start_addr)
        end = ipaddress.ip_address(self.end_addr)
        nets = list(ipaddress.summarize_address_range(start, end))
        text = str(nets[0]) if len(nets) == 1 else f"{start}..{end}"
        if self.protocol or (self.start_port, self.end_port) != (0, 65535):
            ports = ("" if (self.start_port, self.end_port) == (0, 65535)
                     else str(self.start_port) if self.start_port == self.end_port
                     else f"{self.start_port}-{self.end_port}")
            text += f"[{self.protocol}/{ports}]"
        return text

    def intersect(self, other: TrafficSelector) -> TrafficSelector | None:
        if self.ts_type != other.ts_type:
            return None
        if self.protocol and other.protocol and self.protocol != other.protocol:
            return None
        start_addr = max(self.start_addr, other.start_addr)
        end_addr = min(self.end_addr, other.end_addr)
        start_port = max(self.start_port, other.start_port)
        end_port = min(self.end_port, other.end_port)
        if start_addr > end_addr or start_port > end_port:
            return None
        return TrafficSelector(self.ts_type, self.protocol or other.protocol,
                               start_port, end_port, start_addr, end_addr)

    def is_host(self) -> bool:
        return self.start_addr == self.end_addr


@dataclass(frozen=True, slots=True)
class TsConfig:
    """A configured selector; `dynamic` stands for the SA's own address on that side."""

    selector: TrafficSelector | None  # None: dynamic
    protocol: int = 0
    start_port: int = 0
    end_port: int = 65535

    def resolve(self, address: str) -> TrafficSelector:
        if self.selector is not None:
            return self.selector
        return TrafficSelector.from_network(address, self.protocol, self.start_port, self.end_port)


def parse_ts_config(text: str) -> TsConfig:
    """`10.1.0.0/16`, `fd00::1`, `dynamic`, optionally followed by `[proto/port]`."""
    protocol, start_port, end_port = 0, 0, 65535
    base = text.strip()
    if "[" in base:
        if not base.endswith("]"):
            raise ValueError(f"bad selector '{text}'")
        base, spec = base[:-1].split("[", 1)
        proto_text, _, port_text = spec.partition("/")
        if proto_text and proto_text != "any":
            if proto_text.isdigit():
                protocol = int(proto_text)
            elif proto_text in _PROTOCOLS:
                protocol = _PROTOCOLS[proto_text]
            else:
                raise ValueError(f"unknown protocol '{proto_text}'")
        if port_text and port_text != "any":
            lo, _, hi = port_text.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"bad port range '{port_text}'")
            start_port, end_port = int(lo), int(hi or lo)
            if not 0 <= start_port <= end_port <= 65535:
                raise ValueError(f"bad port range '{port_text}'")
    if not 0 <= protocol <= 255:
        raise ValueError(f"bad protocol {protocol}")
    if base == "dynamic":
        return TsConfig(None, protocol, start_port, end_port)
    try:
        selector = TrafficSelector.from_network(base, protocol, start_port, end_port)
    except ValueError:
        raise ValueError(f"'{base}' is not an address or network") from None
    return TsConfig(selector, protocol, start_port, end_port)


def narrow(proposed: Sequence[TrafficSelector],
           allowed: Sequence[TrafficSelector]) -> tuple[TrafficSelector, ...]:
    """RFC 7296 2.9: the responder narrows to the intersection with its policy.

    The initiator's first selector may be the specific packet that triggered the
    request; intersecting every proposed selector keeps it when it fits.
    """
    out: list[TrafficSelector] = []
    for p in proposed:
        for a in allowed:
            common = p.intersect(a)
            if common is not None and common not in out:
                out.append(common)
    return tuple(out)
