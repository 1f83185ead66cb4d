"""The Security Association Database of one worker (RFC 4301 4.4.2).

Inbound lookup is one dict access by SPI. Outbound lookup matches the packet's flow
against each SA's selectors: SAs whose remote side is single hosts (road warriors,
transport mode) sit in a dict keyed by address, the rest in a short list, newest
first. Key install is explicit: `install`, `replace` on rekey (the new SA takes the
outbound traffic at once, the old one keeps receiving until `remove`), `succeed` on the
peer's rekey (the new SA sends once the peer can receive on it), `remove`. After a rekey
collision (RFC 7296 2.8.1) only an SA both ends have installed sends.
"""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Callable, Iterator

from .counters import EspDrop, SaCounters, SadCounters
from .events import EspEvent
from .inbound import InboundSa
from .ip import ecn_decapsulate, flow_of, with_tos
from .outbound import OutboundSa
from .params import ChildSaParams
from .sa import ChildSa

_U32 = struct.Struct("!I")


class Sad:
    def __init__(self) -> None:
        self.counters = SadCounters()
        self._children: dict[bytes, ChildSa] = {}  # by spi_in
        self._inbound: dict[int, InboundSa] = {}  # by spi_in as an integer (hot path)
        self._by_remote_host: dict[bytes, list[ChildSa]] = {}
        self._ranged: list[ChildSa] = []
        self._port_aware = 0  # indexed SAs whose selectors name protocols or ports
        self._events: deque[EspEvent] = deque()
        self._removed_totals = SaCounters()  # counters of SAs no longer here
        self._waiting: dict[bytes, bytes] = {}  # receive-only SAs: new spi_in -> old spi_in
        # SAs a rekey of ours made send (`replace`): new spi_in -> old spi_in (see `_fall_back`)
        self._replaced: dict[bytes, bytes] = {}
        self._deleted: set[bytes] = set()  # deleted with the peer, still decrypting
        # called with each SA as it leaves (`remove`, its hard lifetime), counters final
        self.on_removed: Callable[[ChildSa], None] | None = None

    # --- key install -----------------------------------------------------------------

    def install(self, params: ChildSaParams, *, outbound: bool = True) -> ChildSa:
        """Add a Child SA; ValueError if its parameters cannot work or its SPI is taken.

        `outbound=False` installs it for receiving only, until `activate` (see `succeed`).
        """
        if params.spi_in in self._children:
            raise ValueError(f"inbound SPI {params.spi_in.hex()} is already installed")
        if params.spi_in == b"\x00\x00\x00\x00":
            raise ValueError("SPI 0 is reserved (RFC 4303 2.1)")
        child = ChildSa(params, self._events.append, self._forget)
        self._children[params.spi_in] = child
        self._inbound[_U32.unpack(params.spi_in)[0]] = child.inbound
        if outbound:
            self._index_outbound(child)
        else:
            self._waiting[params.spi_in] = b""
        return child

    def succeed(self, old_spi_in: bytes, params: ChildSaParams) -> ChildSa:
        """A rekey the peer started: the new SA decrypts at once, but we keep sending on
        the old one until `activate` (the peer used the new SA, or deleted the old one).

        The peer installs its inbound half only after reading our CREATE_CHILD_SA
        response, so sending on the new SA at once could lose packets (RFC 7296 2.8).
        """
        new = self.install(params, outbound=False)
        self._waiting[params.spi_in] = old_spi_in
        return new

    def activate(self, spi_in: bytes) -> None:
        """Send on an SA installed by `succeed`; the one it replaces stops sending."""
        if spi_in not in self._waiting:
            return
        old_spi_in = self._waiting.pop(spi_in)
        new = self._children.get(spi_in)
        if new is None:
            return
        self._index_outbound(new)
        old = self._children.get(old_spi_in)
        if old is not None and old is not new:
            old.retiring = True
            self._unindex_outbound(old)

    def successor_of(self, old_spi_in: bytes) -> bytes | None:
        """The SA waiting (by `succeed`) to take over from `old_spi_in`, if any."""
        return next((new for new, old in self._waiting.items() if old == old_spi_in), None)

    @property
    def waiting(self) -> dict[bytes, bytes]:
        """SAs installed by `succeed` and not yet sending: new spi_in -> old spi_in."""
        return self._waiting

    def replace(self, old_spi_in: bytes, params: ChildSaParams) -> ChildSa:
        """Install the rekeyed SA and move outbound traffic to it at once.

        The old SA keeps decrypting what is still in flight until `remove(old_spi_in)`;
        it no longer sends or asks for a rekey. An unknown old SPI (it may have expired
        meanwhile) just installs.
        """
        new = self.install(params)
        old = self._children.get(old_spi_in)
        if old is not None and old is not new:
            old.retiring = True
            self._unindex_outbound(old)
            self._replaced[params.spi_in] = old_spi_in
        return new

    def deleted(self, spi_in: bytes) -> None:
        """The SA was deleted with the peer (it may still decrypt a while): it never sends
        again, also when the SA that took its traffic goes. Its successor, as in
        `remove`."""
        child = self._children.get(spi_in)
        if child is not None:
            self._deleted.add(spi_in)
            self._succeed_now(spi_in, child)

    def remove(self, spi_in: bytes) -> ChildSa | None:
        """Delete a Child SA (no event: the caller asked). Returns it, or None if unknown.
        An SA waiting to succeed it starts sending now (`_succeed_now`)."""
        child = self._children.get(spi_in)
        self._succeed_now(spi_in, child)
        if child is None:
            self._waiting.pop(spi_in, None)
            return None
        child.close()
        self._forget(child)
        return child

    def _succeed_now(self, spi_in: bytes, child: ChildSa | None) -> None:
        """The SA of the peer's rekey waiting to succeed `spi_in` sends now, unless a
        rekey of ours took the traffic already (the waiting SA is then the peer's
        redundant one of a collision, RFC 7296 2.8.1: the peer deletes it, and may never
        have installed it)."""
        successor = self.successor_of(spi_in)
        if successor is not None and not (child is not None and child.retiring):
            self.activate(successor)

    def _forget(self, child: ChildSa) -> None:
        if self._children.get(child.spi_in) is not child:
            return
        sending = not child.retiring and child.spi_in not in self._waiting
        del self._children[child.spi_in]
        del self._inbound[_U32.unpack(child.spi_in)[0]]
        self._waiting.pop(child.spi_in, None)
        self._deleted.discard(child.spi_in)
        self._unindex_outbound(child)
        old_spi_in = self._replaced.pop(child.spi_in, None)
        if sending and old_spi_in is not None:
            self._fall_back(old_spi_in)
        self._removed_totals.add(child.counters)
        if self.on_removed is not None:
            self.on_removed(child)

    def _fall_back(self, old_spi_in: bytes) -> None:
        """A rekey of ours that took `old_spi_in`'s traffic went while it sent: the
        redundant SA of a rekey collision we lost (RFC 7296 2.8.1). The old SA sends again
        while the peer has it; once the peer deleted it, the SA the peer's rekey made."""
        old = self._children.get(old_spi_in)
        if old is not None and old.retiring and old_spi_in not in self._deleted:
            old.retiring = False
            self._index_outbound(old)
            return
        successor = self.successor_of(old_spi_in)
        if successor is not None:
            self.activate(successor)

    def _index_outbound(self, child: ChildSa) -> None:
        if not child.address_only:
            self._port_aware += 1
        hosts = child.remote_selectors.hosts()
        if hosts is None:
            self._ranged.insert(0, child)
            return
        for host in hosts:
            self._by_remote_host.setdefault(host, []).insert(0, child)

    def _unindex_outbound(self, child: ChildSa) -> None:
        found = False
        if child in self._ranged:
            self._ranged.remove(child)
            found = True
        for host in child.remote_selectors.hosts() or ():
            children = self._by_remote_host.get(host, [])
            if child in children:
                children.remove(child)
                found = True
                if not children:
                    del self._by_remote_host[host]
        if found and not child.address_only:
            self._port_aware -= 1

    # --- lookups -----------------------------------------------------------------------

    @property
    def address_only(self) -> bool:
        """Whether every SA that sends matches packets on addresses alone (no ports)."""
        return self._port_aware == 0

    def get(self, spi_in: bytes) -> ChildSa | None:
        return self._children.get(spi_in)

    def inbound(self, spi: bytes) -> InboundSa | None:
        if len(spi) != 4:
            return None
        return self._inbound.get(_U32.unpack(spi)[0])

    def outbound_for(self, packet: bytes) -> OutboundSa | None:
        """The SA that protects `packet` (from the TUN), or None: drop it, never send it clear.

        Misses are counted (`no_sa_out`, or `malformed_out` for a packet that does not parse).
        """
        if self._port_aware:
            return self._outbound_by_flow(packet)
        # every SA matches on addresses alone: no need to parse beyond the IP header
        length = len(packet)
        version = packet[0] >> 4 if length >= 20 else 0
        if version == 4:
            src, dst = packet[12:16], packet[16:20]
        elif version == 6 and length >= 40:
            src, dst = packet[8:24], packet[24:40]
        else:
            self.counters.malformed_out += 1
            return None
        candidates = self._by_remote_host.get(dst)
        if candidates is not None:
            for child in candidates:
                if child.local_selectors.covers_address(src):
                    return child.outbound
        for child in self._ranged:
            if child.remote_selectors.covers_address(dst) and \
                    child.local_selectors.covers_address(src):
                return child.outbound
        self.counters.no_sa_out += 1
        return None

    def _outbound_by_flow(self, packet: bytes) -> OutboundSa | None:
        flow = flow_of(packet)
        if flow is None:
            self.counters.malformed_out += 1
            return None
        version, src, dst, protocol, sport, dport = flow
        candidates = self._by_remote_host.get(dst)
        if candidates is not None:
            for child in candidates:
                if child.local_selectors.covers(version, src, protocol, sport) and \
                        child.remote_selectors.covers(version, dst, protocol, dport):
                    return child.outbound
        for child in self._ranged:
            if child.remote_selectors.covers(version, dst, protocol, dport) and \
                    child.local_selectors.covers(version, src, protocol, sport):
                return child.outbound
        self.counters.no_sa_out += 1
        return None

    def decapsulate_untrusted(self, data: bytes, outer_tos: int = 0) -> bytes:
        """The inner packet of an ESP packet for any installed SA; EspDrop (counted) if not.
        `outer_tos`: the TOS / traffic class of the header it arrived in. In tunnel mode
        its ECN field acts on the packet's as RFC 6040 4.2 says; in transport mode the
        header we rebuild is the packet's own and takes it whole (DSCP and ECN, as a
        kernel's transport-mode SA leaves the header it came in)."""
        if len(data) < 8:
            self.counters.malformed_in += 1
            raise EspDrop("malformed_in")
        sa = self._inbound.get(_U32.unpack_from(data)[0])
        if sa is None:
            self.counters.no_sa_in += 1
            raise EspDrop("no_sa_in")
        inner = sa.decapsulate_untrusted(data)
        if not outer_tos:
            return inner
        if sa.transport:
            return with_tos(inner, outer_tos)
        if outer_tos & 1 and sa.ecn:  # ECT(1) or CE: what RFC 6040 4.2 acts on
            marked = ecn_decapsulate(inner, outer_tos)
            if marked is None:
                sa.counters.ecn_drops += 1
                raise EspDrop("ecn_drops")
            return marked
        return inner

    def decapsulate_batch(self, datagrams: list[bytes],
                          outer_tos: dict[int, int] | None = None) -> list[bytes]:
        """`decapsulate_untrusted` of each, in order: the inner packets of those that
        pass; the others are dropped and counted. `outer_tos` maps the index of each
        datagram that arrived with a TOS other than 0 to that TOS; those whose TOS
        changes nothing (a DSCP or ECT(0) on a tunnel-mode SA) keep the fast path."""
        if not outer_tos:
            return self._decapsulate_plain(datagrams)
        acting = {i: tos for i, tos in outer_tos.items()
                  if tos & 1 or self._transport_sa(datagrams[i])}
        if not acting:
            return self._decapsulate_plain(datagrams)
        out: list[bytes] = []
        start = 0
        for index in sorted(acting):
            if start < index:
                out += self._decapsulate_plain(datagrams[start:index])
            with contextlib.suppress(EspDrop):  # counted
                out.append(self.decapsulate_untrusted(datagrams[index], acting[index]))
            start = index + 1
        if start < len(datagrams):
            out += self._decapsulate_plain(datagrams[start:])
        return out

    def _transport_sa(self, data: bytes) -> bool:
        """Whether the ESP packet is for an installed transport-mode SA."""
        sa = self._inbound.get(_U32.unpack_from(data)[0]) if len(data) >= 8 else None
        return sa is not None and sa.transport

    def _decapsulate_plain(self, datagrams: list[bytes]) -> list[bytes]:
        """`decapsulate_batch` of datagrams with no outer TOS to act on: runs of one
        SA's ordinary packets go through `InboundSa.decapsulate_run`."""
        out: list[bytes] = []
        append = out.append
        inbound = self._inbound
        unpack = _U32.unpack_from
        counters = self.counters
        i, n = 0, len(datagrams)
        while i < n:
            data = datagrams[i]
            if len(data) < 8:
                counters.malformed_in += 1
                i += 1
                continue
            sa = inbound.get(unpack(data)[0])
            if sa is None:
                counters.no_sa_in += 1
                i += 1
                continue
            end = sa.decapsulate_run(datagrams, i, append)
            if end > i:
                i = end
                continue
            i += 1
            try:
                append(sa.decapsulate_untrusted(data))
            except EspDrop:
                continue  # counted
        return out

    # --- events and counters -----------------------------------------------------------

    def next_event(self) -> EspEvent | None:
        return self._events.popleft() if self._events else None

    def totals(self) -> SaCounters:
        """Every SA's counters summed, including SAs already removed."""
        total = SaCounters()
        total.add(self._removed_totals)
        for child in self._children.values():
            total.add(child.counters)
        return total

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self) -> Iterator[ChildSa]:
        return iter(list(self._children.values()))
