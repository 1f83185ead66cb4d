"""The IKE_SA_INIT exchange (RFC 7296 1.2), NAT detection (2.23) and IKE key setup."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidKePayload, InvalidSyntax, NoProposalChosen, ParseError, Redirected
from ..key_exchange import ExponentialPool, new_key_exchange
from ..transforms import sha1
from ..wire import packed_address
from .auth import certreq_authority_hashes, supported_hash_algorithms
from .constants import CertEncoding, NotifyType, ProtocolId
from .events import Address
from .keymat import derive_ike_keys, skeyseed
from .message import SkProtection
from .payloads import (
    CertreqPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    SaPayload,
    first_of,
)
from .policy import ConnectionConfig, ResponderPolicy
from .proposals import accept_response, chosen_to_proposal, select_proposal
from .sa import IkeSa

NONCE_SIZE = 32
Random = Callable[[int], bytes]


def nat_hash(spi_i: bytes, spi_r: bytes, addr: Address) -> bytes:
    """SHA-1(SPIi | SPIr | IP | port) (RFC 7296 2.23)."""
    return sha1(spi_i + spi_r + packed_address(addr[0]) + addr[1].to_bytes(2, "big"))


def _address_matches(addr: str, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    ip = ipaddress.ip_address(addr)
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def candidate_connections(policy: ResponderPolicy, local: Address,
                          remote: Address) -> list[ConnectionConfig]:
    return [c for c in policy.connections
            if c.version == 2 and _address_matches(local[0], c.local_addrs)
            and _address_matches(remote[0], c.remote_addrs)]


def notifies(payloads: list[Payload], notify_type: int) -> list[NotifyPayload]:
    return [p for p in payloads if isinstance(p, NotifyPayload) and p.notify_type == notify_type]


def _hash_algorithms_untrusted(payloads: list[Payload]) -> frozenset[int]:
    found: set[int] = set()
    for n in notifies(payloads, NotifyType.SIGNATURE_HASH_ALGORITHMS):
        data = n.data
        found.update(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data) - 1, 2))
    return frozenset(found)


_HASH_ALGORITHMS = b"".join(int(h).to_bytes(2, "big") for h in supported_hash_algorithms())


def _hash_algorithms_notify() -> NotifyPayload:
    return NotifyPayload(NotifyType.SIGNATURE_HASH_ALGORITHMS, _HASH_ALGORITHMS)


def _detect_nat(sa: IkeSa, payloads: list[Payload], spi_r_in_message: bytes) -> None:
    """Compare the peer's NAT_DETECTION hashes with what we see (RFC 7296 2.23)."""
    sources = notifies(payloads, NotifyType.NAT_DETECTION_SOURCE_IP)
    destinations = notifies(payloads, NotifyType.NAT_DETECTION_DESTINATION_IP)
    if not sources or not destinations:
        return
    seen_source = nat_hash(sa.spi_i, spi_r_in_message, sa.remote)
    seen_dest = nat_hash(sa.spi_i, spi_r_in_message, sa.local)
    sa.nat_remote = sa.nat_remote or seen_source not in [n.data for n in sources]
    sa.behind_nat = seen_dest not in [n.data for n in destinations]
    sa.nat_local = sa.nat_local or sa.behind_nat


def _nat_notifies(sa: IkeSa, spi_r: bytes, fake_source: bool) -> list[Payload]:
    source = os.urandom(20) if fake_source else nat_hash(sa.spi_i, spi_r, sa.local)
    return [
        NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, source),
        NotifyPayload(NotifyType.NAT_DETECTION_DESTINATION_IP, nat_hash(sa.spi_i, spi_r,
                                                                        sa.remote)),
    ]


def _setup_keys(sa: IkeSa, shared: bytes) -> None:
    chosen = sa.chosen
    assert chosen is not None and chosen.prf is not None
    seed = skeyseed(chosen.prf, sa.nonce_i, sa.nonce_r, shared)
    keys = derive_ike_keys(chosen.prf, chosen.encr, chosen.integ, seed, sa.nonce_i, sa.nonce_r,
                           sa.spi_i, sa.spi_r)
    sa.keys = keys
    if sa.is_initiator:
        sa.sk = SkProtection(chosen.encr, chosen.integ, keys.sk_ei, keys.sk_ai, keys.sk_er,
                             keys.sk_ar)
    else:
        sa.sk = SkProtection(chosen.encr, chosen.integ, keys.sk_er, keys.sk_ar, keys.sk_ei,
                             keys.sk_ai)


# --- responder -----------------------------------------------------------------------


def respond_init(sa: IkeSa, payloads: list[Payload], rng: Random,
                 exponentials: ExponentialPool | None = None, now: float = 0.0
                 ) -> list[Payload]:
    """Process an IKE_SA_INIT request and build the response payloads; IkeError on refusal.

    With `exponentials`, our DH value may be one shared with other recent SAs (RFC 7296
    2.12); the SA records which in `sa.exponential` and keeps no reference to it."""
    sa_p = first_of(payloads, SaPayload)
    ke = first_of(payloads, KePayload)
    nonce = first_of(payloads, NoncePayload)
    if sa_p is None or ke is None or nonce is None:
        raise InvalidSyntax("IKE_SA_INIT request lacks SA, KE or Nonce")
    sa.redirect_supported = bool(notifies(payloads, NotifyType.REDIRECT_SUPPORTED))
    if sa.redirect_to and sa.redirect_supported:  # RFC 5685 4: go there, with your nonce
        raise Redirected(redirect_data(sa.redirect_to, nonce.data), sa.redirect_to)
    connections = candidate_connections(sa.policy, sa.local, sa.remote)
    configured = [p for c in connections for p in c.proposals]
    if not configured:
        raise NoProposalChosen("no connection for this address pair")
    proposal, chosen = select_proposal(sa_p.proposals, configured, ke_group=ke.group,
                                       legacy_allowed=sa.policy.legacy_algorithms)
    if proposal.spi:
        raise InvalidSyntax("IKE_SA_INIT proposal carries an SPI")
    assert chosen.dh is not None
    sa.chosen = chosen
    if exponentials is None:
        ours = new_key_exchange(chosen.dh)
    else:
        ours, sa.exponential = exponentials.take(chosen.dh, now)
    try:
        shared = ours.shared_secret_untrusted(ke.data)
    except ParseError:
        raise InvalidKePayload(chosen.dh) from None  # RFC 6989: an invalid value is refused
    sa.nonce_i = nonce.data
    sa.nonce_r = rng(NONCE_SIZE)
    sa.peer_hashes = _hash_algorithms_untrusted(payloads)
    _detect_nat(sa, payloads, bytes(8))
    encap = any(c.encap for c in connections)
    sa.nat_local = sa.nat_local or encap
    _setup_keys(sa, shared)
    response: list[Payload] = [
        SaPayload((chosen_to_proposal(proposal.number, ProtocolId.IKE, b"", chosen),)),
        KePayload(chosen.dh, ours.public_value()),
        NoncePayload(sa.nonce_r),
        *_nat_notifies(sa, sa.spi_r, fake_source=encap),
    ]
    cacerts = [ca for c in connections if c.remote.method == "pubkey" and c.send_certreq
               for ca in c.remote.cacerts]
    if cacerts:
        response.append(CertreqPayload(CertEncoding.X509_SIGNATURE,
                                       certreq_authority_hashes(cacerts)))
    if sa.peer_hashes:  # RFC 7427 4: announce only to a peer that announced
        response.append(_hash_algorithms_notify())
    if notifies(payloads, NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) \
            and any(c.fragmentation != "no" for c in connections):  # RFC 7383 2.3
        sa.fragmentation = True
        response.append(NotifyPayload(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
    # RFC 6023 3: announced to every initiator a connection takes childless (strongSwan's
    # childless = force sends nothing itself and waits for it); a status notify others
    # ignore
    if any(c.childless != "never" for c in connections):
        sa.childless = True
        response.append(NotifyPayload(NotifyType.CHILDLESS_IKEV2_SUPPORTED))
    if notifies(payloads, NotifyType.USE_PPK) and sa.policy.has_ppk:  # RFC 8784 3
        sa.use_ppk = True
        response.append(NotifyPayload(NotifyType.USE_PPK))
    return response


# --- initiator -----------------------------------------------------------------------


def redirect_data(gateway: str, nonce: bytes = b"") -> bytes:
    """REDIRECT notification data (RFC 5685 9.2): the new gateway as an IPv4 or IPv6
    address or an FQDN, then (in an IKE_SA_INIT response) the initiator's nonce."""
    try:
        address = ipaddress.ip_address(gateway)
    except ValueError:
        ident = gateway.encode("idna")
        kind = 3  # FQDN
    else:
        ident = address.packed
        kind = 1 if address.version == 4 else 2
    if not 0 < len(ident) < 256:
        raise ValueError(f"{gateway!r} is not a gateway address or name")
    return bytes([kind, len(ident)]) + ident + nonce


def build_init_request(sa: IkeSa, group: int, rng: Random, cookie: bytes = b"") -> list[Payload]:
    conn = sa.connection
    assert conn is not None
    if not sa.nonce_i:
        sa.nonce_i = rng(NONCE_SIZE)
    sa.ke = new_key_exchange(group)
    proposals = tuple(p.to_proposal(i + 1, b"") for i, p in enumerate(conn.proposals))
    payloads: list[Payload] = []
    if cookie:
        payloads.append(NotifyPayload(NotifyType.COOKIE, cookie))
    payloads += [
        SaPayload(proposals),
        KePayload(group, sa.ke.public_value()),
        NoncePayload(sa.nonce_i),
        *_nat_notifies(sa, bytes(8), fake_source=conn.encap),
        *([NotifyPayload(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED)]
          if conn.fragmentation != "no" else []),
        _hash_algorithms_notify(),
    ]
    if conn.ppk_id is not None or conn.ppk_required:  # RFC 8784 3
        payloads.append(NotifyPayload(NotifyType.USE_PPK))
    sa.nat_local = conn.encap
    return payloads


@dataclass(frozen=True, slots=True)
class InitRetry:
    group: int
    cookie: bytes


def process_init_response(sa: IkeSa, spi_r: bytes,
                          payloads: list[Payload]) -> InitRetry | None:
    """Absorb the responder's IKE_SA_INIT answer; a retry when it asked for one."""
    conn = sa.connection
    assert conn is not None
    for n in notifies(payloads, NotifyType.COOKIE):
        return InitRetry(sa.ke.group if sa.ke else 0, n.data)
    for n in notifies(payloads, NotifyType.INVALID_KE_PAYLOAD):
        if len(n.data) != 2:
            raise InvalidSyntax("INVALID_KE_PAYLOAD without a group")
        group = int.from_bytes(n.data, "big")
        offered = {g for p in conn.proposals for g in p.dh}
        if group not in offered or (sa.ke is not None and group == sa.ke.group):
            raise NoProposalChosen(f"responder wants DH group {group}, which we did not offer")
        return InitRetry(group, b"")
    errors = [p for p in payloads if isinstance(p, NotifyPayload) and p.notify_type < 16384]
    if errors:
        raise NoProposalChosen(f"responder refused with notify {errors[0].notify_type}")
    sa_p = first_of(payloads, SaPayload)
    ke = first_of(payloads, KePayload)
    nonce = first_of(payloads, NoncePayload)
    if sa_p is None or ke is None or nonce is None or len(sa_p.proposals) != 1:
        raise InvalidSyntax("IKE_SA_INIT response lacks SA, KE or Nonce")
    proposal = sa_p.proposals[0]
    if proposal.protocol != ProtocolId.IKE or proposal.spi:
        raise NoProposalChosen("IKE_SA_INIT response with a non-IKE proposal")
    chosen = accept_response(proposal, conn.proposals, sa.policy.legacy_algorithms)
    assert sa.ke is not None
    if chosen.dh != sa.ke.group or ke.group != sa.ke.group or chosen.prf is None:
        raise NoProposalChosen("responder chose another key exchange")
    sa.spi_r = spi_r
    sa.chosen = chosen
    sa.nonce_r = nonce.data
    sa.peer_hashes = _hash_algorithms_untrusted(payloads)
    sa.peer_certreq = first_of(payloads, CertreqPayload) is not None
    sa.fragmentation = conn.fragmentation != "no" and \
        bool(notifies(payloads, NotifyType.IKEV2_FRAGMENTATION_SUPPORTED))
    sa.childless = bool(notifies(payloads, NotifyType.CHILDLESS_IKEV2_SUPPORTED))
    sa.use_ppk = bool(notifies(payloads, NotifyType.USE_PPK)) and \
        (conn.ppk_id is not None or conn.ppk_required)
    _detect_nat(sa, payloads, spi_r)
    try:
        shared = sa.ke.shared_secret_untrusted(ke.data)
    except ParseError as exc:
        raise InvalidSyntax(str(exc)) from None
    _setup_keys(sa, shared)
    return None
