"""TFC padding (RFC 4303 2.7; swanctl's tfc_padding): in tunnel mode each packet is
padded with zeros to a minimum size before encryption, and the receiver, which cuts
at the inner packet's own length, gets the packet back unchanged."""

from __future__ import annotations

import pytest

from tests.esp.pairs import GW_A, GW_B, packet, pair, params

SIZES = (28 + 1, 200, 999, 1000, 1400)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize(("encr", "integ"), [("aes256gcm16", None), ("aes128", "sha256")])
def test_short_packets_leave_padded_and_arrive_unchanged(
        v6: bool, encr: str, integ: str | None) -> None:
    ours, theirs = pair(params(encr, integ, v6=v6, tfc_padding=1000))
    src, dst = ("fd00:a::5", "fd00:b::7") if v6 else ("10.99.1.5", "10.99.2.7")
    header = 48 if v6 else 28  # the packet helper's IP and UDP headers
    inner = [packet(src, dst, payload=b"t" * max(1, size - header)) for size in SIZES]
    sa = ours.outbound_for(inner[0])
    assert sa is not None
    sent = [sa.encapsulate(p) for p in inner]
    # every packet up to 1000 bytes makes an ESP packet of one size; a larger one its own
    small = {len(esp) for p, esp in zip(inner, sent, strict=True) if len(p) <= 1000}
    assert len(small) == 1
    assert len(sent[-1]) > max(small)
    assert [theirs.decapsulate_untrusted(esp) for esp in sent] == inner
    assert ours.totals().bytes_out == sum(map(len, inner))  # padding is not traffic
    # the batch path (AEAD's runs) pads the same way
    runs, end = sa.encapsulate_flow(inner, 0, True)
    batch = [esp for run in runs for esp in run]
    assert end == len(inner) and [len(esp) for esp in batch][:-1] == [max(small)] * 4
    assert [theirs.decapsulate_untrusted(esp) for esp in batch] == inner


def test_transport_mode_and_a_zero_setting_add_nothing() -> None:
    for mode, tfc in (("transport", 1000), ("tunnel", 0)):
        plain_pair = pair(params(mode=mode))
        padded_pair = pair(params(mode=mode, tfc_padding=tfc))
        src, dst = (GW_A, GW_B) if mode == "transport" else ("10.99.1.5", "10.99.2.7")
        p = packet(src, dst, payload=b"x" * 60)
        lengths = []
        for ours, _ in (plain_pair, padded_pair):
            sa = ours.outbound_for(p)
            assert sa is not None
            lengths.append(len(sa.encapsulate(p)))
        assert lengths[0] == lengths[1], (mode, lengths)
