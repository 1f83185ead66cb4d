"""Child SA negotiation shared by IKE_AUTH and CREATE_CHILD_SA (RFC 7296 1.3, 2.9, 2.17)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import NoProposalChosen, TsUnacceptable
from ..transforms import SHA256_96
from .configuration import dynamic_addresses, own_dynamic_addresses
from .constants import NotifyType, ProtocolId
from .events import ChildSaEstablished
from .keymat import derive_child_keys
from .payloads import NotifyPayload, Payload, SaPayload, TsiPayload, TsrPayload, first_of
from .policy import ChildConfig, ConnectionConfig
from .proposals import ChosenAlgorithms, Proposal, chosen_to_proposal, select_proposal
from .sa import ChildSa, IkeSa
from .traffic_selectors import TrafficSelector, TsConfig, narrow

Random = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class ChildChoice:
    config: ChildConfig
    proposal: Proposal
    chosen: ChosenAlgorithms
    tsi: tuple[TrafficSelector, ...]
    tsr: tuple[TrafficSelector, ...]
    transport: bool


def new_child_spi(sa: IkeSa, rng: Random) -> bytes:
    while True:  # SPIs below 256 are reserved (RFC 4303 2.1)
        spi = rng(4)
        if int.from_bytes(spi, "big") >= 256 and spi not in sa.children:
            return spi


def choose_child(sa: IkeSa, conn: ConnectionConfig, payloads: list[Payload], *,
                 key_exchange: bool = True) -> ChildChoice:
    """The responder's pick of child config, ESP proposal and narrowed selectors."""
    sa_p = first_of(payloads, SaPayload)
    tsi_p = first_of(payloads, TsiPayload)
    tsr_p = first_of(payloads, TsrPayload)
    if sa_p is None or tsi_p is None or tsr_p is None:
        raise NoProposalChosen("no Child SA requested")
    transport = NotifyType.USE_TRANSPORT_MODE in [p.notify_type for p in payloads
                                                  if isinstance(p, NotifyPayload)]
    offered = [p for p in sa_p.proposals if p.protocol == ProtocolId.ESP and len(p.spi) == 4]
    proposal_error: Exception | None = None
    peer, ours = dynamic_addresses(sa), own_dynamic_addresses(sa)
    for child in conn.children:
        tsi = narrow(tsi_p.selectors, [t.resolve(a) for t in child.remote_ts for a in peer])
        tsr = narrow(tsr_p.selectors, [t.resolve(a) for t in child.local_ts for a in ours])
        if not tsi or not tsr:
            continue
        if child.mode == "transport" and not transport:
            continue  # we insist on transport; the peer asked for a tunnel
        try:
            proposal, chosen = select_proposal(offered, child.esp_proposals,
                                               legacy_allowed=sa.policy.legacy_algorithms,
                                               key_exchange=key_exchange)
        except NoProposalChosen as exc:
            proposal_error = exc
            continue
        return ChildChoice(child, proposal, chosen, tsi, tsr,
                           transport and child.mode == "transport")
    if proposal_error is not None:
        raise NoProposalChosen("no acceptable ESP proposal")
    raise TsUnacceptable("no child config fits the traffic selectors")


def install_child(sa: IkeSa, name: str, mode: str, spi_in: bytes, spi_out: bytes,
                  chosen: ChosenAlgorithms, nonce_i: bytes, nonce_r: bytes,
                  local_ts: tuple[TrafficSelector, ...], remote_ts: tuple[TrafficSelector, ...],
                  shared: bytes = b"", *, we_initiated: bool | None = None,
                  replaces: bytes = b"") -> ChildSa:
    """Derive KEYMAT, record the Child SA and emit ChildSaEstablished.

    `we_initiated`: whether we sent the request of this exchange (KEYMAT gives the
    exchange initiator's outbound keys first, RFC 7296 2.17); IKE_AUTH: our IKE role.
    `replaces`: the spi_in of the Child SA this one rekeys.
    """
    assert sa.chosen is not None and sa.chosen.prf is not None and sa.keys is not None
    keys = derive_child_keys(sa.chosen.prf, sa.keys.sk_d, chosen.encr, chosen.integ,
                             nonce_i, nonce_r, shared)
    if we_initiated is None:
        we_initiated = sa.is_initiator
    child = ChildSa(name, mode, spi_in, spi_out, chosen, keys, local_ts, remote_ts,
                    we_initiated=we_initiated)
    sa.children[spi_in] = child
    sa.events.append(child_established(sa, child, replaces))
    return child


def initiator_selectors(sa: IkeSa, config: ChildConfig, ours: Sequence[str]
                        ) -> tuple[tuple[TrafficSelector, ...], tuple[TrafficSelector, ...]]:
    """(TSi, TSr) we propose for a Child SA of `config`: a "dynamic" local selector
    stands for each of `ours` (our address, or the virtual IPs asked for or assigned),
    a "dynamic" remote one for the peer's address, or the virtual IPs we assigned it."""
    return _resolved(config.local_ts, ours), _resolved(config.remote_ts, dynamic_addresses(sa))


def _resolved(configured: Sequence[TsConfig], addresses: Sequence[str]
              ) -> tuple[TrafficSelector, ...]:
    """Each configured selector, a "dynamic" one once per address, without repeats."""
    out: list[TrafficSelector] = []
    for ts in (t.resolve(a) for t in configured for a in addresses):
        if ts not in out:
            out.append(ts)
    return tuple(out)


def child_established(sa: IkeSa, child: ChildSa, replaces: bytes = b"") -> ChildSaEstablished:
    """The install request for a Child SA of `sa`: its keys as inbound and outbound."""
    keys, chosen = child.keys, child.chosen
    config = _child_config(sa, child.name)
    if child.we_initiated:
        key_in, int_in, key_out, int_out = keys.encr_r, keys.integ_r, keys.encr_i, keys.integ_i
    else:
        key_in, int_in, key_out, int_out = keys.encr_i, keys.integ_i, keys.encr_r, keys.integ_r
    integ = chosen.integ
    if integ is not None and config is not None and config.sha256_96 \
            and integ.transform_id == SHA256_96.transform_id:
        integ = SHA256_96  # (only the data plane's ICV changes; the negotiation did not)
    return ChildSaEstablished(
        sa.spi_i, sa.spi_r, child.name, child.mode, child.spi_in, child.spi_out, chosen.encr,
        integ, chosen.esn == 1, key_in, int_in, key_out, int_out, child.local_ts,
        child.remote_ts, sa.local, sa.remote, encap=sa.nat, replaces=replaces,
        we_initiated=child.we_initiated,
        inactivity=config.inactivity if config is not None else 0.0,
        copy_dscp=config.copy_dscp if config is not None else True,
        copy_ecn=config.copy_ecn if config is not None else True,
        tfc_padding=config.tfc_padding if config is not None else 0,
        replay_window=config.replay_window if config is not None else 0,
        # the random part of the rekey limits comes from our SPI: random, and the same
        # each time this Child SA's install request is made
        volume=config.volume.for_child(int.from_bytes(child.spi_in, "big") / 2**32)
        if config is not None else (0, 0, 0, 0),
        connection=sa.connection.name if sa.connection is not None else "",
        local_id=str(sa.local_id or ""), remote_id=str(sa.remote_id or ""),
        eap_identity=sa.eap_identity,
        virtual_ips=tuple(str(lease.address) for lease in sa.leases),
        own_virtual_ips=sa.own_vips,
    )


def _child_config(sa: IkeSa, name: str) -> ChildConfig | None:
    """The SA's child `name` (None when it is gone)."""
    conn = sa.connection
    return next((c for c in conn.children if c.name == name), None) \
        if conn is not None else None


def respond_child(sa: IkeSa, conn: ConnectionConfig, payloads: list[Payload],
                  rng: Random) -> list[Payload]:
    """Child SA part of a response; a refusal is a notify, the IKE SA stays (RFC 7296 2.21.3)."""
    try:  # IKE_AUTH: the Child SA has no key exchange of its own (RFC 7296 1.2)
        choice = choose_child(sa, conn, payloads, key_exchange=False)
    except (NoProposalChosen, TsUnacceptable) as exc:
        return [NotifyPayload(exc.notify)]
    spi_in = new_child_spi(sa, rng)
    mode = "transport" if choice.transport else "tunnel"
    install_child(sa, choice.config.name, mode, spi_in, choice.proposal.spi, choice.chosen,
                  sa.nonce_i, sa.nonce_r, choice.tsr, choice.tsi)
    out: list[Payload] = []
    if choice.transport:
        out.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    out += [
        SaPayload((chosen_to_proposal(choice.proposal.number, ProtocolId.ESP, spi_in,
                                      choice.chosen),)),
        TsiPayload(choice.tsi),
        TsrPayload(choice.tsr),
    ]
    return out
