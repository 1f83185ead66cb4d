"""The stored form of an SA snapshot: clear fields readable by the operations CLI, the
secret fields sealed together, and the whole bound to the SA's identity.

    msgpack [SNAPSHOT_FORMAT, clear, sealed]
      clear  = msgpack of the record without its secret fields
      sealed = seal(msgpack of the secret fields, AAD = label | identity | clear)

One AES-GCM operation per snapshot covers both confidentiality of the secrets and the
integrity of the clear part (message IDs, identities, the cached response): a store writer
without the cluster key can neither read keys nor alter, move or splice a snapshot. It can
still replay an older snapshot of the same SA; the fence on the record guards ownership,
not age. The record itself (its own schema version, which fields are secret) is the
caller's; values must be msgpack-able (tuples come back as lists).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import msgpack

from .interface import SealError
from .sealing import ClusterKey, bind, open_sealed, seal

SNAPSHOT_FORMAT = 1
_LABEL = b"ike-cluster snapshot v1"


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    # (TypeError: a map key that is not hashable, with strict_map_key off)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise SealError(f"{what} does not decode: {exc}") from None


def pack_snapshot(record: Mapping[str, Any], secret_fields: Collection[str], key: ClusterKey,
                  aad: bytes) -> bytes:
    """Seal `record`'s secret fields under `key`, bound to `aad` (the SA's identity)."""
    clear = _pack({k: v for k, v in record.items() if k not in secret_fields})
    secrets = {k: v for k, v in record.items() if k in secret_fields}
    sealed = seal(key, _pack(secrets), bind(_LABEL, aad, clear))
    return _pack([SNAPSHOT_FORMAT, clear, sealed])


def _envelope(blob: bytes) -> tuple[bytes, bytes]:
    envelope = _unpack(blob, "snapshot")
    if not (isinstance(envelope, list) and len(envelope) == 3):
        raise SealError("snapshot is not a [format, clear, sealed] envelope")
    version, clear, sealed = envelope
    if version != SNAPSHOT_FORMAT:
        raise SealError(f"snapshot format {version!r} is not {SNAPSHOT_FORMAT}")
    if not (isinstance(clear, bytes) and isinstance(sealed, bytes)):
        raise SealError("snapshot envelope fields are not bytes")
    return clear, sealed


def _as_record(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SealError(f"{what} is not a map of names")
    return value


def unpack_snapshot(blob: bytes, key: ClusterKey, aad: bytes) -> dict[str, Any]:
    """The record `pack_snapshot` was given; SealError unless it authenticates under `aad`."""
    clear, sealed = _envelope(blob)
    secrets = _as_record(_unpack(open_sealed(key, sealed, bind(_LABEL, aad, clear)),
                                 "sealed fields"), "sealed fields")
    record = _as_record(_unpack(clear, "clear fields"), "clear fields")
    record.update(secrets)
    return record


def peek_snapshot(blob: bytes) -> dict[str, Any]:
    """The clear fields only, without the key and UNAUTHENTICATED: for display, not for use."""
    clear, _ = _envelope(blob)
    return _as_record(_unpack(clear, "clear fields"), "clear fields")
