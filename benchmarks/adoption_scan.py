"""What a responder's look for the SAs it should hold costs (SaPersistence.adopt): one
pass of `scan_owners` over N stored SAs in Redis, against `scan_sas` (which reads the
snapshots too), with snapshots of a realistic size. After a change of the live
responders every responder makes such a pass once a renewal round for two lease TTLs.

    .venv/bin/python benchmarks/adoption_scan.py --redis redis://127.0.0.1:6390/0 --sas 100000

Writes under a fresh key prefix and deletes it afterwards. Run by hand, not by pytest.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.store.interface import Acquire, PutSa  # noqa: E402
from cluster.store.redis_store import RedisStore  # noqa: E402

SNAPSHOT_BYTES = 1500  # a sealed snapshot of an SA with one Child SA is about this long
BATCH = 1000


async def main(url: str, sas: int, rounds: int) -> None:
    prefix = f"bench-adopt-{os.getpid()}:"
    store = RedisStore.from_url(url, prefix=prefix)
    try:
        started = time.perf_counter()
        for at in range(0, sas, BATCH):
            keys = [os.urandom(16) for _ in range(min(BATCH, sas - at))]
            fences = await store.execute([Acquire(k, "responder-1", 600.0) for k in keys])
            await store.execute([PutSa(k, os.urandom(SNAPSHOT_BYTES), "responder-1", f)
                                 for k, f in zip(keys, fences, strict=True)])
        print(f"stored {sas} SAs in {time.perf_counter() - started:.1f} s")
        for name in ("scan_owners", "scan_sas"):
            times = []
            for _ in range(rounds):
                began = time.perf_counter()
                count = 0
                async for _item in getattr(store, name)():
                    count += 1
                times.append(time.perf_counter() - began)
            assert count == sas, (name, count)
            best = min(times)
            print(f"{name}: {best:.2f} s a pass (best of {rounds}), "
                  f"{best / sas * 1e6:.1f} us per SA")
    finally:
        client = store.client
        for name in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(name)
        await store.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", required=True, help="redis:// URL of a Redis to use")
    parser.add_argument("--sas", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.redis, args.sas, args.rounds)
