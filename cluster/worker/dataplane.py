"""The userspace ESP data plane: TUN <-> SAD <-> ESP (raw protocol 50 or UDP 4500).

Hot loops wait for readiness once, then drain a bounded batch with non-blocking
calls (see notes/building-blocks.md). A packet the host routes into the TUN that no
SA covers is dropped and counted, never sent in the clear.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import trio
from pyroute2 import IPRoute

from ..esp import (
    ChildSa,
    ChildSaParams,
    EspDrop,
    OutboundSa,
    Sad,
    SaHardExpired,
    SaIdle,
    SaSequenceExhausted,
    SaSoftExpired,
    Selector,
)
from ..esp.ip import ADDRESS_SPANS, flow_of, tos_of
from ..esp.params import Address
from ..esp.selector import SelectorSet
from ..ike.events import (
    ChildSaDeleted,
    ChildSaEstablished,
    Event,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaMoved,
    IkeSaRekeyed,
)
from . import IoCounters
from .gro import coalesce
from .keys import Limits, params_from_event
from .routing import Routes
from .sockets import EspSocket
from .tun import TunDevice

# a Child SA's (bytes in, bytes out, packets in, packets out)
Traffic = tuple[int, int, int, int]

logger = logging.getLogger(__name__)

BATCH = 64
# Received packets held for one decapsulation batch and coalesced TUN write at most
# (a bound on memory; a receive batch normally ends first).
WRITE_BATCH = 256
# One UDP GSO send carries at most this many datagrams (the kernel's UDP_MAX_SEGMENTS
# is 64 or more) and bytes (an IP datagram's limit, with room for the headers).
GSO_SEGMENTS = 64
GSO_BYTES = 65000
# A TUN read that found at least TUN_HOLD_AFTER packets means a busy stream: the pump
# then pauses TUN_HOLD seconds before it waits again, so the next wake-up finds a
# bigger batch (longer GSO runs, fewer wake-ups per packet). A lone packet (a ping,
# an ACK) never waits.
TUN_HOLD = 0.0005
TUN_HOLD_AFTER = 8
# A Child SA deleted after a rekey replaced it keeps decrypting this many seconds, for
# packets the peer sent on it before switching that arrive late (strongSwan's
# charon.delete_rekeyed_delay, 5 s by default). It sends nothing in that time.
REKEYED_LINGER = 5.0
# How often Child SAs with an inactivity timeout are looked at (their counters): an idle
# SA is deleted at most this much after its timeout.
IDLE_CHECK = 1.0
# How often the Child SAs that received ESP are told to `on_activity` (the IKE side puts
# off its liveness checks for them); a peer silent since is checked this much sooner.
ACTIVITY_CHECK = 5.0


@dataclass(frozen=True)
class Trap:
    """A connection brought up on demand (swanctl's start_action = "trap"): a packet
    from `local` to `remote` that no SA covers asks for it."""

    name: str
    local: SelectorSet
    remote: SelectorSet

    def covers(self, packet: bytes) -> bool:
        flow = flow_of(packet)
        if flow is None:
            return False
        version, src, dst, protocol, sport, dport = flow
        return self.remote.covers(version, dst, protocol, dport) and \
            self.local.covers(version, src, protocol, sport)


class UdpSend(Protocol):
    """`Dispatcher.send_esp`: ESP in UDP from the NAT-T socket at `local` to `remote`;
    with `segment`, `esp` is several packets of that size (the last may be shorter);
    `tos`, the outer header's TOS / traffic class."""

    def __call__(self, esp: bytes, local: Address, remote: Address, segment: int = 0,
                 tos: int = 0) -> bool: ...


def _send_run(udp_send: UdpSend, sa: OutboundSa, run: list[bytes], size: int, tos: int
              ) -> None:
    """A run of ESP packets of `size` bytes (the last may be shorter) in as few UDP GSO
    sends as the kernel's limits allow, with `tos` outside."""
    local, remote = sa.child.params.local, sa.remote
    if len(run) == 1:
        udp_send(run[0], local, remote, 0, tos)
        return
    limit = min(GSO_SEGMENTS, GSO_BYTES // size)
    for at in range(0, len(run), limit):
        piece = run[at:at + limit]
        if len(piece) == 1:
            udp_send(piece[0], local, remote, 0, tos)
        else:
            udp_send(b"".join(piece), local, remote, size, tos)


@dataclass(frozen=True, slots=True)
class DataPlaneSettings:
    tun: str = "ikec0"
    mtu: int = 1400
    queues: int = 1
    mark: int = 0x1C5
    table: int = 1450
    priority: int = 1450
    limits: Limits = field(default_factory=Limits)


@functools.lru_cache(maxsize=1024)
def _networks(selector_start: bytes, selector_end: bytes) -> tuple[str, ...]:
    """The prefixes that make up a selector's address range (cached: SAs share them)."""
    start = ipaddress.ip_address(selector_start)
    end = ipaddress.ip_address(selector_end)
    return tuple(str(n) for n in ipaddress.summarize_address_range(start, end))


def _host_interface(address: str) -> str:
    return f"{address}/{32 if ipaddress.ip_address(address).version == 4 else 128}"


def _local_source(params: ChildSaParams) -> str | None:
    """An address of this host inside the local selectors: the source hint for routes,
    so packets this host originates towards the remote side match the SA."""
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            text = msg.get_attr("IFA_ADDRESS")
            if text is None:
                continue
            packed = ipaddress.ip_address(text).packed
            for sel in params.local_ts:
                if len(packed) == len(sel.start) and sel.start <= packed <= sel.end:
                    return str(text)
    return None


class DataPlane:
    """Owns the SAD, the TUN device, its routes and the raw ESP sockets."""

    def __init__(self, tun: TunDevice, routes: Routes, esp_sockets: list[EspSocket],
                 limits: Limits) -> None:
        self.tun = tun
        self.routes = routes
        self.esp_sockets = {6 if s.family == socket.AF_INET6 else 4: s for s in esp_sockets}
        self.limits = limits
        self.sad = Sad()
        self.sad.on_removed = self._sa_removed
        self.counters: IoCounters = tun.counters
        self.udp_send: UdpSend | None = None  # ESP in UDP from the NAT-T socket (wired later)
        self.on_esp_event: Callable[[object], None] = self._log_esp_event
        self._ike_of: dict[bytes, tuple[bytes, bytes]] = {}  # Child SA spi_in -> its IKE SA
        # our virtual IPs on the TUN, by the IKE SA the responder assigned them with
        self._vips_of: dict[tuple[bytes, bytes], tuple[str, ...]] = {}
        self._sources: dict[tuple[Selector, ...], str] = {}  # local selectors -> our address
        self._routes_of: dict[bytes, list[str]] = {}
        # The outbound fast path: the last packet's addresses and the SA the SAD chose
        # for them. Valid while every SA selects on addresses only (then the addresses
        # decide) and until the SAD changes: `_sad_changed` clears it.
        self._address_only = True
        self._flow_key: bytes | None = None
        self._flow_sa: OutboundSa | None = None
        # Received ESP packets wait here until the batch that brought them ends, then
        # are decapsulated and go into the TUN coalesced (gro.py): `flush`, which the
        # receiving task calls (the ESP pump here, the dispatcher's NAT-T reader).
        self._incoming: list[bytes] = []
        # index in _incoming -> the TOS its outer header carried, where not 0 (`receive_esp`)
        self._incoming_tos: dict[int, int] = {}
        self.clock: Callable[[], float] = trio.current_time
        # Rekeyed-away SAs still receiving: spi_in -> when they go, by `clock` (`delete`).
        self._lingering: dict[bytes, float] = {}
        self._linger_added = trio.Event()
        self._traps: list[Trap] = []
        # called with a trapped connection's name when a packet for it finds no SA
        self.on_acquire: Callable[[str], None] | None = None
        self.acquires = 0
        # called as each Child SA leaves the SAD for good (a delete, the end of its
        # linger, its hard lifetime) with its IKE SA and what it carried: accounting
        self.on_removed: Callable[[bytes, tuple[bytes, bytes] | None, Traffic], None] | None \
            = None
        # Child SAs with an inactivity timeout: spi_in -> [timeout, packets so far, when
        # they last changed (by `clock`)]; an idle one leaves (SaIdle is emitted once)
        self._idle: dict[bytes, list[float]] = {}
        self._idle_added = trio.Event()
        # ESP received: told every ACTIVITY_CHECK seconds, with the spi_in of each Child SA
        # whose inbound packet count changed (`inbound_activity`)
        self.on_activity: Callable[[list[bytes]], object] | None = None
        self._packets_in: dict[bytes, int] = {}

    @classmethod
    @contextlib.contextmanager
    def open(cls, settings: DataPlaneSettings, addresses: tuple[str, ...]) -> Iterator[DataPlane]:
        """TUN, policy routing and one raw ESP socket per address; all removed on exit."""
        with contextlib.ExitStack() as stack:
            tun = stack.enter_context(TunDevice.open(settings.tun, queues=settings.queues,
                                                     mtu=settings.mtu, vnet_hdr=True))
            routes = stack.enter_context(Routes.open(tun.ifindex, table=settings.table,
                                                     priority=settings.priority,
                                                     mark=settings.mark))
            sockets = [stack.enter_context(EspSocket.open(a, mark=settings.mark,
                                                          counters=tun.counters))
                       for a in addresses]
            yield cls(tun, routes, sockets, settings.limits)

    # --- the key-install interface ----------------------------------------------------

    # (`inactivity`: the child's timeout, see `watch_idle`; 0 for none)

    def install(self, params: ChildSaParams, ike: tuple[bytes, bytes] | None = None,
                inactivity: float = 0.0) -> None:
        self._end_linger(params.spi_in)
        self.sad.install(params)
        self._installed(params, ike, inactivity)

    def replace(self, old_spi_in: bytes, params: ChildSaParams,
                ike: tuple[bytes, bytes] | None = None, inactivity: float = 0.0) -> None:
        """A rekeyed SA: the new SPIs take outbound traffic at once (no packet lost)."""
        self._end_linger(params.spi_in)
        self.sad.replace(old_spi_in, params)
        self._installed(params, ike, inactivity)

    def succeed(self, old_spi_in: bytes, params: ChildSaParams,
                ike: tuple[bytes, bytes] | None = None, inactivity: float = 0.0) -> None:
        """A rekey the peer started: receive on the new SA now, send on it once the peer
        uses it or deletes the old one (it installs the new SA after our response)."""
        self._end_linger(params.spi_in)
        self.sad.succeed(old_spi_in, params)
        self._installed(params, ike, inactivity)

    def _installed(self, params: ChildSaParams, ike: tuple[bytes, bytes] | None,
                   inactivity: float) -> None:
        self._sad_changed()
        if ike is not None:
            self._ike_of[params.spi_in] = ike
        self._route(params)
        if inactivity > 0:
            self.watch_idle(params.spi_in, inactivity)

    def _sa_removed(self, child: ChildSa) -> None:
        if self.on_removed is not None:
            spi_in = child.params.spi_in
            self.on_removed(spi_in, self._ike_of.get(spi_in), child.counters.traffic())

    def ike_sa_of(self, spi_in: bytes) -> tuple[bytes, bytes] | None:
        """(spi_i, spi_r) of the IKE SA a Child SA was installed for."""
        return self._ike_of.get(spi_in)

    def set_ike_sa(self, spi_in: bytes, ike: tuple[bytes, bytes]) -> None:
        """The Child SA's IKE SA continues under new SPIs (an IKE rekey)."""
        if spi_in in self._ike_of:
            self._ike_of[spi_in] = ike

    def _peer_switched(self, esp: bytes) -> None:
        """The peer sent on an SA waiting to take over: it can receive on it too."""
        spi = esp[:4]
        if spi in self.sad.waiting:
            self.sad.activate(spi)
            self._sad_changed()

    def remove(self, spi_in: bytes) -> None:
        """Remove a Child SA at once (also one lingering after `delete`)."""
        self.sad.remove(spi_in)
        self._sad_changed()
        self._ike_of.pop(spi_in, None)
        self._lingering.pop(spi_in, None)
        self._remove_routes(spi_in)

    def move(self, spi_in: bytes, remote: tuple[str, int]) -> None:
        """Send the SA's ESP to the peer's new address: after a NAT rebinding (ESP in UDP,
        RFC 7296 2.23) or a MOBIKE update (tunnel mode only, RFC 4555 1.1)."""
        child = self.sad.get(spi_in)
        if child is not None and (child.params.encap or child.params.mode == "tunnel"):
            child.outbound.remote = remote

    def delete(self, spi_in: bytes) -> None:
        """The Child SA was deleted (RFC 7296 1.4.1). One a rekey replaced stops sending
        (its successor sends) but decrypts for REKEYED_LINGER seconds more, so packets
        the peer sent on it before switching are not lost when they arrive late; any
        other SA goes at once. Deleting a lingering SA again changes nothing."""
        if spi_in in self._lingering:
            return
        self.sad.deleted(spi_in)  # (the SA of the peer's rekey of it sends now)
        child = self.sad.get(spi_in)
        if child is None or not child.retiring:
            self.remove(spi_in)
            return
        self._sad_changed()
        self._remove_routes(spi_in)  # its successor holds them
        self._lingering[spi_in] = self.clock() + REKEYED_LINGER
        self._linger_added.set()

    @property
    def lingering(self) -> dict[bytes, float]:
        """Deleted rekeyed-away SAs still receiving: spi_in -> when they go."""
        return self._lingering

    def end_lingering(self) -> None:
        """Remove the lingering SAs whose time is up."""
        now = self.clock()
        for spi_in in [s for s, until in self._lingering.items() if until <= now]:
            self.remove(spi_in)

    def _end_linger(self, spi_in: bytes) -> None:
        # an SPI the responder gave out again (it forgot the lingering SA): the new SA wins
        if spi_in in self._lingering:
            self.remove(spi_in)

    def _remove_routes(self, spi_in: bytes) -> None:
        for network in self._routes_of.pop(spi_in, []):
            with contextlib.suppress(KeyError):
                self.routes.remove(network)

    def trap(self, name: str, local: tuple[Selector, ...], remote: tuple[Selector, ...]
             ) -> None:
        """Route `remote` into the TUN from now on, so that a packet to it that no SA
        covers (and that comes from `local`) starts connection `name` (`on_acquire`).
        The packet itself is dropped and counted, like any other without an SA."""
        self._traps.append(Trap(name, SelectorSet(local), SelectorSet(remote)))
        for sel in remote:
            for network in _networks(sel.start, sel.end):
                self.routes.add(network)

    def _acquire(self, packet: bytes) -> None:
        for trap in self._traps:
            if trap.covers(packet):
                self.acquires += 1
                if self.on_acquire is not None:
                    self.on_acquire(trap.name)
                return

    def _sad_changed(self) -> None:
        self._flow_key = self._flow_sa = None
        self._address_only = self.sad.address_only  # O(1): installs must not scan every SA

    def _route(self, params: ChildSaParams) -> None:
        if params.mode == "transport":
            networks = [params.remote[0]]
            source: str | None = params.local[0]
        else:
            networks = [n for sel in params.remote_ts for n in _networks(sel.start, sel.end)]
            source = self._sources.get(params.local_ts)
            if source is None:  # one netlink dump per distinct selector set, not per SA
                source = _local_source(params)
                if source is not None:
                    self._sources[params.local_ts] = source
        added = []
        for network in networks:
            hint = source if source and (":" in source) == (":" in network) else None
            self.routes.add(network, src=hint)
            added.append(network)
        self._routes_of[params.spi_in] = added

    def on_ike_event(self, event: Event) -> None:
        """The responder's events, in-process: install and remove Child SAs."""
        try:
            if isinstance(event, IkeSaEstablished) and event.own_virtual_ips:
                # the address this host uses inside the tunnel (RFC 7296 2.19): on the TUN,
                # where the routes of its Child SAs find it as their source
                for address in event.own_virtual_ips:
                    self.tun.add_address(_host_interface(address))
                self._vips_of[(event.spi_i, event.spi_r)] = event.own_virtual_ips
                self._sources.clear()
            elif isinstance(event, ChildSaEstablished):
                params = params_from_event(event, self.limits)
                ike = (event.ike_spi_i, event.ike_spi_r)
                idle = event.inactivity
                if event.replaces and event.we_initiated:
                    self.replace(event.replaces, params, ike, idle)  # the peer already has it
                elif event.replaces:
                    self.succeed(event.replaces, params, ike, idle)
                else:
                    self.install(params, ike, idle)
            elif isinstance(event, IkeSaMoved):  # NAT rebinding or MOBIKE: ESP follows
                ike = (event.spi_i, event.spi_r)
                for spi_in, owner in self._ike_of.items():
                    if owner == ike:
                        self.move(spi_in, event.remote)
            elif isinstance(event, IkeSaRekeyed):  # the Child SAs moved to the new IKE SA
                old, new = (event.old_spi_i, event.old_spi_r), (event.spi_i, event.spi_r)
                if old in self._vips_of:
                    self._vips_of[new] = self._vips_of.pop(old)
                for spi_in, ike in self._ike_of.items():
                    if ike == old:
                        self._ike_of[spi_in] = new
            elif isinstance(event, ChildSaDeleted):
                self.delete(event.spi_in)
            elif isinstance(event, IkeSaDeleted):
                ike = (event.spi_i, event.spi_r)
                for spi_in in [s for s, i in self._ike_of.items() if i == ike]:
                    self.remove(spi_in)
                vips = self._vips_of.pop(ike, ())
                if vips:
                    # (a reauthentication's new IKE SA may hold the same address)
                    held = {a for addresses in self._vips_of.values() for a in addresses}
                    for address in vips:
                        if address not in held:
                            self.tun.remove_address(_host_interface(address))
                    self._sources.clear()  # a route source may have been one of them
        except (ValueError, OSError) as exc:
            # a Child SA the data plane cannot carry must not take the responder down
            logger.error("data plane: %s for %s", exc, type(event).__name__)

    # --- packets -----------------------------------------------------------------------

    def receive_esp(self, datagrams: list[bytes],
                    outer_tos: dict[int, int] | None = None) -> None:
        """ESP packets from the network (raw, or UDP-encapsulated as the dispatcher's
        NAT-T reader classified them) towards the TUN. `outer_tos`: the index of each
        that arrived with a TOS / traffic class other than 0 in its IP header, and that
        TOS (see `EspSad.decapsulate_untrusted`).

        They are decapsulated and written when the receiving task's batch ends and it
        calls `flush`, so that the batch is decrypted in one loop and a run of TCP
        segments enters the kernel as one superpacket.
        """
        incoming = self._incoming
        if outer_tos:
            offset = len(incoming)
            self._incoming_tos.update((offset + i, tos) for i, tos in outer_tos.items())
        incoming += datagrams
        if len(incoming) >= WRITE_BATCH:
            self.flush()

    def flush(self) -> None:
        """Decapsulate the ESP packets received since the last flush and write them
        into the TUN, TCP runs coalesced."""
        incoming = self._incoming
        if not incoming:
            return
        self._incoming = []
        outer_tos = self._incoming_tos
        if outer_tos:
            self._incoming_tos = {}
        sad = self.sad
        if sad.waiting:  # a rekey in progress: note the peer's first use of the new SA
            packets = []
            for i, esp in enumerate(incoming):
                try:
                    packets.append(sad.decapsulate_untrusted(esp, outer_tos.get(i, 0)))
                except EspDrop:
                    continue  # counted by the SAD
                if sad.waiting:
                    self._peer_switched(esp)
        else:
            packets = sad.decapsulate_batch(incoming, outer_tos)
        if not packets:
            return
        counters = self.counters
        if not self.tun.vnet_hdr:
            for packet in packets:
                self.tun.write(self.tun.fds[0], packet)
            return
        fd = self.tun.fds[0]
        writev = os.writev
        for pieces, count, size in coalesce(packets):
            try:
                writev(fd, pieces)
            except OSError:
                # EINVAL for a packet the kernel cannot parse, EIO when the link is
                # down, EAGAIN under memory pressure: drop, never block (TunDevice.write)
                counters.tun_write_errors += count
                continue
            counters.tun_write_packets += count
            counters.tun_write_bytes += size

    def send_packets(self, packets: list[bytes]) -> None:
        """Packets the host routed into the TUN: protect and send, or drop.

        ESP in UDP leaves in runs: consecutive packets of one SA with the same length
        (the last may be shorter) and TOS go to the kernel in one UDP GSO send, which
        puts each on the wire as its own datagram. Order within an SA is kept. The
        outer header carries the packet's DSCP unless the SA's child says copy_dscp =
        "no" (RFC 4301 5.1.2.1), and its ECN field: in tunnel mode unless it says
        copy_ecn = false (RFC 6040 4.1), in transport mode always (the header is the
        packet's own).
        """
        outbound_for = self.sad.outbound_for
        udp_send = self.udp_send
        address_only = self._address_only
        flow_key = self._flow_key
        flow_sa = self._flow_sa
        # the GSO run that waits for more of its SA and length
        pending: list[bytes] = []
        pending_sa: OutboundSa | None = None
        pending_size = pending_tos = 0
        at, total = 0, len(packets)
        while at < total:
            packet = packets[at]
            # the addresses: all an address-only SAD looks at, and what makes a flow
            span = ADDRESS_SPANS.get(packet[0] >> 4) if packet else None
            key = packet[span[0]:span[1]] if span is not None else None
            sa = flow_sa
            # (flow_key is None exactly when flow_sa is)
            if key != flow_key or sa is None or sa.child.removed or sa.child.retiring:
                sa = outbound_for(packet)
                if sa is None:
                    if self._traps:
                        self._acquire(packet)
                    at += 1
                    continue  # counted: no SA covers it, never sent in the clear
                if address_only and key is not None:
                    flow_key, flow_sa = key, sa
            # this packet and those of its flow and TOS that follow (the same SA)
            tos = tos_of(packet) & sa.tos_mask
            runs, at = sa.encapsulate_flow(packets, at, address_only and key is not None)
            if not sa.encap:
                sock = self.esp_sockets.get(6 if ":" in sa.remote[0] else 4)
                if sock is not None:
                    for run in runs:
                        for esp in run:
                            sock.send(esp, sa.remote[0], tos)
                continue
            if udp_send is None:
                continue
            for run in runs:
                size = len(run[0])
                if sa is pending_sa and tos == pending_tos:
                    if size == pending_size:
                        pending += run
                        continue
                    if size < pending_size:  # a shorter packet can only end a GSO run
                        pending.append(run[0])
                        run = run[1:]
                    _send_run(udp_send, sa, pending, pending_size, tos)
                    pending_sa = None
                    if not run:
                        continue
                elif pending_sa is not None:
                    _send_run(udp_send, pending_sa, pending, pending_size, pending_tos)
                pending, pending_sa, pending_size, pending_tos = run, sa, size, tos
        if pending_sa is not None and udp_send is not None:
            _send_run(udp_send, pending_sa, pending, pending_size, pending_tos)
        self._flow_key, self._flow_sa = flow_key, flow_sa
        self._drain_events()

    def _drain_events(self) -> None:
        event = self.sad.next_event()
        if event is not None:
            self._sad_changed()  # a hard lifetime may have removed an SA
        while event is not None:
            self.on_esp_event(event)
            event = self.sad.next_event()

    @staticmethod
    def _log_esp_event(event: object) -> None:
        if isinstance(event, SaSoftExpired):
            logger.info("CHILD SA %s soft lifetime reached (%s): rekey due",
                        event.spi_in.hex(), event.reason)
        elif isinstance(event, SaHardExpired):
            logger.info("CHILD SA %s hard lifetime reached (%s): removed",
                        event.spi_in.hex(), event.reason)
        elif isinstance(event, SaIdle):
            logger.info("CHILD SA %s idle for %.0f s (inactivity): delete due",
                        event.spi_in.hex(), event.seconds)
        elif isinstance(event, SaSequenceExhausted):
            logger.warning("CHILD SA %s sequence numbers exhausted: sending stopped",
                           event.spi_in.hex())

    # --- the pumps ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            for fd in self.tun.fds:
                nursery.start_soon(self._tun_pump, fd)
            for sock in self.esp_sockets.values():
                nursery.start_soon(self._esp_pump, sock)
            nursery.start_soon(self._linger_timer)
            nursery.start_soon(self._idle_watch)
            nursery.start_soon(self._activity_watch)
            task_status.started()

    async def _linger_timer(self) -> None:
        while True:
            if not self._lingering:
                self._linger_added = trio.Event()
                await self._linger_added.wait()
                continue
            await trio.sleep(max(0.0, min(self._lingering.values()) - self.clock()))
            self.end_lingering()

    async def _idle_watch(self) -> None:
        while True:
            if not self._idle:
                self._idle_added = trio.Event()
                await self._idle_added.wait()
                continue
            await trio.sleep(IDLE_CHECK)
            self.check_idle()

    async def _activity_watch(self) -> None:
        while True:
            await trio.sleep(ACTIVITY_CHECK)
            if self.on_activity is not None:
                active = self.inbound_activity()
                if active:
                    self.on_activity(active)

    def inbound_activity(self) -> list[bytes]:
        """The Child SAs (spi_in) that received ESP since the last call: one look at each
        SA's counters."""
        last = self._packets_in
        now: dict[bytes, int] = {}
        active = []
        for child in self.sad:
            spi_in, packets = child.params.spi_in, child.counters.packets_in
            if packets != last.get(spi_in, 0):
                active.append(spi_in)
            now[spi_in] = packets
        self._packets_in = now
        return active

    def watch_idle(self, spi_in: bytes, timeout: float) -> None:
        """Have the Child SA deleted (SaIdle) after `timeout` seconds without a packet
        either way (swanctl's `inactivity`)."""
        self._idle[spi_in] = [timeout, 0.0, self.clock()]
        self._idle_added.set()

    def check_idle(self) -> None:
        """Emit SaIdle for each Child SA that carried no packet for its inactivity
        timeout (then forget it); forget those gone from the SAD or rekeyed away."""
        now = self.clock()
        for spi_in, watched in list(self._idle.items()):
            child = self.sad.get(spi_in)
            if child is None or spi_in in self._lingering:
                del self._idle[spi_in]
                continue
            timeout, seen, since = watched
            counters = child.counters
            packets = counters.packets_in + counters.packets_out
            if packets != seen:
                watched[1], watched[2] = packets, now
            elif now - since >= timeout:
                del self._idle[spi_in]
                self.on_esp_event(SaIdle(spi_in, child.params.spi_out, now - since))

    async def _tun_pump(self, fd: int) -> None:
        tun = self.tun
        while True:
            packets = await tun.read_batch(fd, BATCH)
            if packets:
                self.send_packets(packets)
            if len(packets) == BATCH:
                await trio.lowlevel.checkpoint()  # a full batch: let the others run
            elif TUN_HOLD and len(packets) >= TUN_HOLD_AFTER:
                await trio.sleep(TUN_HOLD)

    async def _esp_pump(self, sock: EspSocket) -> None:
        while True:
            batch = await sock.recv_batch(BATCH)
            self.receive_esp([esp for esp, _peer, _tos in batch],
                             {i: tos for i, (_, _, tos) in enumerate(batch) if tos})
            self.flush()
            self._drain_events()
            if len(batch) == BATCH:
                await trio.lowlevel.checkpoint()

    def stats(self) -> dict[str, int]:
        out = self.counters.as_dict()
        out.update(self.sad.counters.as_dict())
        out.update({f"sa_{k}": v for k, v in self.sad.totals().as_dict().items()})
        out["acquires"] = self.acquires
        return out
