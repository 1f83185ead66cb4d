"""Receive coalescing for the TUN device: consecutive TCP segments as one GSO write.

Each packet written into the TUN is one trip through the kernel's IP and TCP input,
and TCP answers every second segment with an ACK that comes back out of the TUN to
be encrypted and sent. A TUN opened with `IFF_VNET_HDR` also takes a TCP
"superpacket" with a virtio-net header saying how it was segmented (gso_type,
gso_size): the kernel handles it like a packet its own GRO merged, once.

`coalesce` does what the kernel's GRO does (net/ipv4/tcp_offload.c) for the
packets one ESP batch decapsulated: a run of in-order segments of one TCP flow
with identical IP and TCP headers except sequence number, lengths, checksums and
PSH on the last, no IP options or IPv6 extension headers, IPv4 with DF, becomes
one packet. Everything else is written as it came, in the same order.

Checksums stay the kernel's to verify. The merged packet goes in without
VIRTIO_NET_HDR_F_NEEDS_CSUM, so TCP checks its checksum over the whole superpacket;
the IPv4 header checksum is checked too. Both checksums are derived, not computed
over the data: the one's-complement sum of the data of segment i is known from its
own checksum field (RFC 1071: header + pseudo-header + data sum to zero when the
checksum is right), so the merged checksum is the sum over the segments' header
words and checksum fields, adjusted for the one merged header (RFC 1624 style
arithmetic, mod 0xFFFF). If every segment was correct the merged checksum is
correct; if one was not, the merged one is not either and the kernel drops the
superpacket, as it would have dropped that segment (TCP retransmits). A
corruption cancelled by another segment's is the one case it misses, beyond those
a 16-bit checksum misses anyway. Data lengths before the last segment must be
even so the words line up.
"""

from __future__ import annotations

import struct

# struct virtio_net_hdr (linux/virtio_net.h), little-endian for a TUN on x86 and
# arm64 (legacy virtio is native-endian; TUNSETVNETLE is not needed there)
VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start/offset
VNET_HDR_SIZE = VNET_HDR.size
VNET_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
PLAIN = bytes(VNET_HDR_SIZE)  # "one ordinary packet, checksums complete"

IPPROTO_TCP = 6
TCP_ACK = 0x10
TCP_PSH = 0x08
MAX_SUPERPACKET = 65535  # the IPv4 total length (and, kept the same, IPv6's)

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

def _merge(group: list[bytes], ip_len: int, header: int, mss: int) -> bytes:
    """One virtio-net header and the superpacket of `group` (at least two segments)."""
    first = group[0]
    t = ip_len
    tcp_len = header - ip_len
    data = b"".join([p[header:] for p in group])
    tcp_total = tcp_len + len(data)
    flags = group[-1][t + 13]
    # TCP: the sum of every segment's header words (checksum fields included), plus
    # the pseudo-header words the segments had beyond the merged one's: the same
    # addresses and protocol, and lengths that exceed their data by tcp_len each
    merged_tcp = first[t:t + 13] + bytes((flags,)) + first[t + 14:t + 16] + b"\0\0" \
        + first[t + 18:header]
    addresses = int.from_bytes(first[12:20] if ip_len == 20 else first[8:40], "big")
    total = (len(group) - 1) * (addresses + IPPROTO_TCP + tcp_len) \
        + int.from_bytes(b"".join([p[t:header] for p in group]), "big")
    tcp_check = (total - int.from_bytes(merged_tcp, "big")) % 0xFFFF
    merged_tcp = merged_tcp[:16] + _U16.pack(tcp_check) + merged_tcp[18:]
    if ip_len == 20:
        ip = first[:2] + _U16.pack(20 + tcp_total) + first[4:10] + b"\0\0" + first[12:20]
        # every segment's header sums to zero when right; the merged one must too
        ip_total = int.from_bytes(b"".join([p[:20] for p in group]), "big")
        ip_check = (ip_total - int.from_bytes(ip, "big")) % 0xFFFF
        ip = ip[:10] + _U16.pack(ip_check) + ip[12:]
        gso = GSO_TCPV4
    else:
        ip = first[:4] + _U16.pack(tcp_total) + first[6:40]
        gso = GSO_TCPV6
    return VNET_HDR.pack(0, gso, header, mss, 0, 0) + ip + merged_tcp + data


# The fields kernel GRO compares, in one unpack. IPv4 without options: (version/IHL),
# TOS, total length, (id), flags/fragment offset, TTL, protocol, (checksum),
# addresses and ports, sequence number, ack/data offset/flags/window, (checksum,
# urgent pointer). IPv6: version/class/flow label, payload length, next header, hop
# limit, addresses and ports, then the same TCP fields.
_V4 = struct.Struct("!xBH2xHBB2x12sI8s4x")
_V6 = struct.Struct("!4sHBB36sI8s4x")
_DF = 0x4000


def coalesce(packets: list[bytes]) -> list[tuple[bytes, int, int]]:
    """Buffers to write into an IFF_VNET_HDR TUN, in order, each with the number and
    total size of the packets it carries: merged TCP runs, the rest one by one."""
    out: list[tuple[bytes, int, int]] = []
    group: list[bytes] = []
    # the open run: its header lengths, segment size, next sequence number, IP length
    # so far, and what every further segment must repeat
    ip_len = header = mss = next_seq = size = 0
    flow: tuple[object, ...] = ()
    middle = options = b""
    closed = True  # the open run takes no more segments

    def flush() -> None:
        if len(group) == 1:
            out.append((PLAIN + group[0], 1, len(group[0])))
        elif group:
            out.append((_merge(group, ip_len, header, mss), len(group), sum(map(len, group))))
        group.clear()

    for packet in packets:
        length = len(packet)
        # what may join a run: TCP with data and only ACK (PSH on the last), in IPv4
        # with DF and no options or fragmenting, or IPv6 without extension headers
        version = packet[0] if length >= 40 else 0
        if version == 0x45:
            tos, total, fragment, ttl, protocol, addresses, seq, packet_middle = \
                _V4.unpack_from(packet)
            t = 20
            mergeable = protocol == IPPROTO_TCP and fragment == _DF and total == length
            packet_flow: tuple[object, ...] = (tos, ttl, addresses)
        elif version >> 4 == 6 and length >= 60:
            first, payload, protocol, hops, addresses, seq, packet_middle = \
                _V6.unpack_from(packet)
            t = 40
            mergeable = protocol == IPPROTO_TCP and payload == length - 40
            packet_flow = (first, hops, addresses)
        else:
            mergeable = False
        if mergeable:
            hl = t + (packet_middle[4] >> 4) * 4
            flags = packet_middle[5]
            data = length - hl
            mergeable = hl >= t + 20 and data > 0 and (flags == TCP_ACK or flags == TCP_ACK
                                                       | TCP_PSH)
        if not mergeable:
            flush()
            closed = True
            out.append((PLAIN + packet, 1, length))
            continue
        # kernel GRO's test: the same addresses, ports, ack, window, options, TOS/class
        # and TTL/hop limit; flags equal but for PSH
        if closed or seq != next_seq or data > mss or hl != header \
                or size + data > MAX_SUPERPACKET or packet_flow != flow \
                or (hl > t + 20 and packet[t + 20:hl] != options) \
                or (packet_middle != middle and not (
                    flags & TCP_PSH and packet_middle[:5] == middle[:5]
                    and packet_middle[6:] == middle[6:])):
            flush()
            ip_len, header, mss, size = t, hl, data, hl
            flow, middle, options = packet_flow, packet_middle, packet[t + 20:hl]
            closed = False
        group.append(packet)
        size += data
        next_seq = (seq + data) & 0xFFFFFFFF
        # a short or odd-length segment, or PSH, can only be the last of a run
        if data < mss or data & 1 or flags & TCP_PSH:
            closed = True
    flush()
    return out
