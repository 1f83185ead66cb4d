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
Pieces = list[bytes | memoryview]


def _merge(group: list[bytes], t: int, header: int, mss: int, size: int, tcp_sum: int,
           ip_sum: int) -> Pieces:
    """One virtio-net header and the superpacket of `group` (two segments or more), as
    the pieces one writev() takes: the headers, then each segment's data in place.
    IP header length `t`, headers `header` long, `size` bytes of IP packet in all;
    `tcp_sum` and `ip_sum` are what `coalesce` summed over the segments."""
    first, last = group[0], group[-1]
    tcp_len = header - t
    flags = last[t + 13]
    merged_tcp = first[t:t + 13] + bytes((flags,)) + first[t + 14:t + 16] + b"\0\0" \
        + first[t + 18:header]
    # TCP: each segment's header words (checksum field included) sum to the first
    # one's but for sequence number, checksum and the last one's flags; add the
    # pseudo-header words the segments had beyond the merged one's: the same addresses
    # and protocol, and lengths that exceed their data by tcp_len each
    seq, check = _SEQ_CHECK.unpack_from(first, t + 4)
    addresses = int.from_bytes(first[12:20] if t == 20 else first[8:40], "big")
    n = len(group)
    total = (n - 1) * (addresses + IPPROTO_TCP + tcp_len) + tcp_sum + flags - first[t + 13] \
        + n * (int.from_bytes(first[t:header], "big") - seq - check)
    tcp_check = (total - int.from_bytes(merged_tcp, "big")) % 0xFFFF
    merged_tcp = merged_tcp[:16] + _U16.pack(tcp_check) + merged_tcp[18:]
    if t == 20:
        ip = first[:2] + _U16.pack(size) + first[4:10] + b"\0\0" + first[12:20]
        # every segment's header sums to zero when right, the merged one must too;
        # they differ from the first one's in ID, checksum and (the last) length
        ident, check = _ID_CHECK.unpack_from(first, 4)
        ip_total = n * (int.from_bytes(first[:20], "big") - ident - check) + ip_sum \
            + len(last) - len(first)
        ip_check = (ip_total - int.from_bytes(ip, "big")) % 0xFFFF
        ip = ip[:10] + _U16.pack(ip_check) + ip[12:]
        gso = GSO_TCPV4
    else:
        ip = first[:4] + _U16.pack(size - 40) + first[6:40]
        gso = GSO_TCPV6
    prefix = VNET_HDR.pack(0, gso, header, mss, 0, 0) + ip + merged_tcp
    return [prefix, *[memoryview(p)[header:] for p in group]]


def _emit(out: list[tuple[Pieces, int, int]], group: list[bytes], t: int, header: int,
          mss: int, size: int, tcp_sum: int, ip_sum: int) -> None:
    if len(group) == 1:
        out.append(([PLAIN, group[0]], 1, len(group[0])))
    elif group:
        out.append((_merge(group, t, header, mss, size, tcp_sum, ip_sum), len(group),
                    sum(map(len, group))))


# The fixed headers of a TCP segment in one unpack. IPv4 without options: version/IHL
# and TOS, total length, ID, flags/fragment offset + TTL + protocol, header checksum,
# addresses and ports, sequence number, ack + data offset + flags + window, TCP
# checksum, urgent pointer. IPv6 without extension headers: version/class/flow label,
# payload length, next header + hop limit, addresses and ports, then the same TCP
# fields. Kernel GRO compares what a run must repeat (net/ipv4/tcp_offload.c).
_V4 = struct.Struct("!2sHH4sH12sI8sH2s")
_V6 = struct.Struct("!4sH2s36sI8sH2s")
_SEQ_CHECK = struct.Struct("!I8xH")  # from the TCP sequence number: it and the checksum
_ID_CHECK = struct.Struct("!H4xH")  # from the IPv4 ID: it and the header checksum
_DF = b"\x40\x00"  # flags and fragment offset: DF only


def coalesce(packets: list[bytes]) -> list[tuple[Pieces, int, int]]:
    """What to write into an IFF_VNET_HDR TUN, in order: per write the pieces of one
    buffer (for writev, which saves joining them), with the number and total size of
    the packets it carries: merged TCP runs, the rest one by one."""
    out: list[tuple[Pieces, int, int]] = []
    group: list[bytes] = []
    # the open run: what every further segment repeats (None once it takes no more),
    # its IP and full header lengths, segment size, next sequence number, IP length
    # so far, and the sums `_merge` derives the checksums from
    same: object = None
    middle = options = b""
    t = header = mss = next_seq = size = tcp_sum = ip_sum = 0
    for packet in packets:
        length = len(packet)
        version = packet[0] if length >= 40 else 0
        # IPv4 with nothing beyond a 20-byte header and the TCP header length (a pure
        # ACK, most often) goes alone at once, as what is not IPv4 or IPv6 does
        if version == 0x45 and length > 20 + (packet[32] >> 4) * 4:
            vt, total, ident, ftp, ip_check, ends, seq, packet_middle, check, urgent = \
                _V4.unpack_from(packet)
            packet_same: object = (vt, ftp, ends, urgent)
            whole = total == length
        elif version >> 4 == 6 and length >= 60:
            vcf, payload, nhh, ends, seq, packet_middle, check, urgent = _V6.unpack_from(packet)
            ident = ip_check = 0
            packet_same = (vcf, nhh, ends, urgent)
            whole = payload == length - 40
        else:
            if group:
                _emit(out, group, t, header, mss, size, tcp_sum, ip_sum)
                group, same = [], None
            out.append(([PLAIN, packet], 1, length))
            continue
        data = length - header
        # the next segment of the open run: the same addresses, ports, ack, window,
        # options, flags (PSH only on the last), TOS/class and TTL/hop limit; the
        # next sequence number; no more data than the first
        if packet_same == same and seq == next_seq and whole and 0 < data <= mss \
                and size + data <= MAX_SUPERPACKET \
                and (not options or packet[header - len(options):header] == options) \
                and (packet_middle == middle or (
                    packet_middle[5] == TCP_ACK | TCP_PSH and packet_middle[:5] == middle[:5]
                    and packet_middle[6:] == middle[6:])):
            group.append(packet)
            size += data
            next_seq = (seq + data) & 0xFFFFFFFF
            tcp_sum += seq + check
            ip_sum += ident + ip_check
            # a short segment, or PSH, can only be the last of a run
            if data < mss or packet_middle[5] & TCP_PSH:
                same = None
            continue
        _emit(out, group, t, header, mss, size, tcp_sum, ip_sum)
        # what may start a run: TCP with data and only ACK (PSH ends it at once), in
        # IPv4 with DF and no options or fragmenting, or IPv6 without extension headers
        t = 20 if version == 0x45 else 40
        hl = t + (packet_middle[4] >> 4) * 4
        flags = packet_middle[5]
        data = length - hl
        tcp = ftp[:2] == _DF and ftp[3] == IPPROTO_TCP if t == 20 else nhh[0] == IPPROTO_TCP
        if not (tcp and whole and hl >= t + 20 and data > 0
                and (flags == TCP_ACK or flags == TCP_ACK | TCP_PSH)):
            group, same = [], None
            out.append(([PLAIN, packet], 1, length))
            continue
        group = [packet]
        same, middle, options = packet_same, packet_middle, packet[t + 20:hl]
        header, mss, size = hl, data, length
        next_seq = (seq + data) & 0xFFFFFFFF
        tcp_sum, ip_sum = seq + check, ident + ip_check
        # odd data would misalign the checksum words of the segments after it
        if data & 1 or flags & TCP_PSH:
            same = None
    _emit(out, group, t, header, mss, size, tcp_sum, ip_sum)
    return out
