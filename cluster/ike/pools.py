"""Virtual IP pools (swanctl's `pools`): inner addresses leased to peers by identity.

A peer that asks for an address in its IKE_AUTH request (a CFG_REQUEST, RFC 7296 2.19)
gets one from the pools of the connection it authenticated for. As in strongSwan's
in-memory pools, a lease belongs to the peer's identity: the same identity gets the
same address back, also while an older IKE SA of it still holds the address, and a
lease whose last IKE SA ended stays reserved for its identity ("offline") until the
pool has no address left that was never leased.

An `AddressPool` is the one mutable object the policy holds: its leases live as long
as the process. A cluster's responders use `SharedPool`s instead, whose addresses the
shared store hands out (see its docstring).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .identity import Identity
from .pending import Pending

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Lease:
    pool: AddressPool
    address: IPAddress
    holder: bytes = b""  # a shared pool's: the IKE SA's first SPIs, kept through rekeys


class AddressPending(Pending):
    """A shared pool has not fetched an address for this IKE SA yet: the exchange waits
    for `SharedPool.fetch` (the session parks it) and then runs again."""

    def __init__(self, pools: tuple[SharedPool, ...], holder: bytes, identity: Identity
                 ) -> None:
        super().__init__(f"waiting for an address from {', '.join(p.name for p in pools)}")
        self.pools = pools
        self.holder = holder
        self.identity = identity

    async def fetch(self) -> None:
        for pool in self.pools:
            await pool.fetch(self.holder, self.identity)


class AddressPool:
    """The addresses `first`..`last` (inclusive) and the attributes handed out with them."""

    shared = False  # leases live in this process only

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

    def acquire(self, identity: Identity, holder: bytes = b"") -> Lease | None:
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

    def adopt(self, lease: Lease) -> None:
        """A lease an SA brings along from another process (shared pools only)."""

    def lease_of(self, identity: Identity) -> IPAddress | None:
        offset = self._by_identity.get(identity)
        return None if offset is None else self._address(offset)

    def offer(self, version: int, identity: Identity, holder: bytes,
              framed: tuple[IPAddress, ...]) -> Lease | None:
        """An address of IP `version` for a peer that asked for one (`framed`: what a
        RADIUS server assigned it, which only FramedPool hands out)."""
        return self.acquire(identity, holder) if version == self.version else None

    def offset_of(self, address: IPAddress) -> int:
        """Where `address` lies in the pool (snapshots keep leases so)."""
        return int(address) - int(self.first)

    def address_at(self, offset: int, text: str) -> IPAddress:
        """The address of a lease a snapshot kept (`text`: as it was written)."""
        return self._address(int(offset))


class SharedPool(AddressPool):
    """A pool whose addresses the cluster's store hands out.

    The sans-IO session cannot wait for the store, so `acquire` answers only for an IKE
    SA whose address `fetch` (awaited by its actor) already claimed; otherwise it raises
    AddressPending and the session parks the exchange. Every address is held in the
    store for a time the SA's snapshot writes renew, so an owner's death frees its
    addresses once its SAs' records expire, and a survivor that takes an SA over keeps
    its address. `release` queues the store's free (the responder role sends them). As
    in one process, an identity gets its last address again when nobody else holds it,
    and SAs of one identity share it.
    """

    shared = True

    def __init__(self, pool: AddressPool, claim: Claim, hold_time: float) -> None:
        super().__init__(pool.name, pool.first, pool._address(pool.size - 1), pool.dns)
        self._claim = claim
        self.hold_time = hold_time
        self._fetched: dict[bytes, int | None] = {}  # holder -> offset, None: none left
        self.to_free: list[tuple[int, bytes]] = []
        self._held: dict[bytes, int] = {}  # what this process holds (for the gauges)

    @property
    def online(self) -> int:
        return len(self._held)

    @property
    def offline(self) -> int:
        return 0

    def acquire(self, identity: Identity, holder: bytes = b"") -> Lease | None:
        if holder in self._held:  # an exchange that waited runs again
            return Lease(self, self._address(self._held[holder]), holder)
        if holder not in self._fetched:
            raise AddressPending((self,), holder, identity)
        offset = self._fetched.pop(holder)
        if offset is None:
            return None
        self._held[holder] = offset
        return Lease(self, self._address(offset), holder)

    async def fetch(self, holder: bytes, identity: Identity) -> bool:
        """Claim an address for `holder` in the store, `identity`'s last one if it is
        free or held by its own SAs only; False when none is left (`claim` also answers
        None when the store cannot be asked: the peer is then told
        INTERNAL_ADDRESS_FAILURE)."""
        key = bytes((identity.id_type,)) + identity.data
        offset = await self._claim(self.name, self.size, holder, key, self.hold_time)
        self._fetched[holder] = offset
        return offset is not None

    def adopt(self, lease: Lease) -> None:
        """The lease of an SA taken over from another node (its snapshot had it)."""
        self._held[lease.holder] = int(lease.address) - int(self.first)

    def release(self, lease: Lease) -> None:
        offset = self._held.pop(lease.holder, None)
        if offset is not None:
            self.to_free.append((offset, lease.holder))


class FramedPool(AddressPool):
    """`pools = ["radius", ...]` on an eap-radius connection (strongSwan's name for it):
    the address the RADIUS server's Access-Accept assigned the user (Framed-IP-Address,
    Framed-IPv6-Address of RFC 6911), when it gave one of the family asked for. The
    server owns that address plan: nothing is reserved here, the pool only counts the
    addresses its SAs hold. One object serves every connection of a configuration."""

    NAME = "radius"

    def __init__(self) -> None:
        super().__init__(self.NAME, ipaddress.IPv4Address(0), ipaddress.IPv4Address(0))
        self.size = 0
        self._held: dict[tuple[bytes, IPAddress], int] = {}

    def __repr__(self) -> str:
        return "FramedPool()"

    @property
    def online(self) -> int:
        return len(self._held)

    def offer(self, version: int, identity: Identity, holder: bytes,
              framed: tuple[IPAddress, ...]) -> Lease | None:
        address = next((a for a in framed if a.version == version), None)
        if address is None:
            return None
        lease = Lease(self, address, holder)
        self.adopt(lease)
        return lease

    def offset_of(self, address: IPAddress) -> int:
        return 0  # (the address is kept as written: IPv6 would not fit msgpack's ints)

    def address_at(self, offset: int, text: str) -> IPAddress:
        return ipaddress.ip_address(text)

    def adopt(self, lease: Lease) -> None:
        key = (lease.holder, lease.address)
        self._held[key] = self._held.get(key, 0) + 1

    def release(self, lease: Lease) -> None:
        key = (lease.holder, lease.address)
        held = self._held.pop(key, 0)
        if held > 1:
            self._held[key] = held - 1


# (pool, size, holder, identity, hold time) -> offset or None
Claim = Callable[[str, int, bytes, bytes, float], Awaitable["int | None"]]
