"""StoreWriter: many callers, few round trips, and each caller learns its own outcome."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from cluster.store import (
    Acquire,
    Children,
    LeaseLost,
    Member,
    MemoryStore,
    Op,
    StateStore,
    StoredSa,
    StoreError,
    StoreStats,
    StoreWriter,
    Subscription,
    open_store_writer,
)


async def test_hundred_concurrent_writers_share_a_few_round_trips(store: StateStore) -> None:
    keys = [os.urandom(8) for _ in range(100)]
    fences = await store.execute([Acquire(k, f"node-{i}", 30.0) for i, k in enumerate(keys)])
    before = store.stats.round_trips
    async with open_store_writer(store) as writer, trio.open_nursery() as nursery:
        for i, (key, fence) in enumerate(zip(keys, fences, strict=True)):
            nursery.start_soon(writer.put_sa, key, b"snap %d" % i, f"node-{i}", fence)
    pipelines = store.stats.round_trips - before
    assert writer.stats.ops == 100
    assert pipelines == writer.stats.flushes
    assert pipelines <= 3, f"{pipelines} round trips for 100 writes"
    for i, key in enumerate(keys):
        assert await store.get_sa(key) == StoredSa(b"snap %d" % i, f"node-{i}", 1)


async def test_each_caller_gets_its_own_result_from_a_shared_flush(store: StateStore) -> None:
    good, stale = os.urandom(8), os.urandom(8)
    outcomes: dict[str, object] = {}

    async def put(name: str, key: bytes, fence: int) -> None:
        try:
            await writer.put_sa(key, name.encode(), "node-a", fence)
            outcomes[name] = "ok"
        except StoreError as exc:
            outcomes[name] = exc

    async def take(key: bytes) -> None:
        outcomes["fence"] = await writer.acquire(key, "node-a", 30.0)

    async with open_store_writer(store) as writer:
        fence = await writer.acquire(good, "node-a", 30.0)
        assert fence is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, "good", good, fence)
            nursery.start_soon(put, "stale", stale, 3)
            nursery.start_soon(take, os.urandom(8))
        assert await writer.get_sa(good) == StoredSa(b"good", "node-a", fence)
    assert outcomes["good"] == "ok"
    assert isinstance(outcomes["stale"], LeaseLost)
    assert outcomes["fence"] == 1


class _GatedStore(MemoryStore):
    """A memory store whose round trips wait for a gate, or fail, on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.gate.set()
        self.fail = False
        self.batches: list[int] = []

    async def execute(self, ops: Sequence[Op[Any]]) -> list[Any]:
        self.batches.append(len(ops))
        await self.gate.wait()
        if self.fail:
            raise StoreError("redis: ConnectionError: Connection refused")
        return await super().execute(ops)


async def test_a_caller_resumes_only_after_its_write_is_acknowledged() -> None:
    store = _GatedStore()
    store.gate = trio.Event()
    key = os.urandom(8)
    done = trio.Event()

    async def write() -> None:
        await writer.put_child("work-1", key, b"p")
        done.set()

    async with open_store_writer(store) as writer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            assert store.batches == [1] and not done.is_set()
            # not applied yet (read past the gate), and the caller still waits
            assert await MemoryStore.execute(store, [Children("work-1")]) == [{}]
            store.gate.set()
        assert done.is_set()
    assert await store.children("work-1") == {key: b"p"}


async def test_writes_queued_during_a_round_trip_go_in_the_next_one() -> None:
    store = _GatedStore()
    store.gate = trio.Event()
    async with open_store_writer(store) as writer, trio.open_nursery() as nursery:
        nursery.start_soon(writer.publish, "work-1", b"first")
        await trio.testing.wait_all_tasks_blocked()
        for n in range(50):
            nursery.start_soon(writer.publish, "work-1", b"m%d" % n)
        await trio.testing.wait_all_tasks_blocked()
        store.gate.set()
    assert store.batches == [1, 50]


async def test_an_outage_reaches_every_waiting_caller_as_store_error() -> None:
    store = _GatedStore()
    store.fail = True
    errors: list[BaseException] = []

    async def write(n: int) -> None:
        try:
            await writer.put_child("work-1", bytes([n]) * 4, b"p")
        except StoreError as exc:
            errors.append(exc)

    async with open_store_writer(store) as writer, trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(write, n)
    assert len(errors) == 10
    assert len({id(e) for e in errors}) == 10  # one instance per caller
    assert all("Connection refused" in str(e) for e in errors)


async def test_the_writer_keeps_going_after_a_failed_flush() -> None:
    store = _GatedStore()
    async with open_store_writer(store) as writer:
        store.fail = True
        with pytest.raises(StoreError):
            await writer.put_child("work-1", b"\x01" * 4, b"p")
        store.fail = False
        await writer.put_child("work-1", b"\x02" * 4, b"q")
    assert await store.children("work-1") == {b"\x02" * 4: b"q"}


async def test_submitting_to_a_closed_writer_raises_store_error() -> None:
    async with open_store_writer(MemoryStore()) as writer:
        pass
    with pytest.raises(StoreError, match="closed"):
        await writer.publish("work-1", b"late")


async def test_callers_waiting_on_a_cancelled_flusher_get_store_error() -> None:
    store = _GatedStore()
    store.gate = trio.Event()  # never opens
    writer = StoreWriter(store)
    errors: list[BaseException] = []

    async def write(n: int) -> None:
        try:
            await writer.publish("work-1", b"%d" % n)
        except StoreError as exc:
            errors.append(exc)

    async with trio.open_nursery() as callers, trio.open_nursery() as flusher:
        await flusher.start(writer.run)
        for n in range(3):
            callers.start_soon(write, n)
        await trio.testing.wait_all_tasks_blocked()
        flusher.cancel_scope.cancel()  # one in flight, two queued
    assert len(errors) == 3
    assert all("stopped" in str(e) for e in errors)


async def test_a_full_queue_makes_callers_wait() -> None:
    store = _GatedStore()
    store.gate = trio.Event()
    sent = 0

    async def write(n: int) -> None:
        nonlocal sent
        await writer.publish("work-1", b"%d" % n)
        sent += 1

    async with (open_store_writer(store, max_pending=4, max_batch=4) as writer,
                trio.open_nursery() as nursery):
        for n in range(20):
            nursery.start_soon(write, n)
        await trio.testing.wait_all_tasks_blocked()
        # at most one batch in flight and a full queue; everyone else waits to be queued
        queue = writer._send.statistics()
        assert sum(store.batches) <= 4 and queue.current_buffer_used == 4
        assert queue.tasks_waiting_send == 20 - sum(store.batches) - 4
        assert sent == 0
        store.gate.set()
    assert sent == 20
    assert max(store.batches) <= 4


class _NoStore(StateStore):
    """Only here to show that StoreWriter needs nothing but `execute`."""

    def __init__(self) -> None:
        self.stats = StoreStats()
        self.seen: list[Op[Any]] = []

    async def execute(self, ops: Sequence[Op[Any]]) -> list[Any]:
        await trio.lowlevel.checkpoint()
        self.seen.extend(ops)
        return [None] * len(ops)

    @asynccontextmanager
    async def subscribe(self, worker: str) -> AsyncIterator[Subscription]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def scan_sas(self) -> AsyncIterator[tuple[bytes, StoredSa]]:
        return
        yield  # pragma: no cover

    async def heartbeat(self, node: str, role: str, ttl: float,
                        info: Mapping[str, Any] | None = None) -> None:
        raise NotImplementedError

    async def leave(self, node: str) -> None:
        raise NotImplementedError

    async def members(self) -> list[Member]:
        raise NotImplementedError


async def test_ops_reach_the_store_in_submission_order_per_caller() -> None:
    store = _NoStore()
    async with open_store_writer(store) as writer:
        for n in range(5):
            await writer.publish("work-1", b"%d" % n)
    assert [op.message for op in store.seen] == [b"%d" % n for n in range(5)]  # type: ignore[attr-defined]
