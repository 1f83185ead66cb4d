"""The IKE_AUTH exchange (RFC 7296 1.2, 2.15): identities, AUTH, the first Child SA."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import (
    AuthenticationFailed,
    IkeError,
    InternalAddressFailure,
    InvalidSyntax,
    NoProposalChosen,
    ParseError,
)
from .auth import (
    certreq_authority_hashes,
    choose_auth_method,
    crl_uris_of,
    load_certificate_der_untrusted,
    ocsp_uris_of,
    psk_auth_data,
    sign_auth,
    signed_octets,
    verify_auth,
    verify_certificate_chain,
    verify_psk,
)
from .child_sa import Random, initiator_selectors, install_child, new_child_spi, respond_child
from .configuration import any_address, assigned_addresses, config_request, respond_config
from .constants import AuthMethod, CertEncoding, IdType, NotifyType, ProtocolId
from .eap import EapMschapv2Server
from .eap_tls import EapTlsServer
from .events import IkeSaEstablished
from .identity import (
    Identity,
    cert_matches_identity,
    eap_identity_untrusted,
    identity_from_payload_untrusted,
)
from .ike_init import candidate_connections, notifies
from .keymat import IkeKeys, mix_ppk
from .ocsp import OcspPending
from .payloads import (
    AuthPayload,
    CertPayload,
    CertreqPayload,
    EapPayload,
    IdiPayload,
    IdrPayload,
    NotifyPayload,
    Payload,
    SaPayload,
    TsiPayload,
    TsrPayload,
    first_of,
)
from .pending import Pending
from .policy import ConnectionConfig, CrlPending, LocalAuth, RemoteAuth
from .proposals import accept_response
from .radius import EapRadiusServer, Station
from .sa import IkeSa

WallClock = Callable[[], datetime]


def _local_identity(sa: IkeSa, auth: LocalAuth) -> Identity:
    if auth.identity is not None:
        return auth.identity
    if auth.cert is not None:
        return Identity(IdType.DER_ASN1_DN, auth.cert.subject.public_bytes())
    ip = ipaddress.ip_address(sa.local[0])
    return Identity(IdType.IPV4_ADDR if ip.version == 4 else IdType.IPV6_ADDR, ip.packed)


def _sends_cert(sa: IkeSa, conn: ConnectionConfig) -> bool:
    """swanctl's send_cert: "always", "ifasked" (the peer sent a CERTREQ) or "never"."""
    return conn.send_cert == "always" or (conn.send_cert == "ifasked" and sa.peer_certreq)


def _our_auth(sa: IkeSa, auth: LocalAuth, ident: Identity, peer_ident: Identity | None,
              message: bytes, peer_nonce: bytes, keys: IkeKeys | None = None,
              certs: bool = True) -> list[Payload]:
    """CERT payloads (with `certs`, for certificate authentication) and our AUTH
    payload; `keys` when not the SA's."""
    chosen, keys = sa.chosen, keys or sa.keys
    assert chosen is not None and chosen.prf is not None and keys is not None
    sk_p = keys.sk_pi if sa.is_initiator else keys.sk_pr
    octets = signed_octets(message, peer_nonce, chosen.prf, sk_p, ident.id_type, ident.data)
    if auth.method == "psk":
        secret = sa.policy.find_psk(ident, peer_ident) if peer_ident else None
        if secret is None:
            raise AuthenticationFailed("no shared secret for this pair of identities")
        return [AuthPayload(AuthMethod.PSK, psk_auth_data(chosen.prf, secret, octets))]
    assert auth.key is not None and auth.cert is not None
    hashes = frozenset(sa.peer_hashes)
    method = choose_auth_method(auth.key, hashes)  # type: ignore[arg-type]
    out: list[Payload] = []
    if certs:
        out.append(CertPayload(CertEncoding.X509_SIGNATURE,
                               auth.cert.public_bytes(Encoding.DER)))
        out += [CertPayload(CertEncoding.X509_SIGNATURE, c.public_bytes(Encoding.DER))
                for c in auth.intermediates]
    out.append(AuthPayload(method, sign_auth(auth.key, method, octets, hashes)))  # type: ignore[arg-type]
    return out


def _verify_peer(sa: IkeSa, remote: RemoteAuth, peer_ident: Identity, id_type: int,
                 id_data: bytes, auth: AuthPayload, certs: list[CertPayload],
                 local_ident: Identity | None, message: bytes, our_nonce: bytes,
                 wall_clock: WallClock, keys: IkeKeys | None = None,
                 may_wait: bool = False) -> None:
    """Check the peer's AUTH; `keys` when they are not the SA's (a PPK mixed in).
    `may_wait`: CrlPending for CRLs its certificates name that were not fetched yet."""
    chosen, keys = sa.chosen, keys or sa.keys
    assert chosen is not None and chosen.prf is not None and keys is not None
    sk_p = keys.sk_pr if sa.is_initiator else keys.sk_pi
    octets = signed_octets(message, our_nonce, chosen.prf, sk_p, id_type, id_data)
    if auth.method == AuthMethod.PSK:
        if remote.method != "psk":
            raise AuthenticationFailed("peer used a PSK where a signature is required")
        secret = sa.policy.find_psk(local_ident, peer_ident)
        if secret is None or not verify_psk(chosen.prf, secret, octets, auth.data):
            raise AuthenticationFailed("PSK AUTH does not verify")
        return
    if remote.method != "pubkey":
        raise AuthenticationFailed("peer used a signature where a PSK is required")
    x509_certs = [c for c in certs if c.encoding == CertEncoding.X509_SIGNATURE]
    if x509_certs:
        try:
            cert = load_certificate_der_untrusted(x509_certs[0].data)
            chain = [load_certificate_der_untrusted(c.data) for c in x509_certs[1:]]
        except ParseError as exc:
            raise AuthenticationFailed(f"peer certificate: {exc}") from None
    else:  # a peer that knows we hold its certificate may leave it out (swanctl's certs)
        held = [c for c in remote.certs if cert_matches_identity(c, peer_ident)]
        if not held:
            raise AuthenticationFailed("no certificate from the peer")
        cert, chain = held[0], []
    now = wall_clock()
    if remote.certs:
        _verify_pinned(remote.certs, cert, now)
    if remote.cacerts:
        _verify_chain(sa, remote, cert, chain, now, may_wait)
    if not cert_matches_identity(cert, peer_ident):
        raise AuthenticationFailed(f"certificate does not contain identity {peer_ident}")
    key = cert.public_key()
    verify_auth(key, auth.method, auth.data, octets)  # type: ignore[arg-type]


def _verify_pinned(pinned: Sequence[x509.Certificate], cert: x509.Certificate,
                   now: datetime) -> None:
    """swanctl's certs on the remote end: the peer's certificate is one of them, and
    valid now."""
    if cert not in pinned:
        raise AuthenticationFailed(f"certificate {cert.subject.rfc4514_string()} is not "
                                   "one of the connection's certs")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AuthenticationFailed(f"certificate {cert.subject.rfc4514_string()} is not "
                                   f"valid now ({cert.not_valid_before_utc:%Y-%m-%d} to "
                                   f"{cert.not_valid_after_utc:%Y-%m-%d})")


def _verify_chain(sa: IkeSa, remote: RemoteAuth, cert: x509.Certificate,
                  chain: Sequence[x509.Certificate], now: datetime, may_wait: bool) -> None:
    """The peer's certificate chains to `remote`'s CAs and is not revoked by the CRLs we
    have (configured, fetched from `remote`'s and the chain's distribution points) or
    the OCSP answers at hand. `may_wait`: OcspPending or CrlPending first for the OCSP
    answers and CRLs the certificates name that were not fetched yet."""
    fetched, answers = sa.policy.fetched_crls, sa.policy.ocsp
    points = tuple(u for c in (cert, *chain) for u in crl_uris_of(c))
    if may_wait:
        queries = [(c, issuer, uris[0]) for c in (cert, *chain) if (uris := ocsp_uris_of(c))
                   for issuer in (*chain, *remote.cacerts) if issuer.subject == c.issuer]
        if asks := answers.missing(queries, now):
            raise OcspPending(answers, asks, now)
        if missing := fetched.missing(points, now):
            raise CrlPending(fetched, missing, now)
    crls = remote.crls + fetched.of(remote.crl_uris + points)
    verify_certificate_chain(cert, chain, remote.cacerts, now, crls,
                             lambda c: answers.verdict(c, now), remote.revocation)


def auth_lifetime(sa: IkeSa) -> tuple[float, float]:
    """(what AUTH_LIFETIME tells the peer, when the SA is deleted unless it authenticated
    anew), in seconds; (0, 0) for no limit. swanctl's reauth_time is told as it is and
    enforced a tenth later (its over_time); a RADIUS Session-Timeout (RFC 2865 5.27) is
    the end of service, so the peer is told a tenth earlier."""
    assert sa.connection is not None
    limits = []
    if sa.connection.reauth_time > 0:
        limits.append((sa.connection.reauth_time, 1.1 * sa.connection.reauth_time))
    if sa.session_timeout > 0:
        limits.append(session_limit(sa.session_timeout))
    return min(limits, key=lambda limit: limit[1]) if limits else (0.0, 0.0)


def session_limit(seconds: float) -> tuple[float, float]:
    """A RADIUS Session-Timeout as (what AUTH_LIFETIME tells, when the SA is deleted):
    the end of service, told a tenth earlier."""
    return 0.9 * seconds, seconds


def auth_lifetime_notify(told: float) -> NotifyPayload:
    """RFC 4478 3: authenticate again within this many seconds (at least one)."""
    return NotifyPayload(NotifyType.AUTH_LIFETIME, max(1, int(told)).to_bytes(4, "big"))


def _established(sa: IkeSa, initial_contact: bool = False) -> None:
    assert sa.connection is not None and sa.chosen is not None
    sa.events.append(IkeSaEstablished(
        sa.spi_i, sa.spi_r, sa.connection.name, str(sa.local_id), str(sa.remote_id),
        sa.local, sa.remote, sa.chosen.describe(), sa.nat, initial_contact,
        tuple(str(lease.address) for lease in sa.leases), sa.eap_identity, sa.own_vips,
        sa.ppk, sa.radius_classes, sa.radius_interim,
    ))


# --- responder -----------------------------------------------------------------------


def respond_auth(sa: IkeSa, payloads: list[Payload], rng: Random,
                 wall_clock: WallClock) -> tuple[list[Payload], bool]:
    """The response, and whether the IKE SA is now established (False while EAP runs)."""
    if sa.eap is not None:
        return _continue_eap(sa, sa.eap, payloads, rng)
    idi = first_of(payloads, IdiPayload)
    auth = first_of(payloads, AuthPayload)
    if idi is None:
        raise InvalidSyntax("IKE_AUTH request without IDi")
    sa.peer_certreq = first_of(payloads, CertreqPayload) is not None  # (send_cert ifasked)
    try:
        peer_ident = identity_from_payload_untrusted(idi.id_type, idi.data)
    except ParseError as exc:
        raise AuthenticationFailed(f"bad IDi: {exc}") from None
    idr = first_of(payloads, IdrPayload)
    if auth is None:  # RFC 7296 2.16: the peer authenticates with EAP
        return _start_eap(sa, payloads, idi, idr, peer_ident, rng, wall_clock), False
    certs = [p for p in payloads if isinstance(p, CertPayload)]
    ppk_id = _ppk_identity_untrusted(payloads) if sa.use_ppk else None
    no_ppk = notifies(payloads, NotifyType.NO_PPK_AUTH) if sa.use_ppk else []
    failure: IkeError = AuthenticationFailed(f"no connection accepts identity {peer_ident}")
    chosen_conn: ConnectionConfig | None = None
    mixed: IkeKeys | None = None  # the keys with the chosen connection's PPK, if any
    for conn in candidate_connections(sa.policy, sa.local, sa.remote):
        if conn.remote.method in EAP_METHODS or not conn.remote.identity.matches(peer_ident):
            continue
        local_ident = _local_identity(sa, conn.local)
        if idr is not None and (idr.id_type, idr.data) != (local_ident.id_type, local_ident.data):
            continue  # the peer asked for another identity of ours
        try:
            ppk = _ppk_for(sa, conn, ppk_id)
            mixed = None if ppk is None else _mixed(sa, ppk)
            # RFC 8784 3: without the PPK, the AUTH made without one (if the peer sent it)
            peer_auth = auth if mixed is not None or not no_ppk else \
                AuthPayload(auth.method, no_ppk[0].data)
            _verify_peer(sa, conn.remote, peer_ident, idi.id_type, idi.data, peer_auth, certs,
                         conn.local.identity, sa.init_request, sa.nonce_r, wall_clock, mixed,
                         may_wait=True)
        except AuthenticationFailed as exc:
            failure = exc
            continue
        chosen_conn = conn
        break
    if chosen_conn is None:
        raise failure
    sa.connection = chosen_conn
    sa.remote_id = peer_ident
    sa.local_id = _local_identity(sa, chosen_conn.local)
    plain = sa.keys
    assert plain is not None
    if mixed is not None:  # our AUTH, the Child SAs and rekeys all use the mixed keys
        sa.keys, sa.ppk = mixed, True
    response: list[Payload] = [IdrPayload(sa.local_id.id_type, sa.local_id.data)]
    response += _our_auth(sa, chosen_conn.local, sa.local_id, peer_ident, sa.init_response,
                          sa.nonce_i, certs=_sends_cert(sa, chosen_conn))
    if mixed is not None:
        response.append(NotifyPayload(NotifyType.PPK_IDENTITY))
    return _finish_keyed(sa, plain, chosen_conn, payloads, response, rng), True


PPK_ID_OPAQUE, PPK_ID_FIXED = 1, 2  # RFC 8784 3: the PPK_ID types


def _ppk_identity_untrusted(payloads: list[Payload]) -> bytes | None:
    """The PPK_ID of the first PPK_IDENTITY notify; None when there is none we can read
    (as strongSwan, a malformed one counts as none)."""
    found = notifies(payloads, NotifyType.PPK_IDENTITY)
    if not found:
        return None
    data = found[0].data
    if len(data) < 2 or data[0] not in (PPK_ID_OPAQUE, PPK_ID_FIXED):
        return None
    return data[1:]


def _ppk_for(sa: IkeSa, conn: ConnectionConfig, ppk_id: bytes | None) -> bytes | None:
    """The PPK this connection uses with the peer, None for none; AuthenticationFailed
    when it requires one it cannot have (RFC 8784 3, strongSwan's ppk_id/ppk_required)."""
    if not sa.use_ppk:
        if conn.ppk_required:
            raise AuthenticationFailed("PPK required, but the peer does not support PPK")
        return None
    if ppk_id is None:
        if conn.ppk_required:
            raise AuthenticationFailed("PPK required, but no PPK_IDENTITY received")
        return None
    if conn.ppk_id is not None and ppk_id != conn.ppk_id:
        raise AuthenticationFailed(f"PPK_ID {ppk_id!r} received, {conn.ppk_id!r} required")
    ppk = sa.policy.find_ppk(ppk_id)
    if ppk is None and conn.ppk_required:
        raise AuthenticationFailed(f"PPK required, but none for PPK_ID {ppk_id!r}")
    return ppk


def _our_ppk(sa: IkeSa) -> bytes | None:
    """As the initiator: the PPK we use, if the responder supports PPKs and we have one;
    AuthenticationFailed when our connection requires one it cannot have."""
    conn = sa.connection
    assert conn is not None
    if not sa.use_ppk or conn.ppk_id is None:
        if conn.ppk_required:
            raise AuthenticationFailed("PPK required, but the responder does not support "
                                       "PPK" if not sa.use_ppk else "PPK required, no ppk_id")
        return None
    return sa.policy.find_ppk(conn.ppk_id)


def _mixed(sa: IkeSa, ppk: bytes) -> IkeKeys:
    assert sa.chosen is not None and sa.chosen.prf is not None and sa.keys is not None
    return mix_ppk(sa.chosen.prf, ppk, sa.keys)


def _finish_keyed(sa: IkeSa, plain: IkeKeys, chosen_conn: ConnectionConfig,
                  payloads: list[Payload], response: list[Payload], rng: Random
                  ) -> list[Payload]:
    """`_finish`; when it parks the exchange (AddressPending: a shared pool's address),
    the SA gets back its `plain` keys, the ones of IKE_SA_INIT, for the exchange's run
    again to mix a PPK into once more."""
    try:
        return _finish(sa, chosen_conn, payloads, response, rng)
    except Pending:
        sa.keys, sa.ppk = plain, False
        raise


def _finish(sa: IkeSa, chosen_conn: ConnectionConfig, payloads: list[Payload],
            response: list[Payload], rng: Random) -> list[Payload]:
    """After both AUTHs: virtual IPs, the SA's extensions and the first Child SA, all
    from the peer's first IKE_AUTH request (`payloads`)."""
    childless = first_of(payloads, SaPayload) is None
    if childless and chosen_conn.childless == "never":  # (as strongSwan answers it)
        raise InvalidSyntax("the peer initiated a childless IKE SA (childless = never)")
    if not childless and chosen_conn.childless == "force":
        raise InvalidSyntax("the peer did not initiate a childless IKE SA (childless = force)")
    try:  # RFC 7296 2.19: CP(CFG_REPLY) follows AUTH
        config: list[Payload] = respond_config(sa, chosen_conn, payloads)
    except InternalAddressFailure as exc:
        # RFC 7296 3.10.1: no address, no Child SA; the IKE SA itself stands
        config = [NotifyPayload(exc.notify)]
    response += config
    _established(sa, bool(notifies(payloads, NotifyType.INITIAL_CONTACT)))
    if notifies(payloads, NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED):
        # RFC 6311 3: a cluster may resynchronise message IDs after a failover
        sa.mid_sync = True
        response.append(NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED))
    told, _ = auth_lifetime(sa)
    if told > 0:  # RFC 4478: authenticate again within this many seconds
        response.append(auth_lifetime_notify(told))
    if chosen_conn.mobike and notifies(payloads, NotifyType.MOBIKE_SUPPORTED):
        sa.mobike = True  # RFC 4555 3.1: the initiator may now move the SA
        response.append(NotifyPayload(NotifyType.MOBIKE_SUPPORTED))
    if sa.childless and childless:
        pass  # RFC 6023 3: an IKE SA alone; CREATE_CHILD_SA brings its Child SAs
    elif not any(isinstance(p, NotifyPayload) for p in config):
        response += respond_child(sa, chosen_conn, payloads, rng)
    return response


# --- EAP (RFC 7296 2.16) ----------------------------------------------------------------

EAP_METHODS = ("eap-mschapv2", "eap-tls", "eap-radius")
EapServer = EapMschapv2Server | EapTlsServer | EapRadiusServer


@dataclass
class EapExchange:
    """An IKE_AUTH that runs EAP: the first request, kept for the Child SA at the end."""

    server: EapServer
    first_request: list[Payload]
    idi: IdiPayload


def _start_eap(sa: IkeSa, payloads: list[Payload], idi: IdiPayload, idr: IdrPayload | None,
               peer_ident: Identity, rng: Random, wall_clock: WallClock) -> list[Payload]:
    """Our IDr, certificate and AUTH, and the first EAP request (EAP-Identity)."""
    for conn in candidate_connections(sa.policy, sa.local, sa.remote):
        if conn.remote.method not in EAP_METHODS or not conn.remote.identity.matches(peer_ident):
            continue
        local_ident = _local_identity(sa, conn.local)
        if idr is not None and (idr.id_type, idr.data) != (local_ident.id_type, local_ident.data):
            continue
        break
    else:
        raise AuthenticationFailed(f"no EAP connection accepts identity {peer_ident} "
                                   "(and it sent no AUTH)")
    sa.connection, sa.remote_id, sa.local_id = conn, peer_ident, local_ident
    eap_id = conn.remote.eap_id
    server: EapServer
    if conn.remote.method == "eap-radius":
        if sa.policy.radius is None:
            raise AuthenticationFailed("eap-radius without a [radius] server")
        station = Station(sa.local, sa.remote, int.from_bytes(sa.spi_r[:4]))
        server = EapRadiusServer(rng, sa.policy.radius, sa.policy.radius_backend, station,
                                 eap_id)
    elif conn.remote.method == "eap-tls":
        local, remote = conn.local, conn.remote
        assert local.cert is not None and local.key is not None
        server = EapTlsServer(rng, local.cert, local.key, local.intermediates,
                              lambda cert, chain, identity: _verify_tls_peer(
                                  sa, remote, cert, chain, identity, wall_clock()))
    else:
        server = EapMschapv2Server(rng, lambda user: sa.policy.find_eap_secret(user, eap_id))
    sa.eap = EapExchange(server, payloads, idi)
    response: list[Payload] = [IdrPayload(local_ident.id_type, local_ident.data)]
    response += _our_auth(sa, conn.local, local_ident, peer_ident, sa.init_response,
                          sa.nonce_i, certs=_sends_cert(sa, conn))
    return [*response, EapPayload(server.start())]


def _connection_for_groups(sa: IkeSa, conn: ConnectionConfig, server: EapRadiusServer
                           ) -> ConnectionConfig:
    """swanctl's groups, as strongSwan switches connections once the peer authenticated:
    `conn` if the RADIUS server's Access-Accept names one of its groups (`groups_of`:
    a Class attribute, or the Filter-Id of an ESP Tunnel-Type), or else the
    next connection that the authentication done fits (EAP-RADIUS, the same IDs and
    gateway credentials, the EAP identity its eap_id allows) and whose groups the user
    is in (or that names none). AuthenticationFailed when there is none."""
    assert sa.remote_id is not None
    groups = server.groups
    identity = eap_identity_untrusted(server.identity)
    candidates = candidate_connections(sa.policy, sa.local, sa.remote)
    for other in [conn, *(c for c in candidates if c is not conn)]:
        if other is not conn and (
                other.remote.method != "eap-radius" or other.local.cert != conn.local.cert
                or not other.remote.identity.matches(sa.remote_id)
                or _local_identity(sa, other.local) != sa.local_id
                or identity is None or not other.remote.eap_id.matches(identity)):
            continue
        if not other.remote.groups or groups.intersection(other.remote.groups):
            return other
    raise AuthenticationFailed(f"EAP user {server.identity!r} is in none of the groups of "
                               f"connection {conn.name!r} (the RADIUS server's: "
                               f"{sorted(groups)})")


def _verify_tls_peer(sa: IkeSa, remote: RemoteAuth, cert: x509.Certificate,
                     chain: Sequence[x509.Certificate], eap_identity: bytes,
                     now: datetime) -> None:
    """An EAP-TLS peer's certificate, checked as a pubkey peer's is (its CA, validity,
    revocation: the exchange waits for the OCSP answers and CRLs it names that were not
    fetched yet, see EapTlsServer), and its EAP identity, which eap_id must allow and
    the certificate must contain."""
    identity = eap_identity_untrusted(eap_identity)
    if identity is None or not remote.eap_id.matches(identity):
        raise AuthenticationFailed(f"EAP identity {eap_identity!r} is not allowed here")
    _verify_chain(sa, remote, cert, chain, now, may_wait=True)
    if not cert_matches_identity(cert, identity):
        raise AuthenticationFailed(f"certificate does not contain EAP identity {identity}")


def _continue_eap(sa: IkeSa, exchange: EapExchange, payloads: list[Payload],
                  rng: Random) -> tuple[list[Payload], bool]:
    server = exchange.server
    eap = first_of(payloads, EapPayload)
    if eap is not None and not server.done:
        return [EapPayload(server.process(eap.data))], False
    auth = first_of(payloads, AuthPayload)
    if auth is None or not server.done or server.msk is None:
        raise AuthenticationFailed("IKE_AUTH after EAP without the expected AUTH")
    chosen, conn = sa.chosen, sa.connection
    assert chosen is not None and chosen.prf is not None and sa.keys is not None
    assert conn is not None and sa.local_id is not None
    if isinstance(server, EapRadiusServer) and conn.remote.groups:
        conn = sa.connection = _connection_for_groups(sa, conn, server)
    # RFC 8784 3 with EAP (as strongSwan does it): PPK_IDENTITY and NO_PPK_AUTH come
    # with the AUTH after EAP, and the PPK goes into these AUTHs only (our first AUTH
    # was made before we knew it)
    ppk = _ppk_for(sa, conn, _ppk_identity_untrusted(payloads) if sa.use_ppk else None)
    keys = sa.keys if ppk is None else _mixed(sa, ppk)
    no_ppk = notifies(payloads, NotifyType.NO_PPK_AUTH) if sa.use_ppk else []
    peer_auth = no_ppk[0].data if ppk is None and no_ppk else auth.data
    # RFC 7296 2.16: both AUTH payloads are computed with the EAP method's MSK
    octets = signed_octets(sa.init_request, sa.nonce_r, chosen.prf, keys.sk_pi,
                           exchange.idi.id_type, exchange.idi.data)
    if not verify_psk(chosen.prf, server.msk, octets, peer_auth):
        raise AuthenticationFailed("AUTH with the EAP key does not verify")
    ours = signed_octets(sa.init_response, sa.nonce_i, chosen.prf, keys.sk_pr,
                         sa.local_id.id_type, sa.local_id.data)
    response: list[Payload] = [AuthPayload(AuthMethod.PSK,
                                           psk_auth_data(chosen.prf, server.msk, ours))]
    plain = sa.keys
    if ppk is not None:  # the Child SAs and rekeys use the mixed keys too
        sa.keys, sa.ppk = keys, True
        response.append(NotifyPayload(NotifyType.PPK_IDENTITY))
    sa.eap_identity = server.identity.decode("utf-8", errors="replace")
    if isinstance(server, EapRadiusServer):
        sa.framed_addresses, sa.radius_classes = server.addresses, server.classes
        sa.radius_attributes = server.config_attributes
        sa.session_timeout, sa.radius_interim = server.session_timeout, server.interim_interval
    response = _finish_keyed(sa, plain, conn, exchange.first_request, response, rng)
    sa.eap = None  # (after: a parked exchange runs this again)
    return response, True


# --- initiator -----------------------------------------------------------------------


def build_auth_request(sa: IkeSa, rng: Random) -> list[Payload]:
    conn = sa.connection
    assert conn is not None
    sa.local_id = _local_identity(sa, conn.local)
    peer = conn.remote.identity
    payloads: list[Payload] = [IdiPayload(sa.local_id.id_type, sa.local_id.data)]
    if conn.remote.method == "pubkey" and conn.remote.cacerts and conn.send_certreq:
        payloads.append(CertreqPayload(CertEncoding.X509_SIGNATURE,
                                       certreq_authority_hashes(conn.remote.cacerts)))
    if not peer.any and peer.identity is not None:
        payloads.append(IdrPayload(peer.identity.id_type, peer.identity.data))
    ppk = _our_ppk(sa)
    auth = _our_auth(sa, conn.local, sa.local_id, peer.identity, sa.init_request, sa.nonce_r,
                     None if ppk is None else _mixed(sa, ppk), _sends_cert(sa, conn))
    # CERT payloads go before AUTH, after IDi (RFC 7296 1.2 ordering)
    payloads[1:1] = [p for p in auth if isinstance(p, CertPayload)]
    payloads += [p for p in auth if isinstance(p, AuthPayload)]
    if ppk is not None and conn.ppk_id is not None:  # RFC 8784 3
        payloads.append(NotifyPayload(NotifyType.PPK_IDENTITY,
                                      bytes([PPK_ID_FIXED]) + conn.ppk_id))
        if not conn.ppk_required:  # a responder without the PPK may check this one
            (plain,) = [p for p in _our_auth(sa, conn.local, sa.local_id, peer.identity,
                                             sa.init_request, sa.nonce_r)
                        if isinstance(p, AuthPayload)]
            payloads.append(NotifyPayload(NotifyType.NO_PPK_AUTH, plain.data))
    if sa.initial_contact:
        payloads.append(NotifyPayload(NotifyType.INITIAL_CONTACT))
    payloads.append(NotifyPayload(NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED))  # RFC 6311 3
    if conn.vips:  # RFC 7296 2.19: CP(CFG_REQUEST) before the Child SA's payloads
        payloads.append(config_request(conn.vips, sa.wanted_vips))
    if conn.childless == "force":
        # RFC 6023 3: no SA and no selectors; CREATE_CHILD_SA brings every Child SA
        if not sa.childless:
            raise NoProposalChosen("the responder does not support childless IKE SAs "
                                   "(childless = force)")
        return payloads
    child = conn.children[0]
    sa.pending_child_spi = new_child_spi(sa, rng)
    if child.mode == "transport":
        payloads.append(NotifyPayload(NotifyType.USE_TRANSPORT_MODE))
    ours = [sa.local[0]]
    if conn.vips:
        ours = [any_address(family) for family in conn.vips]
    tsi, tsr = initiator_selectors(sa, child, ours)
    payloads += [
        SaPayload(tuple(p.to_proposal(i + 1, sa.pending_child_spi, key_exchange=False)
                        for i, p in enumerate(child.esp_proposals))),
        TsiPayload(tsi),
        TsrPayload(tsr),
    ]
    return payloads


def process_auth_response(sa: IkeSa, payloads: list[Payload], wall_clock: WallClock) -> None:
    conn = sa.connection
    assert conn is not None
    for n in payloads:
        if isinstance(n, NotifyPayload) and n.notify_type == NotifyType.AUTHENTICATION_FAILED:
            raise AuthenticationFailed("responder refused our authentication")
    idr = first_of(payloads, IdrPayload)
    auth = first_of(payloads, AuthPayload)
    if idr is None or auth is None:
        raise AuthenticationFailed("IKE_AUTH response lacks IDr or AUTH")
    try:
        peer_ident = identity_from_payload_untrusted(idr.id_type, idr.data)
    except ParseError as exc:
        raise AuthenticationFailed(f"bad IDr: {exc}") from None
    if not conn.remote.identity.matches(peer_ident):
        raise AuthenticationFailed(f"responder identity {peer_ident} is not the one configured")
    certs = [p for p in payloads if isinstance(p, CertPayload)]
    ppk = _our_ppk(sa)
    if ppk is not None and not notifies(payloads, NotifyType.PPK_IDENTITY):
        if conn.ppk_required:  # RFC 8784 3: the responder did not use our PPK
            raise AuthenticationFailed("PPK required, but the responder did not use it")
        ppk = None
    keys = None if ppk is None else _mixed(sa, ppk)
    _verify_peer(sa, conn.remote, peer_ident, idr.id_type, idr.data, auth, certs,
                 sa.local_id, sa.init_response, sa.nonce_i, wall_clock, keys)
    if keys is not None:
        sa.keys, sa.ppk = keys, True
    sa.remote_id = peer_ident
    sa.mid_sync = bool(notifies(payloads, NotifyType.IKEV2_MESSAGE_ID_SYNC_SUPPORTED))
    if conn.vips:
        sa.own_vips = assigned_addresses(payloads)
    _established(sa)
    if conn.childless == "force":
        return  # RFC 6023: no Child SA in IKE_AUTH
    refused = [n for n in payloads if isinstance(n, NotifyPayload) and n.notify_type < 16384]
    sa_p = first_of(payloads, SaPayload)
    tsi = first_of(payloads, TsiPayload)
    tsr = first_of(payloads, TsrPayload)
    if refused or sa_p is None or tsi is None or tsr is None or len(sa_p.proposals) != 1:
        return  # the IKE SA stands without a Child SA (RFC 7296 2.21.3)
    proposal = sa_p.proposals[0]
    if proposal.protocol != ProtocolId.ESP or len(proposal.spi) != 4:
        return
    child = conn.children[0]
    try:
        chosen = accept_response(proposal, child.esp_proposals, sa.policy.legacy_algorithms,
                                 key_exchange=False)
    except NoProposalChosen:
        return  # a choice we did not offer: install nothing (the IKE SA itself is fine)
    transport = bool(notifies(payloads, NotifyType.USE_TRANSPORT_MODE))
    install_child(sa, child.name, "transport" if transport else "tunnel",
                  sa.pending_child_spi, proposal.spi, chosen,
                  sa.nonce_i, sa.nonce_r, tsi.selectors, tsr.selectors)

