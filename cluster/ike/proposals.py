"""SA proposals: strongSwan proposal strings, and the responder's choice (RFC 7296 2.7, 3.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..errors import InvalidKePayload, NoProposalChosen
from ..key_exchange import DH_NAMES, LEGACY_GROUPS, DhGroup
from ..transforms import (
    ENCR_ALGORITHMS,
    ENCR_ALIASES,
    INTEG_ALGORITHMS,
    INTEG_ALIASES,
    PRF_ALGORITHMS,
    EncrAlgorithm,
    Esn,
    IntegAlgorithm,
    PrfAlgorithm,
    find_encr,
    find_integ,
    find_prf,
)
from .constants import ProtocolId, TransformType


@dataclass(slots=True)
class Transform:
    """One transform as carried in an SA payload."""

    type: int
    id: int
    key_bits: int | None = None


@dataclass(slots=True)
class Proposal:
    """One proposal as carried in an SA payload."""

    number: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]

    def of_type(self, t: TransformType) -> list[Transform]:
        return [x for x in self.transforms if x.type == t]


@dataclass(frozen=True)
class ConfiguredProposal:
    """A proposal from configuration: alternatives for each transform type."""

    text: str
    protocol: ProtocolId
    encr: tuple[EncrAlgorithm, ...]
    integ: tuple[IntegAlgorithm, ...]
    prf: tuple[PrfAlgorithm, ...]
    dh: tuple[DhGroup, ...]
    esn: tuple[Esn, ...]

    def to_proposal(self, number: int, spi: bytes, *, key_exchange: bool = True) -> Proposal:
        """The proposal we send when we initiate with this configuration.

        `key_exchange=False` leaves out the DH transforms: the Child SA of IKE_AUTH
        reuses the IKE SA's key exchange (RFC 7296 1.2)."""
        ts: list[Transform] = []
        for e in self.encr:
            ts.append(Transform(TransformType.ENCR, e.transform_id,
                                e.key_bits if e.needs_key_length else None))
        ts += [Transform(TransformType.PRF, p.transform_id) for p in self.prf]
        ts += [Transform(TransformType.INTEG, i.transform_id) for i in self.integ]
        if key_exchange:
            ts += [Transform(TransformType.DH, g) for g in self.dh]
        ts += [Transform(TransformType.ESN, e) for e in self.esn]
        return Proposal(number, self.protocol, spi, tuple(ts))


@dataclass(frozen=True, slots=True)
class ChosenAlgorithms:
    """The responder's choice: exactly one of each transform type that applies."""

    encr: EncrAlgorithm
    integ: IntegAlgorithm | None
    prf: PrfAlgorithm | None
    dh: DhGroup | None
    esn: Esn | None

    def describe(self) -> str:
        parts = [self.encr.name]
        if self.integ:
            parts.append(self.integ.name)
        if self.prf:
            parts.append(self.prf.name)
        if self.dh:
            parts.append(self.dh.name.lower())
        if self.esn is Esn.ESN:
            parts.append("esn")
        return "-".join(parts)


def parse_proposal(text: str, protocol: ProtocolId, legacy_allowed: bool) -> ConfiguredProposal:
    """Parse a strongSwan proposal keyword string such as `aes256gcm16-prfsha256-x25519`."""
    encr: list[EncrAlgorithm] = []
    integ: list[IntegAlgorithm] = []
    prf: list[PrfAlgorithm] = []
    dh: list[DhGroup] = []
    esn: list[Esn] = []
    if not text:
        raise ValueError("empty proposal")
    for token in text.lower().split("-"):
        name = ENCR_ALIASES.get(token, token)
        if name in ENCR_ALGORITHMS:
            encr.append(ENCR_ALGORITHMS[name])
        elif INTEG_ALIASES.get(token, token) in INTEG_ALGORITHMS:
            integ.append(INTEG_ALGORITHMS[INTEG_ALIASES.get(token, token)])
        elif token in PRF_ALGORITHMS:
            prf.append(PRF_ALGORITHMS[token])
        elif token in DH_NAMES:
            dh.append(DH_NAMES[token])
        elif token in ("esn", "noesn"):
            esn.append(Esn.ESN if token == "esn" else Esn.NO_ESN)
        else:
            raise ValueError(f"unknown algorithm '{token}'")
    if not encr:
        raise ValueError("no encryption algorithm")
    aead = [e.aead for e in encr]
    if any(aead) and not all(aead):
        raise ValueError("AEAD and non-AEAD encryption cannot share a proposal")
    if all(aead) and integ:
        raise ValueError("an AEAD proposal takes no integrity algorithm")
    if not all(aead) and not integ:
        raise ValueError("a non-AEAD proposal needs an integrity algorithm")
    if not legacy_allowed:
        names = [a.name for a in encr if a.legacy] + [a.name for a in integ if a.legacy]
        names += [a.name for a in prf if a.legacy]
        names += [name for name, group in DH_NAMES.items() if group in dh and group in
                  LEGACY_GROUPS]
        if names:
            raise ValueError(f"'{names[0]}' is a legacy algorithm (set legacy_algorithms)")
    if protocol == ProtocolId.IKE:
        if esn:
            raise ValueError("esn applies to ESP proposals only")
        if not prf:  # strongSwan derives the PRF from the integrity algorithm
            if not integ:
                raise ValueError("an AEAD IKE proposal needs a PRF (e.g. prfsha256)")
            prf = [PRF_ALGORITHMS[i.prf_name] for i in integ]
        if not dh:
            raise ValueError("an IKE proposal needs a key exchange method (e.g. x25519)")
    else:
        if prf:
            raise ValueError("a PRF applies to IKE proposals only")
        if not esn:
            esn = [Esn.NO_ESN]
    return ConfiguredProposal(
        text, protocol, tuple(encr), tuple(integ), tuple(prf), tuple(dict.fromkeys(dh)),
        tuple(esn),
    )


class _Offer:
    """One received proposal, indexed by transform type once for all our proposals."""

    __slots__ = ("dh", "encr", "esn", "integ", "known", "prf", "proposal")

    def __init__(self, proposal: Proposal) -> None:
        self.proposal = proposal
        self.encr: set[tuple[int, int | None]] = set()
        self.integ: set[int] = set()
        self.prf: set[int] = set()
        self.dh: list[int] = []
        self.esn: set[int] = set()
        self.known = True
        for t in proposal.transforms:
            kind = t.type
            if kind == TransformType.ENCR:
                self.encr.add((t.id, t.key_bits))
            elif kind == TransformType.INTEG:
                if t.id:
                    self.integ.add(t.id)
            elif kind == TransformType.PRF:
                self.prf.add(t.id)
            elif kind == TransformType.DH:
                self.dh.append(t.id)
            elif kind == TransformType.ESN:
                self.esn.add(t.id)
            else:  # a transform type we do not know makes the proposal unusable (RFC 7296 3.3.6)
                self.known = False

    def has_encr(self, alg: EncrAlgorithm) -> bool:
        if (alg.transform_id, alg.key_bits) in self.encr:
            return True
        return not alg.needs_key_length and (alg.transform_id, None) in self.encr


A = TypeVar("A", IntegAlgorithm, PrfAlgorithm)


def _first_offered(ours: tuple[A, ...], offered: set[int]) -> A | None:
    """Our first choice the peer offered (a loop: see payloads.first_of)."""
    for alg in ours:
        if alg.transform_id in offered:
            return alg
    return None


def _match_one(offer: _Offer, conf: ConfiguredProposal, ke_group: int | None,
               legacy_allowed: bool, key_exchange: bool = True) -> ChosenAlgorithms | None:
    encr = None
    for e in conf.encr:
        if offer.has_encr(e):
            encr = e
            break
    if encr is None or (encr.legacy and not legacy_allowed):
        return None
    integ = _first_offered(conf.integ, offer.integ)
    if encr.aead:
        if offer.integ:
            return None
    elif integ is None:
        return None
    prf: PrfAlgorithm | None = None
    if conf.protocol == ProtocolId.IKE:
        prf = _first_offered(conf.prf, offer.prf)
        if prf is None:
            return None
    dh: DhGroup | None = None
    if not key_exchange:
        pass  # the Child SA of IKE_AUTH: no key exchange of its own (RFC 7296 1.2)
    elif conf.dh:
        common = [g for g in conf.dh if g in offer.dh]
        if not common:
            return None  # we demand a key exchange (PFS) the peer does not offer
        # prefer the group whose KE the initiator already sent (RFC 7296 1.2)
        dh = DhGroup(ke_group) if ke_group in common else common[0]
    elif conf.protocol == ProtocolId.IKE or (offer.dh and 0 not in offer.dh):
        return None  # the peer demands a key exchange we are not configured for
    esn: Esn | None = None
    if conf.protocol != ProtocolId.IKE:
        offered_esn = offer.esn or {Esn.NO_ESN}
        for esn in conf.esn:
            if esn in offered_esn:
                break
        else:
            return None
    for p in (prf, integ):
        if p is not None and p.legacy and not legacy_allowed:
            return None
    return ChosenAlgorithms(encr, integ, prf, dh, esn)


def select_proposal(
    offered: Sequence[Proposal],
    configured: Sequence[ConfiguredProposal],
    *,
    ke_group: int | None = None,
    legacy_allowed: bool = False,
    key_exchange: bool = True,
) -> tuple[Proposal, ChosenAlgorithms]:
    """Choose in our configured order (strongSwan's prefer_configured_proposals).

    Raises NoProposalChosen, or InvalidKePayload when the choice needs a different
    KE group than the initiator sent (RFC 7296 1.2).
    """
    offers = [_Offer(p) for p in offered]
    for conf in configured:
        for offer in offers:
            prop = offer.proposal
            if prop.protocol != conf.protocol or not offer.known:
                continue
            chosen = _match_one(offer, conf, ke_group, legacy_allowed, key_exchange)
            if chosen is None:
                continue
            if conf.protocol == ProtocolId.IKE and ke_group is not None and chosen.dh != ke_group:
                assert chosen.dh is not None
                raise InvalidKePayload(chosen.dh)
            return prop, chosen
    raise NoProposalChosen("no acceptable proposal")


def chosen_to_proposal(number: int, protocol: int, spi: bytes,
                       chosen: ChosenAlgorithms) -> Proposal:
    """The single-transform-per-type proposal a responder returns."""
    ts = [Transform(TransformType.ENCR, chosen.encr.transform_id,
                    chosen.encr.key_bits if chosen.encr.needs_key_length else None)]
    if chosen.prf:
        ts.append(Transform(TransformType.PRF, chosen.prf.transform_id))
    if chosen.integ:
        ts.append(Transform(TransformType.INTEG, chosen.integ.transform_id))
    if chosen.dh:
        ts.append(Transform(TransformType.DH, chosen.dh))
    if chosen.esn is not None:
        ts.append(Transform(TransformType.ESN, chosen.esn))
    return Proposal(number, protocol, spi, tuple(ts))


def accept_response(proposal: Proposal, configured: Sequence[ConfiguredProposal],
                    legacy_allowed: bool = False, key_exchange: bool = True) -> ChosenAlgorithms:
    """The initiator's check of a responder's choice (RFC 7296 2.7): one transform of each
    type, and a combination we offered. Raises NoProposalChosen otherwise."""
    counts: dict[int, int] = {}
    for t in proposal.transforms:
        if t.type != TransformType.INTEG or t.id != 0:
            counts[t.type] = counts.get(t.type, 0) + 1
    if any(n != 1 for n in counts.values()):
        raise NoProposalChosen("the response must carry one transform of each type")
    ke_group = None
    for t in proposal.transforms:
        if t.type == TransformType.DH:
            ke_group = t.id
            break
    try:
        _, chosen = select_proposal([proposal], configured, ke_group=ke_group,
                                    legacy_allowed=legacy_allowed, key_exchange=key_exchange)
    except InvalidKePayload:
        raise NoProposalChosen("the responder chose a group we did not offer") from None
    return chosen


def chosen_from_response(proposal: Proposal) -> ChosenAlgorithms:
    """The initiator's reading of a responder's single-choice proposal."""
    encr_t = proposal.of_type(TransformType.ENCR)
    if len(encr_t) != 1:
        raise NoProposalChosen("response must carry exactly one ENCR transform")
    encr = find_encr(encr_t[0].id, encr_t[0].key_bits)
    if encr is None:
        raise NoProposalChosen("unknown ENCR in response")
    integ_t = [t for t in proposal.of_type(TransformType.INTEG) if t.id != 0]
    prf_t = proposal.of_type(TransformType.PRF)
    dh_t = proposal.of_type(TransformType.DH)
    esn_t = proposal.of_type(TransformType.ESN)
    integ = find_integ(integ_t[0].id) if integ_t else None
    prf = find_prf(prf_t[0].id) if prf_t else None
    dh = DhGroup(dh_t[0].id) if dh_t and dh_t[0].id in DhGroup._value2member_map_ else None
    esn = Esn(esn_t[0].id) if esn_t and esn_t[0].id in (0, 1) else None
    return ChosenAlgorithms(encr, integ, prf, dh, esn)
