"""Outbound ESP (RFC 4303 3.3): sequence number, padding, encryption, ICV.

`encapsulate(packet)` takes what the host routed into the TUN device and returns the
ESP packet (SPI .. ICV) that goes into a UDP/4500 datagram or a raw protocol-50
socket. Tunnel mode protects the whole packet; transport mode protects the payload
and leaves the host's header outside (`encapsulate_ip` returns it rebuilt).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from itertools import islice
from typing import TYPE_CHECKING, NoReturn

from cryptography.hazmat.primitives.ciphers import CipherContext

from .ciphers import AeadObject
from .counters import EspDrop, SaCounters
from .ip import ADDRESS_SPANS, IPPROTO_ESP, HeaderTemplate, internet_checksum, tos_of
from .params import Address, ChildSaParams

if TYPE_CHECKING:
    import hmac

    from .sa import ChildSa

_SPI_SEQ = struct.Struct("!II")
_SPI_SEQ_IV = struct.Struct("!IIQ")  # AEAD: the 8-byte IV is the 64-bit sequence number
_AAD_ESN = struct.Struct("!III")  # SPI | seq high | seq low (RFC 4106 5, RFC 7634 2.1)
_NONCE = struct.Struct("!4sQ")  # salt | IV (RFC 4106 4, RFC 7634 2)
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
# tunnel mode: next header for the inner packet's version nibble (0: not an IP packet)
_TUNNEL_NEXT_HEADER = (0, 0, 0, 0, 4, 0, 41, 0, 0, 0, 0, 0, 0, 0, 0, 0)
NEVER = 1 << 80  # an alarm threshold no counter reaches
_AEAD_OVERHEAD = 8 + 8 + 16  # SPI and sequence number, IV, ICV (GCM-16, Poly1305)


def _flow_end(packets: list[bytes], at: int) -> int:
    """The index after the packets from `at` on with packets[at]'s IP version, addresses
    and TOS (at + 1 when that one is not an IP packet)."""
    first = packets[at]
    version = first[0] >> 4 if first else 0
    if version not in ADDRESS_SPANS:
        return at + 1
    low, high = ADDRESS_SPANS[version]
    key = first[low:high]
    tos = tos_of(first)
    end, total = at + 1, len(packets)
    # (a packet too short to hold the addresses cannot match them)
    while end < total and packets[end][low:high] == key and \
            packets[end][0] >> 4 == version and tos_of(packets[end]) == tos:
        end += 1
    return end


class OutboundSa:
    """The sending half of a Child SA. Subclasses hold the cipher."""

    __slots__ = ("_alarm_bytes", "_alarm_seq", "_block", "_esn", "_outer", "_params",
                 "_seq_max", "_seq_soft", "_spi", "_tfc", "_trailers", "_transport", "child",
                 "counters", "encap", "exhausted", "remote", "seq", "spi", "tos_mask")

    def __init__(self, child: ChildSa, params: ChildSaParams, local_ip: bytes,
                 remote_ip: bytes) -> None:
        self.child = child
        self.counters: SaCounters = child.counters
        self.spi = params.spi_out
        self._spi = int.from_bytes(params.spi_out, "big")
        self._params = params
        self._esn = params.esn
        self._transport = params.mode == "transport"
        self._block = max(4, params.encr.block_size)  # RFC 4303 2.4: 4-byte alignment
        self.remote: Address = params.remote  # where the worker sends (UDP port with encap)
        self.encap = params.encap
        # the bits of a packet's TOS its ESP packet's outer header takes: the DSCP
        # (RFC 4301 5.1.2.1) and the ECN field: in tunnel mode unless copy_ecn is off
        # (RFC 6040 4.1, normal mode: copied as it is, CE too); in transport mode the
        # header is the packet's own (the peer's rebuilt one takes it back, and a
        # router's CE mark with it)
        self.tos_mask = (0xFC if params.copy_dscp else 0) | \
            (0x03 if params.copy_ecn or self._transport else 0)
        self._outer = HeaderTemplate(local_ip, remote_ip)
        # RFC 4303 2.7: tunnel mode only, where the inner header says where padding starts
        self._tfc = 0 if self._transport else params.tfc_padding
        self.seq = params.initial_seq  # the last sequence number used
        self._seq_max = (1 << 64) - 1 if params.esn else (1 << 32) - 1
        # ask for a rekey with 1/16 of the sequence space left
        self._seq_soft = self._seq_max - (self._seq_max >> 4)
        self.exhausted = False
        self._trailers: dict[int, bytes] = {}
        self._alarm_seq = NEVER
        self._alarm_bytes = NEVER
        self.rearm()

    def encapsulate(self, packet: bytes) -> bytes:
        """The ESP packet for `packet`; raises EspDrop (already counted) when it cannot."""
        raise NotImplementedError

    def encapsulate_flow(self, packets: list[bytes], at: int, flow: bool
                         ) -> tuple[list[list[bytes]], int]:
        """`encapsulate` packets[at] and, with `flow`, the packets after it that have its
        IP version, addresses (for a SAD that selects on addresses only: this SA's) and
        TOS (one outer DSCP and ECN field for all, see `tos_mask`).

        Returns the ESP packets in runs of equal length, in order (what one UDP GSO send
        can carry), and the index of the first packet not used. A packet that cannot go
        out is dropped and counted. It may stop before the flow ends (always when a hard
        lifetime removed the SA): the caller looks the next packet up again.
        """
        end = _flow_end(packets, at) if flow else at + 1
        runs: list[list[bytes]] = []
        run: list[bytes] = []
        child = self.child
        for n in range(at, end):
            if child.removed:
                return runs, n
            try:
                esp = self.encapsulate(packets[n])
            except EspDrop:
                continue
            if run and len(esp) == len(run[0]):
                run.append(esp)
            else:
                run = [esp]
                runs.append(run)
        return runs, end

    def encapsulate_ip(self, packet: bytes) -> bytes:
        """`encapsulate` with an IP header in front (protocol / next header 50).

        Tunnel mode builds the outer header from the SA's addresses; transport mode keeps
        the host's header (options, TTL, DSCP, identification) with protocol, lengths
        and the IPv4 checksum fixed. For raw sockets with IP_HDRINCL, or captures.
        """
        esp = self.encapsulate(packet)
        if not self._transport:
            return self._outer.build(IPPROTO_ESP, len(esp)) + esp
        if packet[0] >> 4 == 4:
            ihl = (packet[0] & 0x0F) * 4
            header = bytearray(packet[:ihl])
            _U16.pack_into(header, 2, ihl + len(esp))
            header[9] = IPPROTO_ESP
            header[10:12] = b"\x00\x00"
            _U16.pack_into(header, 10, internet_checksum(bytes(header)))
        else:
            header = bytearray(packet[:40])
            _U16.pack_into(header, 4, len(esp))
            header[6] = IPPROTO_ESP
        return bytes(header) + esp

    # --- shared pieces ---------------------------------------------------------------

    def _payload(self, packet: bytes) -> tuple[bytes, int]:
        """What ESP protects and its next header value."""
        if not self._transport:
            next_header = _TUNNEL_NEXT_HEADER[packet[0] >> 4] if packet else 0
            if not next_header:
                self._drop("malformed_drops")
            if len(packet) < self._tfc:  # TFC padding (RFC 4303 2.7): the receiver cuts
                packet += bytes(self._tfc - len(packet))  # at the inner packet's length
            return packet, next_header
        length = len(packet)
        if length >= 20 and packet[0] >> 4 == 4:
            ihl = (packet[0] & 0x0F) * 4
            total = _U16.unpack_from(packet, 2)[0]
            if ihl < 20 or total < ihl or total > length:
                self._drop("malformed_drops")
            if _U16.unpack_from(packet, 6)[0] & 0x3FFF:
                # RFC 4303 3.1.1: transport mode applies to whole datagrams only
                self._drop("policy_drops")
            return packet[ihl:total], packet[9]
        if length >= 40 and packet[0] >> 4 == 6:
            end = 40 + _U16.unpack_from(packet, 4)[0]
            if end > length:
                self._drop("malformed_drops")
            if packet[6] == 0:
                # a hop-by-hop header must stay in front of ESP (RFC 4303 3.1.1); we
                # place ESP right after the fixed header, so such packets are refused
                self._drop("policy_drops")
            return packet[40:end], packet[6]
        self._drop("malformed_drops")

    def _trailer(self, pad: int, next_header: int) -> bytes:
        """Padding 1, 2, 3, ... then pad length and next header (RFC 4303 2.4), cached."""
        key = pad << 8 | next_header
        trailer = self._trailers.get(key)
        if trailer is None:
            trailer = self._trailers[key] = bytes(range(1, pad + 1)) + bytes((pad, next_header))
        return trailer

    def _next_seq(self) -> int:
        seq = self.seq + 1
        if seq > self._seq_max:
            self._refuse()
        self.seq = seq
        return seq

    def _refuse(self) -> NoReturn:
        if self.child.removed:
            self._drop("expired_drops")
        if not self.exhausted:
            self.exhausted = True
            self.child.sequence_exhausted()
        self._drop("seq_exhausted_drops")

    def _drop(self, reason: str) -> NoReturn:
        counters = self.counters
        setattr(counters, reason, getattr(counters, reason) + 1)
        raise EspDrop(reason)

    def _counted(self, seq: int, size: int) -> None:
        counters = self.counters
        counters.packets_out += 1
        counters.bytes_out += size
        if seq >= self._alarm_seq or counters.bytes_out >= self._alarm_bytes:
            self._alarm(seq)

    # --- lifetimes -------------------------------------------------------------------

    def close(self) -> None:
        """Refuse everything from now on (the SA left the SAD)."""
        self._seq_max = -1

    def rearm(self) -> None:
        """Recompute the thresholds that send a packet down the slow path."""
        p = self._params
        seq_alarm = bytes_alarm = NEVER
        if p.hard_packets is not None:
            seq_alarm = p.initial_seq + p.hard_packets
        if p.hard_bytes is not None:
            bytes_alarm = p.hard_bytes
        if not self.child.soft_expired:
            seq_alarm = min(seq_alarm, self._seq_soft)
            if p.soft_packets is not None:
                seq_alarm = min(seq_alarm, p.initial_seq + p.soft_packets)
            if p.soft_bytes is not None:
                bytes_alarm = min(bytes_alarm, p.soft_bytes)
        self._alarm_seq = seq_alarm
        self._alarm_bytes = bytes_alarm

    def _alarm(self, seq: int) -> None:
        p = self._params
        packets = seq - p.initial_seq
        sent = self.counters.bytes_out
        if p.hard_packets is not None and packets >= p.hard_packets:
            self.child.hard_expire("packets_out")
        elif p.hard_bytes is not None and sent >= p.hard_bytes:
            self.child.hard_expire("bytes_out")
        elif p.soft_packets is not None and packets >= p.soft_packets:
            self.child.soft_expire("packets_out")
        elif p.soft_bytes is not None and sent >= p.soft_bytes:
            self.child.soft_expire("bytes_out")
        elif seq >= self._seq_soft:
            self.child.soft_expire("sequence")


class AeadOutbound(OutboundSa):
    """AES-GCM-16 (RFC 4106) and ChaCha20-Poly1305 (RFC 7634)."""

    __slots__ = ("_aead", "_salt")

    def __init__(self, child: ChildSa, params: ChildSaParams, local_ip: bytes,
                 remote_ip: bytes, aead: AeadObject, salt: bytes) -> None:
        super().__init__(child, params, local_ip, remote_ip)
        self._aead = aead
        self._salt = salt

    def encapsulate(self, packet: bytes) -> bytes:
        if self._transport or self._tfc:
            payload, next_header = self._payload(packet)
        else:  # the hot path, inline
            payload = packet
            next_header = _TUNNEL_NEXT_HEADER[packet[0] >> 4] if packet else 0
            if not next_header:
                self._drop("malformed_drops")
        seq = self.seq + 1
        if seq > self._seq_max:
            self._refuse()
        self.seq = seq
        pad = -(len(payload) + 2) & 3
        trailer = self._trailers.get(pad << 8 | next_header) or self._trailer(pad, next_header)
        seq_low = seq & 0xFFFFFFFF
        # a counter IV is unique per key, which is all GCM and ChaCha20 ask (RFC 4106 3.1)
        header = _SPI_SEQ_IV.pack(self._spi, seq_low, seq)
        aad = _AAD_ESN.pack(self._spi, seq >> 32, seq_low) if self._esn else header[:8]
        out = header + self._aead.encrypt(_NONCE.pack(self._salt, seq), payload + trailer, aad)
        counters = self.counters
        counters.packets_out += 1
        counters.bytes_out += len(packet)
        if seq >= self._alarm_seq or counters.bytes_out >= self._alarm_bytes:
            self._alarm(seq)
        return out


    def encapsulate_flow(self, packets: list[bytes], at: int, flow: bool
                         ) -> tuple[list[list[bytes]], int]:
        # Tunnel mode, an IP packet first (an IPv4 header long at least), and no alarm or
        # sequence limit within reach however many of the packets left go out (each
        # below 128 KiB): the loop below, with no check per packet but the flow's, the
        # trailer and run kept while the length stays, the counters added once.
        # Anything else goes through `encapsulate` one by one.
        left = len(packets) - at if flow else 1
        first = packets[at]
        next_header = _TUNNEL_NEXT_HEADER[first[0] >> 4] if len(first) >= 20 else 0
        if self._transport or not next_header or self.child.removed or self._tfc \
                or self.seq + left >= min(self._seq_max + 1, self._alarm_seq) \
                or self.counters.bytes_out + (left << 17) >= self._alarm_bytes:
            return super().encapsulate_flow(packets, at, flow)
        low, high = ADDRESS_SPANS[first[0] >> 4]
        key = first[low:high]
        lead = first[0]  # version (and IPv4 header length, IPv6 traffic class)
        # the rest of the TOS: IPv4's second byte, IPv6's traffic class bits in it
        mask = 0xFF if lead >> 4 == 4 else 0xF0
        second = first[1] & mask
        runs: list[list[bytes]] = []
        run: list[bytes] = []
        append = run.append  # the current run's (the first packet starts one)
        spi = self._spi
        esn = self._esn
        encrypt = self._aead.encrypt
        salt = self._salt
        pack_header = _SPI_SEQ_IV.pack
        pack_nonce = _NONCE.pack
        seq = self.seq
        sent = 0
        last_size = run_length = -1
        trailer = b""
        todo: Iterable[bytes] = (first,)
        if flow:
            todo = islice(packets, at, None) if at else packets
        for packet in todo:
            # Another flow ends the loop; so does another TOS, and may a change in the
            # first byte alone (IPv4 options, IPv6 traffic class): the caller goes on
            # from that packet.
            if packet[low:high] != key or packet[0] != lead or packet[1] & mask != second:
                break
            size = len(packet)
            if size != last_size:
                last_size = size
                trailer = self._trailer(-(size + 2) & 3, next_header)
                length = _AEAD_OVERHEAD + size + len(trailer)
                if length != run_length:
                    run_length = length
                    run = []
                    runs.append(run)
                    append = run.append
            seq += 1
            header = pack_header(spi, seq & 0xFFFFFFFF, seq)
            aad = _AAD_ESN.pack(spi, seq >> 32, seq & 0xFFFFFFFF) if esn else header[:8]
            append(header + encrypt(pack_nonce(salt, seq), packet + trailer, aad))
            sent += size
        used = seq - self.seq
        counters = self.counters
        counters.packets_out += used
        counters.bytes_out += sent
        self.seq = seq
        return runs, at + used


class CbcOutbound(OutboundSa):
    """AES-CBC (RFC 3602) or 3DES-CBC with HMAC (RFC 4868, RFC 2404)."""

    __slots__ = ("_encryptor", "_hmac", "_icv_size")

    def __init__(self, child: ChildSa, params: ChildSaParams, local_ip: bytes,
                 remote_ip: bytes, encryptor: CipherContext, mac: hmac.HMAC,
                 icv_size: int) -> None:
        super().__init__(child, params, local_ip, remote_ip)
        self._encryptor = encryptor
        self._hmac = mac
        self._icv_size = icv_size

    def encapsulate(self, packet: bytes) -> bytes:
        payload, next_header = self._payload(packet)
        seq = self._next_seq()
        block = self._block
        pad = -(len(payload) + 2) % block
        trailer = self._trailers.get(pad << 8 | next_header) or self._trailer(pad, next_header)
        # the first output block is the IV (see ciphers.py)
        body = _SPI_SEQ.pack(self._spi, seq & 0xFFFFFFFF) + self._encryptor.update(
            os.urandom(block) + payload + trailer)
        mac = self._hmac.copy()
        mac.update(body)
        if self._esn:
            mac.update(_U32.pack(seq >> 32))  # RFC 4303 3.3.2.1: high bits in the ICV only
        out = body + mac.digest()[: self._icv_size]
        self._counted(seq, len(packet))
        return out
