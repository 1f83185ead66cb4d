"""Stateless responder cookies (RFC 7296 2.6).

Under load the responder answers an IKE_SA_INIT request with only a COOKIE
notify and keeps nothing; an initiator that really owns its source address
repeats the request with that cookie first, and the responder recomputes the
cookie to see that it issued it:

    Cookie = <VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>)

with a 4-byte version and SHA-256 (Ni length-prefixed, see `_digest`). The
secret is replaced every `lifetime` seconds of the clock the caller passes (no
clock is read here); cookies made with the secret before the current one are
still accepted, so a cookie stays valid for at least one lifetime and at most
two, as 2.6 allows ("keep the old value of <secret> around for a short time").
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from ..wire import packed_address

SECRET_SIZE = 32
DEFAULT_LIFETIME = 30.0  # seconds a secret is current; strongSwan's cookies live 10 s
_VERSION = struct.Struct("!I")
COOKIE_SIZE = _VERSION.size + hashlib.sha256().digest_size  # 36; RFC 7296 3.10.1: 1-64

Random = Callable[[int], bytes]


class CookieSecrets:
    """The current and the previous secret, rotated by the `now` of each call."""

    __slots__ = ("_current", "_lifetime", "_previous", "_rng", "_rotate_at", "_version")

    def __init__(self, *, lifetime: float = DEFAULT_LIFETIME, rng: Random = os.urandom) -> None:
        if lifetime <= 0:
            raise ValueError("a cookie secret's lifetime must be positive")
        self._lifetime = lifetime
        self._rng = rng
        self._version = 0
        self._current = b""
        self._previous: tuple[int, bytes] | None = None
        self._rotate_at = float("-inf")  # the first call makes a secret

    @property
    def version(self) -> int:
        """The version id of the current secret."""
        return self._version

    def make_cookie(self, spi_i: bytes, nonce_i: bytes, remote_ip: str, now: float) -> bytes:
        """The cookie to send to `remote_ip` for this initiator SPI and nonce."""
        self._rotate(now)
        return _VERSION.pack(self._version) + self._digest(
            nonce_i, remote_ip, spi_i, self._current
        )

    def check_cookie(
        self, cookie: bytes, spi_i: bytes, nonce_i: bytes, remote_ip: str, now: float
    ) -> bool:
        """Whether we made `cookie` for exactly this SPI, nonce and address, recently."""
        secret = self._secret_of(cookie, now)
        if secret is None:
            return False
        expected = self._digest(nonce_i, remote_ip, spi_i, secret)
        return hmac.compare_digest(cookie[_VERSION.size :], expected)

    def version_known(self, cookie: bytes, now: float) -> bool:
        """Whether `cookie` names the current or the previous secret (else it expired)."""
        return self._secret_of(cookie, now) is not None

    def _secret_of(self, cookie: bytes, now: float) -> bytes | None:
        self._rotate(now)
        if len(cookie) != COOKIE_SIZE:
            return None
        (version,) = _VERSION.unpack_from(cookie)
        if version == self._version:
            return self._current
        if self._previous is not None and self._previous[0] == version:
            return self._previous[1]
        return None

    def _rotate(self, now: float) -> None:
        if now < self._rotate_at:
            return
        # Idle for a whole lifetime past the due rotation: the current secret would
        # already have been retired too, so nothing older stays valid.
        if self._current and now < self._rotate_at + self._lifetime:
            self._previous = (self._version, self._current)
        else:
            self._previous = None
        self._version = (self._version + 1) & 0xFFFFFFFF
        self._current = self._rng(SECRET_SIZE)
        self._rotate_at = now + self._lifetime

    @staticmethod
    def _digest(nonce_i: bytes, remote_ip: str, spi_i: bytes, secret: bytes) -> bytes:
        # RFC 7296 2.6's order. Ni (16-256 bytes) goes in behind its length: bare,
        # Ni | IPi of an IPv4 peer could equal a shorter Ni | IPi of an IPv6 peer
        # whose interface id ends in that IPv4 address, and its cookie would fit.
        return hashlib.sha256(
            len(nonce_i).to_bytes(2, "big") + nonce_i + packed_address(remote_ip) + spi_i + secret
        ).digest()
