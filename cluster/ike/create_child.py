"""CREATE_CHILD_SA (RFC 7296 1.3): new Child SAs, Child SA rekeys (with or without PFS)
and IKE SA rekeys, as responder and as initiator.

Collisions (2.8.1, 2.8.2): when both ends rekey the same Child SA, both exchanges
complete; the new SA whose exchange carried the lowest nonce is redundant and its
creator deletes it. For the IKE SA itself we answer TEMPORARY_FAILURE while our own
IKE rekey is in flight (2.25), and the peer retries.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass, field, replace

from ..errors import (
    ChildSaNotFound,
    InvalidKePayload,
    InvalidSyntax,
    NoProposalChosen,
    ParseError,
    TemporaryFailure,
)
from ..key_exchange import KeyExchange, new_key_exchange
from .child_sa import choose_child, initiator_selectors, install_child, new_child_spi
from .configuration import own_dynamic_addresses
from .constants import NotifyType, ProtocolId
from .events import IkeSaRekeyed
from .ike_init import notifies
from .keymat import derive_ike_keys, rekey_skeyseed
from .message import SkProtection
from .payloads import (
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TsiPayload,
    TsrPayload,
    first_of,
)
from .policy import ChildConfig
from .proposals import ChosenAlgorithms, accept_response, chosen_to_proposal, select_proposal
from .sa import ChildSa, IkeSa
from .state import State
from .traffic_selectors import TrafficSelector

Random = Callable[[int], bytes]
NONCE_SIZE = 32


def _ke_for(chosen: ChosenAlgorithms, ke: KePayload | None) -> tuple[KeyExchange | None, bytes]:
    """Our half of the PFS exchange the chosen proposal asks for, and the shared secret."""
    if chosen.dh is None:
        return None, b""
    if ke is None or ke.group != chosen.dh:
        raise InvalidKePayload(chosen.dh)
    ours = new_key_exchange(chosen.dh)
    try:
        return ours, ours.shared_secret_untrusted(ke.data)
    except ParseError:
        raise InvalidKePayload(chosen.dh) from None  # RFC 6989: refuse an invalid value


def _config_of(sa: IkeSa, name: str) -> ChildConfig | None:
    assert sa.connection is not None
    return sa.connection.child(name)


# --- responder -----------------------------------------------------------------------


@dataclass
class Answer:
    payloads: list[Payload]
    new_ike: IkeSa | None = None  # an IKE rekey: the SA that takes over


def respond_create_child(sa: IkeSa, payloads: list[Payload], rng: Random) -> Answer:
    sa_p = first_of(payloads, SaPayload)
    nonce = first_of(payloads, NoncePayload)
    if sa_p is None or nonce is None:
        raise InvalidSyntax("CREATE_CHILD_SA request lacks SA or Nonce")
    if any(p.protocol == ProtocolId.IKE for p in sa_p.proposals):
        return _respond_ike_rekey(sa, payloads, sa_p, nonce, rng)
    return Answer(_respond_child(sa, payloads, nonce, rng))


def _respond_child(sa: IkeSa, payloads: list[Payload], nonce: NoncePayload,
                   rng: Random) -> list[Payload]:
    assert sa.connection is not None
    old: ChildSa | None = None
    for n in notifies(payloads, NotifyType.REKEY_SA):
        if n.protocol != ProtocolId.ESP:
            raise NoProposalChosen("only ESP Child SAs are supported")
        # the SPI the peer receives with: our outbound SPI of that SA (RFC 7296 1.3.3)
        old = next((c for c in sa.children.values() if c.spi_out == n.spi), None)
        if old is None:
            raise ChildSaNotFound(f"no Child SA with SPI {n.spi.hex()} to rekey")
        if old.deleting:  # RFC 7296 2.25.1: our Delete is on its way
            raise TemporaryFailure(f"the Child SA with SPI {n.spi.hex()} is being deleted")
    conn = sa.connection
    if old is not None:  # keep the old SA's configuration: a rekey, not a new policy
        config = _config_of(sa, old.name)
        if config is not None:
            conn = replace(conn, children=(config,))
    choice = choose_child(sa, conn, payloads)
    ke = first_of(payloads, KePayload)
    ours, shared = _ke_for(choice.chosen, ke)
    nonce_r = rng(NONCE_SIZE)
    spi_in = new_child_spi(sa, rng)
    mode = "transport" if choice.transport else "tunnel"
    child = install_child(sa, choice.config.name, mode, spi_in, choice.proposal.spi,
                          choice.chosen, nonce.data, nonce_r, choice.tsr, choice.tsi, shared,
                          we_initiated=False, replaces=old.spi_in if old else b"")
    if old is not None:
        old.replaced_by = child.spi_in
        old.replaced_nonce = min(nonce.data, nonce_r)
    out: list[Payload] = []
    if choice.transport:
        out.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    out += [
        SaPayload((chosen_to_proposal(choice.proposal.number, ProtocolId.ESP, spi_in,
                                      choice.chosen),)),
        NoncePayload(nonce_r),
    ]
    if ours is not None:
        out.append(KePayload(ours.group, ours.public_value()))
    out += [TsiPayload(choice.tsi), TsrPayload(choice.tsr)]
    return out


def _respond_ike_rekey(sa: IkeSa, payloads: list[Payload], sa_p: SaPayload,
                       nonce: NoncePayload, rng: Random) -> Answer:
    assert sa.connection is not None
    if sa.rekeying:
        raise TemporaryFailure("we are rekeying this IKE SA ourselves")  # RFC 7296 2.25
    if sa.pending is not None:  # it would die with the old IKE SA (strongSwan waits too)
        raise TemporaryFailure("a request of ours is outstanding on this IKE SA")
    ke = first_of(payloads, KePayload)
    if ke is None:
        raise InvalidSyntax("IKE SA rekey without KE")
    offered = [p for p in sa_p.proposals if p.protocol == ProtocolId.IKE and len(p.spi) == 8]
    proposal, chosen = select_proposal(offered, sa.connection.proposals, ke_group=ke.group,
                                       legacy_allowed=sa.policy.legacy_algorithms)
    ours, shared = _ke_for(chosen, ke)
    assert ours is not None
    nonce_r = rng(NONCE_SIZE)
    new = _successor(sa, is_initiator=False, spi_i=proposal.spi, spi_r=_new_ike_spi(rng),
                     chosen=chosen, nonce_i=nonce.data, nonce_r=nonce_r, shared=shared)
    out: list[Payload] = [
        SaPayload((chosen_to_proposal(proposal.number, ProtocolId.IKE, new.spi_r, chosen),)),
        NoncePayload(nonce_r),
        KePayload(ours.group, ours.public_value()),
    ]
    return Answer(out, new)


def _new_ike_spi(rng: Random) -> bytes:
    while True:
        spi = rng(8)
        if any(spi):
            return spi


def _successor(sa: IkeSa, *, is_initiator: bool, spi_i: bytes, spi_r: bytes,
               chosen: ChosenAlgorithms, nonce_i: bytes, nonce_r: bytes,
               shared: bytes) -> IkeSa:
    """The IKE SA that takes over from `sa` (RFC 7296 2.18): new keys, same Child SAs."""
    assert sa.keys is not None and sa.chosen is not None and sa.chosen.prf is not None
    assert chosen.prf is not None
    # SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr), with the old SA's PRF
    seed = rekey_skeyseed(sa.chosen.prf, sa.keys.sk_d, shared, nonce_i, nonce_r)
    keys = derive_ike_keys(chosen.prf, chosen.encr, chosen.integ, seed, nonce_i, nonce_r,
                           spi_i, spi_r)
    if is_initiator:
        sk = SkProtection(chosen.encr, chosen.integ, keys.sk_ei, keys.sk_ai, keys.sk_er,
                          keys.sk_ar)
    else:
        sk = SkProtection(chosen.encr, chosen.integ, keys.sk_er, keys.sk_ar, keys.sk_ei,
                          keys.sk_ai)
    new = IkeSa(sa.policy, is_initiator, spi_i, spi_r, sa.local, sa.remote,
                state=State.ESTABLISHED, connection=sa.connection, chosen=chosen,
                nonce_i=nonce_i, nonce_r=nonce_r, keys=keys, sk=sk,
                nat_local=sa.nat_local, nat_remote=sa.nat_remote, behind_nat=sa.behind_nat,
                peer_hashes=sa.peer_hashes, local_id=sa.local_id, remote_id=sa.remote_id,
                events=sa.events, fragmentation=sa.fragmentation, last_heard=sa.last_heard,
                leases=sa.leases, mobike=sa.mobike, reauth_at=sa.reauth_at,
                reauth_due=sa.reauth_due,
                own_vips=sa.own_vips, eap_identity=sa.eap_identity, ppk=sa.ppk,
                session_timeout=sa.session_timeout, authenticated_at=sa.authenticated_at,
                radius_classes=sa.radius_classes, radius_interim=sa.radius_interim,
                # what both announced goes on with the SA (as strongSwan's extensions do)
                mid_sync=sa.mid_sync, redirect_supported=sa.redirect_supported,
                original_initiator=sa.original_initiator)
    sa.leases = ()  # the successor holds the virtual IPs now
    new.children, sa.children = sa.children, {}
    sa.events.append(IkeSaRekeyed(sa.spi_i, sa.spi_r, spi_i, spi_r, is_initiator))
    return new


# --- initiator -----------------------------------------------------------------------


@dataclass
class RekeyChild:
    """Our CREATE_CHILD_SA rekeying one Child SA."""

    spi_in: bytes  # of the SA being rekeyed
    new_spi: bytes = b""
    nonce: bytes = b""
    ke: KeyExchange | None = None
    group: int | None = None  # PFS group to offer; set from INVALID_KE_PAYLOAD on retry
    # set when the SA reached its hard lifetime with this request in flight: the child
    # whose new Child SA the answer brings, taking over from nothing
    name: str = ""


@dataclass
class CreateChild:
    """Our CREATE_CHILD_SA for a new Child SA of one of the connection's children (RFC
    7296 1.3.1): a connection we initiate brings its other start_action = "start"
    children up this way once IKE_AUTH has brought the first."""

    name: str
    new_spi: bytes = b""
    nonce: bytes = b""
    ke: KeyExchange | None = None
    group: int | None = None  # PFS group to offer; set from INVALID_KE_PAYLOAD on retry
    # the selectors of a Child SA the peer lost, created again (RFC 7296 2.25); none:
    # the child's configured ones
    tsi: tuple[TrafficSelector, ...] = ()
    tsr: tuple[TrafficSelector, ...] = ()


@dataclass
class RekeyIke:
    new_spi: bytes = b""
    nonce: bytes = b""
    ke: KeyExchange | None = None
    group: int | None = None
    proposals: list[object] = field(default_factory=list)


def _child_request(sa: IkeSa, task: RekeyChild | CreateChild, config: ChildConfig,
                   transport: bool, tsi: tuple[TrafficSelector, ...],
                   tsr: tuple[TrafficSelector, ...], rng: Random) -> list[Payload]:
    """The payloads of a CREATE_CHILD_SA request for a Child SA of `config` after any
    REKEY_SA (RFC 7296 1.3.1, 1.3.3): our new SPI, nonce and, with PFS, key exchange
    go into `task` for the response."""
    task.new_spi = new_child_spi(sa, rng)
    task.nonce = rng(NONCE_SIZE)
    groups = [g for p in config.esp_proposals for g in p.dh]
    if task.group is None and groups:
        task.group = groups[0]
    payloads: list[Payload] = []
    if transport:
        payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    payloads += [
        SaPayload(tuple(p.to_proposal(i + 1, task.new_spi)
                        for i, p in enumerate(config.esp_proposals))),
        NoncePayload(task.nonce),
    ]
    if task.group is not None:
        task.ke = new_key_exchange(task.group)
        payloads.append(KePayload(task.group, task.ke.public_value()))
    payloads += [TsiPayload(tsi), TsrPayload(tsr)]
    return payloads


def _child_response(sa: IkeSa, task: RekeyChild | CreateChild, name: str,
                    payloads: list[Payload], replaces: bytes = b"") -> tuple[ChildSa, bytes]:
    """The Child SA the response to `task` makes, installed, and the peer's nonce;
    IkeError when the peer refused or the response does not fit what we asked for."""
    config = _config_of(sa, name)
    offered: Set[int] = {g for p in config.esp_proposals for g in p.dh} if config else set()
    _raise_refusal(payloads, offered, task.group)
    sa_p = first_of(payloads, SaPayload)
    nonce = first_of(payloads, NoncePayload)
    tsi = first_of(payloads, TsiPayload)
    tsr = first_of(payloads, TsrPayload)
    if sa_p is None or nonce is None or tsi is None or tsr is None or len(sa_p.proposals) != 1:
        raise InvalidSyntax("CREATE_CHILD_SA response lacks SA, Nonce or TS")
    proposal = sa_p.proposals[0]
    if config is None or proposal.protocol != ProtocolId.ESP or len(proposal.spi) != 4:
        raise NoProposalChosen("unusable Child SA proposal in the response")
    chosen = accept_response(proposal, config.esp_proposals, sa.policy.legacy_algorithms)
    shared = b""
    if chosen.dh is not None:
        ke = first_of(payloads, KePayload)
        if task.ke is None or ke is None or ke.group != task.ke.group:
            raise NoProposalChosen("the response's key exchange does not match ours")
        try:
            shared = task.ke.shared_secret_untrusted(ke.data)
        except ParseError as exc:
            raise InvalidSyntax(str(exc)) from None
    transport = bool(notifies(payloads, NotifyType.USE_TRANSPORT_MODE))
    child = install_child(sa, name, "transport" if transport else "tunnel", task.new_spi,
                          proposal.spi, chosen, task.nonce, nonce.data, tsi.selectors,
                          tsr.selectors, shared, we_initiated=True, replaces=replaces)
    return child, nonce.data


def build_rekey_child(sa: IkeSa, task: RekeyChild, rng: Random) -> list[Payload]:
    child = sa.children[task.spi_in]
    config = _config_of(sa, child.name)
    if config is None:
        raise NoProposalChosen(f"child config {child.name} is gone")
    payloads: list[Payload] = [NotifyPayload(NotifyType.REKEY_SA, b"", ProtocolId.ESP,
                                             child.spi_in)]
    payloads += _child_request(sa, task, config, child.mode == "transport", child.local_ts,
                               child.remote_ts, rng)
    child.rekeying = True
    return payloads


def process_rekey_child(sa: IkeSa, task: RekeyChild, payloads: list[Payload]) -> ChildSa:
    """The new Child SA; raises IkeError when the peer refused."""
    old = sa.children.get(task.spi_in)
    if old is None and task.name:  # it expired meanwhile: the new SA stands alone
        return _child_response(sa, task, task.name, payloads)[0]
    if old is None:
        _raise_refusal(payloads, set(), task.group)
        raise ChildSaNotFound("the Child SA went away during its rekey")
    new, nonce_r = _child_response(sa, task, old.name, payloads, replaces=old.spi_in)
    old.rekey_nonce = min(task.nonce, nonce_r)
    return new


def build_create_child(sa: IkeSa, task: CreateChild, rng: Random) -> list[Payload]:
    """RFC 7296 1.3.1: the selectors as IKE_AUTH proposes them, "dynamic" being our
    address or the virtual IPs we were assigned."""
    config = _config_of(sa, task.name)
    if config is None:
        raise NoProposalChosen(f"child config {task.name} is gone")
    if task.tsi and task.tsr:
        tsi, tsr = task.tsi, task.tsr
    else:
        tsi, tsr = initiator_selectors(sa, config, own_dynamic_addresses(sa))
    return _child_request(sa, task, config, config.mode == "transport", tsi, tsr, rng)


def process_create_child(sa: IkeSa, task: CreateChild, payloads: list[Payload]) -> ChildSa:
    """The new Child SA; raises IkeError when the peer refused."""
    return _child_response(sa, task, task.name, payloads)[0]


def build_rekey_ike(sa: IkeSa, task: RekeyIke, rng: Random) -> list[Payload]:
    assert sa.connection is not None
    task.new_spi = _new_ike_spi(rng)
    task.nonce = rng(NONCE_SIZE)
    if task.group is None:
        assert sa.chosen is not None and sa.chosen.dh is not None
        task.group = sa.chosen.dh  # the group we already agreed on
    task.ke = new_key_exchange(task.group)
    sa.rekeying = True
    proposals = tuple(p.to_proposal(i + 1, task.new_spi)
                      for i, p in enumerate(sa.connection.proposals))
    return [SaPayload(proposals), NoncePayload(task.nonce),
            KePayload(task.group, task.ke.public_value())]


def process_rekey_ike(sa: IkeSa, task: RekeyIke, payloads: list[Payload]) -> IkeSa:
    assert sa.connection is not None
    _raise_refusal(payloads, {g for p in sa.connection.proposals for g in p.dh}, task.group)
    sa_p = first_of(payloads, SaPayload)
    nonce = first_of(payloads, NoncePayload)
    ke = first_of(payloads, KePayload)
    if sa_p is None or nonce is None or ke is None or len(sa_p.proposals) != 1:
        raise InvalidSyntax("IKE rekey response lacks SA, Nonce or KE")
    proposal = sa_p.proposals[0]
    if proposal.protocol != ProtocolId.IKE or len(proposal.spi) != 8:
        raise NoProposalChosen("IKE rekey response without an 8-byte SPI")
    chosen = accept_response(proposal, sa.connection.proposals, sa.policy.legacy_algorithms)
    if task.ke is None or chosen.dh != task.ke.group or ke.group != task.ke.group:
        raise NoProposalChosen("the response's key exchange does not match ours")
    try:
        shared = task.ke.shared_secret_untrusted(ke.data)
    except ParseError as exc:
        raise InvalidSyntax(str(exc)) from None
    sa.rekey_nonce = min(task.nonce, nonce.data)
    return _successor(sa, is_initiator=True, spi_i=task.new_spi, spi_r=proposal.spi,
                      chosen=chosen, nonce_i=task.nonce, nonce_r=nonce.data, shared=shared)


def _raise_refusal(payloads: list[Payload], offered: Set[int], sent: int | None) -> None:
    for n in payloads:
        if isinstance(n, NotifyPayload) and n.notify_type < 16384:
            if n.notify_type == NotifyType.INVALID_KE_PAYLOAD and len(n.data) == 2:
                group = int.from_bytes(n.data, "big")
                # RFC 7296 1.3: a retry only with a group we offered and did not send
                if group in offered and group != sent:
                    raise InvalidKePayload(group)
                raise NoProposalChosen(f"the peer wants DH group {group}, not one we offered")
            if n.notify_type == NotifyType.TEMPORARY_FAILURE:
                raise TemporaryFailure("the peer asked us to retry later")
            if n.notify_type == NotifyType.CHILD_SA_NOT_FOUND:
                raise ChildSaNotFound("the peer does not know that Child SA")
            try:
                name = NotifyType(n.notify_type).name
            except ValueError:
                name = str(n.notify_type)
            raise NoProposalChosen(f"the peer refused with {name}")
