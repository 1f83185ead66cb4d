"""The StateStore contract, run against the memory store and the Redis store alike.

TTLs here are real time (Redis expires keys on its own clock), so they are short.
"""

from __future__ import annotations

import os

import pytest
import trio

from cluster.store import (
    Acquire,
    ClaimAddress,
    FreeAddress,
    GetSa,
    HoldAddress,
    LeaseLost,
    MemoryStore,
    PutSa,
    Release,
    Renew,
    StateStore,
    StoredSa,
    StoreError,
)

from .conftest import close_test_redis_store, open_test_redis_store

SHORT = 0.4  # a lease/TTL that the test outlives by sleeping PAST
PAST = 0.7


def spi() -> bytes:
    return os.urandom(8)


async def owned(store: StateStore, node: str = "node-a", ttl: float = 30.0) -> tuple[bytes, int]:
    key = spi()
    fence = await store.acquire(key, node, ttl)
    assert fence is not None
    return key, fence


# -- snapshots -----------------------------------------------------------------------------


async def test_put_then_get_returns_snapshot_owner_and_fence(store: StateStore) -> None:
    key, fence = await owned(store)
    await store.put_sa(key, b"\x00snapshot\xff", "node-a", fence)
    assert await store.get_sa(key) == StoredSa(b"\x00snapshot\xff", "node-a", fence)


async def test_get_of_unknown_sa_is_none(store: StateStore) -> None:
    assert await store.get_sa(spi()) is None


async def test_put_overwrites_previous_snapshot(store: StateStore) -> None:
    key, fence = await owned(store)
    await store.put_sa(key, b"one", "node-a", fence)
    await store.put_sa(key, b"two", "node-a", fence)
    assert await store.get_sa(key) == StoredSa(b"two", "node-a", fence)


async def test_delete_removes_the_snapshot(store: StateStore) -> None:
    key, fence = await owned(store)
    await store.put_sa(key, b"s", "node-a", fence)
    await store.delete_sa(key, fence)
    assert await store.get_sa(key) is None


async def test_snapshot_with_ttl_expires(store: StateStore) -> None:
    key, fence = await owned(store)
    await store.put_sa(key, b"s", "node-a", fence, ttl=SHORT)
    assert await store.get_sa(key) is not None
    await trio.sleep(PAST)
    assert await store.get_sa(key) is None


async def test_put_without_ttl_clears_an_earlier_ttl(store: StateStore) -> None:
    key, fence = await owned(store)
    await store.put_sa(key, b"s", "node-a", fence, ttl=SHORT)
    await store.put_sa(key, b"s2", "node-a", fence)
    await trio.sleep(PAST)
    assert await store.get_sa(key) == StoredSa(b"s2", "node-a", fence)


# -- leases and fencing --------------------------------------------------------------------


async def test_put_without_ever_acquiring_is_rejected(store: StateStore) -> None:
    key = spi()
    for fence in (0, 1):
        with pytest.raises(LeaseLost):
            await store.put_sa(key, b"s", "node-a", fence)
    assert await store.get_sa(key) is None


async def test_acquire_is_refused_while_another_node_holds_the_lease(store: StateStore) -> None:
    key, _ = await owned(store, "node-a")
    assert await store.acquire(key, "node-b", 30.0) is None


async def test_two_nodes_racing_for_one_sa_get_one_lease(store: StateStore) -> None:
    key = spi()
    won: dict[str, int | None] = {}

    async def contend(node: str) -> None:
        won[node] = await store.acquire(key, node, 30.0)

    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(contend, f"node-{n}")
    winners = [node for node, fence in won.items() if fence is not None]
    assert len(winners) == 1, won
    fence = won[winners[0]]
    assert fence == 1
    await store.put_sa(key, b"winner", winners[0], fence)
    assert await store.get_sa(key) == StoredSa(b"winner", winners[0], fence)


async def test_expired_lease_passes_to_another_node_and_fences_out_the_first(
        store: StateStore) -> None:
    key, old = await owned(store, "node-a", ttl=SHORT)
    await store.put_sa(key, b"by a", "node-a", old)
    await trio.sleep(PAST)
    new = await store.acquire(key, "node-b", 30.0)
    assert new is not None and new > old
    with pytest.raises(LeaseLost):
        await store.put_sa(key, b"late write by a", "node-a", old)
    with pytest.raises(LeaseLost):
        await store.delete_sa(key, old)
    assert await store.get_sa(key) == StoredSa(b"by a", "node-a", old)  # b reads a's last
    await store.put_sa(key, b"by b", "node-b", new)
    assert await store.get_sa(key) == StoredSa(b"by b", "node-b", new)


async def test_acquire_by_the_holder_issues_a_newer_token(store: StateStore) -> None:
    key, first = await owned(store, "node-a")
    second = await store.acquire(key, "node-a", 30.0)
    assert second is not None and second > first
    with pytest.raises(LeaseLost):  # a second incarnation fences out the first
        await store.put_sa(key, b"s", "node-a", first)
    await store.put_sa(key, b"s", "node-a", second)


async def test_renew_extends_only_the_holders_lease(store: StateStore) -> None:
    key, fence = await owned(store, "node-a", ttl=SHORT)
    assert not await store.renew(key, "node-b", fence, 30.0)
    assert not await store.renew(key, "node-a", fence + 1, 30.0)
    assert await store.renew(key, "node-a", fence, 30.0)
    await trio.sleep(PAST)  # past the original ttl: the renewal holds
    assert await store.acquire(key, "node-b", 30.0) is None


async def test_renew_of_an_expired_lease_fails(store: StateStore) -> None:
    key, fence = await owned(store, "node-a", ttl=SHORT)
    await trio.sleep(PAST)
    assert not await store.renew(key, "node-a", fence, 30.0)


async def test_release_lets_another_node_take_over_at_once(store: StateStore) -> None:
    key, fence = await owned(store, "node-a")
    assert not await store.release(key, "node-b", fence)
    assert not await store.release(key, "node-a", fence + 1)
    assert await store.release(key, "node-a", fence)
    taken = await store.acquire(key, "node-b", 30.0)
    assert taken is not None and taken > fence


async def test_delete_makes_every_earlier_token_stale(store: StateStore) -> None:
    key, fence = await owned(store)
    await store.put_sa(key, b"s", "node-a", fence)
    await store.delete_sa(key, fence)
    with pytest.raises(LeaseLost):  # a late batched write cannot resurrect it
        await store.put_sa(key, b"zombie", "node-a", fence)
    assert await store.get_sa(key) is None
    again = await store.acquire(key, "node-b", 30.0)  # the lease went with the record
    assert again is not None and again > fence + 1


async def test_delete_of_an_sa_already_gone_succeeds_for_any_token(store: StateStore) -> None:
    key, fence = await owned(store)
    await store.delete_sa(key, fence)
    await store.delete_sa(key, fence)  # a retry after a lost reply
    await store.delete_sa(spi(), 7)  # never existed: nothing to protect


async def test_fences_keep_rising_after_the_counter_expires(store: StateStore) -> None:
    # With a short retention the counter goes away; the record's own fence keeps the
    # next token above every token that wrote it.
    if isinstance(store, MemoryStore):
        short: StateStore = MemoryStore(fence_retention=SHORT)
    else:
        short = await open_test_redis_store(fence_retention=SHORT)
    try:
        key, fence = await owned(short, "node-a")
        await short.put_sa(key, b"s", "node-a", fence)
        await short.release(key, "node-a", fence)
        await trio.sleep(PAST)
        again = await short.acquire(key, "node-b", 30.0)
        assert again is not None and again > fence
        with pytest.raises(LeaseLost):
            await short.put_sa(key, b"x", "node-a", fence)
    finally:
        if not isinstance(short, MemoryStore):
            await close_test_redis_store(short)  # type: ignore[arg-type]


# -- execute: one round trip, per-op results -----------------------------------------------


async def test_execute_runs_ops_in_order_in_one_round_trip(store: StateStore) -> None:
    key = spi()
    before = store.stats.round_trips
    results = await store.execute([
        Acquire(key, "node-a", 30.0),
        PutSa(key, b"first", "node-a", 1),
        GetSa(key),
        Acquire(key, "node-b", 30.0),
        Renew(key, "node-a", 1, 30.0),
    ])
    assert store.stats.round_trips == before + 1
    assert results == [1, None, StoredSa(b"first", "node-a", 1), None, True]


async def test_a_stale_op_fails_alone_in_its_batch(store: StateStore) -> None:
    key, fence = await owned(store)
    results = await store.execute([
        PutSa(key, b"stale", "node-a", fence + 5),
        PutSa(key, b"good", "node-a", fence),
        GetSa(key),
    ])
    assert isinstance(results[0], LeaseLost) and isinstance(results[0], StoreError)
    assert results[1:] == [None, StoredSa(b"good", "node-a", fence)]
    assert store.stats.lease_lost >= 1


async def test_scan_lists_every_stored_sa(store: StateStore) -> None:
    keys = [spi() for _ in range(1100)]  # more than one Redis SCAN page
    results = await store.execute([Acquire(k, "node-a", 30.0) for k in keys])
    await store.execute([PutSa(k, k[::-1], "node-a", f) for k, f in zip(keys, results,
                                                                          strict=True)])
    seen = {key: sa async for key, sa in store.scan_sas()}
    assert seen == {k: StoredSa(k[::-1], "node-a", 1) for k in keys}


async def test_scan_of_owners_lists_every_stored_sa_with_its_last_writer(
        store: StateStore) -> None:
    keys = [spi() for _ in range(1100)]
    fences = await store.execute([Acquire(k, "node-a", 30.0) for k in keys])
    await store.execute([PutSa(k, b"snap", "node-a", f) for k, f in zip(keys, fences,
                                                                         strict=True)])
    await store.execute([Release(keys[0], "node-a", fences[0])])
    [fence] = await store.execute([Acquire(keys[0], "node-b", 30.0)])
    await store.execute([PutSa(keys[0], b"snap", "node-b", fence)])
    seen = {key: owner async for key, owner in store.scan_owners()}
    assert seen == {k: "node-b" if k == keys[0] else "node-a" for k in keys}


# -- membership ----------------------------------------------------------------------------


async def test_members_are_listed_with_role_info_and_age(store: StateStore) -> None:
    await store.heartbeat("resp-2", "responder", 30.0, {"relay": "10.0.0.2:4501"})
    await store.heartbeat("work-1", "worker", 30.0)
    members = await store.members()
    assert [(m.node, m.role, dict(m.info)) for m in members] == [
        ("resp-2", "responder", {"relay": "10.0.0.2:4501"}),
        ("work-1", "worker", {}),
    ]
    assert all(0 <= m.age < 5 for m in members)


async def test_a_member_without_heartbeat_expires(store: StateStore) -> None:
    await store.heartbeat("resp-1", "responder", SHORT)
    await store.heartbeat("resp-2", "responder", 30.0)
    await trio.sleep(PAST)
    assert [m.node for m in await store.members()] == ["resp-2"]


async def test_heartbeats_keep_a_member_alive(store: StateStore) -> None:
    for _ in range(4):  # 4 x 0.2 s outlives one TTL; each beat renews it
        await store.heartbeat("resp-1", "responder", SHORT)
        await trio.sleep(SHORT / 2)
    assert [m.node for m in await store.members()] == ["resp-1"]


async def test_leave_removes_a_member_at_once(store: StateStore) -> None:
    await store.heartbeat("resp-1", "responder", 30.0)
    await store.leave("resp-1")
    assert await store.members() == []


# -- key distribution ----------------------------------------------------------------------


async def test_children_are_kept_per_worker(store: StateStore) -> None:
    await store.put_child("work-1", b"\x00\x00\x10\x01", b"sealed-1")
    await store.put_child("work-1", b"\x00\x00\x10\x02", b"sealed-2")
    await store.put_child("work-2", b"\x00\x00\x20\x01", b"sealed-3")
    await store.delete_child("work-1", b"\x00\x00\x10\x01")
    await store.delete_child("work-1", b"\xff\xff\xff\xff")  # absent: no error
    assert await store.children("work-1") == {b"\x00\x00\x10\x02": b"sealed-2"}
    assert await store.children("work-2") == {b"\x00\x00\x20\x01": b"sealed-3"}
    assert await store.children("work-3") == {}


async def test_subscribers_get_what_is_published_after_they_subscribe(
        store: StateStore) -> None:
    await store.publish("work-1", b"before")
    async with store.subscribe("work-1") as first, store.subscribe("work-1") as second:
        await store.publish("work-2", b"for another worker")
        for n in range(5):
            await store.publish("work-1", b"install %d" % n)
        with trio.fail_after(5):
            got_first = [await anext(first) for _ in range(5)]
            got_second = [await anext(second) for _ in range(5)]
    expected = [b"install %d" % n for n in range(5)]
    assert got_first == expected and got_second == expected


async def test_a_waiting_subscriber_wakes_on_publish(store: StateStore) -> None:
    async with store.subscribe("work-1") as subscription:
        got: list[bytes | None] = []

        async def consume() -> None:
            got.append(await anext(subscription))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await trio.sleep(0.2)  # the consumer is blocked (in XREAD BLOCK on Redis)
            assert got == []
            await store.put_child("work-1", b"\x01\x02\x03\x04", b"p")
            await store.publish("work-1", b"install 01020304")
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.01)
    assert got == [b"install 01020304"]


# -- virtual IP pools ---------------------------------------------------------------------


def claim(pool: str, size: int, holder: bytes, identity: bytes = b"",
          ttl: float = 30.0) -> ClaimAddress:
    return ClaimAddress(pool, size, holder, identity or holder, ttl)


async def test_claimed_addresses_are_distinct_until_the_pool_is_full(store: StateStore) -> None:
    pool = f"p{os.urandom(4).hex()}"
    offsets = [await store.run(claim(pool, 3, f"sa{n}".encode())) for n in range(4)]
    assert sorted(o for o in offsets[:3] if o is not None) == [0, 1, 2]
    assert offsets[3] is None  # every address is held


async def test_freed_or_expired_addresses_are_claimed_again(store: StateStore) -> None:
    pool = f"p{os.urandom(4).hex()}"
    first = await store.run(claim(pool, 2, b"a"))
    second = await store.run(claim(pool, 2, b"b", ttl=SHORT))
    assert first is not None and second is not None
    assert not await store.run(FreeAddress(pool, first, b"someone else"))
    assert await store.run(FreeAddress(pool, first, b"a"))
    assert await store.run(claim(pool, 2, b"c")) == first
    await trio.sleep(PAST)  # b's hold ran out
    assert await store.run(claim(pool, 2, b"d")) == second


async def test_holding_an_address_keeps_it_only_for_its_holder(store: StateStore) -> None:
    pool = f"p{os.urandom(4).hex()}"
    assert await store.run(claim(pool, 1, b"a", ttl=SHORT)) == 0
    assert not await store.run(HoldAddress(pool, 0, b"b", 30.0))
    assert await store.run(HoldAddress(pool, 0, b"a", 30.0))
    await trio.sleep(PAST)  # still held: the hold extended it
    assert await store.run(claim(pool, 1, b"b")) is None


async def test_an_identity_gets_its_address_back_and_shares_it(store: StateStore) -> None:
    pool = f"p{os.urandom(4).hex()}"
    alice = await store.run(claim(pool, 4, b"sa-1", b"alice"))
    bob = await store.run(claim(pool, 4, b"sa-2", b"bob"))
    assert alice is not None and bob is not None and alice != bob
    # a second SA of alice's (a reauthentication before the first ends) shares it
    assert await store.run(claim(pool, 4, b"sa-3", b"alice")) == alice
    assert await store.run(FreeAddress(pool, alice, b"sa-1"))
    assert await store.run(claim(pool, 4, b"sa-4", b"carol")) not in (alice, bob)
    assert await store.run(FreeAddress(pool, alice, b"sa-3"))  # now nobody holds it
    # alice comes back later: her address again, although others were never used
    assert await store.run(claim(pool, 4, b"sa-5", b"alice")) == alice
    # bob's address is his while he holds it: alice's other SAs never get it
    assert await store.run(claim(pool, 4, b"sa-6", b"dave")) not in (alice, bob)
