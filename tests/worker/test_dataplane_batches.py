"""DataPlane's batch paths without a kernel: GSO runs out, coalesced TUN writes in.

The TUN and the routes are stand-ins; the SAD, the ESP code and the run logic are real.
The peer's SAD checks what left: every packet protected, sequence numbers used once
and in order, nothing for a destination no SA covers.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from cluster.esp import Sad
from cluster.esp.params import Address
from cluster.worker import IoCounters
from cluster.worker.dataplane import GSO_BYTES, GSO_SEGMENTS, TUN_HOLD, TUN_HOLD_AFTER, DataPlane
from cluster.worker.gro import GSO_TCPV4, VNET_HDR, VNET_HDR_SIZE
from cluster.worker.keys import Limits
from tests.esp.pairs import GW_A, GW_B, mirror, packet, params, with_tos

from .test_gro import tcp


@dataclass
class FakeTun:
    fds: list[int]
    vnet_hdr: bool = True
    counters: IoCounters = field(default_factory=IoCounters)


class FakeRoutes:
    """Records the networks routed into the TUN."""

    def __init__(self) -> None:
        self.routes: list[str] = []

    def add(self, network: str, src: str | None = None) -> None:
        self.routes.append(network)

    def remove(self, network: str) -> None:
        self.routes.remove(network)


@dataclass
class Sent:
    calls: list[tuple[bytes, Address, Address, int]] = field(default_factory=list)
    tos: list[int] = field(default_factory=list)  # each call's

    def __call__(self, esp: bytes, local: Address, remote: Address, segment: int = 0,
                 tos: int = 0) -> bool:
        self.calls.append((esp, local, remote, segment))
        self.tos.append(tos)
        return True

    def datagrams(self) -> list[bytes]:
        return [d for call in self.calls for d in _split(call)]

    def datagrams_with_tos(self) -> list[tuple[bytes, int]]:
        return [(d, tos) for call, tos in zip(self.calls, self.tos, strict=True)
                for d in _split(call)]


def _split(call: tuple[bytes, Address, Address, int]) -> list[bytes]:
    esp, _, _, segment = call
    step = segment or len(esp)
    return [esp[at:at + step] for at in range(0, len(esp), step)]


def plane_and_peer(fd: int, *, we_are_b: bool = False, **changes: object
                   ) -> tuple[DataPlane, Sad, Sent]:
    """Our data plane as gateway A of tests.esp.pairs (10.99.1.0/24 behind it), or B."""
    a_side = params(encap=True, **changes)
    ours, theirs = (mirror(a_side), a_side) if we_are_b else (a_side, mirror(a_side))
    plane = DataPlane(FakeTun([fd]), FakeRoutes(), [], Limits())  # type: ignore[arg-type]
    plane.install(ours)
    peer = Sad()
    peer.install(theirs)
    sent = Sent()
    plane.udp_send = sent
    return plane, peer, sent


def sequence(esp: bytes) -> int:
    return int(struct.unpack_from("!I", esp, 4)[0])


def test_runs_of_equal_packets_leave_in_gso_sends_in_order(tun_pair: tuple[int, int]) -> None:
    plane, peer, sent = plane_and_peer(tun_pair[0])
    # three small packets, then larger ones: a larger packet must start a new run
    flow = [packet("10.99.1.5", "10.99.2.7", payload=bytes([n]) * (1300 if n > 2 else 200))
            for n in range(150)]
    uncovered = packet("10.99.1.5", "10.77.0.1", payload=b"clear" * 10)
    short = packet("10.99.1.5", "10.99.2.7", payload=b"end")
    batch = [*flow[:70], uncovered, *flow[70:], short]
    plane.send_packets(batch[:64])
    plane.send_packets(batch[64:])
    datagrams = sent.datagrams()
    assert [peer.decapsulate_untrusted(d) for d in datagrams] == [*flow, short]
    assert [sequence(d) for d in datagrams] == list(range(1, len(flow) + 2))
    assert plane.sad.counters.no_sa_out == 1
    for esp, local, remote, segment in sent.calls:
        assert (local, remote) == (("192.0.2.1", 4500), ("198.51.100.2", 4500))
        if segment:
            assert len(esp) > segment and len(esp) <= GSO_BYTES
            assert -(-len(esp) // segment) <= GSO_SEGMENTS
    # GSO did happen: far fewer sends than packets, the shorter packet last in its run
    assert len(sent.calls) <= 8
    assert sent.calls[-1][0].endswith(datagrams[-1]) and sent.calls[-1][3] > len(datagrams[-1])


EF, AF41, LE, ECT0, CE = 0xB8, 0x88, 0x04, 0x02, 0x03  # LE: DSCP 1 (RFC 8622)


@pytest.mark.parametrize("copy_ecn", [True, False])
@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("cipher", [("aes256gcm16", None), ("aes128", "sha256")])
def test_the_outer_header_takes_each_packets_dscp_and_ecn(
        tun_pair: tuple[int, int], v6: bool, cipher: tuple[str, str | None],
        copy_ecn: bool) -> None:
    plane, peer, sent = plane_and_peer(tun_pair[0], v6=v6, encr=cipher[0], integ=cipher[1],
                                       copy_ecn=copy_ecn)
    src, dst = ("fd00:a::5", "fd00:b::7") if v6 else ("10.99.1.5", "10.99.2.7")
    marks = [0] * 5 + [EF | ECT0] * 20 + [EF] * 3 + [0 | CE] * 4 + [LE] * 2 + [AF41] * 2 \
        + [EF]
    flow = [with_tos(packet(src, dst, payload=bytes([n]) * 1300), tos)
            for n, tos in enumerate(marks)]
    plane.send_packets(flow)
    datagrams = sent.datagrams_with_tos()
    assert [peer.decapsulate_untrusted(d) for d, _ in datagrams] == flow
    mask = 0xFF if copy_ecn else 0xFC
    assert [tos for _, tos in datagrams] == [tos & mask for tos in marks]
    # each TOS's stretch still leaves in GSO sends, one per stretch (CBC pads: the
    # lengths stay equal); without ECN, EF | ECT(0) and EF are one stretch
    assert len(sent.calls) == (7 if copy_ecn else 6)


def test_copy_dscp_no_keeps_the_outer_dscp_zero(tun_pair: tuple[int, int]) -> None:
    plane, peer, sent = plane_and_peer(tun_pair[0], copy_dscp=False)
    flow = [with_tos(packet("10.99.1.5", "10.99.2.7", payload=b"q" * 900), tos)
            for tos in (0, EF, EF, AF41, 0, EF | ECT0)]
    plane.send_packets(flow)
    datagrams = sent.datagrams_with_tos()
    assert [peer.decapsulate_untrusted(d) for d, _ in datagrams] == flow
    assert [tos for _, tos in datagrams] == [0] * 5 + [ECT0]  # the ECN field still goes


def _tun_writes(fd: int) -> list[bytes]:
    """The packets written into the TUN stand-in so far, without their vnet headers."""
    written = []
    while True:
        try:
            written.append(os.read(fd, 1 << 17)[VNET_HDR_SIZE:])
        except BlockingIOError:
            return written


@pytest.mark.parametrize("v6", [False, True])
def test_a_ce_mark_on_the_outer_header_goes_into_the_packet(
        tun_pair: tuple[int, int], v6: bool) -> None:
    """RFC 6040 4.2 through the data plane's receive path: the outer ECN the sockets
    report reaches the SAD by index, across receive calls, until the flush."""
    plane, peer, _ = plane_and_peer(tun_pair[0], we_are_b=True, v6=v6)
    src, dst = ("fd00:a::5", "fd00:b::7") if v6 else ("10.99.1.5", "10.99.2.7")
    inner = [with_tos(packet(src, dst, payload=bytes([n]) * 300), tos)
             for n, tos in enumerate([ECT0, ECT0, 0, ECT0, ECT0 | EF, ECT0])]
    esp = [peer.outbound_for(p).encapsulate(p) for p in inner]  # type: ignore[union-attr]
    plane.receive_esp(esp[:3], {1: CE, 2: CE})
    plane.receive_esp(esp[3:], {1: CE})  # index 1 of this call: the fifth packet
    plane.flush()
    assert _tun_writes(tun_pair[1]) == [inner[0], with_tos(inner[1], CE), inner[3],
                                        with_tos(inner[4], EF | CE), inner[5]]
    assert plane.stats()["sa_ecn_drops"] == 1
    # a later batch without marks: nothing left over from the last one
    more = [peer.outbound_for(p).encapsulate(p) for p in inner[:2]]  # type: ignore[union-attr]
    plane.receive_esp(more)
    plane.flush()
    assert _tun_writes(tun_pair[1]) == inner[:2]


@dataclass
class FakeEspSocket:
    family: int = socket.AF_INET
    sent: list[tuple[bytes, str, int]] = field(default_factory=list)

    def send(self, esp: bytes, peer: str, tos: int = 0) -> bool:
        self.sent.append((esp, peer, tos))
        return True


@pytest.mark.parametrize("mode", ["tunnel", "transport"])
def test_raw_esp_takes_each_packets_tos_too(tun_pair: tuple[int, int], mode: str) -> None:
    a_side = params(mode=mode)
    raw = FakeEspSocket()
    plane = DataPlane(FakeTun([tun_pair[0]]), FakeRoutes(), [raw], Limits())  # type: ignore[list-item]
    plane.install(a_side)
    peer = Sad()
    peer.install(mirror(a_side))
    src, dst = (GW_A, GW_B) if mode == "transport" else ("10.99.1.5", "10.99.2.7")
    flow = [with_tos(packet(src, dst, payload=b"r" * 500), tos) for tos in (EF, EF | CE, 0)]
    plane.send_packets(flow)
    # the ECN field goes outside in both modes (in transport mode the peer's rebuilt
    # header takes the TOS back)
    assert [(peer_address, tos) for _, peer_address, tos in raw.sent] == \
        [(GW_B, EF), (GW_B, EF | CE), (GW_B, 0)]
    received = [peer.decapsulate_untrusted(esp, tos) for esp, _, tos in raw.sent]
    assert len({p[-500:] for p in received}) == 1
    if mode == "transport":
        assert received == flow


def test_a_removed_sa_is_not_used_from_the_fast_path(tun_pair: tuple[int, int]) -> None:
    plane, _, sent = plane_and_peer(tun_pair[0])
    flow = [packet("10.99.1.5", "10.99.2.7") for _ in range(3)]
    plane.send_packets(flow)
    plane.remove(plane.sad.__iter__().__next__().params.spi_in)
    plane.send_packets(flow)
    assert len(sent.datagrams()) == 3
    assert plane.sad.counters.no_sa_out == 3


def test_decapsulated_tcp_enters_the_tun_coalesced(tun_pair: tuple[int, int]) -> None:
    plane, peer, _ = plane_and_peer(tun_pair[0], we_are_b=True)
    # tcp() sends from 10.99.1.5 to 10.99.2.1: from behind A (the peer) to behind us
    segments = [tcp(4, 1000 + n * 1360, os.urandom(1360)) for n in range(30)]
    esp = [peer.outbound_for(s).encapsulate(s) for s in segments]  # type: ignore[union-attr]
    plane.receive_esp(esp[:20])
    plane.receive_esp([*esp[20:], esp[3]])  # the last a replay
    plane.flush()
    written = os.read(tun_pair[1], 1 << 17)
    _, gso, _, gso_size, _, _ = VNET_HDR.unpack_from(written)
    assert (gso, gso_size) == (GSO_TCPV4, 1360)
    assert written[VNET_HDR_SIZE + 52:] == b"".join(s[52:] for s in segments)
    counters = plane.counters
    assert (counters.tun_write_packets, counters.tun_write_bytes) == (30, sum(map(len, segments)))
    assert plane.sad.totals().replay_drops == 1
    with pytest.raises(BlockingIOError):
        os.read(tun_pair[1], 100)


class QueuedTun(FakeTun):
    """A TUN whose reads come from a list of batches, one per wake-up."""

    def __init__(self) -> None:
        super().__init__([0])
        self.batches: list[list[bytes]] = []
        self.reads = 0

    async def read_batch(self, fd: int, max_packets: int) -> list[bytes]:
        while not self.batches:
            await trio.lowlevel.checkpoint()
        self.reads += 1
        return self.batches.pop(0)


async def test_the_tun_pump_holds_after_a_busy_read_never_after_a_lone_packet(
        mock_clock: trio.testing.MockClock) -> None:
    tun = QueuedTun()
    plane = DataPlane(tun, FakeRoutes(), [], Limits())  # type: ignore[arg-type]
    sent: list[list[bytes]] = []
    plane.send_packets = sent.append  # type: ignore[method-assign]
    lone, busy = [b"a"], [b"b"] * TUN_HOLD_AFTER

    async def settle() -> None:
        for _ in range(50):
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(plane._tun_pump, 0)
        tun.batches += [lone, lone]
        await settle()
        assert sent == [lone, lone]  # no pause after a lone packet
        tun.batches += [busy, lone]
        await settle()
        assert sent == [lone, lone, busy]  # paused: trio's clock stands still here
        mock_clock.jump(TUN_HOLD)
        await settle()
        assert sent == [lone, lone, busy, lone]
        nursery.cancel_scope.cancel()
