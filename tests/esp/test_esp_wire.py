"""RFC 3948 classification on UDP/4500, raw protocol-50 framing, and the IP helpers."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.esp import (
    NAT_KEEPALIVE,
    NON_ESP_MARKER,
    EspDrop,
    Selector,
    UdpKind,
    classify_udp_untrusted,
    esp_from_ipv4_untrusted,
    ike_from_udp_untrusted,
    ike_to_udp,
)
from cluster.esp.ip import (
    NO_PORTS,
    HeaderTemplate,
    flow_of,
    internet_checksum,
    ip_header,
    ones_complement_sum,
)
from cluster.esp.selector import SelectorSet
from tests.esp.pairs import pair, params

IKE_HEADER = bytes(range(28))  # any IKE header: its first 4 bytes (SPIi) are non-zero


def test_udp_4500_classification() -> None:
    assert classify_udp_untrusted(NAT_KEEPALIVE) is UdpKind.KEEPALIVE
    assert classify_udp_untrusted(b"\xff\xff") is UdpKind.INVALID
    assert classify_udp_untrusted(b"") is UdpKind.INVALID
    assert classify_udp_untrusted(NON_ESP_MARKER) is UdpKind.INVALID
    assert classify_udp_untrusted(ike_to_udp(IKE_HEADER)) is UdpKind.IKE
    assert ike_from_udp_untrusted(ike_to_udp(IKE_HEADER)) == IKE_HEADER
    assert classify_udp_untrusted(b"\xc0\x00\x00\x01" + bytes(4)) is UdpKind.ESP
    with pytest.raises(EspDrop):
        ike_from_udp_untrusted(b"\xc0\x00\x00\x01" + IKE_HEADER)


def test_real_esp_from_the_core_classifies_as_esp() -> None:
    p = params(encap=True)
    a, b = pair(p)
    inner = bytes.fromhex("45000018000000004011") + bytes(2) + bytes([10, 99, 1, 5]) \
        + bytes([10, 99, 2, 7]) + bytes(4)
    sa = a.outbound_for(inner)
    assert sa is not None and sa.encap and sa.remote == p.remote
    esp = sa.encapsulate(inner)
    assert classify_udp_untrusted(esp) is UdpKind.ESP
    assert b.decapsulate_untrusted(esp) == inner


def test_esp_from_a_raw_ipv4_socket() -> None:
    esp = b"\xc0\x00\x00\x01" + bytes(40)
    src, dst = ipaddress.ip_address("198.51.100.2").packed, ipaddress.ip_address("192.0.2.1").packed
    datagram = ip_header(src, dst, 50, len(esp)) + esp
    assert esp_from_ipv4_untrusted(datagram) == esp
    assert esp_from_ipv4_untrusted(datagram + b"trailing") == esp  # cut at total length
    for bad in (datagram[:19], ip_header(src, dst, 17, len(esp)) + esp, datagram[:30],
                b"\x60" + datagram[1:], b"\x44" + datagram[1:]):
        with pytest.raises(EspDrop):
            esp_from_ipv4_untrusted(bad)


def _naive_sum(data: bytes) -> int:
    """RFC 1071's loop, written out."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(st.binary(max_size=300))
def test_ones_complement_sum_matches_rfc1071(data: bytes) -> None:
    assert ones_complement_sum(data) == _naive_sum(data)


def test_ones_complement_sum_edges() -> None:
    assert ones_complement_sum(b"") == 0
    assert ones_complement_sum(b"\x00\x00\x00\x00") == 0
    assert ones_complement_sum(b"\xff\xff") == 0xFFFF
    assert ones_complement_sum(b"\xff\xff\x00\x01") == 1  # end-around carry
    # a known header: RFC 1071-style example, checksum field included verifies to zero
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    checksum = internet_checksum(header)
    assert checksum == 0xB861
    assert internet_checksum(header[:10] + struct.pack("!H", checksum) + header[12:]) == 0


@given(st.integers(0, 255), st.integers(0, 65515), st.booleans())
def test_header_template_equals_the_plain_builder(protocol: int, length: int, v6: bool) -> None:
    src = ipaddress.ip_address("2001:db8::1" if v6 else "192.0.2.1").packed
    dst = ipaddress.ip_address("2001:db8::2" if v6 else "203.0.113.200").packed
    built = HeaderTemplate(src, dst).build(protocol, length)
    assert built == ip_header(src, dst, protocol, length)
    if not v6:
        assert internet_checksum(built) == 0


def test_flow_of_ipv6_extension_headers_and_fragments() -> None:
    src = ipaddress.ip_address("fd00:a::5").packed
    dst = ipaddress.ip_address("fd00:b::7").packed
    udp = struct.pack("!HHHH", 1111, 53, 8, 0)

    def ipv6(next_header: int, body: bytes) -> bytes:
        return struct.pack("!IHBB", 0x60000000, len(body), next_header, 64) + src + dst + body

    hop_by_hop = bytes([60, 0]) + bytes(6)  # then destination options
    dest_opts = bytes([44, 0]) + bytes(6)  # then a fragment header
    first_fragment = bytes([17, 0]) + struct.pack("!HI", 0x0001, 7)  # offset 0, M=1
    later_fragment = bytes([17, 0]) + struct.pack("!HI", 0x0008, 7)  # offset 1
    assert flow_of(ipv6(0, hop_by_hop + dest_opts + first_fragment + udp)) == \
        (6, src, dst, 17, 1111, 53)
    assert flow_of(ipv6(44, later_fragment + udp)) == (6, src, dst, 17, NO_PORTS, NO_PORTS)
    assert flow_of(ipv6(0, hop_by_hop)) is None  # header chain runs off the end
    icmp6 = bytes([128, 0]) + bytes(6)
    assert flow_of(ipv6(58, icmp6)) == (6, src, dst, 58, 0x8000, 0x8000)


def test_flow_of_ipv4_fragment_and_icmp() -> None:
    header = bytearray(ip_header(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 17, 8))
    later = bytes(header[:6]) + b"\x00\x03" + bytes(header[8:]) + bytes(8)
    assert flow_of(later)[4:] == (NO_PORTS, NO_PORTS)  # type: ignore[index]
    echo = ip_header(bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 1, 8) + bytes([8, 0]) + bytes(6)
    assert flow_of(echo)[4:] == (0x0800, 0x0800)  # type: ignore[index]
    assert flow_of(b"\x30" + bytes(30)) is None


def test_selector_validation_and_cover() -> None:
    with pytest.raises(ValueError):
        Selector(4, bytes(16), bytes(16))
    with pytest.raises(ValueError):
        Selector(4, bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]))
    with pytest.raises(ValueError):
        Selector(5, bytes(4), bytes(4))
    with pytest.raises(ValueError):
        Selector.from_network("10.0.0.0/8", 300)
    sel = Selector.from_network("10.0.0.0/8", 6, 1000, 2000)
    ten = bytes([10, 1, 2, 3])
    assert sel.covers(4, ten, 6, 1500)
    assert not sel.covers(4, ten, 17, 1500)
    assert not sel.covers(4, ten, 6, 999)
    assert not sel.covers(4, ten, 6, NO_PORTS)
    assert not sel.covers(6, bytes(16), 6, 1500)
    assert Selector.from_range(ten, ten).is_host
    both = SelectorSet([Selector.from_network("10.0.0.0/8"),
                        Selector.from_network("fd00::/8")])
    assert both.address_only and both.hosts() is None
    assert both.covers_address(ten)
    assert both.covers_address(ipaddress.ip_address("fd00::1").packed)
    assert not both.covers_address(ipaddress.ip_address("fe80::1").packed)
    # a 4-byte address never matches a 16-byte range that happens to compare around it
    v6_only = SelectorSet([Selector.from_network("::/0")])
    assert not v6_only.covers_address(ten)
