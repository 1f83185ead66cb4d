"""Group commit: operations from many tasks share one `execute` (one Redis pipeline).

Callers `await writer.put_sa(...)` and resume once the store has acknowledged their op.
The flusher takes everything queued while the previous round trip was in flight, so under
load a round trip carries many actors' writes and at rest a write costs one round trip
with no added delay. The queue is bounded: when the store falls behind, callers wait in
`submit` (back-pressure) rather than memory growing.

A caller cancelled while waiting does not withdraw its op; it may still be applied.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import trio

from .interface import (
    Acquire,
    Children,
    DeleteChild,
    DeleteSa,
    GetSa,
    Op,
    Publish,
    PutChild,
    PutSa,
    Release,
    Renew,
    StateStore,
    StoredSa,
    StoreError,
)

T = TypeVar("T")


@dataclass(slots=True)
class _Pending:
    op: Op[Any]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None


@dataclass(slots=True)
class WriterStats:
    flushes: int = 0
    ops: int = 0
    largest_batch: int = 0


class StoreWriter:
    def __init__(self, store: StateStore, *, max_pending: int = 4096,
                 max_batch: int = 512) -> None:
        self.store = store
        self.stats = WriterStats()
        self._max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[_Pending](max_pending)

    async def submit(self, op: Op[T]) -> T:
        """Queue `op`, wait for its flush, return its result or raise its StoreError."""
        pending = _Pending(op)
        try:
            await self._send.send(pending)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StoreError("store writer is closed") from None
        await pending.done.wait()
        if isinstance(pending.result, StoreError):
            raise pending.result
        return cast(T, pending.result)

    async def submit_all(self, ops: Sequence[Op[Any]]) -> list[Any]:
        """Queue `ops` in order and wait for all: each result, or its StoreError instance.

        They usually share one round trip; when they straddle two, order still holds.
        """
        batch = [_Pending(op) for op in ops]
        try:
            for pending in batch:
                await self._send.send(pending)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StoreError("store writer is closed") from None
        for pending in batch:
            await pending.done.wait()
        return [pending.result for pending in batch]

    def close(self) -> None:
        """No more submissions; `run` flushes what is queued and returns."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The flusher; start it with `nursery.start(writer.run)`."""
        task_status.started()
        batch: list[_Pending] = []
        try:
            async for first in self._receive:
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._flush(batch)
                batch = []
        finally:
            # Whoever still waits must not wait forever on a flusher that is gone
            # (no checkpoint between the drain and the close: nothing slips in).
            stranded = batch + _drain(self._receive)
            self._receive.close()
            for pending in stranded:
                pending.result = StoreError("store writer stopped before this write")
                pending.done.set()

    async def _flush(self, batch: list[_Pending]) -> None:
        self.stats.flushes += 1
        self.stats.ops += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        try:
            results = await self.store.execute([pending.op for pending in batch])
        except StoreError as exc:
            # One instance per waiter: each raises it in its own task with its own traceback.
            results = [_copy(exc) for _ in batch]
        for pending, result in zip(batch, results, strict=True):
            pending.result = result
            pending.done.set()

    # -- typed shorthands ----------------------------------------------------------------

    async def get_sa(self, key: bytes) -> StoredSa | None:
        return await self.submit(GetSa(key))

    async def put_sa(self, key: bytes, snapshot: bytes, owner: str, fence: int,
                     ttl: float | None = None) -> None:
        await self.submit(PutSa(key, snapshot, owner, fence, ttl))

    async def delete_sa(self, key: bytes, fence: int) -> None:
        await self.submit(DeleteSa(key, fence))

    async def acquire(self, key: bytes, node: str, ttl: float) -> int | None:
        return await self.submit(Acquire(key, node, ttl))

    async def renew(self, key: bytes, node: str, fence: int, ttl: float) -> bool:
        return await self.submit(Renew(key, node, fence, ttl))

    async def release(self, key: bytes, node: str, fence: int) -> bool:
        return await self.submit(Release(key, node, fence))

    async def put_child(self, worker: str, spi_in: bytes, params: bytes) -> None:
        await self.submit(PutChild(worker, spi_in, params))

    async def delete_child(self, worker: str, spi_in: bytes) -> None:
        await self.submit(DeleteChild(worker, spi_in))

    async def children(self, worker: str) -> dict[bytes, bytes]:
        return await self.submit(Children(worker))

    async def publish(self, worker: str, message: bytes) -> None:
        await self.submit(Publish(worker, message))


def _copy(exc: StoreError) -> StoreError:
    copy = type(exc)(*exc.args)
    copy.__cause__ = exc.__cause__ or exc
    return copy


def _drain(receive: trio.MemoryReceiveChannel[_Pending]) -> list[_Pending]:
    drained: list[_Pending] = []
    while True:
        try:
            drained.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return drained


@asynccontextmanager
async def open_store_writer(store: StateStore, *, max_pending: int = 4096,
                            max_batch: int = 512) -> AsyncIterator[StoreWriter]:
    """A writer with its flusher running for the duration of the block."""
    writer = StoreWriter(store, max_pending=max_pending, max_batch=max_batch)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        try:
            yield writer
        finally:
            writer.close()
