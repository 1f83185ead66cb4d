"""Sequence number exhaustion (RFC 4303 3.3.3) and byte/packet lifetimes (RFC 4301 4.4.2.1)."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.esp import (
    EspDrop,
    EspEvent,
    Sad,
    SaHardExpired,
    SaSequenceExhausted,
    SaSoftExpired,
)
from tests.esp.pairs import packet, pair, params

INNER = packet("10.99.1.5", "10.99.2.7", 17, b"x" * 72)  # 100 bytes
REPLY = packet("10.99.2.7", "10.99.1.5", 17, b"y" * 72)
assert len(INNER) == 100


def events(sad: Sad) -> list[EspEvent]:
    out = []
    while (event := sad.next_event()) is not None:
        out.append(event)
    return out


def send(sad: Sad, count: int, pkt: bytes = INNER) -> list[bytes]:
    out = []
    for _ in range(count):
        sa = sad.outbound_for(pkt)
        assert sa is not None
        out.append(sa.encapsulate(pkt))
    return out


@pytest.mark.parametrize("esn", [False, True])
def test_sequence_number_never_wraps(esn: bool) -> None:
    last = (1 << 64) - 1 if esn else (1 << 32) - 1
    p = params(esn=esn, initial_seq=last - 2)
    a, b = pair(p, initial_seq=0)  # only A's outbound is near the end
    receiver = b.get(p.spi_out)
    assert receiver is not None
    receiver.inbound.replay.top = last - 2
    packets = send(a, 2)  # last - 1 and last
    assert [int.from_bytes(e[4:8], "big") for e in packets] == \
        [(last - 1) & 0xFFFFFFFF, last & 0xFFFFFFFF]
    for esp in packets:
        assert b.decapsulate_untrusted(esp) == INNER
    sa = a.outbound_for(INNER)
    assert sa is not None
    for _ in range(3):
        with pytest.raises(EspDrop) as drop:
            sa.encapsulate(INNER)
        assert drop.value.reason == "seq_exhausted_drops"
    assert sa.seq == last and sa.exhausted
    assert sa.counters.seq_exhausted_drops == 3 and sa.counters.packets_out == 2
    evs = events(a)
    assert [e for e in evs if isinstance(e, SaSequenceExhausted)] == \
        [SaSequenceExhausted(p.spi_in, p.spi_out)]  # reported once
    # near the end of the space the SA had already asked for a rekey
    assert SaSoftExpired(p.spi_in, p.spi_out, "sequence") in evs
    # inbound keeps working until the rekey replaces the SA
    reply = b.outbound_for(REPLY)
    assert reply is not None
    assert a.decapsulate_untrusted(reply.encapsulate(REPLY)) == REPLY


def test_soft_sequence_event_fires_with_a_sixteenth_left() -> None:
    soft_at = (1 << 32) - 1 - (((1 << 32) - 1) >> 4)
    a, _ = pair(params(initial_seq=soft_at - 3))
    send(a, 2)
    assert events(a) == []
    send(a, 1)
    assert [type(e) for e in events(a)] == [SaSoftExpired]
    send(a, 5)
    assert events(a) == []  # once only


@pytest.mark.parametrize(("limit", "value", "reason"), [
    ("soft_packets", 5, "packets_out"),
    ("soft_bytes", 450, "bytes_out"),  # crossed by the fifth 100-byte packet
])
def test_soft_outbound_limit_emits_one_event(limit: str, value: int, reason: str) -> None:
    limits: dict[str, Any] = {limit: value}
    p = params(**limits)
    a, b = pair(p)
    packets = send(a, 4)
    assert events(a) == []
    packets += send(a, 1)
    assert events(a) == [SaSoftExpired(p.spi_in, p.spi_out, reason)]
    packets += send(a, 20)
    assert events(a) == []
    assert a.get(p.spi_in) is not None  # still installed: the rekey comes later
    for esp in packets:
        b.decapsulate_untrusted(esp)


@pytest.mark.parametrize(("limit", "value", "reason", "allowed"), [
    ("hard_packets", 5, "packets_out", 5),
    ("hard_bytes", 450, "bytes_out", 5),
])
def test_hard_outbound_limit_removes_the_sa(limit: str, value: int, reason: str,
                                            allowed: int) -> None:
    limits: dict[str, Any] = {limit: value}
    p = params(**limits)
    a, b = pair(p)
    packets = send(a, allowed)  # the packet that reaches the limit is still sent
    assert events(a) == [SaHardExpired(p.spi_in, p.spi_out, reason)]
    assert a.get(p.spi_in) is None and len(a) == 0
    assert a.inbound(p.spi_in) is None
    assert a.outbound_for(INNER) is None and a.counters.no_sa_out == 1  # never sent clear
    for esp in packets:
        assert b.decapsulate_untrusted(esp) == INNER
    # totals survive the SA
    assert a.totals().packets_out == allowed


@pytest.mark.parametrize(("limit", "reason"), [("packets", "packets_in"), ("bytes", "bytes_in")])
def test_inbound_limits(limit: str, reason: str) -> None:
    # 100-byte packets: soft at the third, hard at the sixth
    soft, hard = (3, 6) if limit == "packets" else (250, 550)
    p = params()
    a, b = pair(p, **{f"soft_{limit}": soft, f"hard_{limit}": hard})
    packets = send(a, 6)
    for esp in packets[:2]:
        b.decapsulate_untrusted(esp)
    assert events(b) == []
    b.decapsulate_untrusted(packets[2])
    assert events(b) == [SaSoftExpired(p.spi_out, p.spi_in, reason)]
    b.decapsulate_untrusted(packets[3])
    b.decapsulate_untrusted(packets[4])
    assert events(b) == []
    b.decapsulate_untrusted(packets[5])  # reaches the hard limit: delivered, then removed
    assert events(b) == [SaHardExpired(p.spi_out, p.spi_in, reason)]
    more = send(a, 1)
    with pytest.raises(EspDrop) as drop:
        b.decapsulate_untrusted(more[0])
    assert drop.value.reason == "no_sa_in"


def test_soft_and_hard_together_on_one_packet() -> None:
    p = params(soft_packets=3, hard_packets=3)
    a, _ = pair(p)
    send(a, 3)
    assert [type(e) for e in events(a)] == [SaHardExpired]


def test_replaced_sa_asks_for_no_rekey() -> None:
    p = params(soft_packets=2)
    a, _ = pair(p)
    old = a.outbound_for(INNER)
    assert old is not None
    new_params = params(spi_in=b"\xc0\x00\x00\x02", spi_out=b"\xc1\x00\x00\x02")
    a.replace(p.spi_in, new_params)
    old.encapsulate(INNER)  # a packet still in the worker's batch
    old.encapsulate(INNER)
    assert events(a) == []


def test_initial_seq_jumps_ahead() -> None:
    p = params(initial_seq=1_000_000)
    a, b = pair(p)
    receiver = b.get(p.spi_out)
    assert receiver is not None
    esp = send(a, 1)[0]
    assert int.from_bytes(esp[4:8], "big") == 1_000_001
    assert b.decapsulate_untrusted(esp) == INNER
    assert receiver.inbound.replay.top == 1_000_001
