"""Membership: heartbeats with a TTL, the view of the others, and what a store outage does."""

from __future__ import annotations

import trio

from cluster.store import MemoryStore, StoreError
from cluster.store.membership import Membership


async def test_members_see_each_other_and_a_silent_one_expires(autojump_clock: object) -> None:
    store = MemoryStore()
    a = Membership(store, "responder-1", "responder", 3.0, {"relay": "10.0.0.1:4800"})
    b = Membership(store, "worker-1", "worker", 3.0, {"relay": "10.0.0.2:4800"})
    changes = []
    a.on_change = lambda members: changes.append([m.node for m in members])
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        scope = trio.CancelScope()

        async def run_b() -> None:
            with scope:
                await b.run()

        nursery.start_soon(run_b)
        await trio.sleep(2.0)
        assert [m.node for m in a.members] == ["responder-1", "worker-1"]
        assert a.find("worker-1") is not None
        assert a.find("worker-1").info["relay"] == "10.0.0.2:4800"  # type: ignore[union-attr]
        assert [m.node for m in a.of_role("worker")] == ["worker-1"]
        scope.cancel()  # a clean stop leaves at once
        await trio.sleep(1.5)
        assert [m.node for m in a.members] == ["responder-1"]
        nursery.cancel_scope.cancel()
    assert changes[-1] == ["responder-1"]


class FailingStore(MemoryStore):
    fail = False

    async def heartbeat(self, *args: object, **kwargs: object) -> None:
        if self.fail:
            raise StoreError("down")
        await super().heartbeat(*args, **kwargs)  # type: ignore[arg-type]


async def test_a_store_outage_keeps_the_last_view_and_counts(autojump_clock: object) -> None:
    store = FailingStore()
    m = Membership(store, "responder-1", "responder", 3.0)
    assert await m.beat()
    store.fail = True
    assert not await m.beat()
    assert [x.node for x in m.members] == ["responder-1"]
    assert m.errors == 1
