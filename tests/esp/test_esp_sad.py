"""The SAD: install / replace / remove, parameter checks, inbound and outbound lookup."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Any

import pytest

from cluster.esp import ChildSa, EspDrop, Sad, Selector
from cluster.transforms import ENCR_ALGORITHMS, INTEG_ALGORITHMS
from tests.esp.pairs import GW6_B, GW_A, GW_B, mirror, packet, pair, params, seal, trailer

INNER = packet("10.99.1.5", "10.99.2.7", 17, b"x")


def spis(n: int) -> dict[str, Any]:
    return {"spi_in": bytes([0xC0, 0, 0, n]), "spi_out": bytes([0xC1, 0, 0, n])}


def test_install_lookup_remove() -> None:
    sad = Sad()
    p = params()
    child = sad.install(p)
    assert isinstance(child, ChildSa)
    assert len(sad) == 1 and list(sad) == [child] and sad.get(p.spi_in) is child
    assert sad.inbound(p.spi_in) is child.inbound
    assert sad.inbound(p.spi_out) is None and sad.inbound(b"\x01") is None
    assert sad.outbound_for(INNER) is child.outbound
    assert sad.remove(p.spi_in) is child
    assert sad.remove(p.spi_in) is None
    assert len(sad) == 0 and sad.outbound_for(INNER) is None
    assert sad.counters.no_sa_out == 1
    assert sad.next_event() is None  # removal on request is not an event


def test_duplicate_and_reserved_spis_are_refused() -> None:
    sad = Sad()
    sad.install(params())
    with pytest.raises(ValueError, match="already installed"):
        sad.install(params(spi_out=b"\x01\x02\x03\x04"))
    with pytest.raises(ValueError, match="SPI 0"):
        sad.install(params(spi_in=bytes(4)))


@pytest.mark.parametrize(("changes", "message"), [
    ({"mode": "beet"}, "mode"),
    ({"spi_in": b"\x01\x02\x03"}, "4 bytes"),
    ({"integ": INTEG_ALGORITHMS["sha256"], "integ_key_in": bytes(32),
      "integ_key_out": bytes(32)}, "combined-mode"),
    ({"encr_key_in": bytes(16)}, "key material"),
    ({"local": ("2001:db8::1", 4500)}, "families"),
    ({"local_ts": ()}, "selectors"),
    ({"initial_seq": -1}, "negative"),
    ({"encr": ENCR_ALGORITHMS["aes128"], "encr_key_in": bytes(16), "encr_key_out": bytes(16)},
     "integrity"),
])
def test_bad_parameters(changes: dict[str, object], message: str) -> None:
    p = dataclasses.replace(params(), **changes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        Sad().install(p)


def test_transport_selectors_of_the_wrong_family_are_refused() -> None:
    p = params(mode="transport", local_ts=(Selector.from_network("2001:db8::/32"),))
    with pytest.raises(ValueError, match="family"):
        Sad().install(p)


def test_params_repr_hides_keys() -> None:
    p = params()
    text = repr(p)
    assert p.encr_key_in.hex() not in text and "encr_key_in" not in text


def test_replace_moves_outbound_at_once_and_old_inbound_lives_until_remove() -> None:
    old_p = params(**spis(1))
    a, b = pair(old_p)
    old_out = a.outbound_for(INNER)
    assert old_out is not None
    late = old_out.encapsulate(INNER)  # in flight while the rekey happens
    reply_old = b.outbound_for(packet("10.99.2.7", "10.99.1.5", 17, b"r"))
    assert reply_old is not None
    in_flight_to_a = reply_old.encapsulate(packet("10.99.2.7", "10.99.1.5", 17, b"r"))

    new_p = params(**spis(2))
    new = a.replace(old_p.spi_in, new_p)
    b.replace(old_p.spi_out, mirror(new_p))
    assert a.outbound_for(INNER) is new.outbound  # new SPIs usable right away
    esp = new.outbound.encapsulate(INNER)
    assert esp[:4] == new_p.spi_out and b.decapsulate_untrusted(esp) == INNER
    assert b.decapsulate_untrusted(late) == INNER  # the old inbound still receives
    assert a.decapsulate_untrusted(in_flight_to_a)[:1] == b"\x45"
    assert len(a) == 2
    a.remove(old_p.spi_in)
    b.remove(old_p.spi_out)
    assert len(a) == 1 and a.outbound_for(INNER) is new.outbound
    with pytest.raises(EspDrop):
        b.decapsulate_untrusted(late)
    totals = a.totals()
    assert totals.packets_out == 2 and totals.packets_in == 1  # removed SA still counted


def test_replace_of_an_unknown_sa_just_installs() -> None:
    sad = Sad()
    child = sad.replace(b"\x99\x99\x99\x99", params())
    assert sad.outbound_for(INNER) is child.outbound


def test_newest_sa_wins_for_overlapping_selectors() -> None:
    sad = Sad()
    first = sad.install(params(**spis(1)))
    second = sad.install(params(**spis(2)))
    assert sad.outbound_for(INNER) is second.outbound
    sad.remove(second.spi_in)
    assert sad.outbound_for(INNER) is first.outbound


def test_outbound_lookup_by_subnet() -> None:
    sad = Sad()
    nets = {n: sad.install(params(
        **spis(n), local_ts=(Selector.from_network("10.99.1.0/24"),),
        remote_ts=(Selector.from_network(f"10.{n}.0.0/16"),))) for n in range(1, 40)}
    for n in (1, 17, 39):
        assert sad.outbound_for(packet("10.99.1.5", f"10.{n}.200.3", 6, b"")) \
            is nets[n].outbound
    assert sad.outbound_for(packet("10.99.1.5", "10.40.0.1", 6, b"")) is None
    assert sad.outbound_for(packet("10.99.9.5", "10.1.0.1", 6, b"")) is None  # wrong source
    assert sad.counters.no_sa_out == 2


def test_outbound_lookup_for_many_road_warriors_uses_host_addresses() -> None:
    sad = Sad()
    warriors = {}
    for n in range(1, 200):
        warriors[n] = sad.install(params(
            **spis(n), local_ts=(Selector.from_network("0.0.0.0/0"),),
            remote_ts=(Selector.from_network(f"10.200.0.{n}/32"),),
            remote=(f"203.0.113.{n}", 4500)))
    assert sad.outbound_for(packet("192.0.2.80", "10.200.0.77", 6, b"")) is warriors[77].outbound
    assert sad.outbound_for(packet("192.0.2.80", "10.200.0.201", 6, b"")) is None
    assert warriors[77].outbound.remote == ("203.0.113.77", 4500)


def test_outbound_lookup_by_protocol_and_port() -> None:
    sad = Sad()
    web = sad.install(params(**spis(1), remote_ts=(Selector.from_network("10.99.2.0/24", 6,
                                                                          443, 443),)))
    dns = sad.install(params(**spis(2), remote_ts=(Selector.from_network("10.99.2.0/24", 17,
                                                                          53, 53),)))
    ping = sad.install(params(**spis(3), remote_ts=(Selector.from_network("10.99.2.0/24", 1,
                                                                           0x0800, 0x08FF),)))
    src, dst = "10.99.1.5", "10.99.2.7"
    assert sad.outbound_for(packet(src, dst, 6, b"", 40000, 443)) is web.outbound
    assert sad.outbound_for(packet(src, dst, 17, b"", 40000, 53)) is dns.outbound
    assert sad.outbound_for(packet(src, dst, 1, b"")) is ping.outbound  # echo: type 8
    assert sad.outbound_for(packet(src, dst, 6, b"", 40000, 80)) is None
    assert sad.outbound_for(packet(src, dst, 17, b"", 40000, 443)) is None
    sad.remove(web.spi_in)
    sad.remove(dns.spi_in)
    sad.remove(ping.spi_in)
    plain = sad.install(params(**spis(4)))
    assert sad.outbound_for(packet(src, dst, 6, b"", 40000, 80)) is plain.outbound


def test_opaque_selector_matches_only_packets_without_ports() -> None:
    sad = Sad()
    opaque = sad.install(params(**spis(1), remote_ts=(Selector.from_network(
        "10.99.2.0/24", 17, 65535, 0),)))
    fragment = bytearray(packet("10.99.1.5", "10.99.2.7", 17, b"x" * 20))
    fragment[6:8] = b"\x00\x10"  # fragment offset 16 * 8: no UDP header here
    assert sad.outbound_for(bytes(fragment)) is opaque.outbound
    assert sad.outbound_for(packet("10.99.1.5", "10.99.2.7", 17, b"x")) is None


def test_transport_mode_lookup_by_peer_address() -> None:
    sad = Sad()
    v4 = sad.install(params(**spis(1), mode="transport"))
    v6 = sad.install(params(**spis(2), mode="transport", v6=True))
    assert sad.outbound_for(packet(GW_A, GW_B, 6, b"")) is v4.outbound
    assert sad.outbound_for(packet("2001:db8::1", GW6_B, 6, b"")) is v6.outbound
    assert sad.outbound_for(packet(GW_A, "198.51.100.3", 6, b"")) is None


def test_transport_mode_behind_nat_uses_the_sa_addresses_not_the_selectors() -> None:
    """The peer's selectors name its private address; packets go to its public one."""
    sad = Sad()
    child = sad.install(params(mode="transport", encap=True,
                               remote_ts=(Selector.from_network("10.0.0.2/32"),)))
    assert sad.outbound_for(packet(GW_A, GW_B, 17, b"")) is child.outbound
    assert sad.outbound_for(packet(GW_A, "10.0.0.2", 17, b"")) is None


def test_malformed_tun_packets_are_counted_not_raised() -> None:
    sad = Sad()
    sad.install(params())
    for junk in (b"", b"\x45", b"\x00" * 40, b"\x60" + bytes(20)):
        assert sad.outbound_for(junk) is None
    assert sad.counters.malformed_out == 4


def test_events_from_several_sas_come_in_order() -> None:
    sad = Sad()
    one = sad.install(params(**spis(1), soft_packets=1))
    two = sad.install(params(**spis(2), hard_packets=1,
                             remote_ts=(Selector.from_network("10.99.3.0/24"),)))
    one.outbound.encapsulate(INNER)
    two.outbound.encapsulate(packet("10.99.1.5", "10.99.3.1", 17, b""))
    first, second = sad.next_event(), sad.next_event()
    assert first is not None and first.spi_in == one.spi_in
    assert second is not None and second.spi_in == two.spi_in
    assert sad.next_event() is None
    assert len(sad) == 1


def test_decapsulate_batch_keeps_order_and_counts_every_drop() -> None:
    a, b = pair(params())
    sa = a.outbound_for(INNER)
    assert sa is not None
    inner = [packet("10.99.1.5", "10.99.2.7", 17, bytes([n]) * (10 + n)) for n in range(4)]
    esp = [sa.encapsulate(p) for p in inner]
    tampered = esp[1][:-1] + bytes([esp[1][-1] ^ 1])
    unknown = b"\x01\x02\x03\x04" + esp[2][4:]
    batch = [esp[0], b"\x00" * 7, tampered, unknown, esp[2], esp[0], esp[3], esp[1]]
    assert b.decapsulate_batch(batch) == [inner[0], inner[2], inner[3], inner[1]]
    assert (b.counters.malformed_in, b.counters.no_sa_in) == (1, 1)
    totals = b.totals()
    assert (totals.integrity_failures, totals.replay_drops, totals.packets_in) == (1, 1, 4)
    assert b.decapsulate_batch([]) == []


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("changes", [{}, {"esn": True}, {"hard_packets": 40, "soft_packets": 20},
                                     {"mode": "transport"}])
def test_decapsulate_batch_is_decapsulate_untrusted_one_by_one(
        seed: int, changes: dict[str, Any]) -> None:
    """The batch path (with its fast runs) against the one-by-one path on twin SADs:
    the same inner packets, counters, replay state and events for a random mix of
    good, repeated, reordered, corrupted, foreign, padded-wrong and out-of-policy ESP."""
    rng = random.Random(seed)
    p = params(**changes)
    sender = Sad()  # the lifetimes are the receivers' to reach
    sender.install(dataclasses.replace(p, hard_packets=None, soft_packets=None))
    twins = []
    for _ in range(2):
        sad = Sad()
        sad.install(mirror(p))
        twins.append(sad)
    if p.mode == "tunnel":
        src, dst, stray = "10.99.1.5", "10.99.2.7", "10.77.0.1"
    else:
        src, dst, stray = p.local[0], p.remote[0], p.local[0]
    sa = sender.outbound_for(packet(src, dst))
    assert sa is not None
    made: list[bytes] = []
    for n in range(120):
        kind = rng.random()
        if kind < 0.6 or not made:
            made.append(sa.encapsulate(packet(src, dst, 6 if n % 3 else 17,
                                              bytes([n]) * rng.randrange(0, 1300))))
        elif kind < 0.7:
            made.append(rng.choice(made))  # a replay
        elif kind < 0.75:
            esp = rng.choice([e for e in made if len(e) > 8] or [bytes(20)])
            at = rng.randrange(8, len(esp))
            made.append(esp[:at] + bytes([esp[at] ^ 0x40]) + esp[at + 1:])
        elif kind < 0.8:
            made.append(b"\x0b\x0b\x0b\x0b" + rng.choice(made)[4:])  # unknown SPI
        elif kind < 0.85:
            made.append(rng.choice(made)[: rng.randrange(0, 30)])  # short
        elif kind < 0.9 and p.mode == "tunnel":
            seq = sa.seq + 1 + rng.randrange(0, 3)
            inner = packet(stray, dst) if rng.random() < 0.5 else packet(src, dst)
            bad_pad = rng.random() < 0.5
            tail = b"\x01\x02\x04\x04" if bad_pad else trailer(len(inner), 4)
            made.append(seal(p, seq, inner + tail))
        else:
            sa.seq += rng.randrange(0, 2000)  # a jump, possibly past the window
            made.append(sa.encapsulate(packet(src, dst)))
    rng.shuffle(made[-30:])  # some reordering at the end
    one_by_one = []
    for esp in made:
        with contextlib.suppress(EspDrop):
            one_by_one.append(twins[0].decapsulate_untrusted(esp))
    batched: list[bytes] = []
    at = 0
    while at < len(made):
        step = rng.randrange(1, 40)
        batched += twins[1].decapsulate_batch(made[at:at + step])
        at += step
    assert batched == one_by_one
    first, second = twins
    assert first.counters.as_dict() == second.counters.as_dict()
    assert first.totals().as_dict() == second.totals().as_dict()
    assert [e for e in iter(first.next_event, None)] == [e for e in iter(second.next_event, None)]
    for x, y in zip(first, second, strict=True):
        assert (x.inbound.replay.top, x.inbound.replay.bitmap) == \
            (y.inbound.replay.top, y.inbound.replay.bitmap)


@pytest.mark.parametrize("changes", [
    {}, {"esn": True}, {"mode": "transport"}, {"initial_seq": (1 << 32) - 30},
    {"hard_packets": 50, "soft_packets": 20}, {"hard_bytes": 30_000, "soft_bytes": 10_000},
    {"encr": "aes128", "integ": "sha256"},
])
@pytest.mark.parametrize("flow", [True, False])
def test_encapsulate_flow_is_encapsulate_one_by_one(changes: dict[str, Any], flow: bool) -> None:
    """Twin outbound SAs (GCM's IV is the sequence number, so the output is fixed for
    AEAD): the same ESP, sequence numbers, counters and events; runs of equal length;
    and `encapsulate_flow` stops where a hard lifetime removed the SA."""
    p = params(**changes)
    twins = [Sad() for _ in range(2)]
    for sad in twins:
        sad.install(p)
    src, dst = ("10.99.1.5", "10.99.2.7") if p.mode == "tunnel" else (p.local[0], p.remote[0])
    other = "10.99.1.6" if p.mode == "tunnel" else src  # another flow of the same SA
    rng = random.Random(5)
    packets = [packet(other if n % 11 == 10 else src, dst, 17,
                      bytes([n]) * (1300 if n % 7 else rng.randrange(0, 1400)))
               for n in range(80)]
    packets[7] = b""
    packets[9] = b"\x10" + packets[9][1:]  # not IP
    packets[41] = b"\x10" + packets[41][1:]
    if p.mode == "tunnel":  # IPv6 between IPv4 packets of the same length (next header 41)
        data = bytes(600)
        packets[49] = packet(src, dst, 17, data)
        packets[50] = packet("fd99:1::5", "fd99:2::7", 17, data[20:])
        packets[51] = packet(src, dst, 17, data)
    first, second = (sad.outbound_for(packets[0]) for sad in twins)
    assert first is not None and second is not None
    one_by_one: list[bytes] = []
    stopped = len(packets)
    for n, inner in enumerate(packets):
        if first.child.removed:
            stopped = n
            break
        with contextlib.suppress(EspDrop):
            one_by_one.append(first.encapsulate(inner))
    flowed: list[bytes] = []
    at = 0
    while at < len(packets):
        runs, next_at = second.encapsulate_flow(packets, at, flow)
        for run in runs:
            assert run and len({len(esp) for esp in run}) == 1
        flowed += [esp for run in runs for esp in run]
        if next_at == at:  # only when the SA went away
            assert second.child.removed
            break
        assert at < next_at <= (len(packets) if flow else at + 1)
        at = next_at
    assert at == stopped
    if p.encr.aead:
        assert flowed == one_by_one
    else:  # CBC: random IVs; the rest must agree
        assert [len(e) for e in flowed] == [len(e) for e in one_by_one]
        assert [e[:8] for e in flowed] == [e[:8] for e in one_by_one]
    assert first.seq == second.seq
    assert twins[0].totals().as_dict() == twins[1].totals().as_dict()
    assert [e for e in iter(twins[0].next_event, None)] == \
        [e for e in iter(twins[1].next_event, None)]


def test_a_flow_ends_where_the_addresses_or_the_ip_version_change() -> None:
    """What `encapsulate_flow` takes as one flow: the same version and addresses. An
    IPv6 packet whose bytes 12-20 equal the IPv4 flow's addresses is not part of it
    (it must go through its own SA lookup)."""
    sad = Sad()
    sad.install(params())
    flow = [packet("10.99.1.5", "10.99.2.7", 6, bytes(1000)) for _ in range(5)]
    lookalike = packet("fd99:1:a63:105:a63:207::", "fd99:2::7", 6, bytes(1000))
    assert lookalike[12:20] == flow[0][12:20]
    other = packet("10.99.1.6", "10.99.2.7", 6, bytes(1000))
    out = sad.outbound_for(flow[0])
    assert out is not None
    for tail, stop in ([lookalike], 5), ([other], 5), ([b""], 5), (flow[:2], 12):
        packets = [*flow, *tail, *flow]
        runs, end = out.encapsulate_flow(packets, 0, True)
        assert end == stop
        assert sum(map(len, runs)) == stop
        runs, end = out.encapsulate_flow(packets, 2, False)
        assert end == 3 and [len(run) for run in runs] == [1]
