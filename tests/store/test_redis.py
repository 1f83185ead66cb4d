"""What only the Redis store has: key layout, no secret in the clear, outages and restarts."""

from __future__ import annotations

import os
from typing import Any

import pytest
import redis
import trio

from cluster.store import (
    Acquire,
    ClusterKey,
    GetSa,
    Publish,
    PutChild,
    PutSa,
    RedisStore,
    StoredSa,
    StoreError,
    open_store_writer,
    pack_snapshot,
    seal,
)

from .redis_server import RedisServer


def everything_under(client: redis.Redis, prefix: str) -> dict[bytes, bytes]:
    """Every key under `prefix` -> its DUMP and its contents read by type, concatenated."""
    found: dict[bytes, bytes] = {}
    for name in client.scan_iter(match=prefix + "*", count=1000):
        kind = client.type(name)
        parts: list[Any] = [client.dump(name) or b""]
        reply: Any
        if kind == b"string":
            parts.append(client.get(name))
        elif kind == b"hash":
            reply = client.hgetall(name)
            parts += [item for pair in reply.items() for item in pair]
        elif kind == b"zset":
            reply = client.zrange(name, 0, -1, withscores=True)
            parts += [member for member, _ in reply]
        elif kind == b"stream":
            reply = client.xrange(name)
            for _, fields in reply:
                parts += [item for pair in fields.items() for item in pair]
        else:
            raise AssertionError(f"unexpected type {kind!r} of {name!r}")
        found[name] = b"\x00".join(parts)
    return found


async def test_no_secret_is_stored_in_the_clear_and_keys_follow_the_layout(
        redis_store: RedisStore) -> None:
    key = ClusterKey.generate()
    spi_i, spi_r, spi_in = os.urandom(8), os.urandom(8), os.urandom(4)
    secrets = {"sk_d": os.urandom(32), "sk_ei": os.urandom(36), "sk_er": os.urandom(36),
               "sk_pi": os.urandom(32), "sk_pr": os.urandom(32)}
    child_key = os.urandom(36)
    record = {"schema": 1, "spi_i": spi_i, "spi_r": spi_r, "message_id": 3, **secrets,
              "children": [{"spi_in": spi_in, "encr_key_in": child_key}],
              "last_response": b"\x00" * 200}
    snapshot = pack_snapshot(record, set(secrets) | {"children"}, key, spi_i + spi_r)
    fence = await redis_store.acquire(spi_r, "resp-1", 30.0)
    assert fence is not None
    await redis_store.put_sa(spi_r, snapshot, "resp-1", fence)
    await redis_store.put_child("work-1", spi_in, seal(key, child_key, b"child" + spi_in))
    await redis_store.publish("work-1", b"install " + spi_in.hex().encode())
    await redis_store.heartbeat("resp-1", "responder", 30.0, {"relay": "127.0.0.1:4501"})

    dump = await trio.to_thread.run_sync(everything_under, redis_store.client,
                                         redis_store.prefix)
    p, tag = redis_store.prefix, "{" + spi_r.hex() + "}"
    assert {name.decode() for name in dump} == {
        f"{p}sa:{tag}", f"{p}fence:{tag}", f"{p}lease:{tag}",
        f"{p}sad:{{work-1}}", f"{p}notify:{{work-1}}",
        f"{p}{{members}}:expiry", f"{p}{{members}}:info",
    }
    everything = b"".join(dump.values())
    assert spi_i in everything  # the scan sees the stored values...
    for name, secret in [*secrets.items(), ("child key", child_key)]:
        assert secret not in everything, f"{name} is in Redis in the clear"
        assert secret[:16] not in everything, f"part of {name} is in Redis in the clear"

    # ...and would have caught a secret stored clear
    await redis_store.put_child("work-2", spi_in, secrets["sk_ei"])
    dump = await trio.to_thread.run_sync(everything_under, redis_store.client,
                                         redis_store.prefix)
    assert secrets["sk_ei"] in b"".join(dump.values())


async def test_redis_outage_raises_store_error_and_everything_resumes_after_restart(
        private_redis: RedisServer) -> None:
    store = RedisStore.from_url(private_redis.url)
    key = os.urandom(8)
    got: list[bytes | None] = []
    try:
        fence = await store.acquire(key, "resp-1", 30.0)
        assert fence is not None
        await store.put_sa(key, b"before", "resp-1", fence)
        async with store.subscribe("work-1") as subscription, trio.open_nursery() as nursery:

            async def collect() -> None:
                async for message in subscription:
                    got.append(message)

            nursery.start_soon(collect)
            await store.publish("work-1", b"before")
            with trio.fail_after(5):
                while got != [b"before"]:
                    await trio.sleep(0.01)

            await trio.to_thread.run_sync(private_redis.stop)
            with trio.fail_after(5):  # errors, promptly: no hang
                with pytest.raises(StoreError, match="redis: ConnectionError"):
                    await store.get_sa(key)
                with pytest.raises(StoreError):
                    await store.put_sa(key, b"during", "resp-1", fence)
                with pytest.raises(StoreError):
                    await store.members()
                async with open_store_writer(store) as writer:
                    with pytest.raises(StoreError):
                        await writer.put_sa(key, b"during", "resp-1", fence)
            errors = store.stats.errors
            assert errors >= 4
            await trio.sleep(1.0)  # the subscription retries with backoff, it does not spin
            assert store.stats.errors - errors <= 8

            await trio.to_thread.run_sync(private_redis.start)  # same port, empty (no save)
            with trio.fail_after(10):
                fence = await store.acquire(key, "resp-1", 30.0)
                assert fence is not None
                await store.put_sa(key, b"after", "resp-1", fence)
                assert await store.get_sa(key) == StoredSa(b"after", "resp-1", fence)
                await store.publish("work-1", b"after")
                while b"after" not in got:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
    assert got == [b"before", None, b"after"]  # None: re-read the SAD, something may be lost


async def test_a_hung_redis_gives_store_error_within_the_socket_timeout(
        private_redis: RedisServer) -> None:
    store = RedisStore.from_url(private_redis.url, socket_timeout=0.3)
    try:
        assert await store.get_sa(b"k" * 8) is None
        private_redis.pause()
        try:
            started = trio.current_time()
            with trio.fail_after(5), pytest.raises(StoreError, match="Timeout"):
                await store.get_sa(b"k" * 8)
            assert trio.current_time() - started < 2.0  # 0.3 s, once retried
        finally:
            private_redis.resume()
        with trio.fail_after(5):
            assert await store.get_sa(b"k" * 8) is None
    finally:
        await store.aclose()


async def test_scripts_are_reloaded_after_the_server_forgets_them(
        private_redis: RedisServer) -> None:
    store = RedisStore.from_url(private_redis.url)
    key = os.urandom(8)
    try:
        [fence] = await store.execute([Acquire(key, "resp-1", 30.0)])
        await trio.to_thread.run_sync(store.client.script_flush)
        # a batch mixing scripted and plain commands: each op applied exactly once
        results = await store.execute([
            PutChild("work-1", b"\x01" * 4, b"p"),
            PutSa(key, b"s", "resp-1", fence),
            Publish("work-1", b"install"),
        ])
        assert results == [None, None, None]
        assert await store.get_sa(key) == StoredSa(b"s", "resp-1", fence)
        length = await trio.to_thread.run_sync(store.client.xlen, "ikec:notify:{work-1}")
        assert length == 1
        await trio.to_thread.run_sync(store.client.script_flush)
        await store.heartbeat("resp-1", "responder", 30.0)  # the single-script path
        assert [m.node for m in await store.members()] == ["resp-1"]
    finally:
        await store.aclose()


async def test_a_corrupt_record_fails_its_own_op_only(redis_store: RedisStore) -> None:
    good, bad = os.urandom(8), os.urandom(8)
    fence = await redis_store.acquire(good, "resp-1", 30.0)
    assert fence is not None
    await redis_store.put_sa(good, b"s", "resp-1", fence)
    bad_name = f"{redis_store.prefix}sa:{{{bad.hex()}}}"
    await trio.to_thread.run_sync(
        lambda: redis_store.client.hset(bad_name, mapping={"v": "9", "owner": "x"}))
    results = await redis_store.execute([GetSa(bad), GetSa(good)])
    assert isinstance(results[0], StoreError) and "version" in str(results[0])
    assert results[1] == StoredSa(b"s", "resp-1", fence)
