"""The TUN device: layer-3 packets between the kernel and the worker, no packet-info header.

`TunDevice.open` creates (or attaches to) the device with `TUNSETIFF` and configures it
through netlink (pyroute2), never by running `ip`. Each queue is one non-blocking fd.

How the pumps read it: an awaited call per packet costs about 9.5 us, waiting for
readiness once and then draining costs 1.8 us (notes/building-blocks.md), so::

    while True:
        await trio.lowlevel.wait_readable(fd)
        for packet in tun.drain(fd, BATCH):
            ...

`read_batch` is that wait plus one drain. Only one task may wait on a given fd at a
time (Trio raises BusyResourceError otherwise): give every queue its own task, or
its own process with `multi_queue=True` (one process per core).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from types import TracebackType

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import IoCounters
from .gro import GSO_NONE, PLAIN, VNET_HDR, VNET_HDR_SIZE, VNET_NEEDS_CSUM

logger = logging.getLogger(__name__)

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
# struct ifreq: 16-byte name, then a union whose first member we use is the short flags.
_IFREQ = struct.Struct("16sH22x")
IFNAMSIZ = 16
IFA_F_NODAD = 0x02  # <linux/if_addr.h>
IN6_ADDR_GEN_MODE_NONE = 1  # <linux/if_link.h>

# Without IFF_VNET_HDR a read returns one packet of at most the MTU; reading with a
# larger buffer costs the same (measured) and survives an MTU raised behind our back.
READ_SIZE = 65535
# Packets the kernel queues for us to read before it drops (the TUN's ring; the
# kernel's default is 500). TCP through the TUN backs off at every drop; a burst
# while the worker is busy elsewhere should wait instead. 1000 packets of 1400 bytes
# are about 11 ms at 1 Gbit/s.
TXQUEUELEN = 1000
# Packets handled per drain before the caller yields, so one busy queue cannot
# starve the other tasks.
DEFAULT_BATCH = 64


def _attach_queue(name: str, flags: int) -> tuple[int, str]:
    """Open /dev/net/tun and bind it to interface `name`; returns (fd, kernel's name)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        reply = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, f"cannot open TUN device {name!r}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    # The kernel fills in the final name (a "%d" template becomes a number).
    return fd, _IFREQ.unpack(reply)[0].rstrip(b"\0").decode()


class TunDevice:
    """An open TUN device with one fd per queue. Close it (or use `with`) to remove the link."""

    def __init__(
        self,
        name: str,
        ifindex: int,
        fds: list[int],
        mtu: int,
        created: bool,
        ipr: IPRoute,
        counters: IoCounters,
        vnet_hdr: bool = False,
    ) -> None:
        self.name = name
        self.ifindex = ifindex
        self.fds = fds
        self.mtu = mtu
        # False when another process made the link and we attached queues to it:
        # then closing detaches our queues and leaves the link to its owner.
        self.created = created
        self.counters = counters
        # every read and write starts with a virtio-net header (see gro.py)
        self.vnet_hdr = vnet_hdr
        self._ipr = ipr
        self._closed = False

    @classmethod
    def open(
        cls,
        name: str,
        *,
        queues: int = 1,
        mtu: int = 1400,
        multi_queue: bool | None = None,
        counters: IoCounters | None = None,
        vnet_hdr: bool = False,
        txqueuelen: int = TXQUEUELEN,
    ) -> TunDevice:
        """Create the TUN `name` (or attach to it), set its MTU and bring it up.

        `multi_queue` defaults to `queues > 1`; set it for a single queue that other
        processes will attach to (they must open with the same flags). `vnet_hdr`
        lets `write_buffer` hand the kernel coalesced TCP (gro.py); `drain` and
        `write` still deal in plain packets. No offloads are enabled for reading,
        so the kernel segments and checksums what it routes into the TUN.
        """
        if not 1 <= len(name.encode()) < IFNAMSIZ:
            raise ValueError(f"TUN name must be 1-{IFNAMSIZ - 1} bytes: {name!r}")
        if queues < 1:
            raise ValueError(f"queues must be at least 1, not {queues}")
        if multi_queue is None:
            multi_queue = queues > 1
        if queues > 1 and not multi_queue:
            raise ValueError("more than one queue needs multi_queue")
        flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
        if vnet_hdr:
            flags |= IFF_VNET_HDR

        existed = _link_exists(name)
        fds: list[int] = []
        ipr: IPRoute | None = None
        try:
            fd, name = _attach_queue(name, flags)
            fds.append(fd)
            for _ in range(queues - 1):
                fds.append(_attach_queue(name, flags)[0])
            ifindex = socket.if_nametoindex(name)
            ipr = IPRoute()
            _quiet_ipv6(ipr, ifindex)
            ipr.link("set", index=ifindex, mtu=mtu, txqlen=txqueuelen, state="up")
        except BaseException:
            for fd in fds:
                os.close(fd)
            if ipr is not None:
                ipr.close()
            raise
        logger.debug("TUN %s (ifindex %d) up, %d queue(s), mtu %d", name, ifindex, queues, mtu)
        return cls(
            name, ifindex, fds, mtu, not existed, ipr,
            counters if counters is not None else IoCounters(), vnet_hdr,
        )

    def add_address(self, interface: str) -> None:
        """Add an address with prefix, e.g. "10.99.2.1/32"; already present is fine.

        IPv6 addresses skip duplicate address detection so they can be used at once.
        """
        iface = ipaddress.ip_interface(interface)
        options: dict[str, int] = {}
        if iface.version == 6:
            options["flags"] = IFA_F_NODAD
        try:
            self._ipr.addr(
                "add",
                index=self.ifindex,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                **options,
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise OSError(exc.code, f"cannot add {interface} to {self.name}: {exc}") from None

    def remove_address(self, interface: str) -> None:
        """Remove an address added with `add_address`; already gone is fine."""
        iface = ipaddress.ip_interface(interface)
        try:
            self._ipr.addr("del", index=self.ifindex, address=str(iface.ip),
                           prefixlen=iface.network.prefixlen)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                raise OSError(exc.code, f"cannot remove {interface} from {self.name}: {exc}"
                              ) from None

    def drain(self, fd: int, max_packets: int = DEFAULT_BATCH) -> list[bytes]:
        """Read up to `max_packets` packets without blocking; empty when none is waiting."""
        packets: list[bytes] = []
        read = os.read
        append = packets.append
        try:
            if self.vnet_hdr:
                for _ in range(max_packets):
                    buffer = read(fd, READ_SIZE)
                    if buffer[1] or buffer[0] & VNET_NEEDS_CSUM:  # not "one plain packet"
                        packet = _plain(buffer)
                        if packet:
                            append(packet)
                    else:
                        append(buffer[VNET_HDR_SIZE:])
            else:
                for _ in range(max_packets):
                    append(read(fd, READ_SIZE))
        except BlockingIOError:
            pass
        counters = self.counters
        counters.tun_read_packets += len(packets)
        counters.tun_read_bytes += sum(map(len, packets))
        return packets

    async def read_batch(self, fd: int, max_packets: int = DEFAULT_BATCH) -> list[bytes]:
        """Wait until `fd` is readable once, then drain (may be empty after a spurious wake)."""
        await trio.lowlevel.wait_readable(fd)
        return self.drain(fd, max_packets)

    def write(self, fd: int, packet: bytes) -> bool:
        """Hand one IP packet to the kernel; a refused packet is dropped and counted."""
        try:
            os.write(fd, PLAIN + packet if self.vnet_hdr else packet)
        except OSError:
            # EINVAL for a packet the kernel cannot parse, EIO when the link is down,
            # EAGAIN under memory pressure: the data plane drops, it never blocks.
            self.counters.tun_write_errors += 1
            return False
        self.counters.tun_write_packets += 1
        self.counters.tun_write_bytes += len(packet)
        return True

    def write_many(self, fd: int, packets: list[bytes]) -> int:
        """`write` each packet; returns how many the kernel took."""
        return sum(self.write(fd, packet) for packet in packets)

    def close(self) -> None:
        """Close the queues and, if we created the link, make sure it is gone. Idempotent."""
        if self._closed:
            return
        self._closed = True
        fds, self.fds = self.fds, []
        for fd in fds:
            # Wake any task parked in wait_readable on it (only possible inside Trio).
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(fd)
            os.close(fd)
        try:
            # Closing the last queue of a non-persistent TUN unregisters it already;
            # a persistent one (or one left by a crashed run) is deleted here.
            if self.created and _ifindex_is(self.name, self.ifindex):
                with contextlib.suppress(NetlinkError):
                    self._ipr.link("del", index=self.ifindex)
        finally:
            self._ipr.close()

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _plain(buffer: bytes) -> bytes:
    """A packet read with a virtio-net header that is not "complete, one packet".

    Without TUNSETOFFLOAD the kernel finishes checksums and segmentation itself, so
    this is a safety net: a partial checksum is completed (RFC 1071 over the bytes
    from csum_start; the field holds the pseudo-header sum), a GSO packet dropped.
    """
    flags, gso_type, _, _, start, offset = VNET_HDR.unpack_from(buffer)
    packet = buffer[VNET_HDR_SIZE:]
    if gso_type != GSO_NONE:
        return b""
    if flags & VNET_NEEDS_CSUM:
        at = start + offset
        if at + 2 > len(packet) or start >= len(packet):
            return b""
        covered = packet[start:] + (b"\0" if (len(packet) - start) & 1 else b"")
        value = int.from_bytes(covered, "big")
        folded = value % 0xFFFF
        # a computed zero goes out as all ones (RFC 768; TCP accepts either)
        checksum = ~(0xFFFF if folded == 0 and value else folded) & 0xFFFF or 0xFFFF
        packet = packet[:at] + struct.pack("!H", checksum) + packet[at + 2:]
    return packet


def _quiet_ipv6(ipr: IPRoute, ifindex: int) -> None:
    """No IPv6 link-local address on the TUN: without one the kernel sends no router
    solicitations or MLD reports into it, which the data plane would only drop.
    IPv6 routes through the TUN and global addresses on it work as before."""
    spec = {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE)]}
    try:
        ipr.link("set", index=ifindex, IFLA_AF_SPEC={"attrs": [("AF_INET6", spec)]})
    except NetlinkError as exc:  # IPv6 disabled in this kernel: nothing to quieten
        logger.debug("cannot set the IPv6 address generation mode: %s", exc)


def _ifindex_is(name: str, ifindex: int) -> bool:
    try:
        return socket.if_indextoname(ifindex) == name
    except OSError:
        return False


def _link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
