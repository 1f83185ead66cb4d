"""The state store in process memory: the single-node default, and the reference the Redis
store is tested against (one contract suite runs on both).

Time is `trio.current_time()`, so TTLs follow an autojump clock in tests. Expired entries
are dropped when read and by a sweep every `SWEEP_INTERVAL` seconds of store time.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

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
    StateStore,
    StoredSa,
    StoreStats,
    Subscription,
)

SWEEP_INTERVAL = 10.0


@dataclass(slots=True)
class _Record:
    snapshot: bytes
    owner: str
    fence: int
    expires: float


@dataclass(slots=True)
class _Lease:
    node: str
    fence: int
    expires: float


@dataclass(slots=True)
class _Counter:
    value: int
    expires: float


@dataclass(slots=True)
class _Heartbeat:
    role: str
    last_seen: float
    expires: float
    info: dict[str, Any]


class _Expiring(Protocol):
    expires: float


K = TypeVar("K")
E = TypeVar("E", bound=_Expiring)


def _drop_expired(table: dict[K, E], now: float) -> None:
    for name in [k for k, v in table.items() if v.expires <= now]:
        del table[name]


class _MemorySubscription:
    """A bounded queue per subscriber: a slow one loses messages and is told so (None)."""

    def __init__(self, buffer: int) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes](buffer)
        self._missed = False

    def push(self, message: bytes) -> None:
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self._missed = True

    def __aiter__(self) -> _MemorySubscription:
        return self

    async def __anext__(self) -> bytes | None:
        if self._missed:
            self._missed = False
            while True:  # what is queued predates the gap; the re-read covers it
                try:
                    self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
            await trio.lowlevel.checkpoint()
            return None
        return await self._receive.receive()


class MemoryStore(StateStore):
    def __init__(self, *, fence_retention: float = 86400.0, subscriber_buffer: int = 4096) -> None:
        self.stats = StoreStats()
        self._fence_retention = fence_retention
        self._subscriber_buffer = subscriber_buffer
        self._records: dict[bytes, _Record] = {}
        self._leases: dict[bytes, _Lease] = {}
        # virtual IP pools: (pool, offset) -> its identity and holders' expiries; where each
        # pool's search goes on; each identity's last address
        self._addresses: dict[tuple[str, int], tuple[bytes, dict[bytes, float]]] = {}
        self._address_next: dict[str, int] = {}
        self._address_of: dict[tuple[str, bytes], int] = {}
        self._counters: dict[bytes, _Counter] = {}
        self._members: dict[str, _Heartbeat] = {}
        self._children: dict[str, dict[bytes, bytes]] = {}
        self._subscribers: dict[str, set[_MemorySubscription]] = {}
        self._next_sweep = -math.inf

    async def execute(self, ops: Sequence[Op[Any]]) -> list[Any]:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        if now >= self._next_sweep:
            self._sweep(now)
        self.stats.round_trips += 1
        self.stats.ops += len(ops)
        results = [_HANDLERS[type(op)](self, op, now) for op in ops]
        self.stats.lease_lost += sum(isinstance(r, LeaseLost) for r in results)
        return results

    def _sweep(self, now: float) -> None:
        _drop_expired(self._records, now)
        _drop_expired(self._leases, now)
        _drop_expired(self._counters, now)
        _drop_expired(self._members, now)
        self._next_sweep = now + SWEEP_INTERVAL

    # -- live entries (an expired one reads as absent) -----------------------------------

    def _record(self, key: bytes, now: float) -> _Record | None:
        record = self._records.get(key)
        return record if record is not None and record.expires > now else None

    def _lease(self, key: bytes, now: float) -> _Lease | None:
        lease = self._leases.get(key)
        return lease if lease is not None and lease.expires > now else None

    def _counter(self, key: bytes, now: float) -> int | None:
        counter = self._counters.get(key)
        return counter.value if counter is not None and counter.expires > now else None

    # -- operations ----------------------------------------------------------------------

    def _get_sa(self, op: GetSa, now: float) -> StoredSa | None:
        record = self._record(op.key, now)
        return None if record is None else StoredSa(record.snapshot, record.owner, record.fence)

    def _put_sa(self, op: PutSa, now: float) -> LeaseLost | None:
        if self._counter(op.key, now) != op.fence:
            return LeaseLost(f"stale fence {op.fence} for SA {op.key.hex()}")
        expires = math.inf if op.ttl is None else now + op.ttl
        self._records[op.key] = _Record(op.snapshot, op.owner, op.fence, expires)
        self._counters[op.key].expires = now + self._fence_retention
        return None

    def _delete_sa(self, op: DeleteSa, now: float) -> LeaseLost | None:
        if self._counter(op.key, now) == op.fence:
            self._records.pop(op.key, None)
            self._leases.pop(op.key, None)
            # Fences issued so far are now stale, even for a late write by the deleter.
            self._counters[op.key] = _Counter(op.fence + 1, now + self._fence_retention)
            return None
        if self._record(op.key, now) is None:
            return None  # already gone: nothing left to protect
        return LeaseLost(f"stale fence {op.fence} for SA {op.key.hex()}")

    def _acquire(self, op: Acquire, now: float) -> int | None:
        lease = self._lease(op.key, now)
        if lease is not None and lease.node != op.node:
            return None
        record = self._record(op.key, now)
        # The record remembers its fence, so an expired counter never re-issues a token.
        fence = max(self._counter(op.key, now) or 0, record.fence if record else 0) + 1
        self._counters[op.key] = _Counter(fence, now + self._fence_retention)
        self._leases[op.key] = _Lease(op.node, fence, now + op.ttl)
        return fence

    def _renew(self, op: Renew, now: float) -> bool:
        lease = self._lease(op.key, now)
        if lease is None or lease.node != op.node or lease.fence != op.fence:
            return False
        lease.expires = now + op.ttl
        self._counters[op.key].expires = now + self._fence_retention
        return True

    def _release(self, op: Release, now: float) -> bool:
        lease = self._lease(op.key, now)
        if lease is None or lease.node != op.node or lease.fence != op.fence:
            return False
        del self._leases[op.key]
        return True

    def _holders(self, pool: str, offset: int, now: float) -> tuple[bytes, dict[bytes, float]]:
        """The address's identity and live holders (expired ones dropped)."""
        identity, holders = self._addresses.get((pool, offset), (b"", {}))
        live = {h: t for h, t in holders.items() if t > now}
        if live:
            self._addresses[(pool, offset)] = (identity, live)
        else:
            self._addresses.pop((pool, offset), None)
        return identity, live

    def _claim_address(self, op: ClaimAddress, now: float) -> int | None:
        def take(offset: int) -> int:
            _, holders = self._holders(op.pool, offset, now)
            self._addresses[(op.pool, offset)] = (op.identity,
                                                  {**holders, op.holder: now + op.ttl})
            self._address_of[(op.pool, op.identity)] = offset
            return offset

        hint = self._address_of.get((op.pool, op.identity))
        if hint is not None:
            identity, holders = self._holders(op.pool, hint, now)
            if not holders or identity == op.identity:
                return take(hint)
        start = self._address_next.get(op.pool, 0)
        for step in range(op.size):
            offset = (start + step) % op.size
            if not self._holders(op.pool, offset, now)[1]:
                self._address_next[op.pool] = offset + 1
                return take(offset)
        return None

    def _hold_address(self, op: HoldAddress, now: float) -> bool:
        _, holders = self._holders(op.pool, op.offset, now)
        if op.holder not in holders:
            return False
        holders[op.holder] = now + op.ttl
        return True

    def _free_address(self, op: FreeAddress, now: float) -> bool:
        _, holders = self._holders(op.pool, op.offset, now)
        if holders.pop(op.holder, None) is None:
            return False
        if not holders:
            del self._addresses[(op.pool, op.offset)]
        return True

    def _put_child(self, op: PutChild, now: float) -> None:
        self._children.setdefault(op.worker, {})[op.spi_in] = op.params

    def _delete_child(self, op: DeleteChild, now: float) -> None:
        sad = self._children.get(op.worker)
        if sad is not None:
            sad.pop(op.spi_in, None)
            if not sad:
                del self._children[op.worker]

    def _get_children(self, op: Children, now: float) -> dict[bytes, bytes]:
        return dict(self._children.get(op.worker, {}))

    def _publish(self, op: Publish, now: float) -> None:
        for subscription in self._subscribers.get(op.worker, ()):
            subscription.push(op.message)

    # -- the rest of the interface -------------------------------------------------------

    @asynccontextmanager
    async def subscribe(self, worker: str) -> AsyncIterator[Subscription]:
        subscription = _MemorySubscription(self._subscriber_buffer)
        self._subscribers.setdefault(worker, set()).add(subscription)
        try:
            yield subscription
        finally:
            subscribers = self._subscribers[worker]
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[worker]

    async def scan_sas(self) -> AsyncIterator[tuple[bytes, StoredSa]]:
        now = trio.current_time()
        for key, record in list(self._records.items()):
            if record.expires > now:
                yield key, StoredSa(record.snapshot, record.owner, record.fence)
        await trio.lowlevel.checkpoint()

    async def heartbeat(self, node: str, role: str, ttl: float,
                        info: Mapping[str, Any] | None = None) -> None:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        self._members[node] = _Heartbeat(role, now, now + ttl, dict(info or {}))

    async def leave(self, node: str) -> None:
        await trio.lowlevel.checkpoint()
        self._members.pop(node, None)

    async def members(self) -> list[Member]:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        return [
            Member(node, beat.role, beat.last_seen, now - beat.last_seen, dict(beat.info))
            for node, beat in sorted(self._members.items())
            if beat.expires > now
        ]


_HANDLERS: dict[type[Op[Any]], Callable[[MemoryStore, Any, float], Any]] = {
    GetSa: MemoryStore._get_sa,
    PutSa: MemoryStore._put_sa,
    DeleteSa: MemoryStore._delete_sa,
    Acquire: MemoryStore._acquire,
    Renew: MemoryStore._renew,
    Release: MemoryStore._release,
    ClaimAddress: MemoryStore._claim_address,
    HoldAddress: MemoryStore._hold_address,
    FreeAddress: MemoryStore._free_address,
    PutChild: MemoryStore._put_child,
    DeleteChild: MemoryStore._delete_child,
    Children: MemoryStore._get_children,
    Publish: MemoryStore._publish,
}
