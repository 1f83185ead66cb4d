"""Hypothesis: functions that take network (or TUN) bytes raise nothing but EspDrop.

Random ciphertext never authenticates, so the interesting inputs are random *plaintexts*
sealed with the right key: they reach the padding, next-header, inner-packet and
policy code that only authenticated data sees.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.esp import (
    EspDrop,
    Sad,
    UdpKind,
    classify_udp_untrusted,
    esp_from_ipv4_untrusted,
    ike_from_udp_untrusted,
)
from cluster.esp.ip import flow_of
from cluster.esp.params import ChildSaParams
from tests.esp.pairs import ALGORITHMS, packet, pair, params, seal

SETUPS: list[tuple[ChildSaParams, Sad, Sad]] = []
for _encr, _integ in [*ALGORITHMS[::2], ("aes256gcm16", None)]:
    for _mode in ("tunnel", "transport"):
        for _esn in (False, True):
            _p = params(_encr, _integ, mode=_mode, esn=_esn, encap=_mode == "transport")
            SETUPS.append((_p, *pair(_p)))

setup_index = st.integers(0, len(SETUPS) - 1)
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(index=setup_index, body=st.binary(max_size=200))
def test_random_bytes_behind_a_known_spi(index: int, body: bytes) -> None:
    p, _, b = SETUPS[index]
    with contextlib.suppress(EspDrop):
        b.decapsulate_untrusted(p.spi_out + body)


@FUZZ
@given(data=st.binary(max_size=100))
def test_random_bytes_at_the_sad(data: bytes) -> None:
    _, _, b = SETUPS[0]
    with contextlib.suppress(EspDrop):
        b.decapsulate_untrusted(data)


@FUZZ
@given(index=setup_index, plaintext=st.binary(max_size=120),
       seq=st.integers(1, (1 << 32) - 1))
def test_authenticated_random_plaintexts(index: int, plaintext: bytes, seq: int) -> None:
    p, _, b = SETUPS[index]
    if not p.encr.aead:  # CBC needs whole blocks, at least one
        plaintext = (plaintext + bytes(-len(plaintext) % 16)) or bytes(16)
    try:
        inner = b.decapsulate_untrusted(seal(p, seq, plaintext))
    except EspDrop as drop:
        assert drop.reason
    else:
        assert flow_of(inner) is not None  # whatever gets through is a parsable packet


@FUZZ
@given(index=setup_index, head=st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x00, 0xFF]),
       rest=st.binary(max_size=80), next_header=st.sampled_from([4, 41, 59, 6, 17, 0, 255]))
def test_authenticated_ip_like_plaintexts(index: int, head: int, rest: bytes,
                                          next_header: int) -> None:
    """Plaintexts with valid padding and plausible inner headers: deeper than random."""
    p, _, b = SETUPS[index]
    body = bytes([head]) + rest
    block = 4 if p.encr.aead else 16
    pad = -(len(body) + 2) % block
    plaintext = body + bytes(range(1, pad + 1)) + bytes([pad, next_header])
    try:
        inner = b.decapsulate_untrusted(seal(p, 1, plaintext))
    except EspDrop:
        pass
    else:
        assert flow_of(inner) is not None


@FUZZ
@given(index=setup_index, cut=st.integers(0, 200), flip=st.integers(0, 10_000))
def test_mutated_valid_packets(index: int, cut: int, flip: int) -> None:
    p, a, b = SETUPS[index]
    sa = a.get(p.spi_in)
    assert sa is not None
    host = ("10.99.1.5", "10.99.2.7") if p.mode == "tunnel" else (p.local[0], p.remote[0])
    esp = bytearray(sa.outbound.encapsulate(packet(*host, 17, b"z" * 50)))
    esp[flip % len(esp)] ^= 1 << (flip % 8)
    with contextlib.suppress(EspDrop):
        b.decapsulate_untrusted(bytes(esp[: max(cut, 4)]))


@FUZZ
@given(index=setup_index, data=st.binary(max_size=120))
def test_outbound_never_raises_for_lookups_and_only_espdrop_to_encapsulate(
        index: int, data: bytes) -> None:
    p, a, _ = SETUPS[index]
    a.outbound_for(data)
    sa = a.get(p.spi_in)
    assert sa is not None
    with contextlib.suppress(EspDrop):
        sa.outbound.encapsulate(data)


@FUZZ
@given(data=st.binary(max_size=120))
def test_flow_of_and_wire_helpers_never_raise_otherwise(data: bytes) -> None:
    flow_of(data)
    kind = classify_udp_untrusted(data)
    assert isinstance(kind, UdpKind)
    for function in (esp_from_ipv4_untrusted, ike_from_udp_untrusted):
        with contextlib.suppress(EspDrop):
            function(data)


@pytest.mark.parametrize("version", [0x45, 0x60])
def test_flow_of_on_every_truncation(version: int) -> None:
    full = packet("10.99.1.5", "10.99.2.7", 6, b"x") if version == 0x45 else \
        packet("fd00:a::5", "fd00:b::7", 6, b"x")
    for cut in range(len(full) + 1):
        flow_of(full[:cut])
