"""Coalesced TUN writes (cluster/worker/gro.py): which packets merge, and that the
kernel takes the superpackets and still checks every checksum.

The checksums here are computed with a plain RFC 1071 word loop, independent of the
arithmetic gro.py uses.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import socket
import struct
from typing import Any

import pytest

from cluster.worker.gro import (
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    MAX_SUPERPACKET,
    PLAIN,
    VNET_HDR,
    VNET_HDR_SIZE,
)
from cluster.worker.gro import coalesce as coalesce_pieces
from cluster.worker.routing import Routes
from cluster.worker.tun import TunDevice

from .namespaces import run_in_netns

ACK, PSH, SYN, FIN = 0x10, 0x08, 0x02, 0x01
SRC4, DST4 = socket.inet_aton("10.99.1.5"), socket.inet_aton("10.99.2.1")
SRC6 = socket.inet_pton(socket.AF_INET6, "fd99:1::5")
DST6 = socket.inet_pton(socket.AF_INET6, "fd99:2::1")
TIMESTAMPS = b"\x01\x01\x08\x0a" + struct.pack("!II", 123456, 654321)


def coalesce(packets: list[bytes]) -> list[tuple[bytes, int, int]]:
    """gro.coalesce with each write's pieces joined: the buffer writev hands the kernel."""
    return [(b"".join(pieces), count, size) for pieces, count, size in coalesce_pieces(packets)]


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(version: int, src: bytes, dst: bytes, length: int) -> bytes:
    if version == 4:
        return src + dst + struct.pack("!xBH", 6, length)
    return src + dst + struct.pack("!IxxxB", length, 6)


def tcp(version: int, seq: int, data: bytes = b"", *, flags: int = ACK, ack: int = 1,
        window: int = 502, options: bytes = TIMESTAMPS, sport: int = 40000,
        dport: int = 5555, ttl: int = 64, ip_id: int | None = None, df: bool = True,
        ip_options: bytes = b"", tos: int = 0) -> bytes:
    """An IPv4 or IPv6 TCP segment with correct checksums."""
    src, dst = (SRC4, DST4) if version == 4 else (SRC6, DST6)
    header = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack,
                         (20 + len(options)) // 4 << 4, flags, window, 0, 0) + options
    segment = header + data
    value = checksum(pseudo(version, src, dst, len(segment)) + segment)
    segment = segment[:16] + struct.pack("!H", value) + segment[18:]
    if version == 6:
        return struct.pack("!IHBB16s16s", 0x60000000 | tos << 20, len(segment), 6, ttl,
                           src, dst) + segment
    ihl = 5 + len(ip_options) // 4
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(segment),
                     random.randrange(65536) if ip_id is None else ip_id,
                     0x4000 if df else 0, ttl, 6, 0, src, dst) + ip_options
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + segment


def stream(version: int, count: int, size: int = 1360, *, seq: int = 1000,
           last: int | None = None, last_flags: int = ACK | PSH) -> list[bytes]:
    """`count` in-order segments of `size` bytes, the last `last` bytes with PSH."""
    packets = []
    for i in range(count):
        n = size if i < count - 1 or last is None else last
        packets.append(tcp(version, seq, os.urandom(n),
                           flags=last_flags if i == count - 1 else ACK))
        seq += n
    return packets


def valid(packet: bytes) -> bool:
    """Whether the IP header (IPv4) and TCP checksums verify."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        if checksum(packet[:ihl]) != 0:
            return False
        src, dst, segment = packet[12:16], packet[16:20], packet[ihl:]
        return checksum(pseudo(4, src, dst, len(segment)) + segment) == 0
    segment = packet[40:]
    return checksum(pseudo(6, packet[8:24], packet[24:40], len(segment)) + segment) == 0


def data_of(packet: bytes) -> bytes:
    ip_len = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    return packet[ip_len + (packet[ip_len + 12] >> 4) * 4:]


def counts(packets: list[bytes]) -> list[int]:
    return [count for _, count, _ in coalesce(packets)]


# --- which packets merge ---------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_a_run_becomes_one_superpacket_with_valid_checksums(version: int) -> None:
    packets = stream(version, 30, last=700)
    ((buffer, count, size),) = coalesce(packets)
    assert (count, size) == (30, sum(map(len, packets)))
    flags, gso, hdr_len, gso_size, _, _ = VNET_HDR.unpack_from(buffer)
    ip_len = 20 if version == 4 else 40
    assert (flags, gso, hdr_len, gso_size) == (
        0, GSO_TCPV4 if version == 4 else GSO_TCPV6, ip_len + 32, 1360)
    merged = buffer[VNET_HDR_SIZE:]
    assert valid(merged)
    assert data_of(merged) == b"".join(data_of(p) for p in packets)
    first = packets[0]
    assert merged[ip_len + 4:ip_len + 8] == first[ip_len + 4:ip_len + 8]  # first seq
    assert merged[ip_len + 13] == ACK | PSH  # the last segment's PSH is kept
    if version == 4:
        assert struct.unpack_from("!H", merged, 2)[0] == len(merged)
        assert merged[4:6] == first[4:6]  # the first segment's IP id
    else:
        assert struct.unpack_from("!H", merged, 4)[0] == len(merged) - 40


@pytest.mark.parametrize("version", [4, 6])
def test_random_runs_always_verify_and_keep_every_byte(version: int) -> None:
    rng = random.Random(7)
    for _ in range(100):
        size = rng.choice([2, 536, 1000, 1360, 1440])
        packets = stream(version, rng.randint(1, 60), size, seq=rng.randrange(1 << 32),
                         last=rng.randint(1, size), last_flags=rng.choice([ACK, ACK | PSH]))
        out = coalesce(packets)
        assert sum(count for _, count, _ in out) == len(packets)
        assert all(valid(buffer[VNET_HDR_SIZE:]) for buffer, _, _ in out)
        assert b"".join(data_of(b[VNET_HDR_SIZE:]) for b, _, _ in out) == \
            b"".join(map(data_of, packets))
        assert all(len(b) - VNET_HDR_SIZE <= MAX_SUPERPACKET for b, _, _ in out)


@pytest.mark.parametrize("version", [4, 6])
def test_a_corrupted_segment_makes_the_superpacket_fail_its_tcp_checksum(version: int) -> None:
    packets = stream(version, 10)
    assert valid(coalesce(packets)[0][0][VNET_HDR_SIZE:])
    for index in (0, 4, 9):
        for at in (-1, -700):
            bad = bytearray(packets[index])
            bad[at] ^= 0x21
            ((buffer, count, _),) = coalesce([*packets[:index], bytes(bad),
                                             *packets[index + 1:]])
            assert count == 10 and not valid(buffer[VNET_HDR_SIZE:])


def test_a_wrong_ipv4_header_checksum_makes_the_merged_header_fail() -> None:
    packets = stream(4, 5)
    bad = bytearray(packets[2])
    bad[5] ^= 0x01  # the IP id, under the segment's header checksum
    ((buffer, count, _),) = coalesce([*packets[:2], bytes(bad), *packets[3:]])
    assert count == 5
    merged = buffer[VNET_HDR_SIZE:]
    assert checksum(merged[:20]) != 0


@pytest.mark.parametrize("packet", [
    tcp(4, 1, flags=ACK),  # a bare ACK
    tcp(4, 1, b"x" * 100, flags=SYN),
    tcp(4, 1, b"x" * 100, flags=ACK | FIN),
    tcp(4, 1, b"x" * 100, flags=ACK | 0x20),  # URG
    tcp(4, 1, b"x" * 100, flags=ACK | 0x40),  # ECE
    tcp(4, 1, b"x" * 100, df=False),
    tcp(4, 1, b"x" * 100, ip_options=b"\x01\x01\x01\x00"),
    tcp(6, 1, flags=ACK),
], ids=["bare-ack", "syn", "fin", "urg", "ece", "no-df", "ip-options", "v6-bare-ack"])
def test_packets_that_never_merge_are_written_as_they_are(packet: bytes) -> None:
    follower = tcp(packet[0] >> 4, 101, b"y" * 100)
    out = coalesce([packet, packet, follower])
    assert [(b, c) for b, c, _ in out] == [(PLAIN + packet, 1), (PLAIN + packet, 1),
                                          (PLAIN + follower, 1)]


def test_other_protocols_fragments_and_ipv6_extension_headers_pass_alone() -> None:
    udp = bytearray(tcp(4, 1, b"z" * 50))
    udp[9] = 17
    fragment = bytearray(tcp(4, 1, b"z" * 50))
    fragment[6:8] = b"\x20\x00"  # MF
    hop_by_hop = bytearray(tcp(6, 1, b"z" * 50))
    hop_by_hop[6] = 0
    for odd in (bytes(udp), bytes(fragment), bytes(hop_by_hop), b"", b"\x00\x01"):
        assert coalesce([odd, odd]) == [(PLAIN + odd, 1, len(odd))] * 2


def test_runs_break_where_kernel_gro_would_flush() -> None:
    base = stream(4, 4)
    seq = struct.unpack_from("!I", base[-1], 24)[0] + 1360
    assert counts([*base, tcp(4, seq + 1, b"a" * 1360)]) == [4, 1]  # a gap
    assert counts([*base, tcp(4, seq, b"a" * 1360, ack=2)]) == [4, 1]
    assert counts([*base, tcp(4, seq, b"a" * 1360, window=900)]) == [4, 1]
    assert counts([*base, tcp(4, seq, b"a" * 1360, options=TIMESTAMPS[:-1] + b"\x02")]) == [4, 1]
    assert counts([*base, tcp(4, seq, b"a" * 1360, ttl=63)]) == [4, 1]
    assert counts([*base, tcp(4, seq, b"a" * 1360, tos=4)]) == [4, 1]
    assert counts([*base, tcp(4, seq, b"a" * 1360, sport=40001)]) == [4, 1]
    assert counts([*base, tcp(4, seq, b"a" * 1400)]) == [4, 1]  # larger than the run's size


def test_psh_short_and_odd_segments_end_a_run() -> None:
    psh = stream(4, 3, last_flags=ACK | PSH)
    seq = struct.unpack_from("!I", psh[-1], 24)[0] + 1360
    assert counts([*psh, tcp(4, seq, b"b" * 1360)]) == [3, 1]
    short = stream(4, 3, last=500, last_flags=ACK)
    seq = struct.unpack_from("!I", short[-1], 24)[0] + 500
    assert counts([*short, tcp(4, seq, b"b" * 500)]) == [3, 1]
    odd = stream(4, 3, size=1001, last_flags=ACK)
    assert counts(odd) == [1, 1, 1]  # odd data would misalign the checksum words


def test_a_run_stops_below_the_ip_length_limit() -> None:
    packets = stream(4, 60, last_flags=ACK)
    out = coalesce(packets)
    assert [c for _, c, _ in out] == [48, 12]
    assert all(len(b) - VNET_HDR_SIZE <= MAX_SUPERPACKET for b, _, _ in out)


@pytest.mark.parametrize("version", [4, 6])
def test_a_pure_ack_ends_a_run_and_goes_alone_in_order(version: int) -> None:
    run = stream(version, 6, last_flags=ACK)
    ack = tcp(version, 1, ack=77777, sport=40001)  # the other direction's ACK, no data
    out = coalesce([*run[:3], ack, ack, *run[3:]])
    assert [c for _, c, _ in out] == [3, 1, 1, 3]
    assert out[1][0] == out[2][0] == PLAIN + ack
    assert all(valid(buffer[VNET_HDR_SIZE:]) for buffer, _, _ in out[1:3])


def test_interleaved_flows_keep_their_order() -> None:
    a = stream(4, 2, last_flags=ACK)
    b = tcp(4, 1, b"c" * 1360, sport=40001)
    out = coalesce([a[0], b, a[1]])
    assert [(buffer[VNET_HDR_SIZE:], c) for buffer, c, _ in out] == [(a[0], 1), (b, 1), (a[1], 1)]
    assert VNET_HDR.unpack_from(out[0][0])[1] == GSO_NONE


# --- the kernel takes superpackets through the TUN ---------------------------------------

TUN = "ikg0"
PORT = 5555


def _read_tcp(fd: int, timeout: float = 2.0, *, required: bool = True) -> bytes:
    """The next TCP packet the kernel routes into the TUN (vnet header stripped);
    b"" after `timeout` if not `required`."""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready and not required:
            return b""
        assert ready, "nothing came out of the TUN"
        buffer = os.read(fd, 65535)[VNET_HDR_SIZE:]
        if (buffer[0] >> 4 == 4 and buffer[9] == 6) or (buffer[0] >> 4 == 6 and buffer[6] == 6):
            return buffer


def _in_csum_errors() -> int:
    with open("/proc/net/snmp") as snmp:
        lines = [line.split() for line in snmp if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("InCsumErrors")])


def _superpackets_body(version: int) -> dict[str, Any]:
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    local, peer_net = (("10.99.2.1", "10.99.1.0/24") if version == 4
                       else ("fd99:2::1", "fd99:1::/64"))
    ip_len = 20 if version == 4 else 40
    with TunDevice.open(TUN, vnet_hdr=True) as tun, Routes.open(tun.ifindex) as routes:
        tun.add_address(f"{local}/{32 if version == 4 else 128}")
        routes.add(peer_net, src=local)
        fd = tun.fds[0]
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind((local, PORT))
            listener.listen()
            # the handshake, by hand: SYN in, SYN-ACK out of the TUN, ACK in (our SYN is
            # sent again if the first gets no answer, as a TCP stack would: once, on a busy
            # CI machine, the first one went unanswered for 2 s)
            for _ in range(3):
                assert tun.write(fd, tcp(version, 999, flags=SYN, options=b""))
                syn_ack = _read_tcp(fd, required=False)
                if syn_ack:
                    break
            assert syn_ack, "no SYN-ACK out of the TUN for three SYNs"
            server_seq = struct.unpack_from("!I", syn_ack, ip_len + 4)[0]
            ack = server_seq + 1
            assert tun.write(fd, tcp(version, 1000, flags=ACK, ack=ack, options=b""))
            listener.settimeout(2)
            conn, _ = listener.accept()
            conn.settimeout(1)
            with conn:
                data = os.urandom(10 * 1000)
                good = [tcp(version, 1000 + i * 1000, data[i * 1000:(i + 1) * 1000], ack=ack,
                            window=4000, options=b"") for i in range(10)]
                ((pieces, count, _),) = coalesce_pieces(good)
                os.writev(fd, pieces)  # as DataPlane.flush writes
                received = b""
                while len(received) < len(data):
                    received += conn.recv(65536)
                # one acknowledgement for the whole superpacket
                reply = _read_tcp(fd)
                acked = struct.unpack_from("!I", reply, ip_len + 8)[0] - 1000
                errors_before = _in_csum_errors()
                bad = [tcp(version, 11000 + i * 1000, b"e" * 1000, ack=ack, window=4000,
                           options=b"") for i in range(10)]
                corrupted = bytearray(bad[5])
                corrupted[-10] ^= 0xFF
                bad[5] = bytes(corrupted)
                ((bad_pieces, _, _),) = coalesce_pieces(bad)
                os.writev(fd, bad_pieces)
                try:
                    leaked = conn.recv(65536)
                except TimeoutError:
                    leaked = b""
                return {"count": count, "same": received == data, "acked": acked,
                        "leaked": len(leaked), "csum_errors": _in_csum_errors() - errors_before}


@pytest.mark.parametrize("version", [4, 6])
def test_the_kernel_takes_a_superpacket_and_drops_one_with_a_bad_segment(
    ns: str, version: int
) -> None:
    got = run_in_netns(ns, _superpackets_body, version)
    assert got["count"] == 10
    assert got["same"], "the socket received other bytes than the segments carried"
    assert got["acked"] == 10_000  # all ten segments at once
    assert got["leaked"] == 0  # nothing of the superpacket with a corrupted segment
    assert got["csum_errors"] >= 1  # TCP's own checksum check refused it


def test_a_vnet_hdr_tun_reads_and_writes_plain_packets(ns: str) -> None:
    def body() -> dict[str, Any]:
        with TunDevice.open(TUN, vnet_hdr=True) as tun, Routes.open(tun.ifindex) as routes:
            tun.add_address("10.99.2.1/32")
            routes.add("10.99.1.0/24", src="10.99.2.1")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("10.99.2.1", 4000))
                s.sendto(b"out", ("10.99.1.5", 9))
                select.select([tun.fds[0]], [], [], 2)
                (packet,) = tun.drain(tun.fds[0])
                # a UDP reply written back as a plain packet reaches the socket
                reply = bytearray(packet)
                reply[12:16], reply[16:20] = packet[16:20], packet[12:16]
                reply[20:22], reply[22:24] = packet[22:24], packet[20:22]
                reply[26:28] = b"\0\0"  # no UDP checksum
                s.settimeout(2)
                written = tun.write(tun.fds[0], bytes(reply))
                data, source = s.recvfrom(100)
        return {"first": packet[0], "written": written, "data": data, "source": source}

    got = run_in_netns(ns, body)
    assert got["first"] == 0x45  # the header was stripped: the packet starts with IPv4
    assert got["written"] and got["data"] == b"out" and tuple(got["source"]) == ("10.99.1.5", 9)


TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01


def test_drain_completes_a_checksum_the_kernel_left_partial(ns: str) -> None:
    # With checksum offload switched on (the worker never does) the kernel hands over
    # UDP with only the pseudo-header summed; drain must finish it, not pass it on.
    def body() -> dict[str, Any]:
        with TunDevice.open(TUN, vnet_hdr=True) as tun, Routes.open(tun.ifindex) as routes:
            tun.add_address("10.99.2.1/32")
            routes.add("10.99.1.0/24", src="10.99.2.1")
            fd = tun.fds[0]
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"partial checksum" * 20, ("10.99.1.5", 9))
                select.select([fd], [], [], 2)
                raw = os.read(fd, 65535)
                s.sendto(b"partial checksum" * 20, ("10.99.1.5", 9))
                select.select([fd], [], [], 2)
                (packet,) = tun.drain(fd)
        segment = packet[20:]
        return {"flags": raw[0], "raw_valid": checksum(
                    pseudo_udp(raw[VNET_HDR_SIZE + 12:VNET_HDR_SIZE + 20],
                               raw[VNET_HDR_SIZE + 20:])) == 0,
                "valid": checksum(pseudo_udp(packet[12:20], segment)) == 0,
                "data": segment[8:]}

    got = run_in_netns(ns, body)
    assert got["flags"] & 1 and not got["raw_valid"]  # the kernel did leave it partial
    assert got["valid"] and got["data"] == b"partial checksum" * 20


def pseudo_udp(addresses: bytes, segment: bytes) -> bytes:
    return addresses + struct.pack("!xBH", 17, len(segment)) + segment
