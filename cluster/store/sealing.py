"""AES-256-GCM sealing under the cluster key, so the store never holds a secret in the clear.

A sealed blob is `key_id (1) | nonce (12) | ciphertext | tag (16)`. The key id is derived
from the key itself, so rotating needs no numbering: a key file may list several keys, the
first seals and all of them open. The AEAD key is derived from the cluster key with HKDF
(`derive`), which keeps it apart from other uses of the same secret (the relay's MAC).

Random 96-bit nonces stay safe for about 2**32 seals per key (NIST SP 800-38D 8.3);
`pack_snapshot` spends one seal per snapshot, so rotate the key long before that.
"""

from __future__ import annotations

import os
import string
import struct
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError
from .interface import SealError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE

_SEAL_LABEL = b"ike-cluster seal v1"
_KEY_ID_LABEL = b"ike-cluster key id v1"
_FIELD_LABEL = b"ike-cluster field v1"


def _hkdf(secret: bytes, label: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(secret)


def bind(*parts: bytes) -> bytes:
    """An unambiguous concatenation (each part length-prefixed) for building AAD."""
    return b"".join(struct.pack("!I", len(part)) + part for part in parts)


def child_aad(worker: str, spi_in: bytes) -> bytes:
    """What a worker's sealed Child SA record is bound to: it opens for that worker and
    SPI only (responders seal, the worker opens)."""
    return bind(b"ike-cluster child v1", worker.encode(), spi_in)


class ClusterKey:
    """The cluster's shared secret: the first key seals, it and any retired keys open."""

    __slots__ = ("_openers", "_sealer", "_secrets", "key_id")

    def __init__(self, secret: bytes, *retired: bytes) -> None:
        secrets = (secret, *retired)
        for index, item in enumerate(secrets, 1):
            if len(item) != KEY_SIZE:
                raise ValueError(f"cluster key {index} is {len(item)} bytes, not {KEY_SIZE}")
            if item == bytes(KEY_SIZE):
                raise ValueError(f"cluster key {index} is all zeros (a placeholder?)")
        self._secrets = secrets
        # Two keys may share an id (1 in 256): opening tries each candidate in turn.
        self._openers: dict[int, list[AESGCM]] = {}
        for item in secrets:
            key_id = _hkdf(item, _KEY_ID_LABEL, 1)[0]
            self._openers.setdefault(key_id, []).append(AESGCM(_hkdf(item, _SEAL_LABEL, 32)))
        self.key_id = _hkdf(secret, _KEY_ID_LABEL, 1)[0]
        self._sealer = self._openers[self.key_id][0]

    def __repr__(self) -> str:  # never the secret
        return f"ClusterKey(key_id=0x{self.key_id:02x}, retired={len(self._secrets) - 1})"

    @classmethod
    def generate(cls) -> ClusterKey:
        return cls(os.urandom(KEY_SIZE))

    def to_text(self) -> str:
        """The key file form: one hex key per line, the sealing key first."""
        return "".join(item.hex() + "\n" for item in self._secrets)

    def derive(self, label: bytes, length: int = 32) -> bytes:
        """A subkey of the sealing secret for another purpose, named by `label`."""
        return _hkdf(self._secrets[0], label, length)

    def derive_each(self, label: bytes, length: int = 32) -> tuple[bytes, ...]:
        """`derive` for every key, sealing key first (to verify during a rotation)."""
        return tuple(_hkdf(item, label, length) for item in self._secrets)

    # -- loading: errors are one line, never echo key material ---------------------------

    @classmethod
    def load(cls, source: str | os.PathLike[str]) -> ClusterKey:
        """`env:NAME` reads an environment variable; anything else is a file path."""
        text = os.fspath(source)
        if text.startswith("env:"):
            return cls.from_env(text[4:])
        return cls.from_file(text)

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str] = os.environ) -> ClusterKey:
        value = environ.get(name)
        if value is None:
            raise ConfigError(f"cluster key: environment variable {name} is not set")
        return cls.from_text(value, f"cluster key in ${name}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ClusterKey:
        origin = f"cluster key file {os.fspath(path)}"
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{origin}: {exc.strerror or exc}") from None
        if len(data) == KEY_SIZE:  # raw bytes; 32 bytes can never be a 64-digit hex key
            return cls._checked(origin, [data])
        text = data.decode("latin-1")
        if not set(text) <= set(string.printable):  # e.g. a raw key with a line break added
            raise ConfigError(
                f"{origin}: neither {KEY_SIZE} raw bytes nor hex text ({len(data)} bytes)")
        return cls.from_text(text, origin)

    @classmethod
    def from_text(cls, text: str, origin: str = "cluster key") -> ClusterKey:
        """Hex keys separated by line breaks, commas or spaces; `#` starts a comment line."""
        keys: list[bytes] = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for word in line.replace(",", " ").split():
                if len(word) != 2 * KEY_SIZE or not set(word) <= set(string.hexdigits):
                    raise ConfigError(
                        f"{origin}: line {number}: expected {2 * KEY_SIZE} hex digits, "
                        f"got {len(word)} characters")
                keys.append(bytes.fromhex(word))
        if not keys:
            raise ConfigError(f"{origin}: no key found")
        return cls._checked(origin, keys)

    @classmethod
    def _checked(cls, origin: str, keys: list[bytes]) -> ClusterKey:
        try:
            return cls(*keys)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None


def seal(key: ClusterKey, plaintext: bytes, aad: bytes) -> bytes:
    header = bytes([key.key_id])
    nonce = os.urandom(NONCE_SIZE)
    return header + nonce + key._sealer.encrypt(nonce, plaintext, header + aad)


def open_sealed(key: ClusterKey, blob: bytes, aad: bytes) -> bytes:
    """The plaintext of `seal(key, plaintext, aad)`; SealError for anything else."""
    if len(blob) < OVERHEAD:
        raise SealError(f"sealed blob of {len(blob)} bytes is shorter than {OVERHEAD}")
    openers = key._openers.get(blob[0])
    if openers is None:
        raise SealError(f"sealed with unknown key id 0x{blob[0]:02x}")
    nonce, body = blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :]
    for opener in openers:
        try:
            return opener.decrypt(nonce, body, blob[:1] + aad)
        except InvalidTag:
            continue
    raise SealError("sealed data failed authentication (tampered, or bound to other data)")


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    # (TypeError: a map key that is not hashable, with strict_map_key off)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise SealError(f"sealed value does not decode: {exc}") from None


def seal_fields(record: Mapping[str, Any], secret_keys: Collection[str], key: ClusterKey,
                aad: bytes) -> dict[str, Any]:
    """A copy of `record` whose secret fields are sealed bytes.

    Each value (anything msgpack-able) is sealed with AAD binding it to `aad` (the
    record's identity, such as its SPIs) and to its field name, so a sealed value
    cannot be moved to another record or another field.
    """
    sealed = dict(record)
    for name in secret_keys:
        if name in sealed:
            sealed[name] = seal(key, _pack(sealed[name]), bind(_FIELD_LABEL, aad, name.encode()))
    return sealed


def open_fields(record: Mapping[str, Any], secret_keys: Collection[str], key: ClusterKey,
                aad: bytes) -> dict[str, Any]:
    """The inverse of `seal_fields`; SealError if a secret field is not a valid sealed value."""
    opened = dict(record)
    for name in secret_keys:
        if name not in opened:
            continue
        blob = opened[name]
        if not isinstance(blob, bytes):
            raise SealError(f"secret field {name!r} is not sealed")
        opened[name] = _unpack(open_sealed(key, blob, bind(_FIELD_LABEL, aad, name.encode())))
    return opened
