"""recvmmsg through MessageBatch: order, sources, ancillary data, GRO splits, errors."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from cluster.runtime.dispatcher import IP_PKTINFO, SOL_UDP, UDP_GRO, UDP_SEGMENT
from cluster.runtime.mmsg import SLOT_SIZE, MessageBatch


def udp(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    receiver, sender = udp(), udp()
    receiver.setblocking(False)
    with receiver, sender:
        yield receiver, sender


def test_nothing_waiting_is_an_empty_list(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, _ = pair
    assert MessageBatch(receiver).receive() == []


def test_one_call_takes_up_to_slots_datagrams_in_order_with_their_sources(
        pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    other = udp()
    with other:
        payloads = [bytes([n]) * (n + 1) for n in range(10)]
        for n, payload in enumerate(payloads):
            (other if n == 4 else sender).sendto(payload, receiver.getsockname())
        batch = MessageBatch(receiver, slots=8)
        first = batch.receive()
        assert first == payloads[:8]
        assert [batch.source(k) for k in range(8)] == \
            [other.getsockname() if k == 4 else sender.getsockname() for k in range(8)]
        assert batch.receive() == payloads[8:]
        assert batch.source(1) == sender.getsockname()
        assert batch.receive() == []


def test_a_full_size_datagram_arrives_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    big = bytes(range(256)) * 255 + bytes(7)  # 65287: the most an IPv4 UDP datagram holds
    sender.sendto(big, receiver.getsockname())
    batch = MessageBatch(receiver, slots=2)
    assert batch.receive() == [big]
    assert len(big) <= SLOT_SIZE and batch.truncated == 0


def test_ipv6_sources_are_decoded() -> None:
    receiver, sender = udp("::1"), udp("::1")
    with receiver, sender:
        receiver.setblocking(False)
        sender.sendto(b"six", receiver.getsockname())
        batch = MessageBatch(receiver)
        assert batch.receive() == [b"six"]
        assert batch.source(0) == sender.getsockname()[:2]


def test_a_coalesced_gro_buffer_is_split_into_its_datagrams(
        pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    receiver.setsockopt(SOL_UDP, UDP_GRO, 1)
    segments = [bytes([n]) * 100 for n in range(5)] + [b"tail"]
    sender.sendto(b"alone", receiver.getsockname())
    # one GSO send: on loopback it reaches a UDP_GRO socket as one buffer
    sender.sendmsg([b"".join(segments)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", 100))], 0,
                   receiver.getsockname())
    sender.sendto(b"after", receiver.getsockname())
    batch = MessageBatch(receiver)
    received = batch.receive()
    assert received == [b"alone", *segments, b"after"]
    # each datagram of the split knows the message it came in
    assert [batch.source(k) for k in range(len(received))] == \
        [sender.getsockname()] * len(received)
    assert all(level == SOL_UDP and kind == UDP_GRO
               for level, kind, _ in batch.ancillary(3))
    assert batch.ancillary(0) == [] and batch.ancillary(len(received) - 1) == []


def test_a_wildcard_sockets_pktinfo_is_decoded_and_does_not_split() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with receiver, udp() as sender:
        receiver.setblocking(False)
        receiver.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        receiver.bind(("0.0.0.0", 0))
        port = receiver.getsockname()[1]
        sender.sendto(b"x" * 300, ("127.0.0.1", port))
        sender.sendto(b"y" * 300, ("127.0.0.1", port))
        batch = MessageBatch(receiver, plain_control=socket.CMSG_SPACE(12))
        assert batch.receive() == [b"x" * 300, b"y" * 300]
        ((level, kind, info),) = batch.ancillary(1)
        assert (level, kind) == (socket.IPPROTO_IP, IP_PKTINFO)
        assert socket.inet_ntoa(info[8:12]) == "127.0.0.1"


def test_a_queued_socket_error_is_raised_once() -> None:
    closed = udp()
    target = closed.getsockname()
    closed.close()
    with udp() as sock:
        sock.setblocking(False)
        sock.connect(target)
        sock.send(b"to nobody")  # the ICMP port unreachable comes back as ECONNREFUSED
        batch = MessageBatch(sock)
        with pytest.raises(ConnectionRefusedError):
            batch.receive()
        assert batch.receive() == []
