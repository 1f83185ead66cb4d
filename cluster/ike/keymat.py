"""Key derivation for IKE and Child SAs (RFC 7296 2.13, 2.14, 2.17, 2.18)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..transforms import EncrAlgorithm, IntegAlgorithm, PrfAlgorithm


@dataclass(frozen=True)
class IkeKeys:
    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def skeyseed(prf: PrfAlgorithm, nonce_i: bytes, nonce_r: bytes, shared: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) (RFC 7296 2.14)."""
    return prf(nonce_i + nonce_r, shared)


def rekey_skeyseed(prf: PrfAlgorithm, old_sk_d: bytes, shared: bytes,
                   nonce_i: bytes, nonce_r: bytes) -> bytes:
    """SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) (RFC 7296 2.18)."""
    return prf(old_sk_d, shared + nonce_i + nonce_r)


def derive_ike_keys(prf: PrfAlgorithm, encr: EncrAlgorithm, integ: IntegAlgorithm | None,
                    seed: bytes, nonce_i: bytes, nonce_r: bytes,
                    spi_i: bytes, spi_r: bytes) -> IkeKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni|Nr|SPIi|SPIr)."""
    a = integ.key_size if integ else 0
    e = encr.keymat_size
    p = prf.size
    stream = prf.plus(seed, nonce_i + nonce_r + spi_i + spi_r, p + 2 * a + 2 * e + 2 * p)
    sizes = (p, a, a, e, e, p, p)
    parts = []
    pos = 0
    for size in sizes:
        parts.append(stream[pos : pos + size])
        pos += size
    return IkeKeys(*parts)


def mix_ppk(prf: PrfAlgorithm, ppk: bytes, keys: IkeKeys) -> IkeKeys:
    """SK_d, SK_pi and SK_pr each become prf+(PPK, the old key), of its length (RFC 8784
    3); the keys that protect IKE messages stay."""
    def mixed(key: bytes) -> bytes:
        return prf.plus(ppk, key, len(key))

    return replace(keys, sk_d=mixed(keys.sk_d), sk_pi=mixed(keys.sk_pi),
                   sk_pr=mixed(keys.sk_pr))


@dataclass(frozen=True)
class ChildKeys:
    """ESP keys per direction: i->r first in KEYMAT (RFC 7296 2.17)."""

    encr_i: bytes = field(repr=False)
    integ_i: bytes = field(repr=False)
    encr_r: bytes = field(repr=False)
    integ_r: bytes = field(repr=False)


def derive_child_keys(prf: PrfAlgorithm, sk_d: bytes, encr: EncrAlgorithm,
                      integ: IntegAlgorithm | None, nonce_i: bytes, nonce_r: bytes,
                      shared: bytes = b"") -> ChildKeys:
    """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr)."""
    e = encr.keymat_size
    a = integ.key_size if integ else 0
    stream = prf.plus(sk_d, shared + nonce_i + nonce_r, 2 * (e + a))
    return ChildKeys(stream[:e], stream[e : e + a], stream[e + a : 2 * e + a], stream[2 * e + a :])
