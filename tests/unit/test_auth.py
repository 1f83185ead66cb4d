"""AUTH payload data (RFC 7296 2.15, RFC 7427), certificate paths and CERTREQ hashes."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import AuthenticationFailed, ParseError
from cluster.ike.auth import (
    PrivateKey,
    certreq_authority_hashes,
    certreq_matches,
    choose_auth_method,
    load_certificate_der_untrusted,
    psk_auth_data,
    sign_auth,
    signed_octets,
    supported_hash_algorithms,
    verify_auth,
    verify_certificate_chain,
    verify_psk,
)
from cluster.ike.constants import AuthMethod, HashAlgorithm


def prf_hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def hand_hmac_sha256(key: bytes, data: bytes) -> bytes:
    """RFC 2104 written out, so the PSK test does not trust the stdlib hmac module."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\x00")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + data).digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in key) + inner).digest()


# --- RFC 7296 2.15 ----------------------------------------------------------------


def test_signed_octets_is_message_nonce_and_prf_of_id_payload_body() -> None:
    octets = signed_octets(b"MSG", b"NONCE", hand_hmac_sha256, b"SK_p", 2, b"moon")
    expected_mac = hand_hmac_sha256(b"SK_p", b"\x02\x00\x00\x00moon")
    assert octets == b"MSGNONCE" + expected_mac


@pytest.mark.parametrize("secret", [b"", b"s3cr3t", bytes(range(200))])
def test_psk_auth_data_follows_rfc7296_formula(secret: bytes) -> None:
    octets = b"\x01" * 100
    # AUTH = prf( prf(Shared Secret, "Key Pad for IKEv2"), <InitiatorSignedOctets>)
    expected = hand_hmac_sha256(hand_hmac_sha256(secret, b"Key Pad for IKEv2"), octets)
    assert psk_auth_data(prf_hmac_sha256, secret, octets) == expected
    assert verify_psk(prf_hmac_sha256, secret, octets, expected)


def test_psk_auth_data_known_value() -> None:
    # Computed outside Python with the openssl CLI:
    #   K=$(printf 'Key Pad for IKEv2' | openssl dgst -sha256 -mac HMAC -macopt key:secret -binary)
    #   printf 'octets' | openssl dgst -sha256 -mac HMAC -macopt hexkey:<hex of K>
    expected = "93d6b432e988c4c184f49457ef7ddfef938f1179de4120120d1cc523b368d33b"
    assert psk_auth_data(prf_hmac_sha256, b"secret", b"octets").hex() == expected


def test_verify_psk_rejects_wrong_secret_data_and_lengths() -> None:
    good = psk_auth_data(prf_hmac_sha256, b"secret", b"octets")
    assert not verify_psk(prf_hmac_sha256, b"Secret", b"octets", good)
    assert not verify_psk(prf_hmac_sha256, b"secret", b"octetz", good)
    assert not verify_psk(prf_hmac_sha256, b"secret", b"octets", good[:-1])
    assert not verify_psk(prf_hmac_sha256, b"secret", b"octets", b"")
    assert not verify_psk(prf_hmac_sha256, b"secret", b"octets", good[:-1] + bytes([good[-1] ^ 1]))


# --- keys ----------------------------------------------------------------------------

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256_KEY = ec.generate_private_key(ec.SECP256R1())
P384_KEY = ec.generate_private_key(ec.SECP384R1())
P521_KEY = ec.generate_private_key(ec.SECP521R1())
ED_KEY = Ed25519PrivateKey.generate()
ALL_HASHES = frozenset(supported_hash_algorithms())
OCTETS = b"IKE_SA_INIT message" + bytes(range(64)) + b"prf(SK_pi, IDi')"

# DER AlgorithmIdentifiers, RFC 7427 Appendix A (and RFC 8420 for Ed25519); the same bytes
# strongSwan 5.9.8 `pki` writes as signatureAlgorithm for these algorithms (checked here).
SHA256_WITH_RSA = "300d06092a864886f70d01010b0500"
SHA384_WITH_RSA = "300d06092a864886f70d01010c0500"
SHA512_WITH_RSA = "300d06092a864886f70d01010d0500"
ECDSA_WITH_SHA256 = "300a06082a8648ce3d040302"
ECDSA_WITH_SHA384 = "300a06082a8648ce3d040303"
ECDSA_WITH_SHA512 = "300a06082a8648ce3d040304"
ED25519 = "300506032b6570"
# RSASSA-PSS, SHA-256, MGF1-SHA-256, salt 32, as strongSwan `pki --rsa-padding pss` encodes it.
RSASSA_PSS_SHA256 = (
    "304106092a864886f70d01010a3034a00f300d06096086480165030402010500a11c301a06092a864886f7"
    "0d010108300d06096086480165030402010500a203020120"
)


def test_we_announce_sha2_and_identity() -> None:
    assert supported_hash_algorithms() == (
        HashAlgorithm.SHA2_256,
        HashAlgorithm.SHA2_384,
        HashAlgorithm.SHA2_512,
        HashAlgorithm.IDENTITY,
    )


@pytest.mark.parametrize(
    ("key", "peer_hashes", "method"),
    [
        (RSA_KEY, ALL_HASHES, AuthMethod.DIGITAL_SIGNATURE),
        (RSA_KEY, frozenset(), AuthMethod.RSA_SIG),
        (RSA_KEY, frozenset({HashAlgorithm.SHA1}), AuthMethod.RSA_SIG),  # nothing usable
        (RSA_KEY, frozenset({HashAlgorithm.IDENTITY}), AuthMethod.RSA_SIG),
        (P256_KEY, ALL_HASHES, AuthMethod.DIGITAL_SIGNATURE),
        (P256_KEY, frozenset(), AuthMethod.ECDSA_SHA256_P256),
        (P384_KEY, frozenset(), AuthMethod.ECDSA_SHA384_P384),
        (P521_KEY, frozenset(), AuthMethod.ECDSA_SHA512_P521),
        (P384_KEY, frozenset({HashAlgorithm.SHA1}), AuthMethod.ECDSA_SHA384_P384),
        (ED_KEY, ALL_HASHES, AuthMethod.DIGITAL_SIGNATURE),
    ],
)
def test_choose_auth_method(
    key: PrivateKey, peer_hashes: frozenset[HashAlgorithm], method: AuthMethod
) -> None:
    assert choose_auth_method(key, peer_hashes) == method


@pytest.mark.parametrize(
    "peer_hashes", [frozenset(), frozenset({HashAlgorithm.SHA2_256, HashAlgorithm.SHA2_512})]
)
def test_ed25519_needs_the_peer_to_announce_identity(
    peer_hashes: frozenset[HashAlgorithm],
) -> None:
    with pytest.raises(AuthenticationFailed, match="IDENTITY"):
        choose_auth_method(ED_KEY, peer_hashes)


def test_unsupported_curve_has_no_method() -> None:
    with pytest.raises(AuthenticationFailed, match="secp256k1"):
        choose_auth_method(ec.generate_private_key(ec.SECP256K1()), frozenset())


# --- RFC 7427 ------------------------------------------------------------------------


def _algorithm_id(auth_data: bytes) -> str:
    return auth_data[1 : 1 + auth_data[0]].hex()


@pytest.mark.parametrize(
    ("key", "peer_hashes", "algorithm_id"),
    [
        (RSA_KEY, ALL_HASHES, SHA256_WITH_RSA),  # SHA-256 preferred for RSA
        (RSA_KEY, frozenset({HashAlgorithm.SHA2_384}), SHA384_WITH_RSA),
        (RSA_KEY, frozenset({HashAlgorithm.SHA2_512, HashAlgorithm.SHA1}), SHA512_WITH_RSA),
        (P256_KEY, ALL_HASHES, ECDSA_WITH_SHA256),
        (P256_KEY, frozenset({HashAlgorithm.SHA2_512}), ECDSA_WITH_SHA512),
        (P384_KEY, ALL_HASHES, ECDSA_WITH_SHA384),  # SHA-384 preferred for P-384
        (P384_KEY, frozenset({HashAlgorithm.SHA2_256}), ECDSA_WITH_SHA256),
        (P521_KEY, ALL_HASHES, ECDSA_WITH_SHA512),
        (ED_KEY, ALL_HASHES, ED25519),
    ],
)
def test_digital_signature_emits_published_algorithm_identifier_and_round_trips(
    key: PrivateKey, peer_hashes: frozenset[HashAlgorithm], algorithm_id: str
) -> None:
    auth_data = sign_auth(key, AuthMethod.DIGITAL_SIGNATURE, OCTETS, peer_hashes)
    assert auth_data[0] == len(algorithm_id) // 2  # RFC 7427 section 3 length octet
    assert _algorithm_id(auth_data) == algorithm_id
    verify_auth(key.public_key(), AuthMethod.DIGITAL_SIGNATURE, auth_data, OCTETS)


def test_rfc7427_ecdsa_signature_is_der_encoded() -> None:
    auth_data = sign_auth(P256_KEY, AuthMethod.DIGITAL_SIGNATURE, OCTETS, ALL_HASHES)
    signature = auth_data[1 + auth_data[0] :]
    assert signature[0] == 0x30  # SEQUENCE { r INTEGER, s INTEGER }, as in X.509
    assert signature[1] == len(signature) - 2


@pytest.mark.parametrize(
    ("key", "method", "size"),
    [
        (RSA_KEY, AuthMethod.RSA_SIG, 256),
        (P256_KEY, AuthMethod.ECDSA_SHA256_P256, 64),
        (P384_KEY, AuthMethod.ECDSA_SHA384_P384, 96),
        (P521_KEY, AuthMethod.ECDSA_SHA512_P521, 132),
    ],
)
def test_classic_signatures_round_trip(key: PrivateKey, method: AuthMethod, size: int) -> None:
    auth_data = sign_auth(key, method, OCTETS, frozenset())
    assert len(auth_data) == size  # RSA modulus size; ECDSA r|s fixed size (RFC 4754)
    verify_auth(key.public_key(), method, auth_data, OCTETS)


def test_classic_rsa_is_pkcs1_v15_with_sha1() -> None:
    auth_data = sign_auth(RSA_KEY, AuthMethod.RSA_SIG, OCTETS, frozenset())
    RSA_KEY.public_key().verify(auth_data, OCTETS, padding.PKCS1v15(), hashes.SHA1())


def test_classic_ecdsa_is_r_then_s() -> None:
    auth_data = sign_auth(P256_KEY, AuthMethod.ECDSA_SHA256_P256, OCTETS, frozenset())
    r, s = int.from_bytes(auth_data[:32], "big"), int.from_bytes(auth_data[32:], "big")
    P256_KEY.public_key().verify(encode_dss_signature(r, s), OCTETS, ec.ECDSA(hashes.SHA256()))


SIGNED = [
    (RSA_KEY, AuthMethod.DIGITAL_SIGNATURE),
    (P256_KEY, AuthMethod.DIGITAL_SIGNATURE),
    (P384_KEY, AuthMethod.DIGITAL_SIGNATURE),
    (ED_KEY, AuthMethod.DIGITAL_SIGNATURE),
    (RSA_KEY, AuthMethod.RSA_SIG),
    (P256_KEY, AuthMethod.ECDSA_SHA256_P256),
    (P384_KEY, AuthMethod.ECDSA_SHA384_P384),
]


@pytest.mark.parametrize(("key", "method"), SIGNED)
def test_flipped_byte_in_octets_fails(key: PrivateKey, method: AuthMethod) -> None:
    auth_data = sign_auth(key, method, OCTETS, ALL_HASHES)
    for position in (0, len(OCTETS) // 2, len(OCTETS) - 1):
        tampered = bytearray(OCTETS)
        tampered[position] ^= 0x01
        with pytest.raises(AuthenticationFailed):
            verify_auth(key.public_key(), method, auth_data, bytes(tampered))


@pytest.mark.parametrize(("key", "method"), SIGNED)
def test_flipped_byte_in_signature_fails(key: PrivateKey, method: AuthMethod) -> None:
    auth_data = sign_auth(key, method, OCTETS, ALL_HASHES)
    start = 1 + auth_data[0] if method == AuthMethod.DIGITAL_SIGNATURE else 0
    for position in (start, (start + len(auth_data)) // 2, len(auth_data) - 1):
        tampered = bytearray(auth_data)
        tampered[position] ^= 0x80
        with pytest.raises(AuthenticationFailed):
            verify_auth(key.public_key(), method, bytes(tampered), OCTETS)


@pytest.mark.parametrize(("key", "method"), SIGNED)
def test_truncated_auth_data_fails(key: PrivateKey, method: AuthMethod) -> None:
    auth_data = sign_auth(key, method, OCTETS, ALL_HASHES)
    for length in (0, 1, 5, len(auth_data) // 2, len(auth_data) - 1):
        with pytest.raises(AuthenticationFailed):
            verify_auth(key.public_key(), method, auth_data[:length], OCTETS)


def _with_algorithm_id(auth_data: bytes, algorithm_id_hex: str) -> bytes:
    algorithm_id = bytes.fromhex(algorithm_id_hex)
    return bytes([len(algorithm_id)]) + algorithm_id + auth_data[1 + auth_data[0] :]


@pytest.mark.parametrize(
    ("key", "claimed"),
    [
        (RSA_KEY, ECDSA_WITH_SHA256),
        (RSA_KEY, ED25519),
        (P256_KEY, SHA256_WITH_RSA),
        (P256_KEY, ED25519),
        (ED_KEY, ECDSA_WITH_SHA256),
        (ED_KEY, SHA256_WITH_RSA),
    ],
)
def test_algorithm_identifier_for_the_wrong_key_type_fails(key: PrivateKey, claimed: str) -> None:
    auth_data = _with_algorithm_id(
        sign_auth(key, AuthMethod.DIGITAL_SIGNATURE, OCTETS, ALL_HASHES), claimed
    )
    with pytest.raises(AuthenticationFailed, match="does not fit"):
        verify_auth(key.public_key(), AuthMethod.DIGITAL_SIGNATURE, auth_data, OCTETS)


def test_algorithm_identifier_with_another_hash_fails() -> None:
    auth_data = sign_auth(P256_KEY, AuthMethod.DIGITAL_SIGNATURE, OCTETS, ALL_HASHES)
    with pytest.raises(AuthenticationFailed):
        verify_auth(
            P256_KEY.public_key(),
            AuthMethod.DIGITAL_SIGNATURE,
            _with_algorithm_id(auth_data, ECDSA_WITH_SHA384),
            OCTETS,
        )


def test_signature_from_another_key_fails() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    auth_data = sign_auth(other, AuthMethod.DIGITAL_SIGNATURE, OCTETS, ALL_HASHES)
    with pytest.raises(AuthenticationFailed):
        verify_auth(P256_KEY.public_key(), AuthMethod.DIGITAL_SIGNATURE, auth_data, OCTETS)


@pytest.mark.parametrize(
    ("key", "method", "reason"),
    [
        (P384_KEY, AuthMethod.ECDSA_SHA256_P256, "needs a secp256r1 key"),  # curve fixed by method
        (P256_KEY, AuthMethod.ECDSA_SHA384_P384, "needs a secp384r1 key"),
        (RSA_KEY, AuthMethod.ECDSA_SHA256_P256, "needs a secp256r1 key"),
        (P256_KEY, AuthMethod.RSA_SIG, "not RSA"),
    ],
)
def test_classic_method_for_the_wrong_key_fails(
    key: PrivateKey, method: AuthMethod, reason: str
) -> None:
    honest = choose_auth_method(key, frozenset())
    auth_data = sign_auth(key, honest, OCTETS, frozenset())
    with pytest.raises(AuthenticationFailed, match=reason):
        verify_auth(key.public_key(), method, auth_data, OCTETS)


def test_unknown_and_sha1_algorithm_identifiers_are_refused() -> None:
    auth_data = sign_auth(RSA_KEY, AuthMethod.DIGITAL_SIGNATURE, OCTETS, ALL_HASHES)
    sha1_with_rsa = "300d06092a864886f70d0101050500"  # we do not announce SHA-1
    with pytest.raises(AuthenticationFailed, match="unsupported signature algorithm"):
        verify_auth(
            RSA_KEY.public_key(),
            AuthMethod.DIGITAL_SIGNATURE,
            _with_algorithm_id(auth_data, sha1_with_rsa),
            OCTETS,
        )


def test_rsa_pkcs1_with_absent_parameters_is_accepted() -> None:
    auth_data = sign_auth(RSA_KEY, AuthMethod.DIGITAL_SIGNATURE, OCTETS, ALL_HASHES)
    no_null = SHA256_WITH_RSA.replace("300d", "300b", 1).removesuffix("0500")
    verify_auth(
        RSA_KEY.public_key(),
        AuthMethod.DIGITAL_SIGNATURE,
        _with_algorithm_id(auth_data, no_null),
        OCTETS,
    )


def test_rsassa_pss_as_strongswan_encodes_it_verifies() -> None:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    signature = RSA_KEY.sign(OCTETS, pss, hashes.SHA256())
    algorithm_id = bytes.fromhex(RSASSA_PSS_SHA256)
    auth_data = bytes([len(algorithm_id)]) + algorithm_id + signature
    verify_auth(RSA_KEY.public_key(), AuthMethod.DIGITAL_SIGNATURE, auth_data, OCTETS)
    with pytest.raises(AuthenticationFailed):
        verify_auth(RSA_KEY.public_key(), AuthMethod.DIGITAL_SIGNATURE, auth_data, OCTETS + b"x")
    # PKCS#1 v1.5 signature under a PSS identifier does not pass.
    pkcs1 = sign_auth(RSA_KEY, AuthMethod.DIGITAL_SIGNATURE, OCTETS, ALL_HASHES)
    with pytest.raises(AuthenticationFailed):
        verify_auth(
            RSA_KEY.public_key(),
            AuthMethod.DIGITAL_SIGNATURE,
            _with_algorithm_id(pkcs1, RSASSA_PSS_SHA256),
            OCTETS,
        )


@pytest.mark.parametrize("method", [AuthMethod.PSK, AuthMethod.DSS_SIG, 0, 12, 13, 255, 70000])
def test_non_signature_methods_fail(method: int) -> None:
    auth_data = sign_auth(RSA_KEY, AuthMethod.RSA_SIG, OCTETS, frozenset())
    with pytest.raises(AuthenticationFailed):
        verify_auth(RSA_KEY.public_key(), method, auth_data, OCTETS)


@pytest.mark.parametrize(
    ("key", "method", "peer_hashes"),
    [
        (P256_KEY, AuthMethod.RSA_SIG, frozenset()),
        (RSA_KEY, AuthMethod.ECDSA_SHA256_P256, frozenset()),
        (P384_KEY, AuthMethod.ECDSA_SHA256_P256, frozenset()),
        (ED_KEY, AuthMethod.RSA_SIG, frozenset()),
        (RSA_KEY, AuthMethod.PSK, frozenset()),
        (ED_KEY, AuthMethod.DIGITAL_SIGNATURE, frozenset({HashAlgorithm.SHA2_256})),
        (RSA_KEY, AuthMethod.DIGITAL_SIGNATURE, frozenset()),
    ],
)
def test_sign_auth_refuses_a_method_that_does_not_fit_the_key(
    key: PrivateKey, method: AuthMethod, peer_hashes: frozenset[HashAlgorithm]
) -> None:
    with pytest.raises(ValueError):
        sign_auth(key, method, OCTETS, peer_hashes)


# Ed448 stands for a certificate key type we have no signature method for.
_PUBLIC_KEYS = [
    k.public_key()
    for k in (RSA_KEY, P256_KEY, P384_KEY, P521_KEY, ED_KEY, Ed448PrivateKey.generate())
]
_METHODS = st.sampled_from([1, 2, 9, 10, 11, 14]) | st.integers(min_value=0, max_value=255)


@given(st.sampled_from(_PUBLIC_KEYS), _METHODS, st.binary(max_size=600))
def test_garbage_auth_data_raises_only_authentication_failed(
    public_key: object, method: int, auth_data: bytes
) -> None:
    with pytest.raises(AuthenticationFailed):
        verify_auth(public_key, method, auth_data, OCTETS)  # type: ignore[arg-type]


_KNOWN_IDS = [SHA256_WITH_RSA, ECDSA_WITH_SHA256, ECDSA_WITH_SHA384, ED25519, RSASSA_PSS_SHA256]


@given(st.sampled_from(_PUBLIC_KEYS), st.sampled_from(_KNOWN_IDS), st.binary(max_size=600))
def test_known_algorithm_with_garbage_signature_raises_only_authentication_failed(
    public_key: object, algorithm_id: str, signature: bytes
) -> None:
    # Get past the AlgorithmIdentifier so the garbage reaches the signature verifiers.
    auth_data = _with_algorithm_id(b"\x00" + signature, algorithm_id)
    with pytest.raises(AuthenticationFailed):
        verify_auth(public_key, 14, auth_data, OCTETS)  # type: ignore[arg-type]


# --- certificates --------------------------------------------------------------------

NOW = datetime(2025, 6, 1, tzinfo=UTC)
_CA_KEY = ec.generate_private_key(ec.SECP256R1())
_INT_KEY = ec.generate_private_key(ec.SECP256R1())
_LEAF_KEY = ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool | None,
    path_length: int | None = None,
    not_before: datetime = NOW - timedelta(days=30),
    not_after: datetime = NOW + timedelta(days=30),
    cert_sign: bool | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
    if cert_sign is not None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=not cert_sign,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=cert_sign,
                crl_sign=cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return builder.sign(issuer_key, hashes.SHA256())


ROOT = _cert("Root CA", _CA_KEY, "Root CA", _CA_KEY, ca=True, cert_sign=True)
INTERMEDIATE = _cert("Intermediate CA", _INT_KEY, "Root CA", _CA_KEY, ca=True)
LEAF = _cert("moon", _LEAF_KEY, "Intermediate CA", _INT_KEY, ca=False)


def _crl(issuer: str, key: ec.EllipticCurvePrivateKey, *revoked: x509.Certificate,
         next_update: datetime = NOW + timedelta(days=7), number: int | None = None,
         delta_of: int | None = None, reason: x509.ReasonFlags | None = None
         ) -> x509.CertificateRevocationList:
    """A CRL; with `delta_of`, a delta CRL on that base CRL number (RFC 5280 5.2.4)."""
    builder = (x509.CertificateRevocationListBuilder().issuer_name(_name(issuer))
               .last_update(NOW - timedelta(days=1)).next_update(next_update))
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    if delta_of is not None:
        builder = builder.add_extension(x509.DeltaCRLIndicator(delta_of), critical=True)
    for cert in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number) \
            .revocation_date(NOW - timedelta(hours=1))
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(key, hashes.SHA256())


def test_delta_crls_revoke_and_release_on_top_of_their_base() -> None:
    """RFC 5280 5.2.4: a delta CRL counts with a complete CRL at least as new as its
    base; it revokes what it lists, and its removeFromCRL takes back the base's hold."""
    base = _crl("Intermediate CA", _INT_KEY, number=10)
    delta = _crl("Intermediate CA", _INT_KEY, LEAF, number=11, delta_of=10)
    with pytest.raises(AuthenticationFailed, match=r"was revoked on .* \(delta CRL\)"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [base, delta])
    # without a complete CRL as new as its base, the delta does not count
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [delta])
    old_base = _crl("Intermediate CA", _INT_KEY, number=9)
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [old_base, delta])
    # on hold in the base, released by the newest delta
    held = _crl("Intermediate CA", _INT_KEY, LEAF, number=12,
                reason=x509.ReasonFlags.certificate_hold)
    released = _crl("Intermediate CA", _INT_KEY, LEAF, number=14, delta_of=12,
                    reason=x509.ReasonFlags.remove_from_crl)
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [held, delta, released])
    with pytest.raises(AuthenticationFailed, match="revoked"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [held])
    # a delta from another key is nobody's word
    forged = _crl("Intermediate CA", ec.generate_private_key(ec.SECP256R1()), LEAF,
                  number=11, delta_of=10)
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [base, forged])


def test_a_revoked_leaf_or_intermediate_fails_its_chain() -> None:
    leaf_crl = _crl("Intermediate CA", _INT_KEY, LEAF)
    with pytest.raises(AuthenticationFailed, match=r"CN=moon,C=CH \(serial [0-9a-f]+\) was "
                                                   r"revoked on"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [leaf_crl])
    with pytest.raises(AuthenticationFailed, match=r"CN=Intermediate CA,C=CH .* was revoked"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW,
                                 [_crl("Root CA", _CA_KEY, INTERMEDIATE)])
    # a stale CRL still revokes (strongSwan's strictcrlpolicy = no)
    stale = _crl("Intermediate CA", _INT_KEY, LEAF, next_update=NOW - timedelta(days=1))
    with pytest.raises(AuthenticationFailed, match="revoked"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [stale])


def _leaf_naming(uri: str, *, ocsp: bool = False) -> x509.Certificate:
    """A leaf of the intermediate that names a CRL distribution point (or an OCSP
    responder) at `uri`."""
    builder = (
        x509.CertificateBuilder().subject_name(_name("sun")).issuer_name(_name("Intermediate CA"))
        .public_key(_LEAF_KEY.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=30)).not_valid_after(NOW + timedelta(days=30))
    )
    location = x509.UniformResourceIdentifier(uri)
    if ocsp:
        builder = builder.add_extension(x509.AuthorityInformationAccess(
            [x509.AccessDescription(AuthorityInformationAccessOID.OCSP, location)]),
            critical=False)
    else:
        builder = builder.add_extension(x509.CRLDistributionPoints(
            [x509.DistributionPoint([location], None, None, None)]), critical=False)
    return builder.sign(_INT_KEY, hashes.SHA256())


def test_revocation_strict_needs_each_status_confirmed() -> None:
    """swanctl's revocation = strict: every certificate below the anchor needs a current
    CRL of its issuer (or OCSP "good"); a missing or stale one refuses the chain."""
    leaf_crl = _crl("Intermediate CA", _INT_KEY)
    root_crl = _crl("Root CA", _CA_KEY)
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [leaf_crl, root_crl],
                             revocation="strict")
    with pytest.raises(AuthenticationFailed, match=r"revocation status of CN=Intermediate "
                                                   r"CA,C=CH unknown: .*\(revocation = strict"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [leaf_crl],
                                 revocation="strict")
    stale = _crl("Intermediate CA", _INT_KEY, next_update=NOW - timedelta(days=1))
    with pytest.raises(AuthenticationFailed, match=r"revocation status of CN=moon,C=CH"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [stale, root_crl],
                                 revocation="strict")
    # OCSP "good" confirms it as well as a CRL does; without a CRL relaxed accepts
    good: Callable[[x509.Certificate], str | None] = lambda cert: "good"  # noqa: E731
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [], good, revocation="strict")
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [stale])


@pytest.mark.parametrize("ocsp", [False, True])
def test_revocation_ifuri_refuses_only_what_names_where_to_ask(ocsp: bool) -> None:
    root_crl = _crl("Root CA", _CA_KEY)
    naming = _leaf_naming("http://crl.example.test/int.crl", ocsp=ocsp)
    with pytest.raises(AuthenticationFailed, match=r"revocation status of CN=sun,C=CH unknown, "
                                                   r"though it names where to ask"):
        verify_certificate_chain(naming, [INTERMEDIATE], [ROOT], NOW, [root_crl],
                                 revocation="ifuri")
    verify_certificate_chain(naming, [INTERMEDIATE], [ROOT], NOW,
                             [root_crl, _crl("Intermediate CA", _INT_KEY)], revocation="ifuri")
    # LEAF and INTERMEDIATE name nowhere: nothing to hold against them
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [], revocation="ifuri")


def test_crls_that_do_not_apply_leave_the_chain_valid() -> None:
    other = _cert("Other", ec.generate_private_key(ec.SECP256R1()), "Intermediate CA", _INT_KEY,
                  ca=False)
    forged = _crl("Intermediate CA", ec.generate_private_key(ec.SECP256R1()), LEAF)
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW, [
        _crl("Intermediate CA", _INT_KEY, other),  # lists someone else
        _crl("Root CA", _CA_KEY, LEAF),  # LEAF's serial, but not from LEAF's issuer
        forged,  # the right issuer name, signed by another key
        _crl("Intermediate CA", _INT_KEY)])  # empty


def test_chain_ca_intermediate_leaf_verifies() -> None:
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW)


def test_chain_finds_its_intermediate_among_unrelated_certificates() -> None:
    stray = _cert("Stray", _LEAF_KEY, "Elsewhere", _LEAF_KEY, ca=True)
    verify_certificate_chain(LEAF, [stray, LEAF, INTERMEDIATE], [stray, ROOT], NOW)


def test_leaf_issued_directly_by_the_anchor_verifies() -> None:
    leaf = _cert("sun", _LEAF_KEY, "Root CA", _CA_KEY, ca=False)
    verify_certificate_chain(leaf, [], [ROOT], NOW)


def test_end_entity_that_is_an_anchor_is_accepted() -> None:
    verify_certificate_chain(LEAF, [], [LEAF], NOW)


def test_naive_now_is_taken_as_utc() -> None:
    verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], NOW.replace(tzinfo=None))


def test_missing_intermediate_fails() -> None:
    with pytest.raises(AuthenticationFailed, match="not a known CA"):
        verify_certificate_chain(LEAF, [], [ROOT], NOW)


def test_wrong_ca_fails() -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_root = _cert("Other CA", other_key, "Other CA", other_key, ca=True)
    with pytest.raises(AuthenticationFailed, match="not a known CA"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [other_root], NOW)


def test_impostor_ca_with_the_same_name_fails_the_signature_check() -> None:
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    impostor = _cert("Root CA", impostor_key, "Root CA", impostor_key, ca=True)
    with pytest.raises(AuthenticationFailed, match="does not verify"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [impostor], NOW)


@pytest.mark.parametrize(
    ("now", "reason"),
    [(NOW + timedelta(days=31), "expired"), (NOW - timedelta(days=31), "not valid before")],
)
def test_leaf_outside_its_validity_fails(now: datetime, reason: str) -> None:
    with pytest.raises(AuthenticationFailed, match=reason):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [ROOT], now)


def test_expired_intermediate_fails() -> None:
    expired = _cert(
        "Intermediate CA", _INT_KEY, "Root CA", _CA_KEY, ca=True,
        not_before=NOW - timedelta(days=60), not_after=NOW - timedelta(days=1),
    )  # fmt: skip
    with pytest.raises(AuthenticationFailed, match="expired"):
        verify_certificate_chain(LEAF, [expired], [ROOT], NOW)


def test_expired_anchor_fails() -> None:
    old_root = _cert(
        "Root CA", _CA_KEY, "Root CA", _CA_KEY, ca=True,
        not_before=NOW - timedelta(days=60), not_after=NOW - timedelta(days=1),
    )  # fmt: skip
    with pytest.raises(AuthenticationFailed, match="expired"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [old_root], NOW)


@pytest.mark.parametrize(("ca", "reason"), [(False, "not a CA"), (None, "no basicConstraints")])
def test_non_ca_issuer_fails(ca: bool | None, reason: str) -> None:
    not_a_ca = _cert("Intermediate CA", _INT_KEY, "Root CA", _CA_KEY, ca=ca)
    with pytest.raises(AuthenticationFailed, match=reason):
        verify_certificate_chain(LEAF, [not_a_ca], [ROOT], NOW)


def test_issuer_whose_key_usage_forbids_cert_signing_fails() -> None:
    no_sign = _cert("Intermediate CA", _INT_KEY, "Root CA", _CA_KEY, ca=True, cert_sign=False)
    with pytest.raises(AuthenticationFailed, match="key usage"):
        verify_certificate_chain(LEAF, [no_sign], [ROOT], NOW)


def test_path_length_constraint_is_enforced() -> None:
    root0 = _cert("Root CA", _CA_KEY, "Root CA", _CA_KEY, ca=True, path_length=0)
    with pytest.raises(AuthenticationFailed, match="allows 0 intermediate"):
        verify_certificate_chain(LEAF, [INTERMEDIATE], [root0], NOW)
    direct = _cert("sun", _LEAF_KEY, "Root CA", _CA_KEY, ca=False)
    verify_certificate_chain(direct, [], [root0], NOW)


def test_issuer_loop_terminates_and_fails() -> None:
    a_key, b_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    a = _cert("A", a_key, "B", b_key, ca=True)
    b = _cert("B", b_key, "A", a_key, ca=True)
    leaf = _cert("leaf", _LEAF_KEY, "A", a_key, ca=False)
    with pytest.raises(AuthenticationFailed):
        verify_certificate_chain(leaf, [a, b], [ROOT], NOW)


def test_chain_depth_is_bounded() -> None:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(11)]
    chain = [_cert("CA 0", keys[0], "Root CA", _CA_KEY, ca=True)]
    for i in range(1, 11):
        chain.append(_cert(f"CA {i}", keys[i], f"CA {i - 1}", keys[i - 1], ca=True))
    leaf = _cert("deep", _LEAF_KEY, "CA 10", keys[10], ca=False)
    with pytest.raises(AuthenticationFailed, match="within 8"):
        verify_certificate_chain(leaf, chain, [ROOT], NOW)
    verify_certificate_chain(chain[3], chain[:3], [ROOT], NOW)  # short ones still pass


def test_load_certificate_der_round_trips() -> None:
    der = LEAF.public_bytes(Encoding.DER)
    assert load_certificate_der_untrusted(der) == LEAF


@pytest.mark.parametrize("cut", [0, 1, 10, 100, -1])
def test_load_certificate_rejects_truncated_der(cut: int) -> None:
    der = LEAF.public_bytes(Encoding.DER)
    with pytest.raises(ParseError):
        load_certificate_der_untrusted(der[:cut])


def test_load_certificate_rejects_a_non_positive_serial_number() -> None:
    der = bytearray(LEAF.public_bytes(Encoding.DER))
    # tbsCertificate: [0] version (a0 03 02 01 02), then serialNumber INTEGER
    at = der.index(b"\xa0\x03\x02\x01\x02") + 5
    assert der[at] == 0x02
    length = der[at + 1]
    der[at + 2 : at + 2 + length] = b"\xff" * length  # two's complement: -1
    with pytest.raises(ParseError, match="serial"):
        load_certificate_der_untrusted(bytes(der))


@given(st.binary(max_size=400))
def test_load_certificate_raises_only_parse_error(data: bytes) -> None:
    with pytest.raises(ParseError):
        load_certificate_der_untrusted(data)


def test_a_name_attribute_of_a_type_its_oid_cannot_have_is_a_parse_error() -> None:
    """Found by the test below: the issuer's commonName turned from UTF8String (tag 0x0C)
    into a BIT STRING (0x03, one flipped byte) made cryptography raise TypeError."""
    der = LEAF.public_bytes(Encoding.DER)
    name = b"Intermediate CA"
    utf8 = bytes([0x0C, len(name)]) + name
    assert der.count(utf8) == 1
    with pytest.raises(ParseError):
        load_certificate_der_untrusted(der.replace(utf8, b"\x03" + utf8[1:]))


@settings(max_examples=1000)
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_load_certificate_with_a_flipped_byte_raises_only_parse_error(
    position: int, xor: int
) -> None:
    der = bytearray(LEAF.public_bytes(Encoding.DER))
    der[position % len(der)] ^= xor
    try:
        cert = load_certificate_der_untrusted(bytes(der))
    except ParseError:
        return
    # If it still decodes, using it for path checks may fail only with AuthenticationFailed.
    with contextlib.suppress(AuthenticationFailed):
        verify_certificate_chain(cert, [INTERMEDIATE], [ROOT], NOW)


# --- CERTREQ -------------------------------------------------------------------------


def _spki_sha1(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha1(spki).digest()


def test_certreq_data_is_concatenated_sha1_of_subject_public_key_info() -> None:
    data = certreq_authority_hashes([ROOT, INTERMEDIATE])
    assert data == _spki_sha1(ROOT) + _spki_sha1(INTERMEDIATE)
    assert len(data) == 40
    assert certreq_authority_hashes([]) == b""


def test_certreq_spki_hash_matches_the_subject_key_identifier_method_1() -> None:
    # RFC 5280 4.2.1.2 method (1) hashes only the BIT STRING, RFC 7296 3.7 the whole SPKI:
    # they must differ, which catches hashing the wrong structure.
    ski = x509.SubjectKeyIdentifier.from_public_key(ROOT.public_key()).digest
    assert _spki_sha1(ROOT) != ski
    assert certreq_authority_hashes([ROOT]) == _spki_sha1(ROOT)


@pytest.mark.parametrize(
    ("data_of", "expected"),
    [
        (lambda: certreq_authority_hashes([ROOT]), True),
        (lambda: certreq_authority_hashes([INTERMEDIATE, ROOT]), True),
        (lambda: certreq_authority_hashes([INTERMEDIATE]), False),
        (lambda: b"", False),
        (lambda: b"\x00" + certreq_authority_hashes([ROOT]), False),  # misaligned
        (lambda: certreq_authority_hashes([ROOT])[:19], False),
    ],
)
def test_certreq_matches(data_of: Callable[[], bytes], expected: bool) -> None:
    assert certreq_matches(data_of(), ROOT) is expected
