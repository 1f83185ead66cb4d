"""Fixtures: the same contract tests run on the memory store and on Redis.

The Redis store needs IKE_CLUSTER_TEST_REDIS (scripts/test starts a private server and sets
it). Without it the Redis cases skip locally but FAIL under CI=true, so CI cannot pass with
the Redis half silently missing.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import trio

from cluster.store import MemoryStore, RedisStore, StateStore

from .redis_server import RedisServer


def redis_url_for_tests() -> str:
    url = os.environ.get("IKE_CLUSTER_TEST_REDIS")
    if url:
        return url
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail("CI is set but IKE_CLUSTER_TEST_REDIS is not: the Redis store must be tested")
    pytest.skip("IKE_CLUSTER_TEST_REDIS is not set (scripts/test starts a Redis and sets it)")


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    names = list(client.scan_iter(match=prefix.replace("*", "\\*") + "*", count=1000))
    if names:
        client.delete(*names)


def unique_prefix() -> str:
    return f"ikec-test-{os.getpid()}-{secrets.token_hex(4)}:"


async def open_test_redis_store(**options: object) -> RedisStore:
    return RedisStore.from_url(redis_url_for_tests(), prefix=unique_prefix(), **options)  # type: ignore[arg-type]


async def close_test_redis_store(store: RedisStore) -> None:
    await trio.to_thread.run_sync(delete_prefix, store.client, store.prefix)
    await store.aclose()


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    store = await open_test_redis_store()
    try:
        yield store
    finally:
        await close_test_redis_store(store)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    opened = await open_test_redis_store()
    try:
        yield opened
    finally:
        await close_test_redis_store(opened)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, for outages; killed by pid afterwards."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
