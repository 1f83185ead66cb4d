"""Raw ESP sockets across a veth pair, and marked sockets bypassing the TUN table."""

from __future__ import annotations

import select
import socket
import struct
from typing import Any

import pytest
import trio

from cluster.errors import ParseError
from cluster.worker import IoCounters
from cluster.worker.routing import Routes
from cluster.worker.sockets import (
    DEFAULT_MARK,
    EspSocket,
    drain_nowait,
    drain_recv,
    esp_from_ipv4_untrusted,
    mark_socket,
)
from cluster.worker.tun import TunDevice
from tests.ip_tos import received_tos, receiving_tos

from .namespaces import Pair, enter_netns, run_in_netns

FAMILIES = pytest.mark.parametrize("version", [4, 6])


def _addresses(pair: Pair, version: int) -> tuple[str, str]:
    return (pair.a_v4, pair.b_v4) if version == 4 else (pair.a_v6, pair.b_v6)


def _esp(spi: int, seq: int, body: bytes) -> bytes:
    return struct.pack("!II", spi, seq) + body


def _wait(fileno: int, timeout: float) -> bool:
    return bool(select.select([fileno], [], [], timeout)[0])


def _tun_payloads(packets: list[bytes]) -> list[tuple[int, bytes]]:
    """(IP protocol, payload) of each IPv4 or IPv6 packet read from the TUN."""
    out = []
    for p in packets:
        if p[0] >> 4 == 4:
            out.append((p[9], p[(p[0] & 0x0F) * 4 :]))
        else:
            out.append((p[6], p[40:]))
    return out


@FAMILIES
def test_raw_esp_reaches_the_peer_namespace_as_bare_esp(pair: Pair, version: int) -> None:
    local, peer = _addresses(pair, version)
    esp = _esp(0x11223344, 1, b"ikc-esp-" + bytes(range(40)))

    def body() -> dict[str, Any]:
        enter_netns(pair.b)
        capture = EspSocket.open(peer, mark=None)  # stays in b after we leave
        enter_netns(pair.a)
        with EspSocket.open(local) as sender:
            mark = sender.sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
            sent = sender.send(esp, peer)
            sent_counters = sender.counters.as_dict()
        arrived = _wait(capture.fileno(), 5)
        received = capture.drain()
        empty_after = capture.drain()
        got = {
            "mark": mark, "sent": sent, "arrived": arrived, "received": received,
            "empty_after": empty_after, "sent_c": sent_counters,
            "recv_c": capture.counters.as_dict(),
        }
        capture.close()
        return got

    got = run_in_netns(pair.a, body)
    assert got["mark"] == DEFAULT_MARK
    assert got["sent"] is True and got["arrived"] is True
    # The IPv4 header the raw socket delivers is cut off: both families give bare ESP.
    assert got["received"] == [(esp, local, 0)]
    assert got["empty_after"] == []
    assert (got["sent_c"]["esp_sent_packets"], got["sent_c"]["esp_sent_bytes"]) == (1, len(esp))
    recv_c = got["recv_c"]
    assert (recv_c["esp_received_packets"], recv_c["esp_received_bytes"]) == (1, len(esp))
    assert recv_c["esp_receive_errors"] == 0


@FAMILIES
def test_marked_sockets_bypass_the_tun_route_to_a_transport_peer(
    pair: Pair, version: int
) -> None:
    """The peer's outer address is routed into the TUN (transport mode); only the
    worker's marked ESP and UDP reach the wire, unmarked packets go into the TUN."""
    local, peer = _addresses(pair, version)
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    marked_esp, plain_esp = _esp(1, 1, b"marked-esp"), _esp(2, 1, b"plain-esp")

    def body() -> dict[str, Any]:
        enter_netns(pair.b)
        esp_capture = EspSocket.open(peer, mark=None)
        udp_capture = socket.socket(family, socket.SOCK_DGRAM)
        udp_capture.bind((peer, 4500))
        udp_capture.setblocking(False)
        enter_netns(pair.a)
        with (
            TunDevice.open("ikt0") as tun,
            Routes.open(tun.ifindex) as routes,
            EspSocket.open(local) as esp,
            EspSocket.open(local, mark=None) as unmarked_esp,
            socket.socket(family, socket.SOCK_DGRAM) as udp,
            socket.socket(family, socket.SOCK_DGRAM) as unmarked_udp,
        ):
            routes.add(peer, src=local)
            mark_socket(udp, DEFAULT_MARK)
            esp.send(marked_esp, peer)
            unmarked_esp.send(plain_esp, peer)
            udp.sendto(b"marked-udp", (peer, 4500))
            unmarked_udp.sendto(b"plain-udp", (peer, 4500))
            _wait(esp_capture.fileno(), 5)
            _wait(udp_capture.fileno(), 5)
            _wait(tun.fds[0], 5)
            # Whatever is misrouted has long arrived by now.
            select.select([], [], [], 0.3)
            got = {
                "wire_esp": [data for data, _, _ in esp_capture.drain()],
                "wire_udp": [data for data, _ in drain_nowait(udp_capture)],
                "tun": _tun_payloads(tun.drain(tun.fds[0])),
            }
        esp_capture.close()
        udp_capture.close()
        return got

    got = run_in_netns(pair.a, body)
    assert got["wire_esp"] == [marked_esp]
    assert got["wire_udp"] == [b"marked-udp"]
    tun = got["tun"]
    assert (50, plain_esp) in tun
    assert [proto for proto, _ in tun] == [50, 17]
    assert tun[1][1][8:] == b"plain-udp"  # after the UDP header


def test_open_on_an_address_that_is_not_local_fails_cleanly(ns: str) -> None:
    def body() -> str:
        try:
            EspSocket.open("203.0.113.9")
        except OSError as exc:
            return str(exc)
        return "opened"

    message = run_in_netns(ns, body)
    assert "cannot open raw ESP socket on 203.0.113.9" in message


async def test_drain_recv_waits_once_and_returns_a_bounded_batch() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        receiver.bind(("127.0.0.1", 0))
        sender.bind(("127.0.0.1", 0))
        receiver.setblocking(False)
        address = receiver.getsockname()

        async def send_later() -> None:
            await trio.sleep(0.05)
            # No checkpoint between the sends: loopback queues all three before
            # the receiving task runs again.
            for i in range(3):
                sender.sendto(bytes([i]), address)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_later)
            with trio.fail_after(5):
                first = await drain_recv(receiver, 2)
        with trio.fail_after(5):
            rest = await drain_recv(receiver, 2)
        assert [data for data, _ in first] == [b"\x00", b"\x01"]
        assert [data for data, _ in rest] == [b"\x02"]
        assert first[0][1] == sender.getsockname()
        assert drain_nowait(receiver) == []


def test_ipv4_header_is_cut_at_its_own_length() -> None:
    esp = _esp(7, 9, b"body")
    plain = bytes([0x45]) + bytes(19) + esp
    with_options = bytes([0x46]) + bytes(23) + esp
    assert esp_from_ipv4_untrusted(plain) == esp
    assert esp_from_ipv4_untrusted(with_options) == esp


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        bytes([0x45]) + bytes(10),  # shorter than a header
        bytes([0x65]) + bytes(30),  # not version 4
        bytes([0x44]) + bytes(30),  # header length below 20
        bytes([0x4F]) + bytes(30),  # header length beyond the packet
    ],
)
def test_malformed_ipv4_headers_raise_parse_error(packet: bytes) -> None:
    with pytest.raises(ParseError):
        esp_from_ipv4_untrusted(packet)


def test_counters_start_at_zero_and_list_every_field() -> None:
    assert set(IoCounters().as_dict().values()) == {0}
    assert "esp_receive_errors" in IoCounters().as_dict()


@FAMILIES
def test_raw_esp_leaves_with_the_tos_it_is_given(pair: Pair, version: int) -> None:
    local, peer = _addresses(pair, version)
    family = socket.AF_INET if version == 4 else socket.AF_INET6

    def body() -> list[int | None]:
        enter_netns(pair.b)
        capture = receiving_tos(socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ESP))
        capture.bind((peer, 0))
        enter_netns(pair.a)
        try:
            with EspSocket.open(local) as sender:
                for tos in (0xB8, 0, 0x04):
                    assert sender.send(_esp(7, tos + 1, b"dscp"), peer, tos)
            seen = []
            for _ in range(3):
                assert _wait(capture.fileno(), 5)
                seen.append(received_tos(capture))
            return seen
        finally:
            capture.close()

    assert run_in_netns(pair.a, body) == [0xB8, 0, 0x04]


@FAMILIES
def test_raw_esp_arrives_with_the_tos_of_its_ip_header(pair: Pair, version: int) -> None:
    """RFC 6040 4.2 needs the outer ECN field, a transport-mode SA the whole TOS: the
    IPv4 header's, the IPv6 traffic class (ancillary data)."""
    local, peer = _addresses(pair, version)
    sent = [(0xB8 | 3, _esp(8, 1, b"ce")), (0x01, _esp(8, 2, b"ect1")), (0x02, _esp(8, 3, b"ect0")),
            (0xB8, _esp(8, 4, b"not-ect"))]

    def body() -> list[tuple[bytes, str, int]]:
        enter_netns(pair.b)
        capture = EspSocket.open(peer, mark=None)
        enter_netns(pair.a)
        try:
            with EspSocket.open(local) as sender:
                for tos, esp in sent:
                    assert sender.send(esp, peer, tos)
            received: list[tuple[bytes, str, int]] = []
            while len(received) < len(sent):
                assert _wait(capture.fileno(), 5)
                received += capture.drain()
            return received
        finally:
            capture.close()

    assert run_in_netns(pair.a, body) == [(esp, local, tos) for tos, esp in sent]
