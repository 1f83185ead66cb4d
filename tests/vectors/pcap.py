"""Just enough pcap to pull IKE datagrams out of a tcpdump capture.

Reads classic pcap (not pcapng) with Ethernet or Linux cooked (SLL) link layers,
IPv4 or IPv6 without extension headers, UDP only. On port 4500 the 4-byte zero
non-ESP marker (RFC 3948 2.2) is stripped; ESP-in-UDP and NAT keepalives are left out.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
IKE_PORTS = (500, 4500)


@dataclass(frozen=True)
class Datagram:
    timestamp: float
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes  # the IKE message (non-ESP marker removed)


def _records(data: bytes) -> Iterator[tuple[int, float, bytes]]:
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError("not a classic pcap file")
    nanos = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    (linktype,) = struct.unpack_from(endian + "I", data, 20)
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, incl, _orig = struct.unpack_from(endian + "IIII", data, pos)
        pos += 16
        yield linktype, sec + frac / (1e9 if nanos else 1e6), data[pos:pos + incl]
        pos += incl


def _network_layer(linktype: int, frame: bytes) -> tuple[int, bytes]:
    """(ethertype, packet) of a link-layer frame."""
    if linktype == LINKTYPE_ETHERNET:
        return struct.unpack_from("!H", frame, 12)[0], frame[14:]
    if linktype == LINKTYPE_LINUX_SLL:
        return struct.unpack_from("!H", frame, 14)[0], frame[16:]
    raise ValueError(f"unsupported pcap link type {linktype}")


def udp_datagrams(path: Path) -> Iterator[tuple[float, str, int, str, int, bytes]]:
    for linktype, ts, frame in _records(path.read_bytes()):
        ethertype, packet = _network_layer(linktype, frame)
        if ethertype == 0x0800 and packet[9] == 17:
            header_len = (packet[0] & 0x0F) * 4
            src = str(ipaddress.IPv4Address(packet[12:16]))
            dst = str(ipaddress.IPv4Address(packet[16:20]))
            total = struct.unpack_from("!H", packet, 2)[0]
            udp = packet[header_len:total]
        elif ethertype == 0x86DD and packet[6] == 17:
            src = str(ipaddress.IPv6Address(packet[8:24]))
            dst = str(ipaddress.IPv6Address(packet[24:40]))
            udp = packet[40:40 + struct.unpack_from("!H", packet, 4)[0]]
        else:
            continue
        sport, dport, length = struct.unpack_from("!HHH", udp, 0)
        yield ts, src, sport, dst, dport, udp[8:length]


def ike_datagrams(path: Path) -> list[Datagram]:
    """Every IKE message in the capture, in capture order."""
    out = []
    for ts, src, sport, dst, dport, payload in udp_datagrams(path):
        if sport not in IKE_PORTS and dport not in IKE_PORTS:
            continue
        if 4500 in (sport, dport):
            if len(payload) < 4 or payload[:4] != b"\0\0\0\0":
                continue  # ESP in UDP, or a one-byte NAT keepalive
            payload = payload[4:]
        if len(payload) < 28:
            continue
        out.append(Datagram(ts, src, sport, dst, dport, payload))
    return out
