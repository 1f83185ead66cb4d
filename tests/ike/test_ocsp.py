"""RFC 6960 answers: which count, what they say, and the cache that keeps them."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cluster.errors import AuthenticationFailed
from cluster.ike.auth import ocsp_uris_of, verify_certificate_chain
from cluster.ike.ocsp import (
    GOOD,
    OcspAnswer,
    OcspCache,
    OcspPending,
    ocsp_answer_untrusted,
    ocsp_request,
)

NOW = datetime.datetime.now(datetime.UTC)
URI = "http://ocsp.example.test"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
          eku: list[x509.ObjectIdentifier] | None = None, aia: bool = True) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(days=1))
               .not_valid_after(NOW + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if aia:
        builder = builder.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
            x509.oid.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(URI))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA = _cert("CA", CA_KEY, "CA", CA_KEY, ca=True, aia=False)
PEER_KEY = ec.generate_private_key(ec.SECP256R1())
PEER = _cert("peer", PEER_KEY, "CA", CA_KEY)


def _answer(status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD, *,
            signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] = (CA, CA_KEY),
            cert: x509.Certificate = PEER, this_update: datetime.datetime = NOW,
            next_update: datetime.datetime | None = NOW + datetime.timedelta(minutes=30),
            nonce: bytes = b"") -> bytes:
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=CA, algorithm=hashes.SHA1(), cert_status=status,
        this_update=this_update, next_update=next_update,
        revocation_time=NOW - datetime.timedelta(hours=1)
        if status == ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=None).responder_id(ocsp.OCSPResponderEncoding.HASH, signer[0])
    if signer[0] is not CA:
        builder = builder.certificates([signer[0]])
    if nonce:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.sign(signer[1], hashes.SHA256()).public_bytes(Encoding.DER)


def test_the_responder_is_read_from_the_certificate_and_asked_about_it() -> None:
    assert ocsp_uris_of(PEER) == (URI,)
    assert ocsp_uris_of(CA) == ()
    request = ocsp.load_der_ocsp_request(ocsp_request(PEER, CA))
    assert request.serial_number == PEER.serial_number


def test_a_nonce_goes_out_and_an_echo_of_another_is_refused() -> None:
    """RFC 8954: the request carries our nonce; an answer echoing another request's is
    refused (a replay), one echoing ours or none (precomputed answers) counts."""
    nonce = bytes(range(32))
    request = ocsp.load_der_ocsp_request(ocsp_request(PEER, CA, nonce))
    assert request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    assert not ocsp.load_der_ocsp_request(ocsp_request(PEER, CA)).extensions
    assert ocsp_answer_untrusted(_answer(nonce=nonce), PEER, CA, NOW, nonce).status == GOOD
    assert ocsp_answer_untrusted(_answer(), PEER, CA, NOW, nonce).status == GOOD
    with pytest.raises(ValueError, match="nonce of another request"):
        ocsp_answer_untrusted(_answer(nonce=nonce[::-1]), PEER, CA, NOW, nonce)
    with pytest.raises(ValueError, match="nonce of another request"):
        ocsp_answer_untrusted(_answer(nonce=nonce), PEER, CA, NOW)


def test_what_the_answers_say() -> None:
    good = ocsp_answer_untrusted(_answer(), PEER, CA, NOW)
    assert good.status == GOOD and good.until <= NOW + datetime.timedelta(minutes=30)
    revoked = ocsp_answer_untrusted(_answer(ocsp.OCSPCertStatus.REVOKED), PEER, CA, NOW)
    assert revoked.status == "revoked" and "was revoked on" in revoked.reason
    unknown = ocsp_answer_untrusted(_answer(ocsp.OCSPCertStatus.UNKNOWN), PEER, CA, NOW)
    assert unknown.status == "unknown"


def test_a_delegated_responder_counts_only_with_the_ocsp_signing_purpose() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    delegated = _cert("responder", key, "CA", CA_KEY, eku=[ExtendedKeyUsageOID.OCSP_SIGNING])
    assert ocsp_answer_untrusted(_answer(signer=(delegated, key)), PEER, CA, NOW).status == GOOD
    plain = _cert("responder", key, "CA", CA_KEY, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(ValueError, match="not signed by"):
        ocsp_answer_untrusted(_answer(signer=(plain, key)), PEER, CA, NOW)


@pytest.mark.parametrize(("answer", "reason"), [
    (lambda: b"junk", "not an OCSP response"),
    (lambda: ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.TRY_LATER).public_bytes(Encoding.DER), "TRY_LATER"),
    (lambda: _answer(signer=(PEER, PEER_KEY)), "not signed by"),
    (lambda: _answer(cert=_cert("other", PEER_KEY, "CA", CA_KEY)), "no answer about this"),
    (lambda: _answer(next_update=NOW - datetime.timedelta(hours=1),
                     this_update=NOW - datetime.timedelta(hours=2)), "expired"),
    (lambda: _answer(this_update=NOW + datetime.timedelta(hours=1), next_update=None),
     "in the future"),
])
def test_answers_that_do_not_count(answer: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        ocsp_answer_untrusted(answer(), PEER, CA, NOW)  # type: ignore[operator]


async def test_the_cache_asks_once_and_its_verdict_decides_before_crls() -> None:
    cache = OcspCache()
    query = [(PEER, CA, URI)]
    assert cache.missing(query, NOW) == ()  # no fetcher: OCSP is off
    answers = [OcspAnswer("revoked", NOW + datetime.timedelta(minutes=5), "revoked (OCSP)")]

    async def fetcher(cert: x509.Certificate, issuer: x509.Certificate, uri: str
                      ) -> OcspAnswer | None:
        return answers.pop(0) if answers else None

    cache.fetcher = fetcher
    assert cache.missing(query, NOW) == tuple(query)
    await OcspPending(cache, tuple(query), NOW).fetch()
    assert cache.missing(query, NOW) == ()
    assert cache.verdict(PEER, NOW) == "revoked (OCSP)"
    with pytest.raises(AuthenticationFailed, match=r"revoked \(OCSP\)"):
        verify_certificate_chain(PEER, [], [CA], NOW, (), lambda c: cache.verdict(c, NOW))
    later = NOW + datetime.timedelta(minutes=10)
    assert cache.verdict(PEER, later) is None  # stale: the CRLs decide
    assert cache.missing(query, later) == tuple(query)
    await cache.fetch(tuple(query), later)  # the responder fails now
    assert cache.missing(query, later) == ()  # not asked again for a minute
    verify_certificate_chain(PEER, [], [CA], later, (), lambda c: cache.verdict(c, later))
