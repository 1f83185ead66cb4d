"""The memory store runs on Trio's clock: TTLs follow an autojump clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from cluster.store import LeaseLost, MemoryStore, StoredSa


async def test_lease_expiry_follows_the_trio_clock(autojump_clock: trio.testing.MockClock
                                                   ) -> None:
    store = MemoryStore()
    key = b"\x01" * 8
    first = await store.acquire(key, "node-a", 30.0)
    assert first is not None
    await trio.sleep(29.0)
    assert await store.acquire(key, "node-b", 30.0) is None
    await trio.sleep(1.5)
    second = await store.acquire(key, "node-b", 30.0)
    assert second is not None and second > first
    with pytest.raises(LeaseLost):
        await store.put_sa(key, b"s", "node-a", first)


async def test_membership_and_records_expire_on_the_trio_clock(
        autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    key = b"\x02" * 8
    fence = await store.acquire(key, "node-a", 30.0)
    assert fence is not None
    await store.put_sa(key, b"s", "node-a", fence, ttl=3600.0)
    await store.heartbeat("resp-1", "responder", 5.0)
    await trio.sleep(4.0)
    [member] = await store.members()
    assert member.age == pytest.approx(4.0)
    await trio.sleep(1.5)
    assert await store.members() == []
    assert await store.get_sa(key) == StoredSa(b"s", "node-a", fence)
    await trio.sleep(3600.0)
    assert await store.get_sa(key) is None


async def test_expired_entries_are_swept_without_being_read(
        autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore(fence_retention=60.0)
    for n in range(100):
        key = bytes([n]) * 8
        fence = await store.acquire(key, "node-a", 5.0)
        assert fence is not None
        await store.put_sa(key, b"s", "node-a", fence, ttl=30.0)
        await store.heartbeat(f"node-{n}", "responder", 5.0)
    await trio.sleep(120.0)
    await store.get_sa(b"\xff" * 8)  # any operation may sweep
    assert not (store._records or store._leases or store._counters or store._members)


async def test_a_subscriber_that_falls_behind_is_told_to_resync() -> None:
    store = MemoryStore(subscriber_buffer=4)
    async with store.subscribe("work-1") as subscription:
        for n in range(10):
            await store.publish("work-1", b"%d" % n)
        assert await anext(subscription) is None  # some were dropped: re-read children()
        await store.publish("work-1", b"after")
        assert await anext(subscription) == b"after"
    assert store._subscribers == {}
