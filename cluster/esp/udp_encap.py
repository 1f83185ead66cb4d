"""ESP on the wire: in UDP on port 4500 (RFC 3948) or raw as IP protocol 50.

On UDP/4500 three things share the port (RFC 3948 2.2, 2.3): a one-byte 0xFF NAT
keepalive (ignored), IKE behind a four-byte zero non-ESP marker (a zero SPI cannot be
ESP), and ESP itself. The worker classifies each datagram once and hands ESP to
`Sad.decapsulate_untrusted`; sending, it puts the ESP packet as the UDP payload or,
for IKE, prefixes the marker.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from .counters import EspDrop
from .ip import IPPROTO_ESP

NON_ESP_MARKER = b"\x00\x00\x00\x00"
NAT_KEEPALIVE = b"\xff"
_U16 = struct.Struct("!H")


class UdpKind(IntEnum):
    ESP = 0
    IKE = 1  # after the non-ESP marker
    KEEPALIVE = 2
    INVALID = 3  # too short to be either


def classify_udp_untrusted(payload: bytes) -> UdpKind:
    """What a UDP/4500 payload is. Never raises."""
    if len(payload) < 8:
        # keepalive is exactly one 0xFF byte; 4 zero bytes alone are no IKE header either
        return UdpKind.KEEPALIVE if payload == NAT_KEEPALIVE else UdpKind.INVALID
    if payload[:4] == NON_ESP_MARKER:
        return UdpKind.IKE
    return UdpKind.ESP


def ike_from_udp_untrusted(payload: bytes) -> bytes:
    """The IKE message behind the non-ESP marker (classify first)."""
    if payload[:4] != NON_ESP_MARKER:
        raise EspDrop("malformed_in")
    return payload[4:]


def ike_to_udp(message: bytes) -> bytes:
    """An IKE message as a UDP/4500 payload."""
    return NON_ESP_MARKER + message


def esp_from_ipv4_untrusted(packet: bytes) -> bytes:
    """The ESP packet inside an IPv4 datagram from a raw protocol-50 socket.

    Linux hands raw IPv4 sockets the IP header too (IPv6 raw sockets do not: there the
    received bytes already are the ESP packet).
    """
    if len(packet) < 20 or packet[0] >> 4 != 4:
        raise EspDrop("malformed_in")
    ihl = (packet[0] & 0x0F) * 4
    total = _U16.unpack_from(packet, 2)[0]
    if ihl < 20 or packet[9] != IPPROTO_ESP or not ihl <= total <= len(packet):
        raise EspDrop("malformed_in")
    return packet[ihl:total]
