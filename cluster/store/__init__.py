"""The cluster's shared state: SA snapshots with fenced ownership leases, membership, and
per-worker Child SA tables with notifications; in memory or on Redis, behind one interface.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .interface import (
    Acquire,
    Children,
    ClaimAddress,
    DeleteChild,
    DeleteSa,
    FreeAddress,
    GetSa,
    HoldAddress,
    LeaseLost,
    Member,
    Op,
    Publish,
    PutChild,
    PutSa,
    Release,
    Renew,
    SealError,
    StateStore,
    StoredSa,
    StoreError,
    StoreStats,
    Subscription,
)
from .memory import MemoryStore
from .redis_store import RedisStore
from .sealing import ClusterKey, open_fields, open_sealed, seal, seal_fields
from .snapshot import pack_snapshot, peek_snapshot, unpack_snapshot
from .writer import StoreWriter, open_store_writer

__all__ = [
    "Acquire",
    "Children",
    "ClaimAddress",
    "ClusterKey",
    "DeleteChild",
    "DeleteSa",
    "FreeAddress",
    "GetSa",
    "HoldAddress",
    "LeaseLost",
    "Member",
    "MemoryStore",
    "Op",
    "Publish",
    "PutChild",
    "PutSa",
    "RedisStore",
    "Release",
    "Renew",
    "SealError",
    "StateStore",
    "StoreError",
    "StoreStats",
    "StoreWriter",
    "StoredSa",
    "Subscription",
    "open_fields",
    "open_sealed",
    "open_store",
    "open_store_writer",
    "pack_snapshot",
    "peek_snapshot",
    "seal",
    "seal_fields",
    "unpack_snapshot",
]


def open_store(url: str | None, *, prefix: str = "ikec:", **options: Any) -> StateStore:
    """`None`, "" or "memory://" -> MemoryStore; a Redis URL -> RedisStore.from_url.

    `prefix` names the Redis keys (ignored in memory); other options go to the class.
    """
    if not url or url in {"memory:", "memory://"}:
        return MemoryStore(**options)
    if url.partition("://")[0].lower() in {"redis", "rediss", "unix", "redis+sentinel",
                                           "rediss+sentinel"}:
        return RedisStore.from_url(url, prefix=prefix, **options)
    raise ConfigError(f"store URL {url.partition('://')[0]!r}: expected memory:// or a Redis URL")
