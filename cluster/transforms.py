"""The algorithm registry: IANA transform ids <-> `cryptography` objects.

Shared by IKE (SK payload, PRF) and ESP. Names are strongSwan's proposal keywords so
configuration reads like swanctl.conf. Legacy algorithms are marked and only offered or
accepted when the operator asks for them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .errors import ParseError


class Encr(IntEnum):
    DES3 = 3
    NULL = 11
    AES_CBC = 12
    AES_GCM_16 = 20
    CHACHA20_POLY1305 = 28


class Prf(IntEnum):
    HMAC_MD5 = 1
    HMAC_SHA1 = 2
    HMAC_SHA2_256 = 5
    HMAC_SHA2_384 = 6
    HMAC_SHA2_512 = 7


class Integ(IntEnum):
    NONE = 0
    HMAC_MD5_96 = 1
    HMAC_SHA1_96 = 2
    HMAC_SHA2_256_128 = 12
    HMAC_SHA2_384_192 = 13
    HMAC_SHA2_512_256 = 14


class Esn(IntEnum):
    NO_ESN = 0
    ESN = 1


# --- encryption -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncrAlgorithm:
    """One ENCR transform at one key length."""

    transform_id: Encr
    key_bits: int
    name: str
    aead: bool
    block_size: int  # padding unit of the plaintext
    iv_size: int  # bytes of IV carried in each message
    icv_size: int  # AEAD tag bytes (0 for non-AEAD)
    salt_size: int  # AEAD implicit nonce bytes taken from KEYMAT
    legacy: bool = False
    needs_key_length: bool = True  # whether the Key Length attribute is sent

    @property
    def keymat_size(self) -> int:
        return self.key_bits // 8 + self.salt_size


ENCR_ALGORITHMS: dict[str, EncrAlgorithm] = {}


def _register_encr(alg: EncrAlgorithm) -> None:
    ENCR_ALGORITHMS[alg.name] = alg


for _bits in (128, 192, 256):
    _register_encr(EncrAlgorithm(Encr.AES_CBC, _bits, f"aes{_bits}", False, 16, 16, 0, 0))
    _register_encr(EncrAlgorithm(Encr.AES_GCM_16, _bits, f"aes{_bits}gcm16", True, 4, 8, 16, 4))
_register_encr(
    EncrAlgorithm(Encr.CHACHA20_POLY1305, 256, "chacha20poly1305", True, 4, 8, 16, 4,
                  needs_key_length=False)
)
_register_encr(
    EncrAlgorithm(Encr.DES3, 192, "3des", False, 8, 8, 0, 0, legacy=True, needs_key_length=False)
)
# strongSwan aliases
ENCR_ALIASES = {"aes": "aes128", "aes128gcm128": "aes128gcm16", "aes256gcm128": "aes256gcm16",
                "aes192gcm128": "aes192gcm16"}


def find_encr(transform_id: int, key_bits: int | None) -> EncrAlgorithm | None:
    """The registered algorithm for a received ENCR transform, or None if unsupported."""
    for alg in ENCR_ALGORITHMS.values():
        if alg.transform_id == transform_id:
            if not alg.needs_key_length and key_bits in (None, alg.key_bits):
                return alg
            if alg.needs_key_length and key_bits == alg.key_bits:
                return alg
    return None


class AeadCipher(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


class SymmetricKey:
    """ENCR key material bound to an algorithm; objects are built once per SA."""

    __slots__ = ("_aead", "_key", "algorithm", "salt")

    def __init__(self, algorithm: EncrAlgorithm, keymat: bytes) -> None:
        if len(keymat) != algorithm.keymat_size:
            raise ValueError("wrong key material length")
        self.algorithm = algorithm
        key_len = algorithm.key_bits // 8
        self._key = keymat[:key_len]
        self.salt = keymat[key_len:]
        self._aead: AeadCipher | None = None
        if algorithm.transform_id == Encr.AES_GCM_16:
            self._aead = AESGCM(self._key)
        elif algorithm.transform_id == Encr.CHACHA20_POLY1305:
            self._aead = ChaCha20Poly1305(self._key)

    def seal(self, iv: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AEAD: ciphertext | tag, nonce = salt | IV (RFC 5282, RFC 7634)."""
        assert self._aead is not None
        return self._aead.encrypt(self.salt + iv, plaintext, aad)

    def open_untrusted(self, iv: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
        """AEAD decrypt; None when the tag does not verify."""
        assert self._aead is not None
        try:
            return self._aead.decrypt(self.salt + iv, ciphertext, aad)
        except Exception:  # InvalidTag, or a ciphertext shorter than the tag
            return None

    def cbc_encrypt(self, iv: bytes, plaintext: bytes) -> bytes:
        encryptor = self._cbc(iv).encryptor()
        return encryptor.update(plaintext) + encryptor.finalize()

    def cbc_decrypt_untrusted(self, iv: bytes, ciphertext: bytes) -> bytes:
        if len(ciphertext) % self.algorithm.block_size:
            raise ParseError("ciphertext is not a whole number of blocks")
        decryptor = self._cbc(iv).decryptor()
        return decryptor.update(ciphertext) + decryptor.finalize()

    def _cbc(self, iv: bytes) -> Cipher[modes.CBC]:
        if self.algorithm.transform_id == Encr.DES3:
            return Cipher(TripleDES(self._key), modes.CBC(iv))
        return Cipher(algorithms.AES(self._key), modes.CBC(iv))


# --- PRF and integrity ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrfAlgorithm:
    transform_id: Prf
    name: str
    hash_name: str
    size: int  # output bytes and preferred key size
    legacy: bool = False

    def __call__(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self.hash_name)

    def plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        """prf+ of RFC 7296 2.13."""
        out = bytearray()
        block = b""
        counter = 1
        while len(out) < length:
            block = hmac.digest(key, block + seed + bytes([counter]), self.hash_name)
            out += block
            counter += 1
        return bytes(out[:length])


PRF_ALGORITHMS: dict[str, PrfAlgorithm] = {
    a.name: a
    for a in (
        PrfAlgorithm(Prf.HMAC_SHA2_256, "prfsha256", "sha256", 32),
        PrfAlgorithm(Prf.HMAC_SHA2_384, "prfsha384", "sha384", 48),
        PrfAlgorithm(Prf.HMAC_SHA2_512, "prfsha512", "sha512", 64),
        PrfAlgorithm(Prf.HMAC_SHA1, "prfsha1", "sha1", 20, legacy=True),
        PrfAlgorithm(Prf.HMAC_MD5, "prfmd5", "md5", 16, legacy=True),
    )
}


@dataclass(frozen=True, slots=True)
class IntegAlgorithm:
    transform_id: Integ
    name: str
    hash_name: str
    key_size: int
    icv_size: int
    legacy: bool = False
    prf_name: str = ""  # the PRF strongSwan pairs with it when none is named

    def compute(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self.hash_name)[: self.icv_size]

    def verify(self, key: bytes, data: bytes, icv: bytes) -> bool:
        return hmac.compare_digest(self.compute(key, data), icv)


INTEG_ALGORITHMS: dict[str, IntegAlgorithm] = {
    a.name: a
    for a in (
        IntegAlgorithm(Integ.HMAC_SHA2_256_128, "sha256", "sha256", 32, 16, prf_name="prfsha256"),
        IntegAlgorithm(Integ.HMAC_SHA2_384_192, "sha384", "sha384", 48, 24, prf_name="prfsha384"),
        IntegAlgorithm(Integ.HMAC_SHA2_512_256, "sha512", "sha512", 64, 32, prf_name="prfsha512"),
        IntegAlgorithm(Integ.HMAC_SHA1_96, "sha1", "sha1", 20, 12, legacy=True,
                       prf_name="prfsha1"),
        IntegAlgorithm(Integ.HMAC_MD5_96, "md5", "md5", 16, 12, legacy=True, prf_name="prfmd5"),
    )
}
INTEG_ALIASES = {"sha": "sha1", "sha2_256": "sha256", "sha2_384": "sha384",
                 "sha2_512": "sha512"}
# swanctl's sha256_96 on a child: HMAC-SHA-256 negotiated as usual (transform 12) but
# its ICV cut to 96 bits in ESP, as some old implementations do (never proposed by name)
SHA256_96 = dataclasses.replace(INTEG_ALGORITHMS["sha256"], name="sha256_96", icv_size=12)


def find_prf(transform_id: int) -> PrfAlgorithm | None:
    return next((a for a in PRF_ALGORITHMS.values() if a.transform_id == transform_id), None)


def find_integ(transform_id: int) -> IntegAlgorithm | None:
    return next((a for a in INTEG_ALGORITHMS.values() if a.transform_id == transform_id), None)


def sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()
