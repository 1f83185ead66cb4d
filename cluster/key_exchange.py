"""Key exchange methods (IKEv2 transform type 4): MODP, ECP and Curve25519/448.

Public values are encoded as IKEv2 carries them: MODP left-padded to the prime's size
(RFC 7296 3.4), ECP as x | y without a point-format byte (RFC 5903 7), Montgomery curves
as the raw u-coordinate (RFC 8031). Peer values are validated before use (RFC 6989).
"""

from __future__ import annotations

import warnings
from enum import IntEnum
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import dh, ec, x448, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import ParseError


class DhGroup(IntEnum):
    MODP1024 = 2  # legacy: Windows' built-in client proposes it unless told otherwise
    MODP2048 = 14
    MODP3072 = 15
    MODP4096 = 16
    ECP256 = 19
    ECP384 = 20
    ECP521 = 21
    CURVE25519 = 31
    CURVE448 = 32


# strongSwan keywords
DH_NAMES: dict[str, DhGroup] = {
    "modp1024": DhGroup.MODP1024,
    "modp2048": DhGroup.MODP2048,
    "modp3072": DhGroup.MODP3072,
    "modp4096": DhGroup.MODP4096,
    "ecp256": DhGroup.ECP256,
    "ecp384": DhGroup.ECP384,
    "ecp521": DhGroup.ECP521,
    "x25519": DhGroup.CURVE25519,
    "curve25519": DhGroup.CURVE25519,
    "x448": DhGroup.CURVE448,
    "curve448": DhGroup.CURVE448,
}


class KeyExchange(Protocol):
    """Our half of one key exchange."""

    group: DhGroup

    def public_value(self) -> bytes: ...

    def private_value(self) -> bytes:
        """The secret half: `new_key_exchange(group, it)` on another node (sealed in
        between) makes the same exchange."""
        ...

    def shared_secret_untrusted(self, peer_value: bytes) -> bytes: ...


# Offered only with [ike] legacy_algorithms: 1024-bit MODP is too weak for new set-ups.
LEGACY_GROUPS = frozenset({DhGroup.MODP1024})

# RFC 2409 6.2 group 2 (the Oakley group of IKEv1, 1024 bits)
_MODP_2 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE65381FFFFFFFFFFFFFFFF",
    16,
)

# RFC 3526 groups 14-16 (checked against the RFC's pi formula in the tests).
_MODP_14 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)

_MODP_15 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
    16,
)

_MODP_16 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33"
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864"
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2"
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D7"
    "88719A10BDBA5B2699C327186AF4E23C1A946834B6150BDA2583E9CA2AD44CE8"
    "DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D99B2964FA090C3A2"
    "233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA9"
    "93B4EA988D8FDDC186FFB7DC90A6C08F4DF435C934063199FFFFFFFFFFFFFFFF",
    16,
)
_MODP_PRIMES = {DhGroup.MODP1024: _MODP_2, DhGroup.MODP2048: _MODP_14,
                DhGroup.MODP3072: _MODP_15, DhGroup.MODP4096: _MODP_16}
_MODP_PARAMETERS: dict[DhGroup, dh.DHParameters] = {}


def _modp_parameters(group: DhGroup) -> dh.DHParameters:
    params = _MODP_PARAMETERS.get(group)
    if params is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FFDH is deprecated in cryptography, still needed
            params = dh.DHParameterNumbers(_MODP_PRIMES[group], 2).parameters()
        _MODP_PARAMETERS[group] = params
    return params


class ModpExchange:
    def __init__(self, group: DhGroup, private: bytes | None = None) -> None:
        self.group = group
        self._p = _MODP_PRIMES[group]
        self._size = (self._p.bit_length() + 7) // 8
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if private is None:
                self._key = _modp_parameters(group).generate_private_key()
            else:
                x = int.from_bytes(private, "big")
                numbers = _modp_parameters(group).parameter_numbers()
                public = dh.DHPublicNumbers(pow(2, x, self._p), numbers)
                self._key = dh.DHPrivateNumbers(x, public).private_key()

    def public_value(self) -> bytes:
        y = self._key.public_key().public_numbers().y
        return y.to_bytes(self._size, "big")

    def private_value(self) -> bytes:
        return self._key.private_numbers().x.to_bytes(self._size, "big")

    def shared_secret_untrusted(self, peer_value: bytes) -> bytes:
        if len(peer_value) != self._size:
            raise ParseError(f"MODP public value of {len(peer_value)} bytes")
        y = int.from_bytes(peer_value, "big")
        if not 1 < y < self._p - 1:  # RFC 6989 2.1
            raise ParseError("MODP public value out of range")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer = dh.DHPublicNumbers(y, _modp_parameters(self.group).parameter_numbers())
            secret = self._key.exchange(peer.public_key())
        return secret.rjust(self._size, b"\x00")


_CURVES: dict[DhGroup, tuple[ec.EllipticCurve, int]] = {
    DhGroup.ECP256: (ec.SECP256R1(), 32),
    DhGroup.ECP384: (ec.SECP384R1(), 48),
    DhGroup.ECP521: (ec.SECP521R1(), 66),
}


class EcpExchange:
    def __init__(self, group: DhGroup, private: bytes | None = None) -> None:
        self.group = group
        self._curve, self._size = _CURVES[group]
        self._key = ec.generate_private_key(self._curve) if private is None else \
            ec.derive_private_key(int.from_bytes(private, "big"), self._curve)

    def public_value(self) -> bytes:
        point = self._key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return point[1:]

    def private_value(self) -> bytes:
        return self._key.private_numbers().private_value.to_bytes(self._size, "big")

    def shared_secret_untrusted(self, peer_value: bytes) -> bytes:
        if len(peer_value) != 2 * self._size:
            raise ParseError(f"ECP public value of {len(peer_value)} bytes")
        try:  # from_encoded_point checks the point is on the curve (RFC 6989 2.3)
            peer = ec.EllipticCurvePublicKey.from_encoded_point(self._curve, b"\x04" + peer_value)
            return self._key.exchange(ec.ECDH(), peer)
        except ValueError as exc:
            raise ParseError(f"invalid ECP public value: {exc}") from None


class MontgomeryExchange:
    """X25519 and X448 (RFC 8031): the raw u-coordinate is the public value."""

    def __init__(self, group: DhGroup, private: bytes | None = None) -> None:
        self.group = group
        if group == DhGroup.CURVE25519:
            self._size, self._public = 32, x25519.X25519PublicKey.from_public_bytes
            self._key: x25519.X25519PrivateKey | x448.X448PrivateKey = (
                x25519.X25519PrivateKey.generate() if private is None
                else x25519.X25519PrivateKey.from_private_bytes(private))
        else:
            self._size, self._public = 56, x448.X448PublicKey.from_public_bytes  # type: ignore[assignment]
            self._key = x448.X448PrivateKey.generate() if private is None \
                else x448.X448PrivateKey.from_private_bytes(private)

    def public_value(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def private_value(self) -> bytes:
        return self._key.private_bytes_raw()

    def shared_secret_untrusted(self, peer_value: bytes) -> bytes:
        if len(peer_value) != self._size:
            raise ParseError(f"{self.group.name} public value of {len(peer_value)} bytes")
        try:  # an all-zero result (small-order point) raises (RFC 8031 2.3)
            return self._key.exchange(self._public(peer_value))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ParseError(f"invalid {self.group.name} public value: {exc}") from None


def public_value_size(group: DhGroup) -> int:
    if group in _MODP_PRIMES:
        return (_MODP_PRIMES[group].bit_length() + 7) // 8
    if group in _CURVES:
        return 2 * _CURVES[group][1]
    return 32 if group == DhGroup.CURVE25519 else 56


def new_key_exchange(group: int, private: bytes | None = None) -> KeyExchange:
    """Our side of a key exchange in `group` (fresh, or the one whose `private_value()`
    is given); raises KeyError for unsupported groups, ValueError for a bad value."""
    g = DhGroup(group)
    if g in _MODP_PRIMES:
        return ModpExchange(g, private)
    if g in _CURVES:
        return EcpExchange(g, private)
    return MontgomeryExchange(g, private)


class ExponentialPool:
    """The responder's Diffie-Hellman private values, reused across IKE_SA_INIT
    exchanges (RFC 7296 2.12) without giving up perfect forward secrecy.

    One value per group is handed out for at most `max_age` seconds, and forgotten as
    soon as any IKE SA that used it ends (`forget`), so the keys of a closed SA can never
    be recomputed from what this process still holds; the SAs themselves keep only their
    derived keys. Reused only for the elliptic-curve groups, whose peer values are
    validated on every exchange (RFC 6989: on the curve, no small-order result); MODP
    values are made fresh each time. With max_age 0 every exchange gets a fresh value.
    """

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        # group -> (the value, its serial, when it was made)
        self._current: dict[int, tuple[KeyExchange, int, float]] = {}
        self._serial = 0
        self.made = 0  # private values generated (for tests and metrics)

    def take(self, group: int, now: float) -> tuple[KeyExchange, int]:
        """A private value for `group` and its serial (0: not pooled, nothing to forget)."""
        current = self._current.get(group)
        if current is not None and now - current[2] < self.max_age:
            return current[0], current[1]
        value = new_key_exchange(group)
        self.made += 1
        if self.max_age <= 0 or DhGroup(group) in _MODP_PRIMES:
            self._current.pop(group, None)
            return value, 0
        self._serial += 1
        self._current[group] = (value, self._serial, now)
        return value, self._serial

    def forget(self, serial: int) -> None:
        """An SA that used value `serial` ended: that value is never handed out again."""
        if not serial:
            return
        for group, (_, current, _) in list(self._current.items()):
            if current == serial:
                del self._current[group]
