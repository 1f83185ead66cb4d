"""IPv4/IPv6 header helpers for the ESP data plane.

Only what ESP needs: the flow of a packet for selector matching, building a plain
header (tunnel-mode outer header, transport-mode header after decapsulation), and the
Internet checksum. Packets come from a TUN device or out of an authenticated ESP
payload; every reader here checks lengths and returns None instead of raising.
"""

from __future__ import annotations

import struct

IPPROTO_ICMP = 1
IPPROTO_IPIP = 4  # ESP next header for an IPv4 packet (tunnel mode)
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41  # ESP next header for an IPv6 packet (tunnel mode)
IPPROTO_ESP = 50
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59  # "no next header": an ESP dummy packet (RFC 4303 2.6)
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

# Protocols whose first four bytes are a source and a destination port.
PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_UDPLITE})
# IPv6 extension headers walked to find the upper-layer protocol (RFC 8200 4).
_IPV6_EXTENSIONS = frozenset({0, 43, 60})
_IPV6_FRAGMENT = 44
_IPV6_AH = 51

NO_PORTS = -1  # RFC 4301 OPAQUE: a non-first fragment or a protocol without ports

# Where the source and destination addresses lie together, by IP version: what an SAD
# that selects on addresses alone looks at, so what makes packets one flow.
ADDRESS_SPANS = {4: (12, 20), 6: (8, 40)}

_PORTS = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
DEFAULT_TTL = 64

# (version, source, destination, protocol, source port, destination port); for ICMP
# both "ports" are type << 8 | code (RFC 7296 3.13.1), otherwise NO_PORTS when absent.
Flow = tuple[int, bytes, bytes, int, int, int]


def flow_of(packet: bytes) -> Flow | None:
    """The selector-relevant fields of an IPv4 or IPv6 packet, or None if it is malformed."""
    length = len(packet)
    if length < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or length < ihl:
            return None
        protocol = packet[9]
        src = packet[12:16]
        dst = packet[16:20]
        offset = ihl
        # a non-first fragment carries no upper-layer header
        first = not (_U16.unpack_from(packet, 6)[0] & 0x1FFF)
    elif version == 6:
        if length < 40:
            return None
        protocol = packet[6]
        src = packet[8:24]
        dst = packet[24:40]
        offset = 40
        first = True
        for _ in range(8):  # bounded walk over extension headers
            if protocol in _IPV6_EXTENSIONS:
                if offset + 8 > length:
                    return None
                protocol, size = packet[offset], (packet[offset + 1] + 1) * 8
            elif protocol == _IPV6_FRAGMENT:
                if offset + 8 > length:
                    return None
                first = not (_U16.unpack_from(packet, offset + 2)[0] & 0xFFF8)
                protocol, size = packet[offset], 8
            elif protocol == _IPV6_AH:
                if offset + 8 > length:
                    return None
                protocol, size = packet[offset], (packet[offset + 1] + 2) * 4
            else:
                break
            offset += size
        else:
            return None
    else:
        return None
    # a truncated upper-layer header has no ports either: only "any port" selectors match
    if first and protocol in PORT_PROTOCOLS and offset + 4 <= length:
        sport, dport = _PORTS.unpack_from(packet, offset)
        return version, src, dst, protocol, sport, dport
    if first and protocol in (IPPROTO_ICMP, IPPROTO_ICMPV6) and offset + 2 <= length:
        type_code = (packet[offset] << 8) | packet[offset + 1]
        return version, src, dst, protocol, type_code, type_code
    return version, src, dst, protocol, NO_PORTS, NO_PORTS


def tos_of(packet: bytes) -> int:
    """The TOS / traffic class byte (DSCP and ECN) of an IPv4 or IPv6 packet, 0 for
    anything else. A tunnel's outer header takes the bits its SA copies from it
    (RFC 4301 5.1.2.1: the DSCP; RFC 6040 4.1: the ECN field, normal mode)."""
    if len(packet) < 2:
        return 0
    version = packet[0] >> 4
    if version == 4:
        return packet[1]
    if version == 6:
        return (packet[0] << 4 | packet[1] >> 4) & 0xFF
    return 0


# ECN codepoints (RFC 3168 5), the low two bits of the TOS / traffic class
NOT_ECT, ECT_1, ECT_0, CE = 0, 1, 2, 3


def ecn_decapsulate(inner: bytes, outer: int) -> bytes | None:
    """`inner` (a tunnel's IPv4 or IPv6 packet) with the ECN field RFC 6040 4.2 gives
    it for the `outer` header's ECN codepoint; None: the packet must be dropped (CE
    outside, Not-ECT inside: that transport would not understand the mark).

    Only outer CE (CE inside, unless Not-ECT) and outer ECT(1) over inner ECT(0)
    (ECT(1) inside) change anything; an IPv4 header's checksum is updated for the
    change (RFC 1624)."""
    outer &= 3
    if outer not in (CE, ECT_1) or len(inner) < 2:
        return inner
    version = inner[0] >> 4
    if version == 4:
        if len(inner) < 20:
            return inner
        ecn = inner[1] & 3
    elif version == 6:
        ecn = inner[1] >> 4 & 3
    else:
        return inner
    if outer == CE:
        if ecn == NOT_ECT:
            return None
        new = CE
    else:
        new = ECT_1 if ecn == ECT_0 else ecn
    if new == ecn:
        return inner
    return with_tos(inner, tos_of(inner) & 0xFC | new)


def with_tos(packet: bytes, tos: int) -> bytes:
    """`packet` (IPv4 with a whole header, or IPv6) with `tos` as its TOS / traffic
    class; an IPv4 header's checksum is updated for the change (RFC 1624)."""
    if packet[0] >> 4 == 6:
        return bytes([0x60 | tos >> 4, (tos & 0x0F) << 4 | packet[1] & 0x0F]) + packet[2:]
    # the checksum's word 0 is version/IHL | TOS: HC' = ~(~HC + ~m + m') (RFC 1624 3)
    word, new_word = packet[0] << 8 | packet[1], packet[0] << 8 | tos
    total = (~_U16.unpack_from(packet, 10)[0] & 0xFFFF) + (~word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return packet[:1] + bytes([tos]) + packet[2:10] + _U16.pack(~total & 0xFFFF) + packet[12:]


def ones_complement_sum(data: bytes) -> int:
    """The 16-bit one's complement sum of `data` (RFC 1071), not yet inverted.

    2^16 = 1 (mod 2^16 - 1), so the big-endian integer of the data is congruent to the
    sum of its 16-bit words: one C-speed modulo instead of a Python loop.
    """
    if len(data) & 1:
        data += b"\x00"
    value = int.from_bytes(data, "big")
    folded = value % 0xFFFF
    return 0xFFFF if folded == 0 and value else folded


def internet_checksum(data: bytes) -> int:
    return ~ones_complement_sum(data) & 0xFFFF


def ip_header(src: bytes, dst: bytes, protocol: int, payload_length: int) -> bytes:
    """A minimal IPv4 (20 bytes) or IPv6 (40 bytes) header; the family follows `src`."""
    if len(src) == 4:
        header = bytearray(_IPV4.pack(0x45, 0, 20 + payload_length, 0, 0, DEFAULT_TTL,
                                      protocol, 0, src, dst))
        _U16.pack_into(header, 10, internet_checksum(bytes(header)))
        return bytes(header)
    return _IPV6.pack(0x60000000, payload_length, protocol, DEFAULT_TTL, src, dst)


class HeaderTemplate:
    """Builds the header for one (src, dst) pair fast: the constant checksum part is summed once."""

    __slots__ = ("_dst", "_partial", "_src", "_v4")

    def __init__(self, src: bytes, dst: bytes) -> None:
        if len(src) != len(dst) or len(src) not in (4, 16):
            raise ValueError("source and destination must both be IPv4 or both IPv6")
        self._src = src
        self._dst = dst
        self._v4 = len(src) == 4
        # words that never change: version/IHL, TTL (protocol added per packet), addresses
        self._partial = 0x4500 + (DEFAULT_TTL << 8) + ones_complement_sum(src + dst)

    def build(self, protocol: int, payload_length: int) -> bytes:
        if self._v4:
            total = 20 + payload_length
            s = self._partial + total + protocol
            s = (s & 0xFFFF) + (s >> 16)
            s = (s & 0xFFFF) + (s >> 16)
            return _IPV4.pack(0x45, 0, total, 0, 0, DEFAULT_TTL, protocol, ~s & 0xFFFF,
                              self._src, self._dst)
        return _IPV6.pack(0x60000000, payload_length, protocol, DEFAULT_TTL, self._src,
                          self._dst)


def fix_transport_checksum(src: bytes, dst: bytes, protocol: int, segment: bytes) -> bytes:
    """`segment` (a TCP or UDP header and data) with its checksum recomputed for src/dst.

    Used after transport-mode decapsulation behind a NAT (RFC 3948 3.1.2, option 2): the
    peer computed the checksum over its private address, which the header we rebuild
    does not carry. ESP's integrity check already covered the segment.
    """
    if protocol == IPPROTO_TCP:
        position = 16
    elif protocol == IPPROTO_UDP:
        position = 6
        if len(segment) >= 8 and len(src) == 4 and segment[6:8] == b"\x00\x00":
            return segment  # IPv4 UDP without a checksum stays without one
    else:
        return segment
    if len(segment) < position + 2:
        return segment
    pseudo = src + dst + struct.pack("!IxxxB", len(segment), protocol)
    zeroed = segment[:position] + b"\x00\x00" + segment[position + 2:]
    checksum = internet_checksum(pseudo + zeroed)
    if checksum == 0 and protocol == IPPROTO_UDP:
        checksum = 0xFFFF  # RFC 768: a computed zero is sent as all ones
    return segment[:position] + _U16.pack(checksum) + segment[position + 2:]
