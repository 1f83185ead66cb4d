"""Proposal strings (strongSwan keywords) and the responder's choice (RFC 7296 2.7, 3.3)."""

from __future__ import annotations

import pytest

from cluster.errors import InvalidKePayload, NoProposalChosen
from cluster.ike.constants import ProtocolId, TransformType
from cluster.ike.proposals import (
    ChosenAlgorithms,
    ConfiguredProposal,
    Proposal,
    Transform,
    chosen_from_response,
    chosen_to_proposal,
    parse_proposal,
    select_proposal,
)
from cluster.key_exchange import DhGroup
from cluster.transforms import Encr, Esn, Integ, Prf

IKE, ESP = ProtocolId.IKE, ProtocolId.ESP

# --- parse_proposal ---------------------------------------------------------------------------

VALID: list[tuple[str, ProtocolId, tuple[str, ...], tuple[str, ...], tuple[str, ...],
                  tuple[int, ...], tuple[Esn, ...]]] = [
    # text, protocol, encr, integ, prf, dh, esn
    ("aes256gcm16-prfsha256-x25519", IKE, ("aes256gcm16",), (), ("prfsha256",), (31,), ()),
    ("aes128-sha256-modp2048", IKE, ("aes128",), ("sha256",), ("prfsha256",), (14,), ()),
    ("chacha20poly1305-prfsha256-x25519", IKE, ("chacha20poly1305",), (), ("prfsha256",),
     (31,), ()),
    ("aes256-sha384-ecp384", IKE, ("aes256",), ("sha384",), ("prfsha384",), (20,), ()),
    ("aes256-sha512-x448", IKE, ("aes256",), ("sha512",), ("prfsha512",), (32,), ()),
    ("aes128gcm16-prfsha256-ecp256", IKE, ("aes128gcm16",), (), ("prfsha256",), (19,), ()),
    ("aes256gcm16-prfsha256-ecp256-x25519", IKE, ("aes256gcm16",), (), ("prfsha256",),
     (19, 31), ()),
    ("aes128gcm16-aes256gcm16-prfsha384-prfsha256-x25519-ecp521", IKE,
     ("aes128gcm16", "aes256gcm16"), (), ("prfsha384", "prfsha256"), (31, 21), ()),
    ("aes256-sha256-prfsha512-modp3072-modp4096", IKE, ("aes256",), ("sha256",),
     ("prfsha512",), (15, 16), ()),
    ("AES256GCM16-PRFSHA256-X25519", IKE, ("aes256gcm16",), (), ("prfsha256",), (31,), ()),
    ("aes128gcm128-prfsha256-curve25519", IKE, ("aes128gcm16",), (), ("prfsha256",), (31,), ()),
    ("aes-sha2_256-modp2048", IKE, ("aes128",), ("sha256",), ("prfsha256",), (14,), ()),
    ("aes256gcm16-prfsha256-x25519-x25519", IKE, ("aes256gcm16",), (), ("prfsha256",),
     (31,), ()),
    ("aes256gcm16", ESP, ("aes256gcm16",), (), (), (), (Esn.NO_ESN,)),
    ("aes128-sha256", ESP, ("aes128",), ("sha256",), (), (), (Esn.NO_ESN,)),
    ("aes128-sha256-esn", ESP, ("aes128",), ("sha256",), (), (), (Esn.ESN,)),
    ("chacha20poly1305-esn-noesn", ESP, ("chacha20poly1305",), (), (), (),
     (Esn.ESN, Esn.NO_ESN)),
    ("aes256gcm16-x25519", ESP, ("aes256gcm16",), (), (), (31,), (Esn.NO_ESN,)),
]


@pytest.mark.parametrize(("text", "protocol", "encr", "integ", "prf", "dh", "esn"), VALID,
                         ids=[v[0] + "/" + v[1].name for v in VALID])
def test_parse_valid_proposals(text: str, protocol: ProtocolId, encr: tuple[str, ...],
                               integ: tuple[str, ...], prf: tuple[str, ...],
                               dh: tuple[int, ...], esn: tuple[Esn, ...]) -> None:
    conf = parse_proposal(text, protocol, legacy_allowed=False)
    assert conf.text == text and conf.protocol == protocol
    assert tuple(e.name for e in conf.encr) == encr
    assert tuple(i.name for i in conf.integ) == integ
    assert tuple(p.name for p in conf.prf) == prf
    assert conf.dh == dh
    assert conf.esn == esn


INVALID: list[tuple[str, ProtocolId, str]] = [
    ("", IKE, "empty proposal"),
    ("aes256gcm16-prfsha256", IKE, "needs a key exchange"),
    ("aes256gcm16-x25519", IKE, "AEAD IKE proposal needs a PRF"),
    ("aes128-x25519", IKE, "needs an integrity algorithm"),
    ("aes128-prfsha256-x25519", IKE, "needs an integrity algorithm"),
    ("aes256gcm16-sha256-prfsha256-x25519", IKE, "takes no integrity algorithm"),
    ("aes128-aes256gcm16-sha256-x25519", IKE, "cannot share a proposal"),
    ("prfsha256-x25519", IKE, "no encryption algorithm"),
    ("sha256-prfsha256-x25519", IKE, "no encryption algorithm"),
    ("aes256-foo-x25519", IKE, "unknown algorithm 'foo'"),
    ("aes256gcm16-prfsha256-modp1024", IKE, "'modp1024' is a legacy algorithm"),
    ("aes256gcm16-prfsha256-modp768", IKE, "unknown algorithm 'modp768'"),
    ("aes256gcm16--prfsha256-x25519", IKE, "unknown algorithm ''"),
    ("aes256gcm16-prfsha256-x25519-esn", IKE, "esn applies to ESP proposals only"),
    ("aes256gcm16-prfsha256", ESP, "a PRF applies to IKE proposals only"),
    ("aes128", ESP, "needs an integrity algorithm"),
    ("3des-sha256-modp2048", IKE, "'3des' is a legacy algorithm"),
    ("aes128-sha1-modp2048", IKE, "'sha1' is a legacy algorithm"),
    ("aes128-md5-modp2048", IKE, "'md5' is a legacy algorithm"),
    ("aes128-sha256-prfsha1-modp2048", IKE, "'prfsha1' is a legacy algorithm"),
    ("aes128-sha1", ESP, "'sha1' is a legacy algorithm"),
]


@pytest.mark.parametrize(("text", "protocol", "reason"), INVALID,
                         ids=[f"{v[0] or '<empty>'}/{v[1].name}" for v in INVALID])
def test_parse_invalid_proposals(text: str, protocol: ProtocolId, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_proposal(text, protocol, legacy_allowed=False)
    assert reason in str(info.value)


@pytest.mark.parametrize("text", ["3des-sha256-modp2048", "aes128-sha1-modp2048",
                                  "aes128-md5-modp2048", "aes128-sha256-prfsha1-modp2048"])
def test_legacy_algorithms_parse_when_allowed(text: str) -> None:
    conf = parse_proposal(text, IKE, legacy_allowed=True)
    legacy = [a.legacy for a in conf.encr] + [a.legacy for a in conf.integ]
    assert any(legacy + [a.legacy for a in conf.prf])


def test_sha1_integrity_pairs_with_prfsha1() -> None:
    conf = parse_proposal("aes128-sha1-modp2048", IKE, legacy_allowed=True)
    assert [p.name for p in conf.prf] == ["prfsha1"]


def test_to_proposal_lists_every_alternative_in_order() -> None:
    conf = parse_proposal("aes256gcm16-chacha20poly1305-prfsha384-ecp256-x25519", IKE, False)
    prop = conf.to_proposal(3, b"")
    assert prop.number == 3 and prop.protocol == IKE and prop.spi == b""
    assert prop.transforms == (
        Transform(TransformType.ENCR, Encr.AES_GCM_16, 256),
        Transform(TransformType.ENCR, Encr.CHACHA20_POLY1305, None),  # no Key Length (RFC 7634)
        Transform(TransformType.PRF, Prf.HMAC_SHA2_384),
        Transform(TransformType.DH, DhGroup.ECP256),
        Transform(TransformType.DH, DhGroup.CURVE25519),
    )
    esp = parse_proposal("aes128-sha256-esn", ESP, False).to_proposal(1, b"\x00\x00\x10\x01")
    assert esp.transforms == (
        Transform(TransformType.ENCR, Encr.AES_CBC, 128),
        Transform(TransformType.INTEG, Integ.HMAC_SHA2_256_128),
        Transform(TransformType.ESN, Esn.ESN),
    )


# --- select_proposal ---------------------------------------------------------------------------

def conf(text: str, protocol: ProtocolId = IKE, legacy: bool = False) -> ConfiguredProposal:
    return parse_proposal(text, protocol, legacy)


def offer(text: str, number: int = 1, protocol: ProtocolId = IKE,
          extra: tuple[Transform, ...] = ()) -> Proposal:
    spi = b"" if protocol == IKE else b"\x00\x00\x20\x00"
    prop = parse_proposal(text, protocol, True).to_proposal(number, spi)
    return Proposal(prop.number, prop.protocol, prop.spi, prop.transforms + extra)


def test_our_configured_order_wins() -> None:
    offered = [offer("aes128-sha256-modp2048", 1), offer("aes256gcm16-prfsha256-x25519", 2)]
    configured = [conf("aes256gcm16-prfsha256-x25519"), conf("aes128-sha256-modp2048")]
    proposal, chosen = select_proposal(offered, configured, ke_group=31)
    assert proposal.number == 2
    assert chosen.encr.name == "aes256gcm16" and chosen.dh == DhGroup.CURVE25519


def test_our_order_wins_within_one_proposal() -> None:
    offered = [offer("aes128gcm16-aes256gcm16-prfsha256-prfsha384-x25519")]
    configured = [conf("aes256gcm16-aes128gcm16-prfsha384-prfsha256-x25519")]
    _, chosen = select_proposal(offered, configured, ke_group=31)
    assert chosen.encr.name == "aes256gcm16" and chosen.prf is not None
    assert chosen.prf.name == "prfsha384"


@pytest.mark.parametrize(("ke_group", "expected"), [(31, DhGroup.CURVE25519),
                                                    (19, DhGroup.ECP256)])
def test_the_group_the_initiator_sent_is_preferred(ke_group: int, expected: DhGroup) -> None:
    offered = [offer("aes256gcm16-prfsha256-x25519-ecp256")]
    configured = [conf("aes256gcm16-prfsha256-ecp256-x25519")]
    _, chosen = select_proposal(offered, configured, ke_group=ke_group)
    assert chosen.dh == expected


def test_invalid_ke_payload_carries_the_group_we_want() -> None:
    offered = [offer("aes256gcm16-prfsha256-ecp256-x25519")]
    configured = [conf("aes256gcm16-prfsha256-x25519")]
    with pytest.raises(InvalidKePayload) as info:
        select_proposal(offered, configured, ke_group=19)
    assert info.value.group == DhGroup.CURVE25519
    assert info.value.notify == 17


def test_invalid_ke_payload_names_our_first_common_group() -> None:
    offered = [offer("aes256gcm16-prfsha256-modp2048-ecp256-x25519")]
    configured = [conf("aes256gcm16-prfsha256-x25519-ecp256")]
    with pytest.raises(InvalidKePayload) as info:
        select_proposal(offered, configured, ke_group=14)
    assert info.value.group == DhGroup.CURVE25519


def test_no_ke_group_given_skips_the_check() -> None:
    _, chosen = select_proposal([offer("aes256gcm16-prfsha256-ecp256")],
                                [conf("aes256gcm16-prfsha256-ecp256")])
    assert chosen.dh == DhGroup.ECP256


NO_PROPOSAL: list[tuple[str, list[Proposal], list[ConfiguredProposal]]] = [
    ("no common encryption", [offer("aes128gcm16-prfsha256-x25519")],
     [conf("aes256gcm16-prfsha256-x25519")]),
    ("AES key length differs", [offer("aes128-sha256-x25519")], [conf("aes256-sha256-x25519")]),
    ("no common PRF", [offer("aes256gcm16-prfsha384-x25519")],
     [conf("aes256gcm16-prfsha256-x25519")]),
    ("no common integrity", [offer("aes256-sha384-x25519")], [conf("aes256-sha256-x25519")]),
    ("no common group", [offer("aes256gcm16-prfsha256-modp2048")],
     [conf("aes256gcm16-prfsha256-x25519")]),
    ("no group offered", [Proposal(1, IKE, b"", tuple(
        t for t in offer("aes256gcm16-prfsha256-x25519").transforms
        if t.type != TransformType.DH))], [conf("aes256gcm16-prfsha256-x25519")]),
    ("AEAD with an integrity algorithm", [offer(
        "aes256gcm16-prfsha256-x25519",
        extra=(Transform(TransformType.INTEG, Integ.HMAC_SHA2_256_128),))],
     [conf("aes256gcm16-prfsha256-x25519")]),
    ("non-AEAD without integrity", [Proposal(1, IKE, b"", tuple(
        t for t in offer("aes256-sha256-x25519").transforms if t.type != TransformType.INTEG))],
     [conf("aes256-sha256-x25519")]),
    ("unknown transform type", [offer("aes256gcm16-prfsha256-x25519",
                                      extra=(Transform(241, 1),))],
     [conf("aes256gcm16-prfsha256-x25519")]),
    ("ESP offered to an IKE configuration", [offer("aes256gcm16", protocol=ESP)],
     [conf("aes256gcm16-prfsha256-x25519")]),
    ("legacy PRF not allowed", [offer("aes128-sha256-prfsha1-modp2048")],
     [conf("aes128-sha256-prfsha1-modp2048", legacy=True)]),
    ("legacy encryption not allowed", [offer("3des-sha256-modp2048")],
     [conf("3des-sha256-modp2048", legacy=True)]),
    ("nothing offered", [], [conf("aes256gcm16-prfsha256-x25519")]),
    ("nothing configured", [offer("aes256gcm16-prfsha256-x25519")], []),
]


@pytest.mark.parametrize(("name", "offered", "configured"), NO_PROPOSAL,
                         ids=[n for n, _, _ in NO_PROPOSAL])
def test_no_proposal_chosen(name: str, offered: list[Proposal],
                            configured: list[ConfiguredProposal]) -> None:
    with pytest.raises(NoProposalChosen) as info:
        select_proposal(offered, configured, ke_group=31 if "group" not in name else None)
    assert info.value.notify == 14


def test_legacy_accepted_when_allowed() -> None:
    _, chosen = select_proposal([offer("aes128-sha256-prfsha1-modp2048")],
                                [conf("aes128-sha256-prfsha1-modp2048", legacy=True)],
                                ke_group=14, legacy_allowed=True)
    assert chosen.prf is not None and chosen.prf.name == "prfsha1"


def test_aead_with_integ_none_is_accepted() -> None:  # RFC 7296 3.3.3: NONE is allowed
    offered = [offer("aes256gcm16-prfsha256-x25519",
                     extra=(Transform(TransformType.INTEG, Integ.NONE),))]
    _, chosen = select_proposal(offered, [conf("aes256gcm16-prfsha256-x25519")], ke_group=31)
    assert chosen.integ is None


def test_a_later_acceptable_proposal_is_found() -> None:
    offered = [offer("aes128gcm16-prfsha256-x25519", 1), offer("aes256gcm16-prfsha256-x25519", 2)]
    proposal, _ = select_proposal(offered, [conf("aes256gcm16-prfsha256-x25519")], ke_group=31)
    assert proposal.number == 2


# --- ESN (RFC 7296 3.3.2, transform type 5) -------------------------------------------------

@pytest.mark.parametrize(("ours", "theirs", "expected"), [
    ("aes256gcm16", (Esn.NO_ESN,), Esn.NO_ESN),
    ("aes256gcm16", (Esn.ESN, Esn.NO_ESN), Esn.NO_ESN),
    ("aes256gcm16", (), Esn.NO_ESN),  # no ESN transform means no ESN
    ("aes256gcm16", (Esn.ESN,), None),
    ("aes256gcm16-esn", (Esn.NO_ESN,), None),
    ("aes256gcm16-esn", (Esn.NO_ESN, Esn.ESN), Esn.ESN),
    ("aes256gcm16-esn-noesn", (Esn.NO_ESN, Esn.ESN), Esn.ESN),
    ("aes256gcm16-noesn-esn", (Esn.ESN, Esn.NO_ESN), Esn.NO_ESN),
])
def test_esn_selection(ours: str, theirs: tuple[Esn, ...], expected: Esn | None) -> None:
    transforms = (Transform(TransformType.ENCR, Encr.AES_GCM_16, 256),
                  *(Transform(TransformType.ESN, e) for e in theirs))
    offered = [Proposal(1, ESP, b"\x00\x00\x20\x00", transforms)]
    configured = [conf(ours, ESP)]
    if expected is None:
        with pytest.raises(NoProposalChosen):
            select_proposal(offered, configured)
    else:
        _, chosen = select_proposal(offered, configured)
        assert chosen.esn == expected
        assert chosen.prf is None and chosen.dh is None


def test_esp_selection_ignores_the_ke_group() -> None:
    _, chosen = select_proposal([offer("aes128-sha256", protocol=ESP)],
                                [conf("aes128-sha256", ESP)], ke_group=None)
    assert chosen.integ is not None and chosen.integ.name == "sha256"


# --- what the responder sends back, and how the initiator reads it ---------------------------

def test_chosen_to_proposal_has_one_transform_per_type() -> None:
    offered = offer("aes128gcm16-aes256gcm16-prfsha256-prfsha384-ecp256-x25519", 4)
    _, chosen = select_proposal([offered], [conf("aes256gcm16-prfsha384-x25519")], ke_group=31)
    reply = chosen_to_proposal(4, IKE, b"", chosen)
    assert reply.number == 4 and reply.spi == b""
    assert reply.transforms == (
        Transform(TransformType.ENCR, Encr.AES_GCM_16, 256),
        Transform(TransformType.PRF, Prf.HMAC_SHA2_384),
        Transform(TransformType.DH, DhGroup.CURVE25519),
    )
    assert chosen_from_response(reply) == chosen
    assert chosen.describe() == "aes256gcm16-prfsha384-curve25519"


def test_esp_reply_carries_our_spi_and_esn() -> None:
    _, chosen = select_proposal([offer("aes256-sha512-esn", protocol=ESP)],
                                [conf("aes256-sha512-esn", ESP)])
    reply = chosen_to_proposal(1, ESP, b"\x00\x00\x30\x00", chosen)
    assert reply.spi == b"\x00\x00\x30\x00"
    assert Transform(TransformType.ESN, Esn.ESN) in reply.transforms
    back = chosen_from_response(reply)
    assert back.esn is Esn.ESN and back.integ is not None and back.integ.name == "sha512"
    assert chosen.describe() == "aes256-sha512-esn"


@pytest.mark.parametrize(("name", "transforms"), [
    ("two ENCR", (Transform(1, Encr.AES_GCM_16, 256), Transform(1, Encr.AES_GCM_16, 128))),
    ("no ENCR", (Transform(2, Prf.HMAC_SHA2_256),)),
    ("unknown ENCR", (Transform(1, 99, 128),)),
    ("ENCR without key length", (Transform(1, Encr.AES_CBC, None),)),
])
def test_chosen_from_response_refuses_malformed_choice(name: str,
                                                       transforms: tuple[Transform, ...]) -> None:
    with pytest.raises(NoProposalChosen):
        chosen_from_response(Proposal(1, IKE, b"", transforms))


def test_chosen_algorithms_is_frozen() -> None:
    _, chosen = select_proposal([offer("aes256gcm16-prfsha256-x25519")],
                                [conf("aes256gcm16-prfsha256-x25519")], ke_group=31)
    assert isinstance(chosen, ChosenAlgorithms)
    with pytest.raises(AttributeError):
        chosen.dh = DhGroup.ECP256  # type: ignore[misc]
