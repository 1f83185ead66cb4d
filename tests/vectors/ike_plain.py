"""A minimal, independent IKEv2 reader for recorded exchanges (RFC 7296 3.1-3.14).

Written for the vectors only: it walks payload chains, opens the SK payload with
keys strongSwan logged, and pulls out nonces, KE data and SA SPIs. It shares no
code with ``cluster`` on purpose, so vectors checked with it are a second opinion.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

EXCHANGES = {34: "IKE_SA_INIT", 35: "IKE_AUTH", 36: "CREATE_CHILD_SA", 37: "INFORMATIONAL"}
# Payload types (RFC 7296 3.2) this reader looks for.
SA, KE, NONCE, SK = 33, 34, 40, 46
FLAG_INITIATOR, FLAG_RESPONSE = 0x08, 0x20


@dataclass(frozen=True)
class Header:
    spi_i: bytes
    spi_r: bytes
    next_payload: int
    exchange: int
    flags: int
    message_id: int
    length: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)

    @property
    def from_original_initiator(self) -> bool:
        return bool(self.flags & FLAG_INITIATOR)


def header(message: bytes) -> Header:
    spi_i, spi_r, nxt, _ver, exch, flags, mid, length = struct.unpack_from("!8s8sBBBBII", message)
    return Header(spi_i, spi_r, nxt, exch, flags, mid, length)


def payloads(first: int, data: bytes) -> list[tuple[int, bytes]]:
    """(type, body) for a payload chain starting with type ``first``."""
    out = []
    kind, pos = first, 0
    while kind != 0:
        nxt, _crit, length = struct.unpack_from("!BBH", data, pos)
        out.append((kind, data[pos + 4:pos + length]))
        kind, pos = nxt, pos + length
    return out


@dataclass(frozen=True)
class SkKeys:
    """Keys protecting one direction: SK_e (with salt for AEAD) and SK_a."""

    cipher: str  # "aes-gcm-16", "chacha20-poly1305" or "aes-cbc"
    sk_e: bytes
    sk_a: bytes = b""
    integ_hash: str = ""  # hashlib name for HMAC integrity, with aes-cbc
    icv_len: int = 16


def open_sk(message: bytes, keys: SkKeys) -> tuple[int, bytes]:
    """Verify and decrypt the SK payload; return (first inner type, inner payloads)."""
    hdr = header(message)
    if hdr.next_payload != SK:
        raise ValueError("first payload is not SK")
    inner_first = message[28]
    body_start, body_end = 32, hdr.length
    aad = message[:body_start]
    if keys.cipher in ("aes-gcm-16", "chacha20-poly1305"):
        # RFC 5282 / RFC 7634: 8-byte IV, nonce = salt | IV, AAD up to the IV.
        iv = message[body_start:body_start + 8]
        sealed = message[body_start + 8:body_end]
        if keys.cipher == "aes-gcm-16":
            plain = AESGCM(keys.sk_e[:-4]).decrypt(keys.sk_e[-4:] + iv, sealed, aad)
        else:
            plain = ChaCha20Poly1305(keys.sk_e[:-4]).decrypt(keys.sk_e[-4:] + iv, sealed, aad)
    elif keys.cipher == "aes-cbc":
        icv = message[body_end - keys.icv_len:body_end]
        mac = hmac.new(keys.sk_a, message[:body_end - keys.icv_len], keys.integ_hash)
        if not hmac.compare_digest(mac.digest()[:keys.icv_len], icv):
            raise ValueError("integrity check failed")
        iv = message[body_start:body_start + 16]
        decryptor = Cipher(algorithms.AES(keys.sk_e), modes.CBC(iv)).decryptor()
        plain = decryptor.update(message[body_start + 16:body_end - keys.icv_len])
        plain += decryptor.finalize()
    else:
        raise ValueError(f"unknown cipher {keys.cipher}")
    pad_len = plain[-1]
    return inner_first, plain[:len(plain) - 1 - pad_len]


def find(chain: list[tuple[int, bytes]], kind: int) -> bytes | None:
    return next((body for k, body in chain if k == kind), None)


def ke_data(body: bytes) -> tuple[int, bytes]:
    """(DH group, public value) of a KE payload body."""
    group, _reserved = struct.unpack_from("!HH", body)
    return group, body[4:]


def first_proposal_spi(sa_body: bytes) -> bytes:
    """The SPI of the first proposal of an SA payload body (8 bytes for IKE rekeys)."""
    spi_size = sa_body[6]
    return sa_body[8:8 + spi_size]


def prf_hmac(hash_name: str, key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, getattr(hashlib, hash_name)).digest()


def prf_plus(hash_name: str, key: bytes, seed: bytes, length: int) -> bytes:
    """RFC 7296 2.13: T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n)."""
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = prf_hmac(hash_name, key, block + seed + bytes([counter]))
        out += block
        counter += 1
    return out[:length]
