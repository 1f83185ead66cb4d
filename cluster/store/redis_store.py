"""The state store on Redis, through redis-py (hiredis) in worker threads.

redis-py's asyncio client does not run under Trio, so blocking calls run in
`trio.to_thread` behind a small CapacityLimiter; one `execute` is one pipeline. Fenced
writes and leases are Lua scripts, so the comparison and the write are one atomic step.

Keys, under a prefix (default `ikec:`); the `{...}` hash tags keep each SA's keys, and each
worker's, in one Redis Cluster slot:
    sa:{SPIHEX}      hash v=1 owner fence snap    the snapshot (optional TTL)
    fence:{SPIHEX}   integer                      newest token issued (kept for a while)
    lease:{SPIHEX}   hash node fence, PX ttl      current ownership
    {members}:expiry zset node -> expiry (ms, Redis clock)
    {members}:info   hash node -> msgpack [1, role, ttl_ms, info]
    sad:{WORKER}     hash spi_in -> sealed params  the worker's durable SAD
    notify:{WORKER}  stream of m=message           its notifications (capped)

Notifications are a stream read with XREAD BLOCK, not pub/sub: a subscriber resumes from
the last entry it saw after a reconnect, so a Redis blip loses nothing, and it still says
"re-read" (None) afterwards in case the cap trimmed entries. Pub/sub would drop whatever
was published while the connection was down, without anyone noticing.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import redis
import trio
from redis.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

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
    StoreError,
    StoreStats,
    Subscription,
)
from .redis_url import client_from_url

T = TypeVar("T")

RECORD_VERSION = b"1"
MEMBER_VERSION = 1
RESUBSCRIBE_MIN, RESUBSCRIBE_MAX = 0.05, 2.0  # subscription retry backoff (s)
IDENTITY_MEMORY = 7 * 86400.0  # how long a pool remembers an identity's last address (s)


@dataclass(frozen=True)
class _Script:
    text: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.text.encode()).hexdigest()


# KEYS lease, fence, sa; ARGV node, ttl_ms, retention_ms
_ACQUIRE = _Script("""
local holder = redis.call('HGET', KEYS[1], 'node')
if holder and holder ~= ARGV[1] then return false end
local fence = redis.call('INCR', KEYS[2])
local stored = tonumber(redis.call('HGET', KEYS[3], 'fence'))
if stored and stored >= fence then
  fence = stored + 1
  redis.call('SET', KEYS[2], fence)
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'fence', fence)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return fence
""")

# KEYS lease, fence; ARGV node, fence, ttl_ms, retention_ms
_RENEW = _Script("""
local v = redis.call('HMGET', KEYS[1], 'node', 'fence')
if v[1] ~= ARGV[1] or v[2] ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
""")

# KEYS lease; ARGV node, fence
_RELEASE = _Script("""
local v = redis.call('HMGET', KEYS[1], 'node', 'fence')
if v[1] ~= ARGV[1] or v[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
""")

# KEYS sa, fence; ARGV fence, owner, snapshot, ttl_ms (0: none), retention_ms
_PUT = _Script("""
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', '1', 'owner', ARGV[2], 'fence', ARGV[1], 'snap', ARGV[3])
if ARGV[4] == '0' then redis.call('PERSIST', KEYS[1])
else redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
""")

# KEYS sa, fence, lease; ARGV fence, retention_ms
_DELETE = _Script("""
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
return 0
""")

_NOW_MS = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Each address is a hash: "id" (the identity it went to) and one "h:<holder>" field per
# IKE SA holding it, valued with its expiry; the key itself expires with the last one.
# "id:<identity>" remembers an identity's last address. Redis's clock decides.
_ADDRESS_FUNCTIONS = """
local function holders(key, now)
  local all = redis.call('HGETALL', key)
  local count, id = 0, false
  for i = 1, #all, 2 do
    if all[i] == 'id' then id = all[i + 1]
    elseif tonumber(all[i + 1]) <= now then redis.call('HDEL', key, all[i])
    else count = count + 1 end
  end
  return count, id
end
local function extend(key, ttl)
  local left = redis.call('PTTL', key)
  if left < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""

# KEYS next; ARGV prefix, size, holder, ttl_ms, identity (hex), identity memory ms
_CLAIM_ADDRESS = _Script(_NOW_MS + _ADDRESS_FUNCTIONS + """
local prefix, size, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local function take(offset)
  local key = prefix .. offset
  redis.call('HSET', key, 'id', ARGV[5], 'h:' .. ARGV[3], now + ttl)
  extend(key, ttl)
  redis.call('SET', prefix .. 'id:' .. ARGV[5], offset, 'PX', ARGV[6])
  return offset
end
local hint = redis.call('GET', prefix .. 'id:' .. ARGV[5])
if hint then
  local count, id = holders(prefix .. hint, now)
  if count == 0 or id == ARGV[5] then return take(tonumber(hint)) end
end
for i = 1, size do
  local offset = (redis.call('INCR', KEYS[1]) - 1) % size
  local count = holders(prefix .. offset, now)
  if count == 0 then return take(offset) end
end
return -1
""")

# KEYS address; ARGV holder, ttl_ms
_HOLD_ADDRESS = _Script(_NOW_MS + _ADDRESS_FUNCTIONS + """
if redis.call('HEXISTS', KEYS[1], 'h:' .. ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'h:' .. ARGV[1], now + tonumber(ARGV[2]))
extend(KEYS[1], tonumber(ARGV[2]))
return 1
""")

# KEYS address; ARGV holder
_FREE_ADDRESS = _Script(_NOW_MS + _ADDRESS_FUNCTIONS + """
if redis.call('HDEL', KEYS[1], 'h:' .. ARGV[1]) == 0 then return 0 end
if holders(KEYS[1], now) == 0 then redis.call('DEL', KEYS[1]) end
return 1
""")


# KEYS expiry, info; ARGV node, ttl_ms, blob. The Redis clock, so node clocks may differ.
_HEARTBEAT = _Script(_NOW_MS + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return now
""")

# KEYS expiry, info -> {now_ms, node, expiry_ms, blob, node, ...}
_MEMBERS = _Script(_NOW_MS + """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, node in ipairs(gone) do
  redis.call('ZREM', KEYS[1], node)
  redis.call('HDEL', KEYS[2], node)
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {now}
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = live[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], live[i])
end
return out
""")

_SCRIPTS = (_ACQUIRE, _RENEW, _RELEASE, _PUT, _DELETE, _HEARTBEAT, _MEMBERS, _CLAIM_ADDRESS,
            _HOLD_ADDRESS, _FREE_ADDRESS)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"redis: {type(exc).__name__}: {text}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(StateStore):
    def __init__(self, client: redis.Redis, *, prefix: str = "ikec:", threads: int = 8,
                 fence_retention: float = 86400.0, stream_maxlen: int = 10_000,
                 block: float = 1.0) -> None:
        self.stats = StoreStats()
        self.client = client
        self.prefix = prefix
        self._limiter = trio.CapacityLimiter(threads)
        self._retention_ms = _ms(fence_retention)
        self._stream_maxlen = stream_maxlen
        # XREAD BLOCK must return before the socket timeout calls the read a failure.
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._block_ms = _ms(block if timeout is None else min(block, timeout / 2))

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "ikec:", threads: int = 8,
                 socket_timeout: float = 2.0, socket_connect_timeout: float = 1.0,
                 retries: int = 1, **options: Any) -> RedisStore:
        client = client_from_url(url, socket_timeout=socket_timeout,
                                 socket_connect_timeout=socket_connect_timeout, retries=retries)
        return cls(client, prefix=prefix, threads=threads, **options)

    async def aclose(self) -> None:
        def close() -> None:
            self.client.close()
            manager = getattr(self.client.connection_pool, "sentinel_manager", None)
            for sentinel in getattr(manager, "sentinels", ()):
                sentinel.close()

        await trio.to_thread.run_sync(close)

    # -- key names -----------------------------------------------------------------------

    def _sa_keys(self, key: bytes) -> tuple[str, str, str]:
        tag = "{" + key.hex() + "}"
        p = self.prefix
        return f"{p}sa:{tag}", f"{p}fence:{tag}", f"{p}lease:{tag}"

    def _sad_key(self, worker: str) -> str:
        return f"{self.prefix}sad:{{{worker}}}"

    def _notify_key(self, worker: str) -> str:
        return f"{self.prefix}notify:{{{worker}}}"

    def _member_keys(self) -> tuple[str, str]:
        return f"{self.prefix}{{members}}:expiry", f"{self.prefix}{{members}}:info"

    # -- running blocking calls off the event loop ---------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter,
                                                 abandon_on_cancel=True)
        except (RedisError, OSError) as exc:
            self.stats.errors += 1
            raise StoreError(_describe(exc)) from exc

    def _eval(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """In a worker thread: EVALSHA, loading the script once if the server lost it."""
        try:
            return self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.client.script_load(script.text)
            return self.client.evalsha(script.sha, len(keys), *keys, *args)

    # -- batched operations --------------------------------------------------------------

    async def execute(self, ops: Sequence[Op[Any]]) -> list[Any]:
        if not ops:
            return []
        started = trio.current_time()
        results = await self._call(self._execute_in_thread, list(ops))
        self.stats.round_trips += 1
        self.stats.ops += len(ops)
        self.stats.seconds += trio.current_time() - started
        self.stats.lease_lost += sum(isinstance(r, LeaseLost) for r in results)
        return results

    def _execute_in_thread(self, ops: list[Op[Any]]) -> list[Any]:
        with self.client.pipeline(transaction=False) as pipe:
            for op in ops:
                _QUEUE[type(op)](self, pipe, op)
            raw: list[Any] = pipe.execute(raise_on_error=False)
        # After a Redis restart the script cache is empty: load and redo only those ops
        # (every other op of the batch has already been applied once).
        missing = [i for i, reply in enumerate(raw) if isinstance(reply, NoScriptError)]
        if missing:
            for script in _SCRIPTS:
                self.client.script_load(script.text)
            with self.client.pipeline(transaction=False) as pipe:
                for i in missing:
                    _QUEUE[type(ops[i])](self, pipe, ops[i])
                for i, reply in zip(missing, pipe.execute(raise_on_error=False), strict=True):
                    raw[i] = reply
        return [_decode_reply(op, reply) for op, reply in zip(ops, raw, strict=True)]

    def _q_get_sa(self, pipe: Pipeline, op: GetSa) -> None:
        pipe.hmget(self._sa_keys(op.key)[0], ["v", "owner", "fence", "snap"])

    def _q_put_sa(self, pipe: Pipeline, op: PutSa) -> None:
        sa, fence, _ = self._sa_keys(op.key)
        ttl = 0 if op.ttl is None else _ms(op.ttl)
        pipe.evalsha(_PUT.sha, 2, sa, fence, op.fence, op.owner, op.snapshot, ttl,
                     self._retention_ms)

    def _q_delete_sa(self, pipe: Pipeline, op: DeleteSa) -> None:
        sa, fence, lease = self._sa_keys(op.key)
        pipe.evalsha(_DELETE.sha, 3, sa, fence, lease, op.fence, self._retention_ms)

    def _q_acquire(self, pipe: Pipeline, op: Acquire) -> None:
        sa, fence, lease = self._sa_keys(op.key)
        pipe.evalsha(_ACQUIRE.sha, 3, lease, fence, sa, op.node, _ms(op.ttl),
                     self._retention_ms)

    def _q_renew(self, pipe: Pipeline, op: Renew) -> None:
        _, fence, lease = self._sa_keys(op.key)
        pipe.evalsha(_RENEW.sha, 2, lease, fence, op.node, op.fence, _ms(op.ttl),
                     self._retention_ms)

    def _address_key(self, pool: str, offset: int | str) -> str:
        return f"{self.prefix}pool:{{{pool}}}:{offset}"

    def _q_claim_address(self, pipe: Pipeline, op: ClaimAddress) -> None:
        pipe.evalsha(_CLAIM_ADDRESS.sha, 1, self._address_key(op.pool, "next"),
                     self._address_key(op.pool, ""), op.size, op.holder, _ms(op.ttl),
                     op.identity.hex(), _ms(IDENTITY_MEMORY))

    def _q_hold_address(self, pipe: Pipeline, op: HoldAddress) -> None:
        pipe.evalsha(_HOLD_ADDRESS.sha, 1, self._address_key(op.pool, op.offset), op.holder,
                     _ms(op.ttl))

    def _q_free_address(self, pipe: Pipeline, op: FreeAddress) -> None:
        pipe.evalsha(_FREE_ADDRESS.sha, 1, self._address_key(op.pool, op.offset), op.holder)

    def _q_release(self, pipe: Pipeline, op: Release) -> None:
        _, _, lease = self._sa_keys(op.key)
        pipe.evalsha(_RELEASE.sha, 1, lease, op.node, op.fence)

    def _q_put_child(self, pipe: Pipeline, op: PutChild) -> None:
        pipe.hset(self._sad_key(op.worker), op.spi_in, op.params)

    def _q_delete_child(self, pipe: Pipeline, op: DeleteChild) -> None:
        pipe.hdel(self._sad_key(op.worker), op.spi_in)

    def _q_children(self, pipe: Pipeline, op: Children) -> None:
        pipe.hgetall(self._sad_key(op.worker))

    def _q_publish(self, pipe: Pipeline, op: Publish) -> None:
        pipe.xadd(self._notify_key(op.worker), {b"m": op.message},
                  maxlen=self._stream_maxlen, approximate=True)

    # -- the rest of the interface -------------------------------------------------------

    @asynccontextmanager
    async def subscribe(self, worker: str) -> AsyncIterator[Subscription]:
        key = self._notify_key(worker)
        last = await self._call(self._stream_tail, key)
        yield _StreamSubscription(self, key, last)

    def _stream_tail(self, key: str) -> bytes:
        newest: Any = self.client.xrevrange(key, count=1)
        return bytes(newest[0][0]) if newest else b"0-0"

    def _read_stream(self, key: str, after: bytes) -> list[tuple[bytes, bytes]]:
        reply: Any = self.client.xread({key: after}, count=512, block=self._block_ms)
        return [(bytes(entry_id), bytes(fields.get(b"m", b"")))
                for _, entries in reply or [] for entry_id, fields in entries]

    async def scan_sas(self) -> AsyncIterator[tuple[bytes, StoredSa]]:
        cursor = 0
        while True:
            cursor, page = await self._call(self._scan_page, cursor)
            for item in page:
                yield item
            if cursor == 0:
                return

    async def scan_owners(self) -> AsyncIterator[tuple[bytes, str]]:
        cursor = 0
        while True:
            cursor, page = await self._call(self._scan_page, cursor, ["owner"])
            for key, (owner,) in page:
                if owner is not None:
                    yield key, owner.decode(errors="replace")
            if cursor == 0:
                return

    def _scan_page(self, cursor: int, fields: list[str] | None = None
                   ) -> tuple[int, list[tuple[bytes, Any]]]:
        """A page of SA records: their keys and `fields` as Redis has them, or (no
        `fields`) the records decoded."""
        start = self.prefix + "sa:{"
        names: list[bytes]
        cursor, names = self.client.scan(  # type: ignore[assignment]
            cursor, match=_glob_escape(start) + "*", count=1000)
        with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(name, fields or ["v", "owner", "fence", "snap"])
            replies = pipe.execute()
        page = []
        for name, reply in zip(names, replies, strict=True):
            record = reply if fields else _decode_record(reply)
            if record is not None:
                page.append((bytes.fromhex(name[len(start.encode()) : -1].decode()), record))
        return int(cursor), page

    async def heartbeat(self, node: str, role: str, ttl: float,
                        info: Mapping[str, Any] | None = None) -> None:
        blob = msgpack.packb([MEMBER_VERSION, role, _ms(ttl), dict(info or {})],
                             use_bin_type=True)
        await self._call(self._eval, _HEARTBEAT, self._member_keys(), (node, _ms(ttl), blob))

    async def leave(self, node: str) -> None:
        expiry, info = self._member_keys()

        def remove() -> None:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(expiry, node)
                pipe.hdel(info, node)
                pipe.execute()

        await self._call(remove)

    async def members(self) -> list[Member]:
        reply = await self._call(self._eval, _MEMBERS, self._member_keys(), ())
        now_ms = int(reply[0])
        members = []
        for i in range(1, len(reply), 3):
            node, expiry_ms, blob = reply[i].decode(), int(reply[i + 1]), reply[i + 2]
            try:
                version, role, ttl_ms, info = msgpack.unpackb(blob, raw=False)
            except (TypeError, ValueError, msgpack.ExtraData, msgpack.FormatError,
                    msgpack.StackError):
                raise StoreError(f"member record of {node!r} does not decode") from None
            if version != MEMBER_VERSION:
                raise StoreError(f"member record version {version!r} of {node!r}")
            last_seen_ms = expiry_ms - ttl_ms
            members.append(Member(node, role, last_seen_ms / 1000,
                                   (now_ms - last_seen_ms) / 1000, info))
        return sorted(members, key=lambda m: m.node)


class _StreamSubscription:
    """XREAD BLOCK in a worker thread, resuming after the last entry delivered."""

    def __init__(self, store: RedisStore, key: str, last_id: bytes) -> None:
        self._store = store
        self._key = key
        self._last_id = last_id
        self._pending: deque[bytes | None] = deque()
        self._limiter = trio.CapacityLimiter(1)  # its own: a blocked read holds a thread
        self._broken = False

    def __aiter__(self) -> _StreamSubscription:
        return self

    async def __anext__(self) -> bytes | None:
        delay = RESUBSCRIBE_MIN
        while not self._pending:
            try:
                entries = await trio.to_thread.run_sync(
                    self._store._read_stream, self._key, self._last_id,
                    limiter=self._limiter, abandon_on_cancel=True)
            except (RedisError, OSError):
                self._store.stats.errors += 1
                self._broken = True
                await trio.sleep(delay)  # back off; never a busy loop while Redis is down
                delay = min(2 * delay, RESUBSCRIBE_MAX)
                continue
            if self._broken:
                self._broken = False
                self._pending.append(None)
            for entry_id, message in entries:
                self._last_id = entry_id  # advanced here, in Trio: an abandoned read loses nothing
                self._pending.append(message)
        return self._pending.popleft()


def _decode_reply(op: Op[Any], reply: Any) -> Any:
    """One op's result, or the StoreError for that op alone."""
    if isinstance(reply, Exception):
        return StoreError(_describe(reply))
    try:
        return _DECODE[type(op)](op, reply)
    except StoreError as exc:
        return exc


def _decode_record(reply: list[Any]) -> StoredSa | None:
    version, owner, fence, snapshot = reply
    if version is None:
        return None
    if version != RECORD_VERSION:
        raise StoreError(f"SA record version {version!r} is not {RECORD_VERSION!r}")
    try:
        return StoredSa(bytes(snapshot), owner.decode(), int(fence))
    except (TypeError, ValueError):
        raise StoreError("SA record does not decode") from None


def _lease_lost(op: PutSa | DeleteSa, reply: int) -> LeaseLost | None:
    return None if reply else LeaseLost(f"stale fence {op.fence} for SA {op.key.hex()}")


_QUEUE: dict[type[Op[Any]], Callable[[RedisStore, Pipeline, Any], None]] = {
    GetSa: RedisStore._q_get_sa,
    PutSa: RedisStore._q_put_sa,
    DeleteSa: RedisStore._q_delete_sa,
    Acquire: RedisStore._q_acquire,
    Renew: RedisStore._q_renew,
    Release: RedisStore._q_release,
    ClaimAddress: RedisStore._q_claim_address,
    HoldAddress: RedisStore._q_hold_address,
    FreeAddress: RedisStore._q_free_address,
    PutChild: RedisStore._q_put_child,
    DeleteChild: RedisStore._q_delete_child,
    Children: RedisStore._q_children,
    Publish: RedisStore._q_publish,
}

_DECODE: dict[type[Op[Any]], Callable[[Any, Any], Any]] = {
    GetSa: lambda op, reply: _decode_record(reply),
    PutSa: _lease_lost,
    DeleteSa: _lease_lost,
    Acquire: lambda op, reply: None if reply is None else int(reply),
    Renew: lambda op, reply: bool(reply),
    Release: lambda op, reply: bool(reply),
    ClaimAddress: lambda op, reply: None if int(reply) < 0 else int(reply),
    HoldAddress: lambda op, reply: bool(reply),
    FreeAddress: lambda op, reply: bool(reply),
    PutChild: lambda op, reply: None,
    DeleteChild: lambda op, reply: None,
    Children: lambda op, reply: {bytes(k): bytes(v) for k, v in reply.items()},
    Publish: lambda op, reply: None,
}
