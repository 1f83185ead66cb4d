"""UDP sockets of the responder: receive, classify, hand to the router; send.

Per socket one task waits for readiness once and then drains a bounded batch
with non-blocking receives until none is left: an awaited Trio socket call per
datagram costs 26-28 us, this pattern about 4 us (notes/building-blocks.md), and
taking up to RECV_SLOTS datagrams per system call (recvmmsg, `mmsg.py`) cuts the
receive itself from about 1.8 to 1.1 us a datagram. Sending is a synchronous
non-blocking `sendto`; a full socket buffer drops the datagram and counts it,
since IKE retransmits (RFC 7296 2.1).

On the NAT-T port every IKE message carries a four-zero-byte non-ESP marker
(RFC 3948 2.2); datagrams without it are ESP, and a single 0xFF byte is a NAT
keepalive (RFC 3948 2.3).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import trio

from ..errors import ParseError
from ..ike.constants import NON_ESP_MARKER
from ..ike.message import Header, peek_header_untrusted
from ..ike.session import Address, Datagram
from ..ip_options import tos_ancillary
from .mmsg import IP_RECVTOS, TOS_SPACE, MessageBatch
from .stats import RuntimeStats

logger = logging.getLogger(__name__)

# Datagrams handled per readiness wake-up before yielding to other tasks, so a
# flood on one socket cannot starve the actors or the other sockets.
RECV_BATCH = 64
# The NAT-T socket carries ESP in bulk: a bigger batch per wake-up there (about 1.5 ms
# of work at most) halves the scheduler rounds per packet; IKE still gets its turn.
ESP_RECV_BATCH = 256
# Datagrams per receive call (recvmmsg): RECV_BATCH and ESP_RECV_BATCH are multiples.
RECV_SLOTS = 64
# Asked for, the kernel caps it at net.core.rmem_max; bursts of IKE_SA_INIT
# from many peers should wait in the kernel rather than be dropped there.
SOCKET_BUFFER = 1 << 21

NATT_KEEPALIVE = b"\xff"
SO_MARK = getattr(socket, "SO_MARK", 36)
# Linux value; the constant is exported by the socket module only from 3.12.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr (struct in_pktinfo)
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex (struct in6_pktinfo)
# UDP generic segmentation/receive offload (linux/udp.h): a u16 segment size per
# sendmsg; a UDP_GRO socket gets coalesced datagrams (split again by MessageBatch)
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
_GSO_SIZE = struct.Struct("=H")
# ESP on the NAT-T port: a wake-up that found at least HOLD_AFTER datagrams means a
# busy stream, and the reader then pauses ESP_HOLD seconds before it waits again, so
# the next wake-up drains a bigger batch (fewer wake-ups and TUN writes per packet,
# longer coalesced TCP runs). Light traffic (a ping, IKE) is never held.
ESP_HOLD = 0.001
HOLD_AFTER = 8


EspSink = Callable[[list[bytes], dict[int, int] | None], None]


class Router(Protocol):
    def route(
        self, header: Header, data: bytes, local: Address, remote: Address, now: float
    ) -> None: ...


@dataclass(slots=True)
class Endpoint:
    """One bound socket. `wildcard` sockets learn the local address per datagram."""

    sock: socket.socket
    local: Address
    natt: bool
    wildcard: bool


def _is_wildcard(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def _open_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            # "::" must not also take IPv4: 0.0.0.0 on the same port is bound separately.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        if _is_wildcard(host):
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        # One clear line for the operator (the CLI prints OSError without a traceback).
        raise OSError(exc.errno, f"cannot bind UDP {host} port {port}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _local_from_ancillary(
    ancdata: list[tuple[int, int, bytes]], port: int, fallback: Address
) -> Address:
    for level, kind, payload in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(payload) >= 12:
            _, _, addr = _IN_PKTINFO.unpack_from(payload)
            return (socket.inet_ntop(socket.AF_INET, addr), port)
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(payload) >= 20:
            addr6, _ = _IN6_PKTINFO.unpack_from(payload)
            return (socket.inet_ntop(socket.AF_INET6, addr6), port)
    return fallback


def _enable_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:  # a kernel before 5.0: datagrams arrive one by one
        return False
    return True


def _source_ancillary(endpoint: Endpoint, local_host: str) -> list[tuple[int, int, bytes]]:
    """Pin the source address of a reply sent from a wildcard socket."""
    if endpoint.sock.family == socket.AF_INET6:
        src = socket.inet_pton(socket.AF_INET6, local_host)
        return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(src, 0))]
    src = socket.inet_pton(socket.AF_INET, local_host)
    return [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, src, bytes(4)))]


class Dispatcher:
    """Owns the UDP sockets. Build it with `Dispatcher.bind(...)` as a context manager."""

    def __init__(self, endpoints: list[Endpoint], stats: RuntimeStats) -> None:
        self.endpoints = endpoints
        self.stats = stats
        # ESP in UDP (RFC 3948) arriving on the NAT-T port goes here: the data plane,
        # wired in by the single-node CLI (runtime never imports worker); with the ESP
        # datagrams whose IP header carried ECT(1) or CE (by index) for RFC 6040 4.2
        self.esp_sink: EspSink | None = None
        # called once the datagrams of a wake-up are all sunk: the data plane decrypts
        # and writes them as one batch
        self.esp_flush: Callable[[], None] | None = None
        self._by_local: dict[Address, Endpoint] = {ep.local: ep for ep in endpoints}
        # (family, port) -> wildcard endpoint, for replies from addresses learnt by pktinfo
        self._wildcards: dict[tuple[int, int], Endpoint] = {
            (ep.sock.family, ep.local[1]): ep for ep in endpoints if ep.wildcard
        }

    @classmethod
    @contextlib.contextmanager
    def bind(
        cls, addresses: Iterable[str], ike_port: int, natt_port: int, stats: RuntimeStats
    ) -> Iterator[Dispatcher]:
        """Bind `ike_port` and `natt_port` on every address; close them all on exit."""
        endpoints: list[Endpoint] = []
        try:
            for host in addresses:
                for port, natt in ((ike_port, False), (natt_port, True)):
                    sock = _open_socket(host, port)
                    bound = sock.getsockname()
                    endpoints.append(Endpoint(sock, (bound[0], bound[1]), natt, _is_wildcard(host)))
            yield cls(endpoints, stats)
        finally:
            for ep in endpoints:
                # Wake any task still parked in wait_readable before the fd goes away.
                trio.lowlevel.notify_closing(ep.sock)
                ep.sock.close()

    @property
    def local_addresses(self) -> list[Address]:
        return [ep.local for ep in self.endpoints]

    async def serve(
        self, router: Router, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run one reader task per socket until cancelled."""
        async with trio.open_nursery() as nursery:
            for ep in self.endpoints:
                nursery.start_soon(self._read_loop, ep, router)
            task_status.started()

    async def _read_loop(self, ep: Endpoint, router: Router) -> None:
        sock = ep.sock
        stats = self.stats
        received = self._received
        # ESP in UDP sent with GSO arrives as one buffer of equal-size datagrams (UDP
        # GRO); the batch splits it again, and each datagram is classified on its own
        plain_control = 0
        if ep.natt:
            _enable_gro(sock)
            # and the TOS of each, whose ECN field may have to go into the packet
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)
            plain_control = TOS_SPACE
        if ep.wildcard:  # every datagram brings its pktinfo
            info = _IN6_PKTINFO if sock.family == socket.AF_INET6 else _IN_PKTINFO
            plain_control += socket.CMSG_SPACE(info.size)
        batch = MessageBatch(sock, RECV_SLOTS, plain_control, tos=ep.natt)
        natt, wildcard, ep_local = ep.natt, ep.wildcard, ep.local
        port = ep_local[1]
        hold = ESP_HOLD if natt else 0.0
        limit = ESP_RECV_BATCH if natt else RECV_BATCH
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            # ESP in UDP (RFC 3948 2.2: no marker, at least SPI and sequence number)
            # goes to the data plane in one list per receive; the rest as `_received` says
            sink = self.esp_sink if natt else None
            flush = self.esp_flush if sink is not None else None
            budget = limit  # datagrams, counting each of a GRO buffer
            while budget > 0:
                try:
                    datagrams = batch.receive()
                except OSError as exc:
                    # e.g. ECONNREFUSED queued from an ICMP error for an earlier send
                    stats.dropped_recv_error += 1
                    budget -= 1
                    logger.debug("recv on %s failed: %s", ep_local, exc)
                    continue
                if not datagrams:
                    break
                count = len(datagrams)
                stats.datagrams_in += count
                budget -= count
                others: list[int] | range = range(count)
                if sink is not None:
                    esp = [d for d in datagrams if d[:4] != NON_ESP_MARKER and len(d) >= 8]
                    others = [] if len(esp) == count else \
                        [k for k, d in enumerate(datagrams)
                         if d[:4] == NON_ESP_MARKER or len(d) < 8]
                    if esp:
                        tos = batch.outer_tos()
                        if tos is not None and others:  # index them among the ESP alone
                            skipped = set(others)
                            kept = [k for k in range(count) if k not in skipped]
                            tos = {j: tos[k] for j, k in enumerate(kept) if k in tos}
                        sink(esp, tos)
                for k in others:
                    local = _local_from_ancillary(batch.ancillary(k), port, ep_local) \
                        if wildcard else ep_local
                    received(ep, datagrams[k], local, batch.source(k), now, router)
            else:
                # A full batch: more may be waiting, but let others run first.
                if flush is not None:
                    flush()
                await trio.lowlevel.checkpoint()
                continue
            if flush is not None:
                flush()
            if hold and budget <= limit - HOLD_AFTER:
                # a busy ESP stream: let the next datagrams gather for a moment, so one
                # wake-up (and one coalesced TUN write) serves more of them
                await trio.sleep(hold)

    def _received(
        self,
        ep: Endpoint,
        data: bytes,
        local: Address,
        remote: Address,
        now: float,
        router: Router,
    ) -> None:
        stats = self.stats
        if ep.natt:
            if data[:4] != NON_ESP_MARKER:
                if data == NATT_KEEPALIVE:
                    stats.natt_keepalives += 1
                elif len(data) < 8:
                    stats.dropped_malformed += 1
                else:  # ESP reaches here only when no data plane runs in this process
                    stats.dropped_esp_on_natt += 1
                return
            data = data[4:]
        try:
            header = peek_header_untrusted(data)
        except ParseError:
            stats.dropped_malformed += 1
            return
        try:
            router.route(header, data, local, remote, now)
        except Exception:
            # A routing bug must not stop this socket's reader.
            stats.dropped_route_error += 1
            logger.exception("routing a datagram from %s failed", remote)

    def set_mark(self, mark: int) -> None:
        """Mark every socket (SO_MARK) so the data plane's policy routing lets it pass."""
        for ep in self.endpoints:
            ep.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)

    def send_esp(self, esp: bytes, local: Address, remote: Address, segment: int = 0,
                 tos: int = 0) -> bool:
        """ESP in UDP from our NAT-T socket at `local` (no marker: RFC 3948 2.2), with
        `tos` as the IP header's TOS / traffic class.

        With `segment`, `esp` is several ESP packets of `segment` bytes each (the last
        may be shorter): one UDP GSO send (UDP_SEGMENT), and the kernel puts each on
        the wire as its own datagram, for a fraction of the per-send cost.
        """
        ep = self._by_local.get(local)
        if ep is None or not ep.natt:
            self.stats.dropped_no_socket += 1
            return False
        ancillary = [tos_ancillary(ep.sock.family, tos)] if tos else []
        if segment and len(esp) > segment:
            ancillary.append((SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(segment)))
        try:
            if ancillary:
                ep.sock.sendmsg([esp], ancillary, 0, remote)
            else:
                ep.sock.sendto(esp, remote)
        except BlockingIOError:
            self.stats.dropped_send_error += 1
            return False
        except OSError:
            if segment and len(esp) > segment:
                # no GSO on this path (e.g. a segment above the route's MTU): one by one
                return all([self.send_esp(esp[at:at + segment], local, remote, 0, tos)
                            for at in range(0, len(esp), segment)])
            self.stats.dropped_send_error += 1
            return False
        return True

    def send(self, datagram: Datagram) -> None:
        """Send now without blocking; drop and count if the socket cannot take it."""
        stats = self.stats
        ep = self._by_local.get(datagram.local)
        ancillary: list[tuple[int, int, bytes]] | None = None
        if ep is None:
            family = socket.AF_INET6 if ":" in datagram.local[0] else socket.AF_INET
            ep = self._wildcards.get((family, datagram.local[1]))
            if ep is None:
                stats.dropped_no_socket += 1
                logger.warning("no socket bound to %s; datagram dropped", datagram.local)
                return
            ancillary = _source_ancillary(ep, datagram.local[0])
        if datagram.keepalive:
            payload = datagram.data  # NAT keepalive: no marker (RFC 3948 2.3)
        else:
            payload = NON_ESP_MARKER + datagram.data if ep.natt else datagram.data
        try:
            if ancillary is None:
                ep.sock.sendto(payload, datagram.remote)
            else:
                ep.sock.sendmsg([payload], ancillary, 0, datagram.remote)
        except BlockingIOError:
            stats.dropped_send_blocked += 1
            return
        except OSError as exc:
            stats.dropped_send_error += 1
            if exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED):
                logger.warning("send to %s failed: %s", datagram.remote, exc)
            return
        stats.datagrams_out += 1
