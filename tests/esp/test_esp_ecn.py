"""ECN across the tunnel (RFC 6040): the outer header takes the packet's ECN field, and
a decapsulated packet the field Figure 4 of section 4.2 gives it."""

from __future__ import annotations

import pytest

from cluster.esp import EspDrop
from cluster.esp.ip import CE, ECT_0, ECT_1, NOT_ECT, ecn_decapsulate, internet_checksum, tos_of
from tests.esp.pairs import GW6_A, GW6_B, GW_A, GW_B, packet, pair, params, with_tos

CODEPOINTS = (NOT_ECT, ECT_1, ECT_0, CE)
# RFC 6040 Figure 4: (inner, outer) -> what leaves the tunnel; None: drop
FIGURE_4 = {
    (NOT_ECT, NOT_ECT): NOT_ECT, (NOT_ECT, ECT_0): NOT_ECT, (NOT_ECT, ECT_1): NOT_ECT,
    (NOT_ECT, CE): None,
    (ECT_0, NOT_ECT): ECT_0, (ECT_0, ECT_0): ECT_0, (ECT_0, ECT_1): ECT_1, (ECT_0, CE): CE,
    (ECT_1, NOT_ECT): ECT_1, (ECT_1, ECT_0): ECT_1, (ECT_1, ECT_1): ECT_1, (ECT_1, CE): CE,
    (CE, NOT_ECT): CE, (CE, ECT_0): CE, (CE, ECT_1): CE, (CE, CE): CE,
}
EF = 0xB8


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize(("inner", "outer"), list(FIGURE_4))
def test_decapsulation_follows_rfc_6040_figure_4(v6: bool, inner: int, outer: int) -> None:
    src, dst = ("fd00:b::7", "fd00:a::5") if v6 else ("10.99.2.7", "10.99.1.5")
    original = with_tos(packet(src, dst, payload=b"e" * 64), EF | inner)
    result = ecn_decapsulate(original, EF | outer)  # the outer DSCP plays no part
    expected = FIGURE_4[inner, outer]
    if expected is None:
        assert result is None
        return
    assert result is not None
    assert tos_of(result) == EF | expected
    assert result == with_tos(original, EF | expected)  # nothing else changed
    if not v6:
        assert internet_checksum(result[:20]) == 0  # the header checksum still holds


def test_decapsulation_leaves_what_is_not_an_ip_packet_alone() -> None:
    for data in (b"", b"\x45", bytes(19), b"\x00" * 40):
        assert ecn_decapsulate(data, CE) == data


@pytest.mark.parametrize("copy_ecn", [True, False])
@pytest.mark.parametrize("mode", ["tunnel", "transport"])
def test_the_outer_header_takes_the_ecn_field_unless_copy_ecn_is_off_in_tunnel_mode(
        mode: str, copy_ecn: bool) -> None:
    """In transport mode the header is the packet's own: its ECN field always goes."""
    ours, _ = pair(params(mode=mode, copy_ecn=copy_ecn))
    src, dst = (GW_A, GW_B) if mode == "transport" else ("10.99.1.5", "10.99.2.7")
    sa = ours.outbound_for(packet(src, dst))
    assert sa is not None
    copies = copy_ecn or mode == "transport"
    assert sa.tos_mask == (0xFF if copies else 0xFC)
    ours_plain, _ = pair(params(mode=mode, copy_ecn=copy_ecn, copy_dscp=False))
    plain = ours_plain.outbound_for(packet(src, dst))
    assert plain is not None and plain.tos_mask == (0x03 if copies else 0)


def test_the_sad_marks_what_arrived_with_ce_and_drops_not_ect_under_ce() -> None:
    ours, theirs = pair(params())
    inner = [with_tos(packet("10.99.2.7", "10.99.1.5", payload=bytes([n]) * 80), tos)
             for n, tos in enumerate([ECT_0, ECT_0, NOT_ECT, ECT_0, ECT_1, NOT_ECT, ECT_0])]
    esp = []
    for p in inner:
        sa = theirs.outbound_for(p)
        assert sa is not None
        esp.append(sa.encapsulate(p))
    # outer CE on 1 and 2, ECT(1) on 3 and 4: 2 (Not-ECT inside) is dropped
    out = ours.decapsulate_batch(esp, {1: CE, 2: CE, 3: ECT_1, 4: ECT_1})
    assert out == [inner[0], with_tos(inner[1], CE), with_tos(inner[3], ECT_1), inner[4],
                   inner[5], inner[6]]
    totals = ours.totals()
    assert (totals.ecn_drops, totals.packets_in) == (1, 7)
    # the marked one alone, by the single-packet path, likewise
    again = theirs.outbound_for(inner[0])
    assert again is not None
    assert ours.decapsulate_untrusted(again.encapsulate(inner[0]), CE) == \
        with_tos(inner[0], CE)
    with pytest.raises(EspDrop):
        ours.decapsulate_untrusted(again.encapsulate(inner[2]), CE)
    assert ours.totals().ecn_drops == 2


def test_outer_ecn_is_ignored_with_copy_ecn_false_and_a_dscp_in_tunnel_mode() -> None:
    ours, theirs = pair(params(copy_ecn=False))
    plain = packet("10.99.2.7", "10.99.1.5", payload=b"t" * 80)
    sa = theirs.outbound_for(plain)
    assert sa is not None
    assert ours.decapsulate_batch([sa.encapsulate(plain)], {0: CE}) == [plain]
    assert ours.totals().ecn_drops == 0
    ours, theirs = pair(params())
    sa = theirs.outbound_for(plain)
    assert sa is not None
    esp = [sa.encapsulate(plain) for _ in range(3)]
    assert ours.decapsulate_batch(esp, {0: EF, 1: EF | ECT_0}) == [plain] * 3
    assert ours.decapsulate_untrusted(sa.encapsulate(plain), EF) == plain


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("encap", [False, True])
def test_a_transport_mode_packet_keeps_the_tos_it_arrived_with(v6: bool, encap: bool) -> None:
    """The header we rebuild is the packet's own (RFC 4303 3.4.4.1): its DSCP and ECN
    field are what the one it came in carried, CE and Not-ECT alike, nothing dropped."""
    a, b = (GW6_A, GW6_B) if v6 else (GW_A, GW_B)
    ours, theirs = pair(params(mode="transport", v6=v6, encap=encap))
    sent = [packet(b, a, protocol=6, payload=b"t" * 80) for _ in range(4)]
    sa = theirs.outbound_for(sent[0])
    assert sa is not None
    (plain,) = ours.decapsulate_batch([sa.encapsulate(sent[0])])
    assert tos_of(plain) == 0
    esp = [sa.encapsulate(p) for p in sent]
    marks = {1: EF | CE, 2: 0x20, 3: CE}
    out = ours.decapsulate_batch(esp, marks)
    assert out[0] == plain and [tos_of(p) for p in out] == [0, EF | CE, 0x20, CE]
    assert [with_tos(p, 0) for p in out] == [plain] * 4  # nothing else changed
    if not v6:
        assert all(internet_checksum(p[:20]) == 0 for p in out)
    assert ours.totals().ecn_drops == 0
    again = sa.encapsulate(sent[0])
    assert tos_of(ours.decapsulate_untrusted(again, EF)) == EF
