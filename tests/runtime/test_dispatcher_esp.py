"""ESP in UDP through the dispatcher's NAT-T socket: GSO sends and GRO receives (loopback)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import pytest
import trio
import trio.testing

from cluster.ike.constants import HEADER_SIZE, NON_ESP_MARKER
from cluster.ike.message import Header
from cluster.ike.session import Address
from cluster.ip_options import tos_ancillary
from cluster.runtime.dispatcher import (
    ESP_HOLD,
    ESP_RECV_BATCH,
    HOLD_AFTER,
    RECV_BATCH,
    SOL_UDP,
    UDP_SEGMENT,
    Dispatcher,
)
from cluster.runtime.stats import RuntimeStats
from tests.ip_tos import received_tos, receiving_tos


class Router:
    def __init__(self) -> None:
        self.routed: list[bytes] = []

    def route(self, header: Header, data: bytes, local: Address, remote: Address,
              now: float) -> None:
        self.routed.append(data)


def esp(spi: int, seq: int, size: int) -> bytes:
    return struct.pack("!II", spi, seq) + bytes([seq & 0xFF]) * (size - 8)


def ike_message(size: int) -> bytes:
    """An IKE header (what the dispatcher peeks at) padded to `size` bytes."""
    header = bytes(16) + bytes((33, 0x20, 34, 0x08)) + struct.pack("!II", 0, size)
    return header + bytes(size - HEADER_SIZE)


def natt_local(dispatcher: Dispatcher) -> Address:
    (local,) = [ep.local for ep in dispatcher.endpoints if ep.natt]
    return local


async def test_send_esp_with_a_segment_size_sends_each_packet_as_a_datagram() -> None:
    packets = [esp(0x1000, n, 300) for n in range(1, 6)] + [esp(0x1000, 6, 120)]
    with Dispatcher.bind(["127.0.0.1"], 0, 0, RuntimeStats()) as dispatcher, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(2)
        assert dispatcher.send_esp(b"".join(packets), natt_local(dispatcher),
                                   peer.getsockname(), 300)
        assert dispatcher.send_esp(packets[0], natt_local(dispatcher), peer.getsockname())
        received = [peer.recvfrom(2000) for _ in range(7)]
        local = natt_local(dispatcher)
    assert [data for data, _ in received] == [*packets, packets[0]]
    assert {source for _, source in received} == {local}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_send_esp_puts_the_tos_it_is_given_on_each_datagram(host: str) -> None:
    packets = [esp(0x1000, n, 300) for n in range(1, 4)]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with Dispatcher.bind([host], 0, 0, RuntimeStats()) as dispatcher, \
            receiving_tos(socket.socket(family, socket.SOCK_DGRAM)) as peer:
        peer.bind((host, 0))
        peer.settimeout(2)
        local, remote = natt_local(dispatcher), peer.getsockname()[:2]
        assert dispatcher.send_esp(b"".join(packets), local, remote, 300, 0xB8)  # GSO
        assert dispatcher.send_esp(packets[0], local, remote, 0, 0x04)
        assert dispatcher.send_esp(packets[1], local, remote)
        seen = [received_tos(peer) for _ in range(5)]
    assert seen == [0xB8, 0xB8, 0xB8, 0x04, 0]


async def test_coalesced_datagrams_are_classified_one_by_one() -> None:
    router = Router()
    sunk: list[bytes] = []
    size = 200
    segments = [esp(0x2000, 1, size), esp(0x2000, 2, size), ike_message(size - 4),
                esp(0x2000, 3, size), esp(0x2000, 4, 80)]
    segments[2] = NON_ESP_MARKER + segments[2]
    stats = RuntimeStats()
    with Dispatcher.bind(["127.0.0.1"], 0, 0, stats) as dispatcher, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        dispatcher.esp_sink = lambda batch, _ecn: sunk.extend(batch)
        flushed: list[int] = []  # how many datagrams had been sunk at each flush
        dispatcher.esp_flush = lambda: flushed.append(len(sunk))
        peer.bind(("127.0.0.1", 0))
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.serve, router)
            await trio.testing.wait_all_tasks_blocked()  # the readers have switched on GRO
            # one GSO send: on loopback it reaches a UDP_GRO socket as one buffer
            peer.sendmsg([b"".join(segments)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))],
                         0, natt_local(dispatcher))
            peer.sendto(b"\xff", natt_local(dispatcher))  # a NAT keepalive after them
            with trio.fail_after(5):
                while stats.natt_keepalives < 1:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert sunk == [segments[i] for i in (0, 1, 3, 4)]
    assert flushed and flushed[0] == 4  # once the wake-up's datagrams were all in
    assert router.routed == [segments[2][4:]]  # the IKE message, marker removed
    assert stats.datagrams_in == 6


# (the peer's TOS for each datagram; the ECN codepoints: 1 ECT(1), 2 ECT(0), 3 CE)
@pytest.mark.parametrize(("host", "wildcard"), [("127.0.0.1", "127.0.0.1"), ("::1", "::1"),
                                               ("0.0.0.0", "127.0.0.1"), ("::", "::1")])
async def test_the_natt_reader_names_the_esp_that_arrived_with_a_tos(
        host: str, wildcard: str) -> None:
    """RFC 6040 4.2 needs the outer ECN field, a transport-mode SA the whole TOS: each
    datagram whose TOS is not 0 reaches the sink by its index among the ESP (an IKE
    message between them does not count) with that TOS, for single datagrams and for a
    coalesced (GRO) one alike; a batch without any gives None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    router = Router()
    sunk: list[tuple[list[bytes], dict[int, int] | None]] = []
    stats = RuntimeStats()
    size = 120
    with Dispatcher.bind([host], 0, 0, stats) as dispatcher, \
            socket.socket(family, socket.SOCK_DGRAM) as peer:
        dispatcher.esp_sink = lambda batch, ecn: sunk.append((batch, ecn))
        local = (wildcard, natt_local(dispatcher)[1])
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.serve, router)
            await trio.testing.wait_all_tasks_blocked()
            sends = [(esp(0x5000, 1, size), 0x00), (NON_ESP_MARKER + ike_message(100), 0x03),
                     (esp(0x5000, 2, size), 0xB8 | 3), (esp(0x5000, 3, size), 0x02),
                     (esp(0x5000, 4, size), 0x01)]
            for data, tos in sends:  # queued before the reader wakes: one batch
                peer.sendmsg([data], [tos_ancillary(family, tos)], 0, local)
            await _until(lambda: sum(len(batch) for batch, _ in sunk) == 4)
            # a GSO send with CE: three datagrams coalesced, each named
            peer.sendmsg([esp(0x5000, 5, size) + esp(0x5000, 6, size) + esp(0x5000, 7, 60)],
                         [tos_ancillary(family, 0x03),
                          (SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, local)
            await _until(lambda: sum(len(batch) for batch, _ in sunk) == 7)
            peer.sendmsg([esp(0x5000, 8, size)], [tos_ancillary(family, 0x00)], 0, local)
            await _until(lambda: sum(len(batch) for batch, _ in sunk) == 8)
            nursery.cancel_scope.cancel()
    assert [len(batch) for batch, _ in sunk] == [4, 3, 1]
    assert sunk[0][1] == {1: 0xB8 | 3, 2: 2, 3: 1}
    assert sunk[1][1] == {0: 3, 1: 3, 2: 3}
    assert sunk[2][1] is None
    assert router.routed == [ike_message(100)]


async def _until(condition: Callable[[], bool]) -> None:
    """Let the reader run (real time: the test's clock stands still) until `condition`."""
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "the reader did not get there"
        await trio.lowlevel.checkpoint()


async def test_a_busy_esp_stream_is_held_a_moment_a_lone_datagram_never(
        mock_clock: trio.testing.MockClock) -> None:
    sunk: list[bytes] = []
    with Dispatcher.bind(["127.0.0.1"], 0, 0, RuntimeStats()) as dispatcher, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        dispatcher.esp_sink = lambda batch, _ecn: sunk.extend(batch)
        local = natt_local(dispatcher)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.serve, Router())
            await trio.testing.wait_all_tasks_blocked()
            peer.sendto(esp(0x3000, 1, 100), local)  # a lone datagram: no hold after it
            await _until(lambda: len(sunk) == 1)
            for seq in range(2, 2 + HOLD_AFTER):  # a burst: one wake-up reads them all
                peer.sendto(esp(0x3000, seq, 100), local)
            await _until(lambda: len(sunk) == 1 + HOLD_AFTER)
            peer.sendto(esp(0x3000, 99, 100), local)
            # the reader pauses for ESP_HOLD of trio's time, which stands still here
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                await trio.lowlevel.checkpoint()
            assert len(sunk) == 1 + HOLD_AFTER
            mock_clock.jump(ESP_HOLD)
            await _until(lambda: len(sunk) == 2 + HOLD_AFTER)
            nursery.cancel_scope.cancel()
    assert [struct.unpack_from("!I", data, 4)[0] for data in sunk] == \
        [*range(1, 2 + HOLD_AFTER), 99]


async def test_the_natt_reader_takes_a_bigger_batch_of_esp_per_wake_up() -> None:
    rounds = 0
    seen: list[int] = []  # the scheduler round each datagram was handled in

    async def spin() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await trio.lowlevel.checkpoint()

    with Dispatcher.bind(["127.0.0.1"], 0, 0, RuntimeStats()) as dispatcher, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        dispatcher.esp_sink = lambda batch, _ecn: seen.extend([rounds] * len(batch))
        local = natt_local(dispatcher)
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.serve, Router())
            await trio.testing.wait_all_tasks_blocked()
            for seq in range(1, ESP_RECV_BATCH + 11):  # queued before the reader wakes
                peer.sendto(esp(0x4000, seq, 20), local)
            nursery.start_soon(spin)
            await _until(lambda: len(seen) == ESP_RECV_BATCH + 10)
            nursery.cancel_scope.cancel()
    assert ESP_RECV_BATCH > RECV_BATCH
    assert len(set(seen[:ESP_RECV_BATCH])) == 1  # one wake-up, no yield in between
    assert seen[ESP_RECV_BATCH] > seen[0]  # then it let the others run
