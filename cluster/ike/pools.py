"""Virtual IP pools (swanctl's `pools`): inner addresses leased to peers by identity.

A peer that asks for an address in its IKE_AUTH request (a CFG_REQUEST, RFC 7296 2.19)
gets one from the pools of the connection it authenticated for. As in strongSwan's
in-memory pools, a lease belongs to the peer's identity: the same identity gets the
same address back, also while an older IKE SA of it still holds the address, and a
lease whose last IKE SA ended stays reserved for its identity ("offline") until the
pool has no address left that was never leased.

An `AddressPool` is the one mutable object the policy holds: its leases live as long
as the process. It is not shared between processes (one node only).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from .identity import Identity

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Lease:
    pool: AddressPool
    address: IPAddress


class AddressPool:
    """The addresses `first`..`last` (inclusive) and the attributes handed out with them."""

    def __init__(self, name: str, first: IPAddress, last: IPAddress,
                 dns: tuple[IPAddress, ...] = ()) -> None:
        if first.version != last.version or int(first) > int(last):
            raise ValueError(f"{first}-{last} is not an address range")
        self.name = name
        self.version = first.version
        self.first = first
        self.size = int(last) - int(first) + 1
        self.dns = dns
        self._unused = 0  # offsets below this were leased at some time
        self._by_identity: dict[Identity, int] = {}  # identity -> its offset
        self._owner: dict[int, Identity] = {}  # offset -> the identity it is leased to
        self._online: dict[int, int] = {}  # offset -> IKE SAs holding it
        self._offline: OrderedDict[int, None] = OrderedDict()  # released, oldest first

    @classmethod
    def parse(cls, name: str, text: str, dns: tuple[str, ...] = ()) -> AddressPool:
        """`10.3.0.0/24` (without its network and broadcast address, as strongSwan),
        `10.3.0.10-10.3.0.99`, or one address."""
        servers = tuple(ipaddress.ip_address(d) for d in dns)
        if "-" in text:
            low, _, high = text.partition("-")
            return cls(name, ipaddress.ip_address(low.strip()), ipaddress.ip_address(high.strip()),
                       servers)
        net = ipaddress.ip_network(text.strip(), strict=False)
        first, last = net.network_address, net.broadcast_address
        if net.num_addresses > 2:
            first, last = first + 1, last - 1
        return cls(name, first, last, servers)

    def __repr__(self) -> str:
        return f"AddressPool({self.name!r}, {self.first}+{self.size})"

    @property
    def online(self) -> int:
        return len(self._online)

    @property
    def offline(self) -> int:
        return len(self._offline)

    def _address(self, offset: int) -> IPAddress:
        return ipaddress.ip_address(int(self.first) + offset)

    def acquire(self, identity: Identity) -> Lease | None:
        """An address for `identity`: its own lease, a never used one, or the oldest
        offline lease of another identity; None when every address is online."""
        offset = self._by_identity.get(identity)
        if offset is None:
            if self._unused < self.size:
                offset = self._unused
                self._unused += 1
            elif self._offline:
                offset, _ = self._offline.popitem(last=False)
                del self._by_identity[self._owner[offset]]
            else:
                return None
            self._by_identity[identity] = offset
            self._owner[offset] = identity
        self._offline.pop(offset, None)
        self._online[offset] = self._online.get(offset, 0) + 1
        return Lease(self, self._address(offset))

    def release(self, lease: Lease) -> None:
        """One IKE SA holding `lease` ended; the last one takes the address offline."""
        offset = int(lease.address) - int(self.first)
        held = self._online.get(offset, 0)
        if held > 1:
            self._online[offset] = held - 1
        elif held == 1:
            del self._online[offset]
            self._offline[offset] = None

    def lease_of(self, identity: Identity) -> IPAddress | None:
        offset = self._by_identity.get(identity)
        return None if offset is None else self._address(offset)
