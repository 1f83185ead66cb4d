"""IKE SA authentication: AUTH payload data (RFC 7296 2.15, RFC 7427) and certificate paths.

Signatures cover `signed_octets(...)`. Classic methods (1 RSA_SIG, 9/10/11 ECDSA) fix the hash
by the method; RFC 7427 method 14 prefixes the signature with the DER AlgorithmIdentifier it
used, which we compare as a blob against the ones we know (RFC 7427 section 3 allows this).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import AuthorityInformationAccessOID

from ..errors import AuthenticationFailed, ParseError
from .constants import AuthMethod, HashAlgorithm

Prf = Callable[[bytes, bytes], bytes]
PrivateKey = RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey
PublicKey = RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey

MAX_CHAIN_DEPTH = 8
_ExtensionValue = TypeVar("_ExtensionValue", bound=x509.ExtensionType)
# What cryptography raises for malformed certificates (some parts decode lazily, on access).
_CERT_ERRORS = (
    ValueError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    CryptographyDeprecationWarning,
    # a Name attribute whose ASN.1 type the library refuses for its OID (e.g. a
    # commonName encoded as a BIT STRING): TypeError, when the name is first read
    TypeError,
)
_KEY_PAD = b"Key Pad for IKEv2"  # RFC 7296 2.15


# --- what is signed, and shared keys ----------------------------------------------


def signed_octets(
    message: bytes, peer_nonce: bytes, prf: Prf, sk_p: bytes, id_type: int, id_data: bytes
) -> bytes:
    """RFC 7296 2.15: the whole first/second message | peer's nonce | prf(SK_px, ID')."""
    id_body = bytes((id_type, 0, 0, 0)) + id_data  # ID payload body: type, 3 reserved octets
    return message + peer_nonce + prf(sk_p, id_body)


def psk_auth_data(prf: Prf, secret: bytes, octets: bytes) -> bytes:
    return prf(_padded_secret(prf, secret), octets)


@functools.lru_cache(maxsize=256)
def _padded_secret(prf: Prf, secret: bytes) -> bytes:
    """prf(Shared Secret, "Key Pad for IKEv2"): the same for every SA of a secret."""
    return prf(secret, _KEY_PAD)


def verify_psk(prf: Prf, secret: bytes, octets: bytes, auth_data: bytes) -> bool:
    return hmac.compare_digest(psk_auth_data(prf, secret, octets), auth_data)


# --- signature schemes -------------------------------------------------------------


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = (n.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + n.to_bytes(size, "big") + body


def _der_oid(dotted: str) -> bytes:
    first, second, *rest = (int(arc) for arc in dotted.split("."))
    body = bytearray()
    for arc in (40 * first + second, *rest):
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _algorithm_id(oid: str, *params: bytes) -> bytes:
    return _der(0x30, _der_oid(oid) + b"".join(params))


_NULL = b"\x05\x00"
_HASH_OIDS = {
    HashAlgorithm.SHA2_256: "2.16.840.1.101.3.4.2.1",
    HashAlgorithm.SHA2_384: "2.16.840.1.101.3.4.2.2",
    HashAlgorithm.SHA2_512: "2.16.840.1.101.3.4.2.3",
}
_DIGESTS: dict[HashAlgorithm, Callable[[], hashes.HashAlgorithm]] = {
    HashAlgorithm.SHA2_256: hashes.SHA256,
    HashAlgorithm.SHA2_384: hashes.SHA384,
    HashAlgorithm.SHA2_512: hashes.SHA512,
}
_SHA2 = tuple(_HASH_OIDS)


@dataclass(frozen=True, slots=True)
class _Scheme:
    key: str  # "rsa", "rsa-pss", "ecdsa" or "ed25519"
    hash: HashAlgorithm
    algorithm_id: bytes  # DER AlgorithmIdentifier, as carried in method 14 AUTH data


def _pss_algorithm_id(h: HashAlgorithm, *hash_params: bytes) -> bytes:
    # RFC 4055 RSASSA-PSS-params: [0] hash, [1] MGF1 over the same hash, [2] salt = hash size
    hash_id = _algorithm_id(_HASH_OIDS[h], *hash_params)
    params = _der(
        0x30,
        _der(0xA0, hash_id)
        + _der(0xA1, _algorithm_id("1.2.840.113549.1.1.8", hash_id))
        + _der(0xA2, _der(0x02, bytes((_DIGESTS[h]().digest_size,)))),
    )
    return _algorithm_id("1.2.840.113549.1.1.10", params)


_RSA_PKCS1_OIDS = {  # sha256/384/512WithRSAEncryption
    HashAlgorithm.SHA2_256: "1.2.840.113549.1.1.11",
    HashAlgorithm.SHA2_384: "1.2.840.113549.1.1.12",
    HashAlgorithm.SHA2_512: "1.2.840.113549.1.1.13",
}
_ECDSA_OIDS = {  # ecdsa-with-SHA256/384/512
    HashAlgorithm.SHA2_256: "1.2.840.10045.4.3.2",
    HashAlgorithm.SHA2_384: "1.2.840.10045.4.3.3",
    HashAlgorithm.SHA2_512: "1.2.840.10045.4.3.4",
}
# What we send: parameters as the algorithm specifications prefer (RFC 7427 section 3).
_RSA_PKCS1 = {h: _Scheme("rsa", h, _algorithm_id(oid, _NULL)) for h, oid in _RSA_PKCS1_OIDS.items()}
_ECDSA = {h: _Scheme("ecdsa", h, _algorithm_id(oid)) for h, oid in _ECDSA_OIDS.items()}
_ED25519 = _Scheme("ed25519", HashAlgorithm.IDENTITY, _algorithm_id("1.3.101.112"))  # RFC 8420

# What we accept: the above, RSA PKCS#1 with absent parameters, and RSASSA-PSS as strongSwan
# and libreswan encode it (hash parameters NULL or absent, salt length = hash length).
_ACCEPTED: dict[bytes, _Scheme] = {
    s.algorithm_id: s for s in (*_RSA_PKCS1.values(), *_ECDSA.values(), _ED25519)
}
for _h, _oid in _RSA_PKCS1_OIDS.items():
    _ACCEPTED[_algorithm_id(_oid)] = _RSA_PKCS1[_h]
    for _params in ((_NULL,), ()):
        _pss = _pss_algorithm_id(_h, *_params)
        _ACCEPTED[_pss] = _Scheme("rsa-pss", _h, _pss)

# RFC 7296 3.8 / RFC 4754: classic ECDSA methods fix curve and hash; signature is r | s.
_CLASSIC_ECDSA = {
    AuthMethod.ECDSA_SHA256_P256: ("secp256r1", HashAlgorithm.SHA2_256, 32),
    AuthMethod.ECDSA_SHA384_P384: ("secp384r1", HashAlgorithm.SHA2_384, 48),
    AuthMethod.ECDSA_SHA512_P521: ("secp521r1", HashAlgorithm.SHA2_512, 66),
}
# Our hash preference per EC curve: the hash matching the curve's strength first.
_EC_HASH_ORDER = {
    "secp256r1": (HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512),
    "secp384r1": (HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_512, HashAlgorithm.SHA2_256),
    "secp521r1": (HashAlgorithm.SHA2_512, HashAlgorithm.SHA2_384, HashAlgorithm.SHA2_256),
}


def supported_hash_algorithms() -> tuple[HashAlgorithm, ...]:
    """What we announce in SIGNATURE_HASH_ALGORITHMS (RFC 7427 section 4)."""
    return (*_SHA2, HashAlgorithm.IDENTITY)


def _pick_scheme(key: PrivateKey, peer_hashes: frozenset[HashAlgorithm]) -> _Scheme | None:
    """RFC 7427 section 4: sign with a hash the peer announced."""
    if isinstance(key, Ed25519PrivateKey):
        return _ED25519 if HashAlgorithm.IDENTITY in peer_hashes else None
    if isinstance(key, RSAPrivateKey):
        order, table = _SHA2, _RSA_PKCS1
    else:
        order, table = _EC_HASH_ORDER.get(key.curve.name, ()), _ECDSA
    return next((table[h] for h in order if h in peer_hashes), None)


def choose_auth_method(key: PrivateKey, peer_hashes: frozenset[HashAlgorithm]) -> AuthMethod:
    if peer_hashes and _pick_scheme(key, peer_hashes) is not None:
        return AuthMethod.DIGITAL_SIGNATURE
    if isinstance(key, RSAPrivateKey):
        return AuthMethod.RSA_SIG
    if isinstance(key, ec.EllipticCurvePrivateKey):
        for method, (curve, _, _) in _CLASSIC_ECDSA.items():
            if key.curve.name == curve:
                return method
        raise AuthenticationFailed(f"no IKEv2 signature method for curve {key.curve.name}")
    raise AuthenticationFailed("Ed25519 needs RFC 7427 and the peer did not announce IDENTITY")


def sign_auth(
    key: PrivateKey, method: AuthMethod, octets: bytes, peer_hashes: frozenset[HashAlgorithm]
) -> bytes:
    """AUTH payload data for `method`; ValueError if the method does not fit the key."""
    if method == AuthMethod.DIGITAL_SIGNATURE:
        scheme = _pick_scheme(key, peer_hashes)
        if scheme is None:
            raise ValueError("no RFC 7427 signature algorithm shared with the peer")
        signature = _sign(key, scheme, octets)
        return bytes((len(scheme.algorithm_id),)) + scheme.algorithm_id + signature
    if method == AuthMethod.RSA_SIG and isinstance(key, RSAPrivateKey):
        return key.sign(octets, padding.PKCS1v15(), hashes.SHA1())  # RFC 7296 3.8
    classic = _CLASSIC_ECDSA.get(method)
    if classic and isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == classic[0]:
        _, hash_alg, size = classic
        r, s = decode_dss_signature(key.sign(octets, ec.ECDSA(_DIGESTS[hash_alg]())))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    raise ValueError(f"cannot sign AUTH method {method!r} with {type(key).__name__}")


def _sign(key: PrivateKey, scheme: _Scheme, octets: bytes) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(octets)
    if isinstance(key, RSAPrivateKey):
        return key.sign(octets, padding.PKCS1v15(), _DIGESTS[scheme.hash]())
    return key.sign(octets, ec.ECDSA(_DIGESTS[scheme.hash]()))  # DER, as in X.509


def verify_auth(public_key: PublicKey, method: int, auth_data: bytes, octets: bytes) -> None:
    """Check a peer's AUTH data; raises AuthenticationFailed and nothing else."""
    try:
        _verify(public_key, method, auth_data, octets)
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        raise AuthenticationFailed(f"AUTH method {method} signature does not verify") from None


def _verify(public_key: PublicKey, method: int, auth_data: bytes, octets: bytes) -> None:
    if method == AuthMethod.DIGITAL_SIGNATURE:
        scheme, signature = _split_digital_signature(auth_data)
        _verify_scheme(public_key, scheme, signature, octets)
    elif method == AuthMethod.RSA_SIG:
        if not isinstance(public_key, RSAPublicKey):
            raise AuthenticationFailed("RSA_SIG AUTH but the peer's key is not RSA")
        public_key.verify(auth_data, octets, padding.PKCS1v15(), hashes.SHA1())
    elif method in _CLASSIC_ECDSA:
        curve, hash_alg, size = _CLASSIC_ECDSA[AuthMethod(method)]
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != curve:
            raise AuthenticationFailed(f"AUTH method {method} needs a {curve} key")
        if len(auth_data) != 2 * size:
            raise AuthenticationFailed(f"ECDSA AUTH data is {len(auth_data)} bytes, not {2 * size}")
        r = int.from_bytes(auth_data[:size], "big")
        s = int.from_bytes(auth_data[size:], "big")
        der = encode_dss_signature(r, s)
        public_key.verify(der, octets, ec.ECDSA(_DIGESTS[hash_alg]()))
    else:
        raise AuthenticationFailed(f"AUTH method {method} is not a signature method we support")


def _split_digital_signature(auth_data: bytes) -> tuple[_Scheme, bytes]:
    """RFC 7427 section 3: 1-octet length | AlgorithmIdentifier | signature value."""
    if not auth_data:
        raise AuthenticationFailed("empty AUTH data")
    end = 1 + auth_data[0]
    algorithm_id, signature = auth_data[1:end], auth_data[end:]
    if len(auth_data) < end or not signature:
        raise AuthenticationFailed("AUTH data ends inside the AlgorithmIdentifier")
    scheme = _ACCEPTED.get(algorithm_id)
    if scheme is None:
        raise AuthenticationFailed(f"unsupported signature algorithm {algorithm_id.hex()}")
    return scheme, signature


def _verify_scheme(public_key: PublicKey, scheme: _Scheme, signature: bytes, data: bytes) -> None:
    if scheme.key == "ed25519" and isinstance(public_key, Ed25519PublicKey):
        public_key.verify(signature, data)
    elif scheme.key == "ecdsa" and isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(_DIGESTS[scheme.hash]()))
    elif scheme.key == "rsa" and isinstance(public_key, RSAPublicKey):
        public_key.verify(signature, data, padding.PKCS1v15(), _DIGESTS[scheme.hash]())
    elif scheme.key == "rsa-pss" and isinstance(public_key, RSAPublicKey):
        digest = _DIGESTS[scheme.hash]()
        pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        public_key.verify(signature, data, pss, digest)
    else:
        raise AuthenticationFailed(
            f"{scheme.key} signature does not fit the peer's {type(public_key).__name__}"
        )


# --- certificates ------------------------------------------------------------------


def load_certificate_der_untrusted(data: bytes) -> x509.Certificate:
    """Decode a CERT payload's X.509 certificate, touching the lazily parsed parts now."""
    try:
        with warnings.catch_warnings():
            # e.g. a non-positive serial number: a warning today, an error in later releases
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(data)
    except _CERT_ERRORS as exc:
        raise ParseError(f"certificate does not decode: {exc}") from None
    decode_certificate_fields(cert)
    return cert


def decode_certificate_fields(cert: x509.Certificate) -> None:
    """Decode the parts cryptography parses on first use (names, extensions, key,
    validity), so a malformed one raises ParseError here and not in later use."""
    try:
        _ = (cert.extensions, cert.subject, cert.issuer, cert.public_key())
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc)
    except _CERT_ERRORS as exc:
        raise ParseError(f"certificate does not decode: {exc}") from None


# a certificate -> "good", why it is revoked, or None (the CRLs decide): OCSP's answer
Verdict = Callable[[x509.Certificate], "str | None"]
OCSP_GOOD = "good"
# swanctl's revocation on a remote end: what a certificate whose status neither OCSP nor
# a current CRL of its issuer confirms gets. "relaxed" (the default) accepts it, "ifuri"
# only if it names no CRL distribution point or OCSP responder, "strict" never
Revocation = Literal["relaxed", "ifuri", "strict"]


def verify_certificate_chain(
    end_entity: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    trust_anchors: Sequence[x509.Certificate],
    now: datetime,
    crls: Sequence[x509.CertificateRevocationList] = (),
    ocsp: Verdict | None = None,
    revocation: Revocation = "relaxed",
) -> None:
    """Find a path end_entity -> intermediates* -> a trust anchor, or raise with a reason.

    A certificate on the path that a CRL of its issuer (signed by that issuer) lists is
    revoked, as strongSwan's revocation plugin decides with its CRLs; a stale CRL still
    counts, as strongSwan's default (strictcrlpolicy = no) has it. One whose status is
    not confirmed (OCSP "good", or a current CRL of its issuer) is refused as
    `revocation` says.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    failure = _path_from(end_entity, [end_entity], intermediates, trust_anchors, now, crls,
                         ocsp, revocation)
    if failure is not None:
        subject = end_entity.subject.rfc4514_string()
        raise AuthenticationFailed(f"certificate of {subject}: {failure}")


def _path_from(
    cert: x509.Certificate,
    path: list[x509.Certificate],
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    now: datetime,
    crls: Sequence[x509.CertificateRevocationList],
    ocsp: Verdict | None = None,
    revocation: Revocation = "relaxed",
) -> str | None:
    """Depth-first search; returns None on success, else the reason the best branch failed."""
    problem = _validity_problem(cert, now)
    if problem:
        return problem
    if cert in anchors:
        return None
    if len(path) > MAX_CHAIN_DEPTH:
        return f"no trust anchor within {MAX_CHAIN_DEPTH} certificates"
    failure = f"issuer {cert.issuer.rfc4514_string()} is not a known CA"
    for issuer in (*anchors, *intermediates):
        if issuer in path or issuer.subject != cert.issuer:
            continue
        problem = _issuer_problem(cert, issuer, intermediates_below=len(path) - 1)
        if problem is None:
            verdict = ocsp(cert) if ocsp is not None else None  # RFC 6960, before the CRLs
            if verdict is None:
                problem, known = _revocation_problem(cert, issuer, crls, now)
                if problem is None and not known:
                    problem = _unconfirmed(cert, revocation)
            elif verdict != OCSP_GOOD:
                problem = verdict
        if problem is None:
            problem = _path_from(issuer, [*path, issuer], intermediates, anchors, now, crls,
                                 ocsp, revocation)
            if problem is None:
                return None
        failure = problem
    return failure


def _validity_problem(cert: x509.Certificate, now: datetime) -> str | None:
    if now < cert.not_valid_before_utc:
        return f"{cert.subject.rfc4514_string()} is not valid before {cert.not_valid_before_utc}"
    if now > cert.not_valid_after_utc:
        return f"{cert.subject.rfc4514_string()} expired at {cert.not_valid_after_utc}"
    return None


def _issuer_problem(
    cert: x509.Certificate, issuer: x509.Certificate, intermediates_below: int
) -> str | None:
    name = issuer.subject.rfc4514_string()
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return f"{name} has no basicConstraints, so it is not a CA"
    except _CERT_ERRORS as exc:
        return f"{name} has malformed extensions: {exc}"
    if not constraints.ca:
        return f"{name} is not a CA (basicConstraints CA=false)"
    if constraints.path_length is not None and intermediates_below > constraints.path_length:
        return f"{name} allows {constraints.path_length} intermediate CAs below it"
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            return f"{name} key usage does not allow certificate signing"
    except x509.ExtensionNotFound:
        pass
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, *_CERT_ERRORS):
        return f"signature by {name} does not verify"
    return None


def _unconfirmed(cert: x509.Certificate, revocation: Revocation) -> str | None:
    """Why a certificate whose revocation status nothing confirmed is refused, if it is."""
    if revocation == "relaxed":
        return None
    subject = cert.subject.rfc4514_string()
    if revocation == "strict":
        return (f"revocation status of {subject} unknown: no OCSP answer and no current "
                "CRL of its issuer (revocation = strict)")
    if crl_uris_of(cert) or ocsp_uris_of(cert):
        return (f"revocation status of {subject} unknown, though it names where to ask "
                "(revocation = ifuri)")
    return None


def _revocation_problem(cert: x509.Certificate, issuer: x509.Certificate,
                        crls: Sequence[x509.CertificateRevocationList], now: datetime
                        ) -> tuple[str | None, bool]:
    """Whether a CRL `issuer` signed lists `cert` (RFC 5280 6.3), and whether one
    current (its nextUpdate not passed) confirms its status. Delta CRLs (5.2.4) count
    when a complete CRL at least as new as their base is there too; the newest that
    names the certificate decides, and removeFromCRL there takes back a hold."""
    complete, deltas = [], []
    for crl in crls:
        if crl.issuer != issuer.subject:
            continue
        try:
            signed = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
            base = extension_value(crl.extensions, x509.DeltaCRLIndicator)
        except (TypeError, UnsupportedAlgorithm, *_CERT_ERRORS):
            signed = False
        if not signed:
            continue  # another CA of the same name, or a forgery: not this issuer's word
        if base is None:
            complete.append(crl)
        else:
            deltas.append((base.crl_number, crl))
    newest = max((_crl_number(crl) for crl in complete), default=-1)
    current = any(crl.next_update_utc is None or crl.next_update_utc >= now
                  for crl in complete)
    for _, delta in sorted(((b, d) for b, d in deltas if b <= newest),
                           key=lambda pair: _crl_number(pair[1]), reverse=True):
        entry = delta.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            reason = _entry_reason(entry)
            if reason == x509.ReasonFlags.remove_from_crl:
                return None, current  # no longer on hold
            return _revoked_text(cert, entry, " (delta CRL)"), True
    for crl in complete:
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            return _revoked_text(cert, entry), True
    return None, current


def extension_value(extensions: x509.Extensions, kind: type[_ExtensionValue]
                    ) -> _ExtensionValue | None:
    """The extension of `kind` among `extensions`, None when absent (ValueError or
    DuplicateExtension when they cannot be read)."""
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        number = extension_value(crl.extensions, x509.CRLNumber)
    except (ValueError, x509.DuplicateExtension):
        return -1
    return number.crl_number if number is not None else -1


def _entry_reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        reason = extension_value(entry.extensions, x509.CRLReason)
    except (ValueError, x509.DuplicateExtension):
        return None
    return reason.reason if reason is not None else None


def _revoked_text(cert: x509.Certificate, entry: x509.RevokedCertificate, where: str = ""
                  ) -> str:
    return (f"{cert.subject.rfc4514_string()} (serial {cert.serial_number:x}) was "
            f"revoked on {entry.revocation_date_utc:%Y-%m-%d %H:%M:%S} UTC{where}")


def http_uris(names: Iterable[x509.GeneralName]) -> tuple[str, ...]:
    """The http(s) URIs among `names` (what this node can fetch)."""
    return tuple(name.value for name in names
                 if isinstance(name, x509.UniformResourceIdentifier)
                 and name.value.partition("://")[0].lower() in ("http", "https"))


def crl_uris_of(cert: x509.Certificate) -> tuple[str, ...]:
    """The http(s) URIs of a certificate's CRL distribution points (RFC 5280 4.2.1.13)."""
    return _point_uris(cert.extensions, x509.CRLDistributionPoints)


def ocsp_uris_of(cert: x509.Certificate) -> tuple[str, ...]:
    """The http(s) OCSP responders of a certificate's authorityInfoAccess (RFC 5280
    4.2.2.1)."""
    try:
        access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return ()
    return http_uris(d.access_location for d in access
                     if d.access_method == AuthorityInformationAccessOID.OCSP)


def delta_crl_uris_of(crl: x509.CertificateRevocationList) -> tuple[str, ...]:
    """The http(s) URIs where a complete CRL says its delta CRLs are (its Freshest CRL
    extension, RFC 5280 5.2.6: the distribution points' syntax)."""
    return _point_uris(crl.extensions, x509.FreshestCRL)


def _point_uris(extensions: x509.Extensions,
                kind: type[x509.CRLDistributionPoints] | type[x509.FreshestCRL]
                ) -> tuple[str, ...]:
    try:
        points = extensions.get_extension_for_class(kind).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return ()
    return http_uris(name for point in points for name in point.full_name or ())


def _spki_sha1(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha1(spki).digest()


def certreq_authority_hashes(cacerts: Sequence[x509.Certificate]) -> bytes:
    """CERTREQ data (RFC 7296 3.7): SHA-1 of each trusted CA's SubjectPublicKeyInfo."""
    return b"".join(_spki_sha1(cert) for cert in cacerts)


def certreq_matches(certreq_data: bytes, cacert: x509.Certificate) -> bool:
    wanted = _spki_sha1(cacert)
    return any(certreq_data[i : i + 20] == wanted for i in range(0, len(certreq_data), 20))
