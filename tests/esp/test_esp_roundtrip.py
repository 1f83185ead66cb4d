"""Encapsulate on one side, decapsulate on the other: every algorithm, both modes, both
IP versions, TCP/UDP/ICMP, with and without ESN; padding, TFC trimming, header rebuild."""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import struct

import pytest

from cluster.esp import EspDrop
from cluster.esp.ip import flow_of, internet_checksum
from cluster.transforms import INTEG_ALGORITHMS, SHA256_96
from tests.esp.pairs import (
    ALGORITHMS,
    GW6_A,
    GW6_B,
    GW_A,
    GW_B,
    packet,
    pair,
    params,
)

TUNNEL_HOSTS = {4: ("10.99.1.5", "10.99.2.7"), 6: ("fd00:a::5", "fd00:b::7")}
TRANSPORT_HOSTS = {4: (GW_A, GW_B), 6: (GW6_A, GW6_B)}


def _checksum_ok(pkt: bytes) -> bool:
    """Whether the L4 checksum of a UDP/TCP/ICMP packet verifies."""
    version = pkt[0] >> 4
    if version == 4:
        ihl = (pkt[0] & 15) * 4
        src, dst, proto, segment = pkt[12:16], pkt[16:20], pkt[9], pkt[ihl:]
    else:
        src, dst, proto, segment = pkt[8:24], pkt[24:40], pkt[6], pkt[40:]
    if proto == 1:
        return internet_checksum(segment) == 0
    pseudo = src + dst + struct.pack("!IxxxB", len(segment), proto)
    return internet_checksum(pseudo + segment) == 0


@pytest.mark.parametrize("esn", [False, True], ids=["seq32", "esn"])
@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("mode", ["tunnel", "transport"])
@pytest.mark.parametrize(("encr", "integ"), ALGORITHMS, ids=lambda x: str(x))
def test_round_trip_both_directions(encr: str, integ: str | None, mode: str, version: int,
                                    esn: bool) -> None:
    p = params(encr, integ, mode=mode, v6=version == 6, esn=esn)
    a, b = pair(p)
    hosts = TUNNEL_HOSTS if mode == "tunnel" else TRANSPORT_HOSTS
    src, dst = hosts[version]
    icmp = 1 if version == 4 else 58
    sent = received_bytes = 0
    for proto in (17, 6, icmp):
        for size in (0, 1, 2, 3, 17, 1000):
            forward = packet(src, dst, proto, (bytes(range(256)) * 4)[:size])
            sa = a.outbound_for(forward)
            assert sa is not None and sa.spi == p.spi_out
            esp = sa.encapsulate(forward)
            sent += len(forward)
            block = max(4, p.encr.block_size)
            icv = p.encr.icv_size if p.encr.aead else p.integ.icv_size  # type: ignore[union-attr]
            assert (len(esp) - 8 - p.encr.iv_size - icv) % block == 0  # RFC 4303 2.4
            received = b.decapsulate_untrusted(esp)
            if mode == "tunnel":
                assert received == forward
            else:
                _check_rebuilt(received, forward)
            back = packet(dst, src, proto, b"reply" * size)
            sb = b.outbound_for(back)
            assert sb is not None
            received = a.decapsulate_untrusted(sb.encapsulate(back))
            received_bytes += len(received)
            if mode == "tunnel":
                assert received == back
            else:
                _check_rebuilt(received, back)
    sa_a = a.get(p.spi_in)
    assert sa_a is not None
    assert sa_a.counters.packets_out == 18 and sa_a.counters.packets_in == 18
    assert sa_a.counters.bytes_out == sent and sa_a.counters.bytes_in == received_bytes


def _check_rebuilt(received: bytes, sent: bytes) -> None:
    """Transport mode: the receiver rebuilds the header from the SA's addresses."""
    assert received[0] >> 4 == sent[0] >> 4
    if sent[0] >> 4 == 4:
        assert received[:20] == sent[:20]  # our test packets use the same minimal header
        assert internet_checksum(received[:20]) == 0
    else:
        assert received[:40] == sent[:40]
    assert received == sent and _checksum_ok(received)


def test_tunnel_inner_packet_is_cut_at_its_ip_length() -> None:
    """TFC padding (RFC 4303 2.7): bytes after the inner packet never reach the TUN."""
    p = params()
    a, b = pair(p)
    inner = packet("10.99.1.5", "10.99.2.7", 17, b"payload")
    sa = a.outbound_for(inner)
    assert sa is not None
    assert b.decapsulate_untrusted(sa.encapsulate(inner + b"\x00" * 37)) == inner
    inner6 = packet("fd00:a::5", "fd00:b::7", 17, b"payload")
    a6, b6 = pair(params(v6=True))
    sa6 = a6.outbound_for(inner6)
    assert sa6 is not None
    assert b6.decapsulate_untrusted(sa6.encapsulate(inner6 + b"\xee" * 9)) == inner6


@pytest.mark.parametrize("version", [4, 6])
def test_encapsulate_ip_builds_the_outer_header_in_tunnel_mode(version: int) -> None:
    p = params(v6=version == 6)
    a, b = pair(p)
    inner = packet(*TUNNEL_HOSTS[version], 6, b"data")
    sa = a.outbound_for(inner)
    assert sa is not None
    outer = sa.encapsulate_ip(inner)
    local = ipaddress.ip_address(p.local[0]).packed
    remote = ipaddress.ip_address(p.remote[0]).packed
    if version == 4:
        assert outer[9] == 50 and outer[12:16] == local and outer[16:20] == remote
        assert struct.unpack("!H", outer[2:4])[0] == len(outer)
        assert internet_checksum(outer[:20]) == 0
        esp = outer[20:]
    else:
        assert outer[6] == 50 and outer[8:24] == local and outer[24:40] == remote
        assert struct.unpack("!H", outer[4:6])[0] == len(outer) - 40
        esp = outer[40:]
    assert b.decapsulate_untrusted(esp) == inner


def test_encapsulate_ip_in_transport_mode_keeps_the_host_header() -> None:
    p = params(mode="transport")
    a, b = pair(p)
    host = bytearray(packet(GW_A, GW_B, 17, b"x" * 33))
    host[1] = 0xB8  # DSCP EF
    host[4:6] = b"\x12\x34"  # identification
    host[8] = 17  # TTL
    host[10:12] = b"\x00\x00"
    host[10:12] = struct.pack("!H", internet_checksum(bytes(host[:20])))
    sa = a.outbound_for(bytes(host))
    assert sa is not None
    outer = sa.encapsulate_ip(bytes(host))
    assert outer[9] == 50 and outer[1] == 0xB8 and outer[4:6] == b"\x12\x34" and outer[8] == 17
    assert struct.unpack("!H", outer[2:4])[0] == len(outer)
    assert internet_checksum(outer[:20]) == 0
    inner = b.decapsulate_untrusted(outer[20:])
    assert inner[9] == 17 and inner[20:] == bytes(host[20:])


def test_encapsulate_ip_in_transport_mode_ipv6() -> None:
    p = params(mode="transport", v6=True)
    a, b = pair(p)
    host = packet(GW6_A, GW6_B, 6, b"tcp data")
    sa = a.outbound_for(host)
    assert sa is not None
    outer = sa.encapsulate_ip(host)
    assert outer[6] == 50 and outer[8:40] == host[8:40]
    assert struct.unpack("!H", outer[4:6])[0] == len(outer) - 40
    assert b.decapsulate_untrusted(outer[40:]) == host


@pytest.mark.parametrize("proto", [6, 17])
def test_transport_behind_nat_fixes_the_inner_checksum(proto: int) -> None:
    """RFC 3948 3.1.2: the peer's checksum covers its private address; we recompute it."""
    p = params(mode="transport", encap=True)
    a, b = pair(p)
    # A sits behind a NAT: its packets carry 10.0.0.2, B knows it as GW_A
    private = packet("10.0.0.2", GW_B, proto, b"behind the nat" * 3)
    assert _checksum_ok(private)
    sa = a.get(p.spi_in)
    assert sa is not None
    esp = sa.outbound.encapsulate(private)  # transport mode: only the payload is sent
    received = b.decapsulate_untrusted(esp)
    assert received[12:16] == ipaddress.ip_address(GW_A).packed
    assert received[20:24] == private[20:24]  # ports untouched
    assert _checksum_ok(received)


def test_transport_without_nat_leaves_the_checksum_alone() -> None:
    p = params(mode="transport", encap=False)
    a, b = pair(p)
    private = packet("10.0.0.2", GW_B, 17, b"no nat, no fix")
    sa = a.get(p.spi_in)
    assert sa is not None
    received = b.decapsulate_untrusted(sa.outbound.encapsulate(private))
    assert received[20:] == private[20:]
    assert not _checksum_ok(received)  # it was computed for 10.0.0.2: not ours to repair


def test_udp_without_checksum_stays_without_one_behind_nat() -> None:
    p = params(mode="transport", encap=True)
    a, b = pair(p)
    host = bytearray(packet(GW_A, GW_B, 17, b"zero checksum"))
    host[26:28] = b"\x00\x00"
    sa = a.get(p.spi_in)
    assert sa is not None
    received = b.decapsulate_untrusted(sa.outbound.encapsulate(bytes(host)))
    assert received[26:28] == b"\x00\x00"


def test_transport_refuses_fragments_and_hop_by_hop() -> None:
    p = params(mode="transport")
    a, _ = pair(p)
    sa = a.get(p.spi_in)
    assert sa is not None
    fragment = bytearray(packet(GW_A, GW_B, 17, b"x" * 40))
    fragment[6:8] = b"\x20\x00"  # more fragments
    with pytest.raises(EspDrop) as drop:
        sa.outbound.encapsulate(bytes(fragment))
    assert drop.value.reason == "policy_drops"
    p6 = params(mode="transport", v6=True)
    a6, _ = pair(p6)
    sa6 = a6.get(p6.spi_in)
    assert sa6 is not None
    hop = bytearray(packet(GW6_A, GW6_B, 17, b"x" * 8))
    hop[6] = 0
    with pytest.raises(EspDrop) as drop:
        sa6.outbound.encapsulate(bytes(hop))
    assert drop.value.reason == "policy_drops"
    assert sa.counters.policy_drops == 1 and sa6.counters.policy_drops == 1


def test_outbound_packets_that_are_not_ip_are_malformed() -> None:
    p = params()
    a, _ = pair(p)
    sa = a.get(p.spi_in)
    assert sa is not None
    for junk in (b"", b"\x00" * 40, b"\x50" + bytes(39)):
        with pytest.raises(EspDrop) as drop:
            sa.outbound.encapsulate(junk)
        assert drop.value.reason == "malformed_drops"
    assert sa.counters.malformed_drops == 3 and sa.counters.packets_out == 0


def test_flow_of_round_trip_sanity() -> None:
    """The packets these tests build parse as what they claim to be."""
    flow = flow_of(packet("10.99.1.5", "10.99.2.7", 6, b"", 1234, 443))
    assert flow == (4, bytes([10, 99, 1, 5]), bytes([10, 99, 2, 7]), 6, 1234, 443)


def test_sha256_96_carries_a_12_byte_icv_that_a_16_byte_peer_refuses() -> None:
    """swanctl's sha256_96: HMAC-SHA-256 cut to 96 bits; both ends must agree."""
    short = dataclasses.replace(params("aes128", "sha256"), integ=SHA256_96)
    ours, theirs = pair(short)
    plain = packet(*TUNNEL_HOSTS[4], payload=b"s" * 100)
    sa = ours.outbound_for(plain)
    assert sa is not None
    esp = sa.encapsulate(plain)
    long = params("aes128", "sha256")
    full = pair(long)[0].outbound_for(plain)
    assert full is not None
    assert len(esp) == len(full.encapsulate(plain)) - 4  # the same padding, 4 bytes less
    # RFC 4868's HMAC-SHA-256 over the ESP header and ciphertext, its first 96 bits
    assert esp[-12:] == hmac.digest(short.integ_key_out, esp[:-12], "sha256")[:12]
    assert theirs.decapsulate_untrusted(esp) == plain
    _, refusing = pair(dataclasses.replace(short, integ=INTEG_ALGORITHMS["sha256"]))
    with pytest.raises(EspDrop):
        refusing.decapsulate_untrusted(esp)
    # (its ciphertext, cut 16 bytes from the end, is no whole number of blocks)
    assert refusing.totals().malformed_drops == 1
