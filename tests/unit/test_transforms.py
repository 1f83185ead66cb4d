"""The algorithm registry against published vectors: RFC 4231 (HMAC-SHA2 as PRF),
RFC 4868 (truncated integrity), McGrew/Viega GCM, RFC 8439 ChaCha20-Poly1305, RFC 3602 CBC,
and prf+ (RFC 7296 2.13) written out by hand."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from cluster.errors import ParseError
from cluster.transforms import (
    ENCR_ALGORITHMS,
    INTEG_ALGORITHMS,
    PRF_ALGORITHMS,
    Encr,
    Integ,
    Prf,
    PrfAlgorithm,
    SymmetricKey,
    find_encr,
    find_integ,
    find_prf,
)

# --- RFC 4231: HMAC-SHA-256/384/512 ---------------------------------------------------------

_LONG_KEY = b"\xaa" * 131
RFC4231: list[tuple[str, bytes, bytes, dict[str, str]]] = [
    ("case1", b"\x0b" * 20, b"Hi There", {
        "prfsha256": "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        "prfsha384": "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59c"
                     "faea9ea9076ede7f4af152e8b2fa9cb6",
        "prfsha512": "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
                     "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854",
    }),
    ("case2", b"Jefe", b"what do ya want for nothing?", {
        "prfsha256": "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        "prfsha384": "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
                     "8e2240ca5e69e2c78b3239ecfab21649",
        "prfsha512": "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
                     "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
    }),
    ("case3", b"\xaa" * 20, b"\xdd" * 50, {
        "prfsha256": "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
        "prfsha384": "88062608d3e6ad8a0aa2ace014c8a86f0aa635d947ac9febe83ef4e55966144b"
                     "2a5ab39dc13814b94e3ab6e101a34f27",
        "prfsha512": "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39"
                     "bf3e848279a722c806b485a47e67c807b946a337bee8942674278859e13292fb",
    }),
    ("case4", bytes(range(1, 26)), b"\xcd" * 50, {
        "prfsha256": "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
        "prfsha384": "3e8a69b7783c25851933ab6290af6ca77a9981480850009cc5577c6e1f573b4e"
                     "6801dd23c4a7d679ccf8a386c674cffb",
        "prfsha512": "b0ba465637458c6990e5a8c5f61d4af7e576d97ff94b872de76f8050361ee3db"
                     "a91ca5c11aa25eb4d679275cc5788063a5f19741120c4f2de2adebeb10a298dd",
    }),
    ("case6", _LONG_KEY, b"Test Using Larger Than Block-Size Key - Hash Key First", {
        "prfsha256": "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
        "prfsha384": "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c6"
                     "0c2ef6ab4030fe8296248df163f44952",
        "prfsha512": "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f352"
                     "6b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598",
    }),
    ("case7", _LONG_KEY,
     b"This is a test using a larger than block-size key and a larger than block-size data."
     b" The key needs to be hashed before being used by the HMAC algorithm.", {
        "prfsha256": "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
        "prfsha384": "6617178e941f020d351e2f254e8fd32c602420feb0b8fb9adccebb82461e99c5"
                     "a678cc31e799176d3860e6110c46523e",
        "prfsha512": "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944"
                     "b6022cac3c4982b10d5eeb55c3e4de15134676fb6de0446065c97440fa8c6a58",
    }),
]

# RFC 4231 test case 5: output truncated to 128 bits
RFC4231_CASE5 = (b"\x0c" * 20, b"Test With Truncation", {
    "sha256": "a3b6167473100ee06e0c796c2955552b",
    "sha384": "3abf34c3503b2a23a46efc619baef897",
    "sha512": "415fad6271580a531d4179bc891d87a6",
})


@pytest.mark.parametrize(("case", "key", "data", "expected"), RFC4231,
                         ids=[c[0] for c in RFC4231])
def test_prf_matches_rfc4231(case: str, key: bytes, data: bytes,
                             expected: dict[str, str]) -> None:
    for name, hex_mac in expected.items():
        prf = PRF_ALGORITHMS[name]
        out = prf(key, data)
        assert out.hex() == hex_mac, f"{case} {name}"
        assert len(out) == prf.size


def test_rfc4231_case5_truncation_prefix() -> None:
    key, data, expected = RFC4231_CASE5
    for name, hex_mac in expected.items():
        assert PRF_ALGORITHMS["prf" + name](key, data)[:16].hex() == hex_mac


# --- RFC 4868: integrity truncation ------------------------------------------------------

@pytest.mark.parametrize(("name", "transform_id", "key_bytes", "icv_bytes"), [
    ("sha256", Integ.HMAC_SHA2_256_128, 32, 16),
    ("sha384", Integ.HMAC_SHA2_384_192, 48, 24),
    ("sha512", Integ.HMAC_SHA2_512_256, 64, 32),
])
def test_integrity_truncation_lengths_follow_rfc4868(name: str, transform_id: Integ,
                                                     key_bytes: int, icv_bytes: int) -> None:
    alg = INTEG_ALGORITHMS[name]
    assert alg.transform_id == transform_id
    assert alg.key_size == key_bytes  # RFC 4868 2.1.1: key length = hash output length
    assert alg.icv_size == icv_bytes  # 2.1.2: truncated to half the output
    assert find_integ(transform_id) is alg
    key = bytes(range(key_bytes))
    data = b"Hi There"
    icv = alg.compute(key, data)
    assert len(icv) == icv_bytes
    assert icv == hmac.new(key, data, getattr(hashlib, name)).digest()[:icv_bytes]
    assert alg.verify(key, data, icv)
    assert not alg.verify(key, data, bytes(icv_bytes))
    assert not alg.verify(key, data + b"!", icv)
    assert not alg.verify(key, data, icv[:-1])


def test_rfc4231_case5_through_the_integrity_transform() -> None:
    key, data, expected = RFC4231_CASE5
    # HMAC-SHA-256-128 outputs exactly the 128-bit truncation of RFC 4231 case 5
    assert INTEG_ALGORITHMS["sha256"].compute(key, data).hex() == expected["sha256"]
    # 384/512 keep more bits; their first 128 bits are the published value
    assert INTEG_ALGORITHMS["sha384"].compute(key, data)[:16].hex() == expected["sha384"]
    assert INTEG_ALGORITHMS["sha512"].compute(key, data)[:16].hex() == expected["sha512"]


def test_legacy_integrity_is_96_bits() -> None:
    assert INTEG_ALGORITHMS["sha1"].icv_size == 12 and INTEG_ALGORITHMS["sha1"].legacy
    assert INTEG_ALGORITHMS["md5"].icv_size == 12 and INTEG_ALGORITHMS["md5"].legacy


# --- prf+ (RFC 7296 2.13) --------------------------------------------------------------------

def _hand_prf_plus(hash_name: str, key: bytes, seed: bytes, length: int) -> bytes:
    """T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n), spelled out block by block."""
    t1 = hmac.new(key, seed + b"\x01", hash_name).digest()
    t2 = hmac.new(key, t1 + seed + b"\x02", hash_name).digest()
    t3 = hmac.new(key, t2 + seed + b"\x03", hash_name).digest()
    t4 = hmac.new(key, t3 + seed + b"\x04", hash_name).digest()
    stream = t1 + t2 + t3 + t4
    assert length <= len(stream)
    return stream[:length]


@pytest.mark.parametrize("name", ["prfsha256", "prfsha384", "prfsha512", "prfsha1"])
def test_prf_plus_matches_hand_expansion(name: str) -> None:
    prf = PRF_ALGORITHMS[name]
    key = b"K" * 17
    seed = bytes.fromhex("0123456789abcdef") * 5
    n = prf.size
    for length in (1, n - 1, n, n + 1, 2 * n, 3 * n + 5, 4 * n):
        expected = _hand_prf_plus(prf.hash_name, key, seed, length)
        assert prf.plus(key, seed, length) == expected, length


def test_prf_plus_first_block_counter_is_one_not_zero() -> None:
    prf = PRF_ALGORITHMS["prfsha256"]
    key, seed = b"k", b"seed"
    assert prf.plus(key, seed, 32) == hmac.new(key, seed + b"\x01", "sha256").digest()
    assert prf.plus(key, seed, 32) != hmac.new(key, seed + b"\x00", "sha256").digest()


def test_prf_plus_is_prefix_stable() -> None:
    prf: PrfAlgorithm = PRF_ALGORITHMS["prfsha512"]
    long = prf.plus(b"key", b"seed", 200)
    for n in (1, 63, 64, 65, 128, 199):
        assert prf.plus(b"key", b"seed", n) == long[:n]


def test_prf_registry_ids() -> None:
    assert find_prf(Prf.HMAC_SHA2_256) is PRF_ALGORITHMS["prfsha256"]
    assert find_prf(Prf.HMAC_SHA2_384) is PRF_ALGORITHMS["prfsha384"]
    assert find_prf(Prf.HMAC_SHA2_512) is PRF_ALGORITHMS["prfsha512"]
    assert find_prf(99) is None
    assert PRF_ALGORITHMS["prfsha1"].legacy and PRF_ALGORITHMS["prfmd5"].legacy


# --- AES-GCM: McGrew/Viega "The Galois/Counter Mode of Operation", test cases 3, 4, 16 ------
# IKEv2/ESP split the 96-bit GCM nonce into a 4-byte salt from KEYMAT and an 8-byte IV
# carried in the packet (RFC 4106 4, RFC 5282).

_GCM_P = ("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
          "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255")
_GCM_A = "feedfacedeadbeeffeedfacedeadbeefabaddad2"
GCM_CASES = [
    ("tc3-aes128", "aes128gcm16", "feffe9928665731c6d6a8f9467308308", _GCM_P, "",
     "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
     "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985",
     "4d5c2af327cd64a62cf35abd2ba6fab4"),
    ("tc4-aes128-aad", "aes128gcm16", "feffe9928665731c6d6a8f9467308308", _GCM_P[:120],
     _GCM_A,
     "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
     "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
     "5bc94fbc3221a5db94fae95ae7121a47"),
    ("tc16-aes256-aad", "aes256gcm16",
     "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308", _GCM_P[:120],
     _GCM_A,
     "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
     "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
     "76fc6ece0f4e1768cddf8853bb2d551b"),
]
_GCM_NONCE = bytes.fromhex("cafebabefacedbaddecaf888")


@pytest.mark.parametrize(("case", "alg_name", "key", "plain", "aad", "cipher", "tag"),
                         GCM_CASES, ids=[c[0] for c in GCM_CASES])
def test_aes_gcm_matches_mcgrew_viega(case: str, alg_name: str, key: str, plain: str, aad: str,
                                      cipher: str, tag: str) -> None:
    alg = ENCR_ALGORITHMS[alg_name]
    salt, iv = _GCM_NONCE[:4], _GCM_NONCE[4:]
    sym = SymmetricKey(alg, bytes.fromhex(key) + salt)
    assert sym.salt == salt
    sealed = sym.seal(iv, bytes.fromhex(plain), bytes.fromhex(aad))
    assert sealed.hex() == cipher + tag
    assert sym.open_untrusted(iv, sealed, bytes.fromhex(aad)) == bytes.fromhex(plain)
    tampered = bytearray(sealed)
    tampered[0] ^= 1
    assert sym.open_untrusted(iv, bytes(tampered), bytes.fromhex(aad)) is None
    assert sym.open_untrusted(iv, sealed, bytes.fromhex(aad) + b"x") is None
    assert sym.open_untrusted(iv, sealed[:10], b"") is None  # shorter than the tag


# --- ChaCha20-Poly1305: RFC 8439 2.8.2 (nonce = 4-byte salt | 8-byte IV, RFC 7634 2) ---------

def test_chacha20_poly1305_matches_rfc8439() -> None:
    alg = ENCR_ALGORITHMS["chacha20poly1305"]
    key = bytes(range(0x80, 0xA0))
    salt, iv = bytes.fromhex("07000000"), bytes.fromhex("4041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plain = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
             b"for the future, sunscreen would be it.")
    expected = (
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
        "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
        "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116"
        "1ae10b594f09e26a7e902ecbd0600691"
    )
    sym = SymmetricKey(alg, key + salt)
    assert sym.seal(iv, plain, aad).hex() == expected
    assert sym.open_untrusted(iv, bytes.fromhex(expected), aad) == plain


# --- AES-CBC: RFC 3602 4 case #1 ----------------------------------------------------------------

def test_aes_cbc_matches_rfc3602() -> None:
    sym = SymmetricKey(ENCR_ALGORITHMS["aes128"], bytes.fromhex("06a9214036b8a15b512e03d534120006"))
    iv = bytes.fromhex("3dafba429d9eb430b422da802c9fac41")
    cipher = sym.cbc_encrypt(iv, b"Single block msg")
    assert cipher.hex() == "e353779c1079aeb82708942dbe77181a"
    assert sym.cbc_decrypt_untrusted(iv, cipher) == b"Single block msg"


def test_cbc_decrypt_of_partial_block_is_a_parse_error() -> None:
    sym = SymmetricKey(ENCR_ALGORITHMS["aes256"], bytes(32))
    with pytest.raises(ParseError):
        sym.cbc_decrypt_untrusted(bytes(16), bytes(17))


def test_symmetric_key_refuses_wrong_keymat_length() -> None:
    with pytest.raises(ValueError):
        SymmetricKey(ENCR_ALGORITHMS["aes128gcm16"], bytes(16))  # salt missing


# --- registry shape -------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "transform_id", "key_bits", "keymat", "iv", "icv", "aead"), [
    ("aes128", Encr.AES_CBC, 128, 16, 16, 0, False),
    ("aes256", Encr.AES_CBC, 256, 32, 16, 0, False),
    ("aes128gcm16", Encr.AES_GCM_16, 128, 20, 8, 16, True),
    ("aes256gcm16", Encr.AES_GCM_16, 256, 36, 8, 16, True),
    ("chacha20poly1305", Encr.CHACHA20_POLY1305, 256, 36, 8, 16, True),
])
def test_encr_registry(name: str, transform_id: Encr, key_bits: int, keymat: int, iv: int,
                       icv: int, aead: bool) -> None:
    alg = ENCR_ALGORITHMS[name]
    assert (alg.transform_id, alg.key_bits, alg.keymat_size, alg.iv_size, alg.icv_size,
            alg.aead) == (transform_id, key_bits, keymat, iv, icv, aead)
    sent_bits = key_bits if alg.needs_key_length else None
    assert find_encr(transform_id, sent_bits) is alg


def test_find_encr_needs_the_key_length_for_aes() -> None:
    assert find_encr(Encr.AES_CBC, None) is None  # RFC 7296 3.3.5: AES needs Key Length
    assert find_encr(Encr.AES_GCM_16, 64) is None
    assert find_encr(Encr.CHACHA20_POLY1305, None) is ENCR_ALGORITHMS["chacha20poly1305"]
    assert find_encr(Encr.CHACHA20_POLY1305, 128) is None
    assert find_encr(99, 128) is None
