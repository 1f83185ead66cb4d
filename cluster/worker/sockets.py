"""The worker's ESP sockets: raw IP protocol 50 (RFC 4303), and the firewall mark.

Every socket the worker sends ESP or IKE from carries the firewall mark
(`SO_MARK`, needs CAP_NET_ADMIN): `routing.Routes` sends only unmarked traffic
through the TUN table, so the worker's own packets to a peer whose address is
routed into the TUN go out on the wire instead of looping back into the TUN.
ESP in UDP (RFC 3948) leaves from the responder's UDP 4500 socket; mark it with
`mark_socket`.

Receiving follows the dispatcher's pattern: wait for readiness once, then drain a
bounded batch with non-blocking calls (about 4 us per datagram instead of 27 us
for an awaited call each, notes/building-blocks.md). Sending is a synchronous
non-blocking call; a full buffer drops the packet and counts it, as a router would.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
from types import TracebackType
from typing import Any

import trio

from ..errors import ParseError
from ..ip_options import tos_ancillary
from . import IoCounters

DEFAULT_MARK = 0x1C5
RECV_SIZE = 65535
# Gigabit bursts need more room than the default ~200 KB; as root the FORCE
# variants go past net.core.{r,w}mem_max.
SOCKET_BUFFER = 1 << 22
DEFAULT_BATCH = 64
# Linux values; typeshed does not declare these.
SO_RCVBUFFORCE: int = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE: int = getattr(socket, "SO_SNDBUFFORCE", 32)
_TCLASS_SPACE = socket.CMSG_SPACE(4)  # IPV6_TCLASS: an int


def mark_socket(sock: socket.socket, mark: int) -> None:
    """Set the firewall mark on `sock`: its packets then bypass the TUN routing table."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


def _enlarge_buffers(sock: socket.socket) -> None:
    for force, plain in (
        (SO_RCVBUFFORCE, socket.SO_RCVBUF),
        (SO_SNDBUFFORCE, socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def drain_nowait(sock: socket.socket, max_n: int = DEFAULT_BATCH) -> list[tuple[bytes, Any]]:
    """Up to `max_n` (data, address) from a non-blocking socket; empty when none waits."""
    received: list[tuple[bytes, Any]] = []
    recvfrom = sock.recvfrom
    try:
        while len(received) < max_n:
            received.append(recvfrom(RECV_SIZE))
    except BlockingIOError:
        pass
    return received


async def drain_recv(sock: socket.socket, max_n: int = DEFAULT_BATCH) -> list[tuple[bytes, Any]]:
    """Wait once for `sock` to be readable, then `drain_nowait` (possibly empty)."""
    await trio.lowlevel.wait_readable(sock)
    return drain_nowait(sock, max_n)


def _tclass_of(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The traffic class of an IPV6_TCLASS control message (an int), 0 without one."""
    for level, kind, payload in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_TCLASS and len(payload) >= 4:
            return int.from_bytes(payload[:4], sys.byteorder) & 0xFF
    return 0


def esp_from_ipv4_untrusted(packet: bytes) -> bytes:
    """The ESP part of an IPv4 packet as a raw IPv4 socket delivers it (header included)."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        raise ParseError("raw IPv4 socket returned no IPv4 header")
    header_length = (packet[0] & 0x0F) * 4
    if header_length < 20 or header_length > len(packet):
        raise ParseError(f"bad IPv4 header length {header_length}")
    return packet[header_length:]


class EspSocket:
    """A raw ESP socket bound to one local address, IPv4 or IPv6.

    `drain` returns bare ESP packets (SPI first) for both families, each with the TOS /
    traffic class of the IP header it came in (its ECN field for RFC 6040 4.2, all of it
    for a transport-mode SA's rebuilt header): an IPv4 raw socket
    hands over the IP header as well, which is cut off here; an IPv6 one does not
    (RFC 3542 3), and its traffic class comes as ancillary data (IPV6_RECVTCLASS).
    """

    def __init__(self, sock: socket.socket, local: str, counters: IoCounters) -> None:
        self.sock = sock
        self.local = local
        self.family = sock.family
        self.counters = counters

    @classmethod
    def open(
        cls, local: str, *, mark: int | None = DEFAULT_MARK, counters: IoCounters | None = None
    ) -> EspSocket:
        """Open, mark (unless `mark` is None), and bind to `local` (it sets our source
        address and limits reception to ESP addressed to it)."""
        address = ipaddress.ip_address(local)
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ESP)
        try:
            sock.setblocking(False)
            if mark is not None:
                mark_socket(sock, mark)
            _enlarge_buffers(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)
            sock.bind((str(address), 0))
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"cannot open raw ESP socket on {local}: {exc.strerror}"
            ) from None
        except BaseException:
            sock.close()
            raise
        return cls(sock, str(address), counters if counters is not None else IoCounters())

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, esp: bytes, peer: str, tos: int = 0) -> bool:
        """Send one ESP packet to `peer` (an address literal); the kernel adds the IP
        header with protocol 50 and `tos` as its TOS / traffic class. False, counted,
        when the kernel refused it."""
        try:
            # Port 0: for IPv6 raw sockets a non-zero port must equal the protocol.
            if tos:
                self.sock.sendmsg([esp], [tos_ancillary(self.family, tos)], 0, (peer, 0))
            else:
                self.sock.sendto(esp, (peer, 0))
        except OSError:
            # EAGAIN/ENOBUFS on a full queue, EHOSTUNREACH, EMSGSIZE: drop, never block.
            self.counters.esp_send_errors += 1
            return False
        self.counters.esp_sent_packets += 1
        self.counters.esp_sent_bytes += len(esp)
        return True

    def drain(self, max_n: int = DEFAULT_BATCH) -> list[tuple[bytes, str, int]]:
        """Up to `max_n` (esp, peer address, TOS / traffic class) without blocking; empty
        when none waits."""
        counters = self.counters
        packets: list[tuple[bytes, str, int]] = []
        if self.family == socket.AF_INET6:
            recvmsg = self.sock.recvmsg
            try:
                while len(packets) < max_n:
                    data, ancillary, _flags, addr = recvmsg(RECV_SIZE, _TCLASS_SPACE)
                    packets.append((data, addr[0], _tclass_of(ancillary)))
            except BlockingIOError:
                pass
        else:
            for data, addr in drain_nowait(self.sock, max_n):
                try:
                    packets.append((esp_from_ipv4_untrusted(data), addr[0], data[1]))
                except ParseError:
                    counters.esp_receive_errors += 1
        counters.esp_received_packets += len(packets)
        counters.esp_received_bytes += sum(len(esp) for esp, _, _ in packets)
        return packets

    async def recv_batch(self, max_n: int = DEFAULT_BATCH) -> list[tuple[bytes, str, int]]:
        """Wait once for readability, then `drain` (possibly empty after a spurious wake)."""
        await trio.lowlevel.wait_readable(self.sock)
        return self.drain(max_n)

    def close(self) -> None:
        if self.sock.fileno() == -1:
            return
        with contextlib.suppress(RuntimeError):  # only possible inside Trio
            trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    def __enter__(self) -> EspSocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
