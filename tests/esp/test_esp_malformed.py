"""Malformed and unwelcome ESP: each is dropped with EspDrop and counted exactly once."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.esp import EspDrop, Sad, Selector
from cluster.esp.params import ChildSaParams
from tests.esp.pairs import ALGORITHMS, GW_A, GW_B, packet, pair, params, seal, trailer

INNER = packet("10.99.1.5", "10.99.2.7", 17, b"hello")


def _drop(b: Sad, esp: bytes) -> str:
    before = b.totals().as_dict() | b.counters.as_dict()
    with pytest.raises(EspDrop) as drop:
        b.decapsulate_untrusted(esp)
    after = b.totals().as_dict() | b.counters.as_dict()
    changed = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert changed == {drop.value.reason: 1}  # exactly the named counter, once
    return drop.value.reason


def _receiver(p: ChildSaParams) -> Sad:
    return pair(p)[1]


@pytest.mark.parametrize(("encr", "integ"), ALGORITHMS, ids=lambda x: str(x))
def test_short_packets(encr: str, integ: str | None) -> None:
    p = params(encr, integ)
    a, b = pair(p)
    sa = a.outbound_for(INNER)
    assert sa is not None
    esp = sa.encapsulate(INNER)
    assert _drop(b, b"") == "malformed_in"
    assert _drop(b, esp[:7]) == "malformed_in"
    for cut in (8, 12, 16, 20, 30):
        assert _drop(b, esp[:cut]) == "malformed_drops"


@pytest.mark.parametrize(("encr", "integ"), ALGORITHMS, ids=lambda x: str(x))
@pytest.mark.parametrize("where", ["iv", "ciphertext", "icv", "seq_high_bits"])
def test_bad_icv(encr: str, integ: str | None, where: str) -> None:
    p = params(encr, integ, esn=True)
    a, b = pair(p)
    sa = a.outbound_for(INNER)
    assert sa is not None
    esp = bytearray(sa.encapsulate(INNER))
    if where == "iv":
        esp[9] ^= 0x01
    elif where == "ciphertext":
        esp[30] ^= 0x40
    elif where == "icv":
        esp[-1] ^= 0x80
    else:
        # the sender's high half is 0; a receiver whose window sits in subspace 1 infers
        # high half 1 for the unchanged packet, and the ICV covers it (RFC 4303 3.3.2.1)
        receiver = b.get(p.spi_out)
        assert receiver is not None
        receiver.inbound.replay.top = (1 << 32) + 1000
    assert _drop(b, bytes(esp)) == "integrity_failures"


def test_truncated_icv_and_misaligned_cbc() -> None:
    p = params("aes128", "sha256")
    a, b = pair(p)
    sa = a.outbound_for(INNER)
    assert sa is not None
    esp = sa.encapsulate(INNER)
    assert _drop(b, esp[:-1]) == "malformed_drops"  # ciphertext no longer whole blocks
    assert _drop(b, esp + b"\x00") == "malformed_drops"
    assert _drop(b, esp[:-16]) == "integrity_failures"  # aligned again, wrong ICV


def test_unknown_spi() -> None:
    p = params()
    a, b = pair(p)
    sa = a.outbound_for(INNER)
    assert sa is not None
    esp = sa.encapsulate(INNER)
    assert _drop(b, b"\xde\xad\xbe\xef" + esp[4:]) == "no_sa_in"
    assert _drop(Sad(), esp) == "no_sa_in"


@pytest.mark.parametrize(("encr", "integ"), ALGORITHMS, ids=lambda x: str(x))
def test_bad_padding_content(encr: str, integ: str | None) -> None:
    p = params(encr, integ)
    b = _receiver(p)
    block = max(4, p.encr.block_size)
    good = trailer(len(INNER), 4, block)
    assert good[-2] > 0  # this size needs padding
    bad = bytes([good[0] ^ 0xFF]) + good[1:]
    assert _drop(b, seal(p, 1, INNER + bad)) == "pad_errors"
    assert b.decapsulate_untrusted(seal(p, 2, INNER + good)) == INNER


@pytest.mark.parametrize(("encr", "integ"), [("aes256gcm16", None), ("aes128", "sha256")])
def test_pad_length_too_large(encr: str, integ: str | None) -> None:
    p = params(encr, integ)
    b = _receiver(p)
    block = 4 if p.encr.aead else 16
    size = len(INNER) + 2
    plain = INNER + bytes(-size % block) + bytes([255, 4])  # more padding than data
    assert _drop(b, seal(p, 1, plain)) == "pad_errors"
    tiny = bytes(block - 2) + bytes([200, 4])  # pad length beyond the whole plaintext
    assert _drop(b, seal(p, 2, tiny)) == "pad_errors"


def test_dummy_packets_are_dropped_in_both_modes() -> None:
    p = params()
    b = _receiver(p)
    assert _drop(b, seal(p, 1, b"\x00" * 30 + trailer(30, 59))) == "dummy_drops"
    pt = params(mode="transport")
    bt = _receiver(pt)
    assert _drop(bt, seal(pt, 1, b"\x00" * 30 + trailer(30, 59))) == "dummy_drops"


def test_tunnel_mode_refuses_non_ip_next_headers() -> None:
    p = params()
    b = _receiver(p)
    assert _drop(b, seal(p, 1, INNER + trailer(len(INNER), 17))) == "policy_drops"


@pytest.mark.parametrize(("next_header", "inner"), [
    (4, b"\x60" + bytes(39)),  # says IPv4, is IPv6
    (41, packet("10.99.1.5", "10.99.2.7", 17, b"x" * 30)),  # says IPv6, is IPv4
    (4, packet("10.99.1.5", "10.99.2.7", 17, b"x")[:12]),  # shorter than a header
    (4, b"\x45\x00\xff\xff" + packet("10.99.1.5", "10.99.2.7", 17, b"x")[4:]),  # length
    (4, b"\x45\x00\x00\x10" + packet("10.99.1.5", "10.99.2.7", 17, b"x")[4:]),  # < 20
    (4, b"\x4f\x00\x00\x1d" + packet("10.99.1.5", "10.99.2.7", 17, b"x")[4:]),  # IHL > length
    (4, b"\x44\x00\x00\x1d" + packet("10.99.1.5", "10.99.2.7", 17, b"x")[4:]),  # IHL < 5
])
def test_tunnel_inner_packet_must_be_sound(next_header: int, inner: bytes) -> None:
    p = params()
    b = _receiver(p)
    assert _drop(b, seal(p, 1, inner + trailer(len(inner), next_header))) == "malformed_drops"


@pytest.mark.parametrize(("src", "dst"), [
    ("10.99.3.5", "10.99.2.7"),  # source outside the peer's selectors (spoofing)
    ("10.99.1.5", "10.99.9.9"),  # destination outside ours
])
def test_inbound_policy(src: str, dst: str) -> None:
    p = params()
    b = _receiver(p)
    # B receives: B's remote selectors are A's local network (10.99.1.0/24)
    inner = packet(src, dst, 17, b"x")
    assert _drop(b, seal(p, 1, inner + trailer(len(inner), 4))) == "policy_drops"


def test_inbound_policy_with_ports() -> None:
    p = params(local_ts=(Selector.from_network("10.99.1.0/24", 6, 1024, 65535),),
               remote_ts=(Selector.from_network("10.99.2.0/24", 6, 443, 443),))
    b = _receiver(p)
    ok = packet("10.99.1.5", "10.99.2.7", 6, b"x", 5000, 443)
    assert b.decapsulate_untrusted(seal(p, 1, ok + trailer(len(ok), 4))) == ok
    wrong_port = packet("10.99.1.5", "10.99.2.7", 6, b"x", 5000, 80)
    assert _drop(b, seal(p, 2, wrong_port + trailer(len(wrong_port), 4))) == "policy_drops"
    wrong_proto = packet("10.99.1.5", "10.99.2.7", 17, b"x", 5000, 443)
    assert _drop(b, seal(p, 3, wrong_proto + trailer(len(wrong_proto), 4))) == "policy_drops"


def test_transport_mode_with_port_selectors() -> None:
    p = params(mode="transport",
               local_ts=(Selector.from_network(GW_A, 17, 500, 500),),
               remote_ts=(Selector.from_network(GW_B, 17, 500, 500),))
    b = _receiver(p)
    isakmp = packet(GW_A, GW_B, 17, b"x", 500, 500)
    plain = isakmp[20:] + trailer(len(isakmp) - 20, 17)
    assert b.decapsulate_untrusted(seal(p, 1, plain)) == isakmp
    other = packet(GW_A, GW_B, 17, b"x", 500, 4500)
    plain = other[20:] + trailer(len(other) - 20, 17)
    assert _drop(b, seal(p, 2, plain)) == "policy_drops"


def test_removed_sa_refuses_held_references() -> None:
    p = params()
    a, b = pair(p)
    sa_out = a.outbound_for(INNER)
    receiver = b.get(p.spi_out)
    assert sa_out is not None and receiver is not None
    esp = sa_out.encapsulate(INNER)
    b.remove(p.spi_out)
    with pytest.raises(EspDrop) as drop:
        receiver.inbound.decapsulate_untrusted(esp)
    assert drop.value.reason == "expired_drops"
    a.remove(p.spi_in)
    with pytest.raises(EspDrop) as drop:
        sa_out.encapsulate(INNER)
    assert drop.value.reason == "expired_drops"
    assert dataclasses.asdict(receiver.counters)["expired_drops"] == 1
