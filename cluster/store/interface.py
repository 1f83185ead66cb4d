"""What the cluster keeps in its shared state store, independent of where it lives.

Every mutation is an `Op` value; `StateStore.execute(ops)` runs a sequence of them in
order in one round trip (one Redis pipeline), which is what lets `StoreWriter` group the
writes of many actors. Single-operation methods (`put_sa`, `acquire`, ...) are shorthands
for `execute([op])`.

Ownership of an IKE SA is a lease with a fencing token. `acquire` hands out a token larger
than any issued before for that key; `put_sa`/`delete_sa` carrying an older token are
rejected atomically (`LeaseLost`), so once a second responder has taken an SA over, the
first can no longer persist it and therefore never sends another response for it.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar, cast

T = TypeVar("T")


class StoreError(Exception):
    """The store could not do what was asked: unreachable, timed out, or bad data in it."""


class LeaseLost(StoreError):
    """A fenced write carried a token older than the newest one: another node owns the SA."""


class SealError(StoreError):
    """Sealed data did not authenticate (tampered, moved to another record, or unknown key)."""


class StoredSa(NamedTuple):
    snapshot: bytes
    owner: str
    fence: int


@dataclass(frozen=True, slots=True)
class Member:
    node: str
    role: str
    last_seen: float  # store clock: Unix seconds for Redis, trio.current_time() in memory
    age: float  # seconds since that heartbeat, measured on the same clock
    info: Mapping[str, Any]


@dataclass(slots=True)
class StoreStats:
    """Plain counters the metrics layer publishes periodically."""

    round_trips: int = 0  # execute() calls that reached the backend (one pipeline each)
    ops: int = 0
    errors: int = 0  # round trips (or subscription reads) that failed as a whole
    lease_lost: int = 0
    seconds: float = 0.0  # time spent in round trips, for a mean latency


# -- operations ------------------------------------------------------------------------


class Op(Generic[T]):
    """One store operation whose result has type T."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class GetSa(Op["StoredSa | None"]):
    key: bytes


@dataclass(frozen=True, slots=True)
class PutSa(Op[None]):
    """Store a snapshot if `fence` is still the newest token for `key`, else LeaseLost.

    `ttl`: seconds the record lives unless written again (None: until deleted). Give one
    beyond the SA's lifetime so records of peers that vanished with their owner go away.
    """

    key: bytes
    snapshot: bytes
    owner: str
    fence: int
    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class DeleteSa(Op[None]):
    """Delete the record and its lease if `fence` is current (or it is already gone)."""

    key: bytes
    fence: int


@dataclass(frozen=True, slots=True)
class Acquire(Op["int | None"]):
    """Take the lease when it is free, expired or ours; None while another node holds it.

    Every successful acquire returns a token larger than every token issued before for
    the key, so even a second incarnation of the same node fences out the first.
    """

    key: bytes
    node: str
    ttl: float


@dataclass(frozen=True, slots=True)
class Renew(Op[bool]):
    """Extend a live lease that `node` holds with `fence`; False if it is gone or not ours."""

    key: bytes
    node: str
    fence: int
    ttl: float


@dataclass(frozen=True, slots=True)
class Release(Op[bool]):
    key: bytes
    node: str
    fence: int


@dataclass(frozen=True, slots=True)
class PutChild(Op[None]):
    """Record a Child SA in a worker's durable SAD (params sealed by the caller)."""

    worker: str
    spi_in: bytes
    params: bytes


@dataclass(frozen=True, slots=True)
class DeleteChild(Op[None]):
    worker: str
    spi_in: bytes


@dataclass(frozen=True, slots=True)
class Children(Op["dict[bytes, bytes]"]):
    worker: str


@dataclass(frozen=True, slots=True)
class Publish(Op[None]):
    """Notify a worker's subscribers; queue it after the PutChild/DeleteChild it announces."""

    worker: str
    message: bytes


@dataclass(frozen=True, slots=True)
class ClaimAddress(Op["int | None"]):
    """An address of pool `pool` (an offset below `size`) for `identity`, held by `holder`
    for `ttl` seconds from now on: the one `identity` had last if nobody else holds it
    (other SAs of `identity` may: they share it), else one nobody holds, going round
    the pool; None when every one is held."""

    pool: str
    size: int
    holder: bytes
    identity: bytes
    ttl: float


@dataclass(frozen=True, slots=True)
class HoldAddress(Op[bool]):
    """Hold `offset` for `ttl` more seconds; False if it is not `holder`'s (any more)."""

    pool: str
    offset: int
    holder: bytes
    ttl: float


@dataclass(frozen=True, slots=True)
class FreeAddress(Op[bool]):
    """Let go of `offset`; False if it was not `holder`'s (any more)."""

    pool: str
    offset: int
    holder: bytes


# -- the store -------------------------------------------------------------------------

Subscription = AsyncIterator["bytes | None"]
"""Messages published to one worker, in order. None means some may have been missed
(after a reconnect or a slow consumer): re-read `children(worker)` before going on."""


class StateStore(abc.ABC):
    """The cluster's shared state; all methods are Trio-async and raise only StoreError."""

    stats: StoreStats  # set by each implementation's __init__

    @abc.abstractmethod
    async def execute(self, ops: Sequence[Op[Any]]) -> list[Any]:
        """Run `ops` in order in one round trip.

        Each entry of the result is that op's result, or a StoreError instance (LeaseLost
        for a stale fence) when only that op failed. When the round trip fails as a whole
        StoreError is raised, and any of the ops may or may not have been applied.
        """

    async def run(self, op: Op[T]) -> T:
        result = (await self.execute([op]))[0]
        if isinstance(result, StoreError):
            raise result
        return cast(T, result)

    # SA snapshots and leases
    async def get_sa(self, key: bytes) -> StoredSa | None:
        return await self.run(GetSa(key))

    async def put_sa(self, key: bytes, snapshot: bytes, owner: str, fence: int,
                     ttl: float | None = None) -> None:
        await self.run(PutSa(key, snapshot, owner, fence, ttl))

    async def delete_sa(self, key: bytes, fence: int) -> None:
        await self.run(DeleteSa(key, fence))

    async def acquire(self, key: bytes, node: str, ttl: float) -> int | None:
        return await self.run(Acquire(key, node, ttl))

    async def renew(self, key: bytes, node: str, fence: int, ttl: float) -> bool:
        return await self.run(Renew(key, node, fence, ttl))

    async def release(self, key: bytes, node: str, fence: int) -> bool:
        return await self.run(Release(key, node, fence))

    # key distribution
    async def put_child(self, worker: str, spi_in: bytes, params: bytes) -> None:
        await self.run(PutChild(worker, spi_in, params))

    async def delete_child(self, worker: str, spi_in: bytes) -> None:
        await self.run(DeleteChild(worker, spi_in))

    async def children(self, worker: str) -> dict[bytes, bytes]:
        return await self.run(Children(worker))

    async def publish(self, worker: str, message: bytes) -> None:
        await self.run(Publish(worker, message))

    @abc.abstractmethod
    def subscribe(self, worker: str) -> AbstractAsyncContextManager[Subscription]:
        """`async with store.subscribe(w) as sub:` delivers what is published after entry.

        Enter it before reading `children(w)`, so nothing falls between the two.
        """

    # the operations CLI
    @abc.abstractmethod
    def scan_sas(self) -> AsyncIterator[tuple[bytes, StoredSa]]:
        """Every stored SA, in no particular order (pages, not one big read)."""

    async def scan_owners(self) -> AsyncIterator[tuple[bytes, str]]:
        """Every stored SA's key and the node that last stored it, as `scan_sas` finds
        them; a store may read less for it (no snapshots)."""
        async for key, stored in self.scan_sas():
            yield key, stored.owner

    # membership
    @abc.abstractmethod
    async def heartbeat(self, node: str, role: str, ttl: float,
                        info: Mapping[str, Any] | None = None) -> None:
        """Announce `node` as alive for `ttl` seconds; `info` must be msgpack-able."""

    @abc.abstractmethod
    async def leave(self, node: str) -> None:
        """Remove `node` at once (clean shutdown) instead of waiting for its TTL."""

    @abc.abstractmethod
    async def members(self) -> list[Member]:
        """Live members sorted by node id."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, the memory store needs none
        """Release connections and threads."""
