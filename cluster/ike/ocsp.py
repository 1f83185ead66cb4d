"""OCSP (RFC 6960) for the peers' certificates, sans-IO: requests, answers, a cache.

A certificate whose authorityInfoAccess names an OCSP responder (http/https) is asked
about before its chain is checked; the exchange waits meanwhile (OcspPending, as for a
CRL). An answer counts only if it is for that certificate, is current, and is signed by
the certificate's issuer or by a responder certificate that issuer gave the OCSPSigning
purpose (RFC 6960 4.2.2.2), and, if it echoes a nonce, echoes the one of our request
(RFC 8954: a replayed older answer is refused; precomputed answers carry none and are
accepted). "good" settles the certificate without CRLs, "revoked" refuses it, anything
else (no answer, "unknown", a bad answer) leaves it to the CRLs, as strongSwan's
revocation plugin does.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from .auth import OCSP_GOOD, extension_value
from .pending import Pending

SKEW = datetime.timedelta(minutes=5)  # clock difference tolerated on thisUpdate/nextUpdate
KEEP = datetime.timedelta(hours=1)  # how long an answer without nextUpdate is used
RETRY = datetime.timedelta(seconds=60)  # a responder that failed is not asked again sooner
GOOD = OCSP_GOOD  # (the verdict auth.py's chain check takes)


NONCE_SIZE = 32  # RFC 8954 2.1: 1 to 32 octets, at least 16 recommended


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes = b"") -> bytes:
    """The DER request for one certificate (CertID with SHA-1, as responders expect),
    with the nonce extension when given one (RFC 8954 2.1)."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(Encoding.DER)


@dataclass(frozen=True)
class OcspAnswer:
    status: str  # "good", "revoked" (with `reason`), or "unknown"
    until: datetime.datetime  # when to ask again
    reason: str = ""


def ocsp_answer_untrusted(der: bytes, cert: x509.Certificate, issuer: x509.Certificate,
                          now: datetime.datetime, nonce: bytes = b"") -> OcspAnswer:
    """Check a responder's answer about `cert` to the request with `nonce`; ValueError
    saying why it does not count."""
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        raise ValueError(f"not an OCSP response: {exc}") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise ValueError(f"responder says {response.response_status.name}")
    _check_signer(response, issuer)
    try:
        echoed = extension_value(response.extensions, x509.OCSPNonce)
    except (ValueError, x509.DuplicateExtension) as exc:
        raise ValueError(f"unreadable extensions: {exc}") from None
    # RFC 8954 2.1: an echoed nonce must be ours; none at all (a precomputed answer) is
    # accepted, as strongSwan does
    if echoed is not None and echoed.nonce != nonce:
        raise ValueError("answer with the nonce of another request (a replay?)")
    single = next((s for s in response.responses if s.serial_number == cert.serial_number
                   and _same_issuer(s, issuer)), None)
    if single is None:
        raise ValueError("no answer about this certificate")
    if single.this_update_utc > now + SKEW:
        raise ValueError(f"answer dated in the future ({single.this_update_utc})")
    next_update = single.next_update_utc
    if next_update is not None and next_update < now - SKEW:
        raise ValueError(f"answer expired at {next_update}")
    until = min(next_update or now + KEEP, now + KEEP)
    status = single.certificate_status
    if status == ocsp.OCSPCertStatus.GOOD:
        return OcspAnswer(GOOD, until)
    if status == ocsp.OCSPCertStatus.REVOKED:
        when = single.revocation_time_utc
        return OcspAnswer("revoked", until, (
            f"{cert.subject.rfc4514_string()} (serial {cert.serial_number:x}) was revoked"
            f"{f' on {when:%Y-%m-%d %H:%M:%S} UTC' if when else ''} (OCSP)"))
    return OcspAnswer("unknown", until)


def _same_issuer(single: ocsp.OCSPSingleResponse, issuer: x509.Certificate) -> bool:
    digest = hashes.Hash(single.hash_algorithm)
    digest.update(issuer.subject.public_bytes())
    return digest.finalize() == single.issuer_name_hash


def _check_signer(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> None:
    """RFC 6960 4.2.2.2: the issuer itself, or a responder it certified for OCSP."""
    signer = issuer
    for cert in response.certificates:
        if cert.subject == issuer.subject and cert.public_key() == issuer.public_key():
            break  # the issuer's own certificate came along
        try:
            cert.verify_directly_issued_by(issuer)
            purposes = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (InvalidSignature, ValueError, TypeError, x509.ExtensionNotFound,
                UnsupportedAlgorithm):
            continue
        if ExtendedKeyUsageOID.OCSP_SIGNING in purposes:
            signer = cert
            break
    key = signer.public_key()
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(),
                       algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
        else:
            raise ValueError("signed with an algorithm we do not check")
    except InvalidSignature:
        raise ValueError(f"not signed by {issuer.subject.rfc4514_string()} or its "
                         "OCSP responder") from None


OcspQuery = tuple[x509.Certificate, x509.Certificate, str]  # certificate, issuer, URI
OcspFetcher = Callable[[x509.Certificate, x509.Certificate, str],
                       Awaitable["OcspAnswer | None"]]


class OcspCache:
    """Answers per (issuer, serial), filled by the runtime's `fetcher`."""

    def __init__(self) -> None:
        self._answers: dict[tuple[bytes, int], OcspAnswer] = {}
        self._failed: dict[str, datetime.datetime] = {}
        self.fetcher: OcspFetcher | None = None  # set by the runtime; None: no OCSP

    @staticmethod
    def _key(cert: x509.Certificate) -> tuple[bytes, int]:
        return cert.issuer.public_bytes(), cert.serial_number

    def missing(self, queries: list[OcspQuery], now: datetime.datetime) -> tuple[OcspQuery, ...]:
        if self.fetcher is None:
            return ()
        out = []
        for cert, issuer, uri in queries:
            answer = self._answers.get(self._key(cert))
            if answer is not None and answer.until > now:
                continue
            failed = self._failed.get(uri)
            if failed is not None and now - failed < RETRY:
                continue
            out.append((cert, issuer, uri))
        return tuple(out)

    def verdict(self, cert: x509.Certificate, now: datetime.datetime) -> str | None:
        """GOOD, a revocation reason, or None (no current answer: the CRLs decide)."""
        answer = self._answers.get(self._key(cert))
        if answer is None or answer.until <= now or answer.status == "unknown":
            return None
        return GOOD if answer.status == GOOD else answer.reason

    async def fetch(self, queries: tuple[OcspQuery, ...], now: datetime.datetime) -> None:
        assert self.fetcher is not None
        for cert, issuer, uri in queries:
            answer = await self.fetcher(cert, issuer, uri)
            if answer is None:
                self._failed[uri] = now
            else:
                self._answers[self._key(cert)] = answer


class OcspPending(Pending):
    """Certificates with OCSP responders not asked yet: the exchange waits for them."""

    def __init__(self, cache: OcspCache, queries: tuple[OcspQuery, ...],
                 now: datetime.datetime) -> None:
        super().__init__(f"waiting for OCSP answers from {', '.join(q[2] for q in queries)}")
        self.cache, self.queries, self.now = cache, queries, now

    async def fetch(self) -> None:
        await self.cache.fetch(self.queries, self.now)
