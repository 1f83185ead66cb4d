"""Cipher objects for one SA direction, built once at install time.

AEAD (RFC 4106 AES-GCM, RFC 7634 ChaCha20-Poly1305): the `cryptography` object is
reused for every packet; the 4-byte salt from KEYMAT prefixes the 8-byte IV.

CBC (RFC 3602) + HMAC (RFC 4868): instead of a new Cipher per packet (about 4 us), one
long-lived CBC context per direction is fed whole blocks only. Encrypting a random
block first makes its ciphertext the packet's IV: C0 = E(R xor C_prev) is as
unpredictable as R, and the packet's blocks then chain from C0 exactly as CBC with
IV = C0. Decrypting, the context is fed IV | ciphertext and the first output block
(garbage from the previous packet's chaining) is dropped. HMAC keeps a keyed object
and copies it per packet, cheaper than a one-shot `hmac.digest`.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..transforms import Encr, EncrAlgorithm, IntegAlgorithm

AeadObject = AESGCM | ChaCha20Poly1305
AEAD_TRANSFORMS = (Encr.AES_GCM_16, Encr.CHACHA20_POLY1305)
CBC_TRANSFORMS = (Encr.AES_CBC, Encr.DES3)


def check_keys(encr: EncrAlgorithm, integ: IntegAlgorithm | None, encr_key: bytes,
               integ_key: bytes) -> None:
    if encr.transform_id not in AEAD_TRANSFORMS + CBC_TRANSFORMS:
        raise ValueError(f"ESP does not support {encr.name}")
    if encr.aead and integ is not None:
        raise ValueError(f"{encr.name} is combined-mode: no separate integrity algorithm")
    if not encr.aead and integ is None:
        raise ValueError(f"{encr.name} needs an integrity algorithm")
    if len(encr_key) != encr.keymat_size:
        raise ValueError(f"{encr.name} needs {encr.keymat_size} bytes of key material")
    if integ is not None and len(integ_key) != integ.key_size:
        raise ValueError(f"{integ.name} needs a {integ.key_size}-byte key")


def make_aead(encr: EncrAlgorithm, keymat: bytes) -> tuple[AeadObject, bytes]:
    """The AEAD object and its salt."""
    key_len = encr.key_bits // 8
    key, salt = keymat[:key_len], keymat[key_len:]
    if encr.transform_id == Encr.AES_GCM_16:
        return AESGCM(key), salt
    return ChaCha20Poly1305(key), salt


def _cbc(encr: EncrAlgorithm, key: bytes) -> Cipher[modes.CBC]:
    iv = bytes(encr.block_size)
    if encr.transform_id == Encr.DES3:
        return Cipher(TripleDES(key), modes.CBC(iv))
    return Cipher(algorithms.AES(key), modes.CBC(iv))


def make_cbc_encryptor(encr: EncrAlgorithm, key: bytes) -> CipherContext:
    return _cbc(encr, key).encryptor()


def make_cbc_decryptor(encr: EncrAlgorithm, key: bytes) -> CipherContext:
    return _cbc(encr, key).decryptor()


def make_hmac(integ: IntegAlgorithm, key: bytes) -> hmac.HMAC:
    """A keyed HMAC object to `.copy()` per packet."""
    return hmac.new(key, digestmod=integ.hash_name)
